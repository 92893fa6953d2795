"""Feature standardisation: the moments, their distributed form, and the model and checkpoints that use them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from causalrec.models import build_model
from causalrec.models.feature_scaling import (MAX_Z, FeatureStandardizer, batch_moments, combine_moments,
                                              dataset_feature_scaling, frame_feature_scaling, scaling_from_moments)
from causalrec.models.featurize import Featurizer
from causalrec.train.checkpoint import architecture_of, load_checkpoint, save_checkpoint


def frame():
    # one row has no vector, one a short one with a NaN: both fed as zeros
    return pd.DataFrame({"features": [[1.0, 10.0, 3.0], [2.0, 30.0, 3.0], None, [4.0, 50.0, 3.0], [0.5, float("nan")],
                                      [3.0, 20.0, 3.0]]})


def fed_as(values, width=3):
    """What the featurizer feeds the model: nulls and NaNs as 0, short vectors padded with 0."""
    return np.array([[0.0] * width if v is None else [0.0 if x != x else x for x in v] + [0.0] * (width - len(v))
                     for v in values])


@pytest.fixture(scope="module")
def minilm():
    from causalrec.models.text import default_encoder_path

    return default_encoder_path()


def test_blockwise_moments_merge_to_the_moments_of_all_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 3.0, size=(1000, 4))  # a large offset: where sum and sum of squares lose the variance
    blocks = [x[:1], x[1:1], x[1:400], x[400:]]  # uneven, one empty
    n, mean, m2 = combine_moments(batch_moments(b) for b in blocks)
    assert n == 1000
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2 / n, x.var(axis=0), rtol=1e-9)


def test_scaling_is_of_what_the_model_is_fed_and_leaves_constant_slots_at_zero():
    s = frame_feature_scaling(frame(), 3)
    x = fed_as(frame()["features"].tolist())
    np.testing.assert_allclose(s["feature_mean"], x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(s["feature_std"], x.std(axis=0), rtol=1e-6)
    z = FeatureStandardizer(s["feature_mean"], s["feature_std"])(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    # a slot every row shares (a count every user has) would divide by 0: it is centred and not scaled
    shared = torch.tensor([[1.0, 10.0, 3.0]]).repeat(3, 1)
    same = frame_feature_scaling(pd.DataFrame({"features": shared.tolist()}), 3)
    assert same["feature_std"] == [1.0, 1.0, 1.0]
    assert torch.all(FeatureStandardizer(same["feature_mean"], same["feature_std"])(shared) == 0)
    assert scaling_from_moments(0, None, None, 3) == {}
    with pytest.raises(ValueError, match="2 slots for a model with 3 features"):
        scaling_from_moments(2, np.zeros(2), np.zeros(2), 3)


def test_ray_dataset_moments_equal_the_in_memory_ones(ray_local):
    import ray

    df = pd.concat([frame()] * 7, ignore_index=True)
    ds = ray.data.from_pandas([df.iloc[i:i + 5] for i in range(0, len(df), 5)])  # several blocks, one short
    dist, local = dataset_feature_scaling(ds, 3), frame_feature_scaling(df, 3)
    np.testing.assert_allclose(dist["feature_mean"], local["feature_mean"], rtol=1e-12)
    np.testing.assert_allclose(dist["feature_std"], local["feature_std"], rtol=1e-12)


def tt_config(minilm, **kw):
    return {"model": "two_tower", "n_users": 3, "n_items": 5, "dim": 8, "history_len": 2, "encoder_path": minilm,
            "max_seq_len": 16, "freeze_layers": -1, "n_features": 3, **kw}


def test_text_models_project_z_scores_and_checkpoints_keep_the_moments(tmp_path, minilm):
    scaling = frame_feature_scaling(frame(), 3)
    batch = Featurizer(tt_config(minilm))(pd.DataFrame({"user_idx": [0, 1], "item_idx": [1, 2],
                                                        "features": [[1.0, 10.0, 3.0], [4.0, 50.0, 3.0]],
                                                        "user_text": ["a", "b"], "item_text": ["c", "d"]}))
    for kind in ("two_tower", "cross_encoder"):
        model = build_model({**tt_config(minilm), "model": kind, **scaling}).eval()
        z = (batch["features"] - torch.tensor(scaling["feature_mean"])) / torch.tensor(scaling["feature_std"])
        with torch.no_grad():
            torch.testing.assert_close(model._feature_vec(batch, batch["user_idx"]), model.features(z))
        # the moments are not weights: a checkpoint written before standardisation still loads strictly
        assert not any(k.startswith("feature_scale") for k in model.state_dict())
    unscaled = build_model(tt_config(minilm)).eval()
    assert unscaled.feature_scale is None
    with torch.no_grad():
        torch.testing.assert_close(unscaled._feature_vec(batch, batch["user_idx"]), unscaled.features(batch["features"]))

    mc = tt_config(minilm, **scaling)
    model = build_model(mc).eval()
    save_checkpoint(tmp_path / "ck", model, mc, {})
    loaded, mc2, _ = load_checkpoint(tmp_path / "ck")
    assert mc2["feature_mean"] == scaling["feature_mean"] and mc2["feature_std"] == scaling["feature_std"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["relevance"], model(batch)["relevance"])
    with pytest.raises(ValueError, match="2/2 slots for n_features=3"):
        build_model(tt_config(minilm, feature_mean=[0.0, 0.0], feature_std=[1.0, 1.0]))


def test_resuming_keeps_the_checkpoints_feature_moments(tmp_path, minilm):
    """The weights were learnt on the checkpoint's z-scores (or raw values): a resumed run keeps those,
    not the moments of the data it resumes on."""
    saved = frame_feature_scaling(frame(), 3)
    now = frame_feature_scaling(pd.DataFrame({"features": [[0.0, 1.0, 2.0], [5.0, 1.0, 0.0]]}), 3)
    save_checkpoint(tmp_path / "scaled", build_model(tt_config(minilm, **saved)), tt_config(minilm, **saved), {})
    save_checkpoint(tmp_path / "raw", build_model(tt_config(minilm)), tt_config(minilm), {})
    resumed = architecture_of(tmp_path / "scaled", tt_config(minilm, **now))
    assert resumed["feature_mean"] == saved["feature_mean"] and resumed["feature_std"] == saved["feature_std"]
    assert "feature_mean" not in architecture_of(tmp_path / "raw", tt_config(minilm, **now))


def test_only_text_models_record_the_moments(cfg):
    from causalrec.train.job import model_config_from

    scaling = frame_feature_scaling(frame(), 3)
    cfg.train.model = "mf"  # MF takes no features
    assert "feature_mean" not in model_config_from(cfg, 3, 5, 3, feature_scaling=scaling)
    cfg.train.model = "two_tower"
    mc = model_config_from(cfg, 3, 5, 3, feature_scaling=scaling)
    assert mc["feature_mean"] == scaling["feature_mean"] and mc["feature_std"] == scaling["feature_std"]


def test_rare_and_drifted_values_are_clipped_not_blown_up():
    """An attribute on 1 train row in 10,000 has std 0.01: unclipped, a candidate carrying it enters at z = 100."""
    rare = np.zeros((10_000, 1))
    rare[0] = 1.0
    s = frame_feature_scaling(pd.DataFrame({"features": rare.tolist()}), 1)
    z = FeatureStandardizer(s["feature_mean"], s["feature_std"])(torch.tensor([[1.0], [0.0], [-5.0]]))
    assert z[0, 0].item() == MAX_Z and z[2, 0].item() == -MAX_Z
    assert z[1, 0].item() == pytest.approx(-0.01, abs=1e-4)  # ordinary values untouched
