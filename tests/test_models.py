"""Models, featurizer and checkpoints: shapes, id handling, cold items, round trips."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from causalrec.models import build_model
from causalrec.models.featurize import Featurizer
from causalrec.train.checkpoint import architecture_of, load_checkpoint, load_optimizer_state, save_checkpoint


def rows():
    return pd.DataFrame({
        "user_idx": [0, 1, -1, 2], "item_idx": [1, 7, 3, -1],
        "features": [[0.5, 1.5, 9.0], None, [2.0], [0.0, 0.0]],
        "history_item_idx": [[0, 1, 2, 3], [], None, [2, 99]],
        "user_text": ["likes wool", None, "new user", "cotton fan"],
        "item_text": ["wool coat", "red jacket", None, "cotton shirt"],
        "label": [4.0, None, 2.0, 5.0], "observed": [1, 0, 1, 1], "is_mcar": [True, False, False, True],
        "exposure_propensity": [0.5, 0.2, 0.1, 0.9],
    })


@pytest.fixture(scope="module")
def minilm():
    from causalrec.models.text import default_encoder_path

    return default_encoder_path()


def mf_config(**kw):
    return {"model": "mf", "n_users": 3, "n_items": 5, "dim": 4, "n_features": 2, **kw}


def test_featurizer_maps_unknown_ids_pads_and_passes_targets():
    b = Featurizer(mf_config())(rows())
    assert b["user_idx"].tolist() == [0, 1, 3, 2]  # -1 -> unknown row 3
    assert b["item_idx"].tolist() == [1, 5, 3, 5]  # 7 (out of range) and -1 -> unknown row 5
    assert b["features"].tolist() == [[0.5, 1.5], [0, 0], [2.0, 0], [0, 0]]  # truncated / padded / null
    assert torch.isnan(b["label"][1]) and b["label"][3].item() == 5.0
    assert b["is_mcar"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert "history_item_idx" not in b  # MF ignores history


def test_featurizer_history_keeps_most_recent_and_drops_unknown(minilm):
    mc = {"model": "two_tower", "n_users": 3, "n_items": 5, "history_len": 3, "encoder_path": minilm, "max_seq_len": 8}
    b = Featurizer(mc)(rows())
    # histories are stored most recent first: [0, 1, 2, 3] cut to 3 keeps 0, 1, 2 (the oldest, 3, goes)
    assert b["history_item_idx"].tolist() == [[0, 1, 2], [-1, -1, -1], [-1, -1, -1], [2, -1, -1]]
    assert b["user_input_ids"].shape == (4, 8) and b["item_attention_mask"][2].sum() == 2  # [CLS][SEP] for null


def test_featurizer_tokenizes_repeated_texts_once_with_the_same_result(minilm):
    from causalrec.models.featurize import _tokenizer

    tok = _tokenizer(minilm)
    users, items = ["likes wool", "", "likes wool", "new user"], ["wool coat", "wool coat", "red jacket", "wool coat"]
    for kind, args in (("two_tower", (items,)), ("cross_encoder", (users, items))):
        f = Featurizer({"model": kind, "n_users": 3, "n_items": 5, "encoder_path": minilm, "max_seq_len": 8})
        ids, mask = f._tokens(*args)
        ref = tok(*args, max_length=8, truncation=True, padding="max_length", return_tensors="pt")
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_mf_is_biased_dot_product_and_unknown_rows_are_neutral():
    model = build_model(mf_config(global_bias=3.5))
    b = Featurizer(mf_config())(rows())
    out = model(b)
    ids = model.ids
    u, i = b["user_idx"][0], b["item_idx"][0]
    expected = ids.user.weight[u] @ ids.item.weight[i] + ids.user_bias.weight[u, 0] + ids.item_bias.weight[i, 0] + 3.5
    assert out["relevance"][0].item() == pytest.approx(expected.item(), rel=1e-5)
    # both ids unknown at init: only the global bias remains
    unk = model({"user_idx": torch.tensor([3]), "item_idx": torch.tensor([5])})
    assert unk["relevance"].item() == pytest.approx(3.5)


def test_click_task_and_uplift_heads():
    model = build_model(mf_config(task="click", uplift=True, imputation=True))
    out = model(Featurizer(mf_config())(rows()))
    assert torch.all((out["relevance"] > 0) & (out["relevance"] < 1))
    assert torch.allclose(out["uplift"], out["y1"] - out["y0"])
    assert out["imputation"].shape == (4,)
    with pytest.raises(ValueError, match="expected one of"):
        build_model({"model": "gbdt", "n_users": 1, "n_items": 1})


def test_two_tower_scores_cold_items_from_text_and_caches_item_vectors(minilm):
    mc = {"model": "two_tower", "n_users": 3, "n_items": 5, "dim": 8, "history_len": 2, "encoder_path": minilm,
          "max_seq_len": 16, "freeze_layers": -1}
    model = build_model(mc).eval()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    cold = pd.DataFrame({"user_idx": [0, 0], "item_idx": [-1, -1], "user_text": ["likes wool"] * 2,
                         "item_text": ["wool winter coat", "pink plastic sandals"]})
    f = Featurizer(mc)
    with torch.no_grad():
        out = model(f(cold))
        assert abs(out["relevance"][0] - out["relevance"][1]) > 1e-6  # the text decides
        # item vectors do not depend on the user: computed once, reused for every user
        other_user = cold.assign(user_idx=[2, 1], user_text=["x", "y"])
        assert torch.allclose(model.encode_items(f(cold)), model.encode_items(f(other_user)))


def test_two_tower_text_match_starts_from_the_pretrained_similarity(minilm):
    """Untrained and with both ids unknown (as after id dropout), the text-match path alone ranks the
    item whose text equals the user's text first; the cached vectors + score equal forward."""
    torch.manual_seed(0)
    mc = {"model": "two_tower", "task": "click", "n_users": 3, "n_items": 5, "dim": 8, "history_len": 2,
          "encoder_path": minilm, "max_seq_len": 16, "freeze_layers": -1}
    model = build_model(mc).eval()
    assert model.text_match and model.text_scale.item() == 5.0
    texts = ["stainless steel lab tweezers", "pink plastic garden sandals", "blue cotton baby blanket",
             "acoustic guitar strings", "ceramic coffee mug"]
    users = pd.DataFrame({"user_idx": -1, "item_idx": -1, "user_text": texts[0], "item_text": texts})
    f = Featurizer(mc)
    b = f(users)
    with torch.no_grad():
        logit = model(b)["logit"]
        assert int(logit.argmax()) == 0 and (logit[0] - logit[1:]).min() > 1.0
        # the bulk path: item vectors cached once, scored against a user vector
        uv, iv = model.encode_users(b), model.encode_items(b)
        assert uv.shape[-1] == iv.shape[-1] == 8 + model.hidden
        torch.testing.assert_close(model.score(uv, iv, b["user_idx"], b["item_idx"])["logit"], logit)
        grid = model.score(uv[:1, None], iv[None], b["user_idx"][:1, None], b["item_idx"][None])["logit"]
        torch.testing.assert_close(grid[0], logit)
        # the text term is the scaled cosine of the encoder's own vectors
        _, ut = model.split_vectors(uv)
        _, it = model.split_vectors(iv)
        raw_u = model.encode_text(b["user_input_ids"], b["user_attention_mask"])
        raw_i = model.encode_text(b["item_input_ids"], b["item_attention_mask"])
        cos = torch.nn.functional.cosine_similarity(raw_u, raw_i, dim=-1)
        torch.testing.assert_close(model.text_match_logit(ut, it), 5.0 * cos)
    # gradients reach the scale
    model.train()
    model(b)["logit"].sum().backward()
    assert model.text_scale.grad is not None and model.text_scale.grad != 0

    off = build_model({**mc, "text_match": False}).eval()
    assert not hasattr(off, "text_scale")
    with torch.no_grad():
        assert off.encode_items(b).shape[-1] == 8
        assert torch.allclose(off(b)["logit"], off.score(off.encode_users(b), off.encode_items(b),
                                                         b["user_idx"], b["item_idx"])["logit"])
    assert build_model({**mc, "text_match_init": 2.5}).text_scale.item() == 2.5
    assert build_model({**mc, "task": "rating", "text_match": True}).text_scale.item() == 1.0
    assert not build_model({**mc, "task": "rating"}).text_match  # off by default for rating regression


def test_two_tower_checkpoint_without_text_match_key_loads_as_before(tmp_path, minilm):
    """A two-tower saved before the text-match path (no key in model_config.json, no text_scale
    weight) still loads strictly; a new one records the flag it was built with."""
    import json

    mc = {"model": "two_tower", "task": "click", "n_users": 3, "n_items": 5, "dim": 8, "history_len": 2,
          "encoder_path": minilm, "max_seq_len": 16, "freeze_layers": -1}
    old = build_model({**mc, "text_match": False}).eval()
    save_checkpoint(tmp_path / "old", old, mc, {})
    cfg_path = tmp_path / "old" / "model_config.json"
    saved = json.loads(cfg_path.read_text())
    saved.pop("text_match")
    cfg_path.write_text(json.dumps(saved))
    loaded, mc2, _ = load_checkpoint(tmp_path / "old")
    assert mc2["text_match"] is False and not hasattr(loaded, "text_scale")
    # resuming training from it keeps its architecture although new configs default the path on
    assert architecture_of(tmp_path / "old", mc)["text_match"] is False
    assert architecture_of(tmp_path / "old", mf_config()) == mf_config()
    with torch.no_grad():
        torch.testing.assert_close(loaded(Featurizer(mc2)(rows()))["logit"], old(Featurizer(mc)(rows()))["logit"])

    new = build_model(mc).eval()  # no key: built with the path, and the saved config says so
    save_checkpoint(tmp_path / "new", new, mc, {})
    loaded, mc3, _ = load_checkpoint(tmp_path / "new")
    assert mc3["text_match"] is True and loaded.text_scale.item() == new.text_scale.item()


def test_cross_encoder_forward_and_partial_freeze(minilm):
    mc = {"model": "cross_encoder", "n_users": 3, "n_items": 5, "dim": 8, "encoder_path": minilm,
          "max_seq_len": 24, "freeze_layers": 4, "n_features": 2}
    model = build_model(mc)
    layers = model.encoder.encoder.layer
    assert not any(p.requires_grad for p in layers[3].parameters())
    assert all(p.requires_grad for p in layers[4].parameters())
    out = model(Featurizer(mc)(rows()))
    assert out["relevance"].shape == (4,) and torch.isfinite(out["relevance"]).all()


def test_random_init_builds_the_same_architecture(minilm):
    from causalrec.models.text import load_encoder

    pre, rnd = load_encoder(minilm), load_encoder(minilm, random_init=True)
    assert sum(p.numel() for p in pre.parameters()) == sum(p.numel() for p in rnd.parameters())
    assert not torch.allclose(pre.embeddings.word_embeddings.weight, rnd.embeddings.word_embeddings.weight)
    shape_only = load_encoder(None, random_init=True)  # no config anywhere: the MiniLM-L6 shape
    assert shape_only.config.hidden_size == 384 and shape_only.config.num_hidden_layers == 6


def test_checkpoint_round_trip_mf_with_optimizer(tmp_path):
    mc = mf_config(imputation=True)
    model = build_model(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    b = Featurizer(mc)(rows())
    model(b)["relevance"].sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, mc, {"epoch": 3}, opt)
    loaded, mc2, meta = load_checkpoint(tmp_path / "ck")
    assert mc2 == mc and meta == {"epoch": 3}
    with torch.no_grad():
        assert torch.allclose(model(b)["relevance"], loaded(b)["relevance"])
        assert torch.allclose(model(b)["imputation"], loaded(b)["imputation"])
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=0.1)
    assert load_optimizer_state(tmp_path / "ck", opt2)
    assert opt2.state_dict()["state"][0]["step"].item() == 1


def test_checkpoint_round_trip_text_model_carries_encoder_config_and_tokenizer(tmp_path, minilm):
    mc = {"model": "two_tower", "n_users": 3, "n_items": 5, "dim": 8, "history_len": 2, "encoder_path": minilm,
          "max_seq_len": 16, "freeze_layers": -1}
    model = build_model(mc).eval()
    save_checkpoint(tmp_path / "tt", model, mc, {})
    loaded, mc2, _ = load_checkpoint(tmp_path / "tt")
    assert mc2["tokenizer_path"] == str(tmp_path / "tt" / "tokenizer")
    with torch.no_grad():
        a = model(Featurizer(mc)(rows()))["relevance"]
        b = loaded(Featurizer(mc2)(rows()))["relevance"]
    assert torch.allclose(a, b, atol=1e-5)


def test_load_checkpoint_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_frozen_encoder_text_cache_matches_uncached(minilm):
    base = {"model": "cross_encoder", "n_users": 3, "n_items": 5, "dim": 8, "encoder_path": minilm,
            "max_seq_len": 16, "freeze_layers": -1}
    cached = build_model(base).eval()
    plain = build_model({**base, "cache_frozen_text": False}).eval()
    plain.load_state_dict(cached.state_dict())
    b = Featurizer(base)(rows())
    with torch.no_grad():
        first = cached(b)["relevance"]
        assert len(cached.text_cache) == 4
        again = cached(b)["relevance"]  # served from the cache
        ref = plain(b)["relevance"]
    assert torch.allclose(first, ref, atol=1e-5) and torch.allclose(again, ref, atol=1e-5)


def test_encoder_attention_implementations_agree(minilm):
    """sdpa (the default) and eager attention are one function; an unknown kernel falls back with a warning."""
    from causalrec.models.text import load_encoder

    encs = {impl: load_encoder(minilm, attn_implementation=impl).eval() for impl in ("sdpa", "eager")}
    assert load_encoder(minilm).config._attn_implementation == "sdpa"
    assert {k: e.config._attn_implementation for k, e in encs.items()} == {k: k for k in encs}
    ids = torch.randint(1000, 5000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        out = {k: e(input_ids=ids, attention_mask=mask).last_hidden_state for k, e in encs.items()}
    keep = mask.bool()
    assert torch.allclose(out["sdpa"][keep], out["eager"][keep], atol=1e-4)
    with pytest.warns(RuntimeWarning, match="not available"):
        fallback = load_encoder(None, random_init=True, attn_implementation="no_such_kernel")
    assert fallback.config._attn_implementation == "sdpa"


def test_sdpa_kernel_order_is_a_no_op_on_cpu_and_the_model_still_trains(minilm):
    from causalrec.models.text import sdpa_priority

    mc = {"model": "cross_encoder", "n_users": 3, "n_items": 5, "dim": 8, "encoder_path": minilm, "max_seq_len": 16,
          "attn_implementation": "eager", "sdpa_backends": "efficient,cudnn"}
    model = build_model(mc)
    assert model.encoder.config._attn_implementation == "eager"
    out = model(Featurizer(mc)(rows()))
    out["relevance"].sum().backward()
    grad = model.encoder.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    import contextlib

    assert isinstance(sdpa_priority(torch.device("cpu"), "efficient,flash"), contextlib.nullcontext)
    assert isinstance(sdpa_priority(torch.device("cuda"), "default"), contextlib.nullcontext)




def test_ids_training_never_reached_are_looked_up_as_the_unknown_row(minilm):
    """Rows sized by id_index but without a training row (set_known_ids) score like an unseen id (-1):
    MF, the imputation model, the two-tower's forward / bulk path / history, the cross-encoder."""
    from causalrec.models.mf import set_known_ids

    torch.manual_seed(0)
    users = torch.tensor([True, True, False])
    items = torch.tensor([True, False, True, True, False])
    known = {"user": users, "item": items, "imputation_user": users, "imputation_item": ~items}
    mf = build_model(mf_config(imputation=True)).eval()
    set_known_ids(mf, known)
    with torch.no_grad():
        cold = mf({"user_idx": torch.tensor([2, 0, 0]), "item_idx": torch.tensor([0, 1, 4])})
        unk = mf({"user_idx": torch.tensor([3, 0, 0]), "item_idx": torch.tensor([0, 5, 5])})
    torch.testing.assert_close(cold["logit"], unk["logit"])
    assert not torch.allclose(unk["imputation"][1:], cold["imputation"][1:])  # own masks: items 1, 4 known there
    assert mf.ids.user_known.tolist() == [True, True, False, True]  # the unknown row itself stays known

    for kind in ("two_tower", "cross_encoder"):
        mc = {"model": kind, "n_users": 3, "n_items": 5, "dim": 8, "history_len": 2, "encoder_path": minilm,
              "max_seq_len": 16, "freeze_layers": -1}
        model = build_model(mc).eval()
        set_known_ids(model, known)
        f = Featurizer(mc)
        frame = pd.DataFrame({"user_idx": [2, 0], "item_idx": [1, 4], "user_text": ["likes wool"] * 2,
                              "item_text": ["wool coat", "red jacket"], "history_item_idx": [[0, 1], [1, 4]]})
        unseen = frame.assign(user_idx=[-1, 0], item_idx=[-1, -1], history_item_idx=[[0], []])
        with torch.no_grad():
            torch.testing.assert_close(model(f(frame))["logit"], model(f(unseen))["logit"])
            if kind == "two_tower":  # the bulk path scoring uses
                b = f(frame)
                uv, iv = model.encode_users(b), model.encode_items(b)
                torch.testing.assert_close(model.score(uv, iv, b["user_idx"], b["item_idx"])["logit"],
                                           model(f(unseen))["logit"])
    with pytest.raises(ValueError, match="3 ids"):
        set_known_ids(mf, {"user": [True, True], "item": items})


def test_known_id_masks_are_saved_and_old_checkpoints_load_all_known(tmp_path):
    """The masks travel in model.safetensors; a checkpoint saved before they existed loads with
    every id known (as it was trained and scored), but any other missing weight still fails."""
    from safetensors.torch import load_file, save_file

    from causalrec.models.mf import set_known_ids

    mc = mf_config(imputation=True)
    model = build_model(mc)
    set_known_ids(model, {"user": [True, False, True], "item": [False, True, True, True, True]})
    save_checkpoint(tmp_path / "ck", model, mc, {})
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.ids.user_known.tolist() == [True, False, True, True]
    assert loaded.imputation.ids.item_known.tolist() == [False, True, True, True, True, True]

    weights = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(weights))
    save_file({k: v for k, v in sd.items() if not k.endswith("_known")}, str(weights))
    old, _, _ = load_checkpoint(tmp_path / "ck")
    assert all(old.ids.user_known) and all(old.imputation.ids.item_known)
    torch.testing.assert_close(old.ids.user.weight, model.ids.user.weight)
    save_file({k: v for k, v in sd.items() if k != "ids.user_bias.weight"}, str(weights))
    with pytest.raises(RuntimeError, match="ids.user_bias.weight"):
        load_checkpoint(tmp_path / "ck")


def test_frozen_encoder_runs_in_eval_mode_so_the_cache_holds_clean_vectors(minilm):
    """train_step calls model.train(); a fully frozen encoder must still encode without dropout, or
    the text cache would keep one noisy draw per text for good (and differ from scoring)."""
    mc = {"model": "two_tower", "n_users": 3, "n_items": 5, "dim": 8, "history_len": 0, "encoder_path": minilm,
          "max_seq_len": 8, "freeze_layers": -1, "id_dropout": 0.0}
    torch.manual_seed(0)
    model = build_model(mc)
    assert model.encoder.config.hidden_dropout_prob > 0
    model.train()
    assert model.training and not model.encoder.training
    b = Featurizer(mc)(rows())
    model(b)  # a training forward fills the cache
    clean = build_model({**mc, "cache_frozen_text": False}).eval()
    clean.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(b["item_input_ids"], b["item_attention_mask"]),
                                   clean.encode_text(b["item_input_ids"], b["item_attention_mask"]))
    # a partly trainable encoder keeps its dropout in training
    partial = build_model({**mc, "freeze_layers": 2}).train()
    assert partial.encoder.training


def test_ragged_history_truncation_keeps_the_most_recent_items():
    """A checkpoint trained with history_len 2 served a features.history_length 4 history (most recent
    first, as user_features.history_item_ids and training_examples hold it) sees the two most recent items."""
    import numpy as np

    from causalrec.models.featurize import _ragged

    recent_first = [[7, 5, 3, 1], [4], None]
    assert _ragged(recent_first, 2, np.int64, -1).tolist() == [[7, 5], [4, -1], [-1, -1]]
