"""The CPU training path for real: Ray Train with 2 workers x 0.5 CPU, MF and MiniLM two-tower."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from causalrec.schemas import TRAINING_EXAMPLES


def synthetic_examples(n_users=30, n_items=40, n_train=400, n_valid=120, seed=0) -> pd.DataFrame:
    """training_examples-shaped rows: ratings from latent factors, exposure biased towards liked items."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(n_users, 3)), rng.normal(size=(n_items, 3))
    words = ["red", "blue", "wool", "cotton", "jacket", "coat", "warm", "light"]
    item_text = [" ".join(rng.choice(words, 3)) for _ in range(n_items)]
    rows = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for k in range(n):
            u, i = int(rng.integers(n_users)), int(rng.integers(n_items))
            score = float(pu[u] @ qi[i])
            rating = float(np.clip(np.round(3 + score), 1, 5))
            observed = int(split == "valid" or rng.random() < 0.8)
            rows.append({
                "example_id": f"{split}-{k}", "split": split, "user_id": f"u{u}", "item_id": f"i{i}",
                "user_idx": u, "item_idx": i, "observed": observed, "label": rating if observed else None,
                "outcome": float(rating >= 4) if observed else None, "treated": int(rng.random() < 0.5),
                "exposure_propensity": float(np.clip(1 / (1 + np.exp(-score)), 0.05, 0.95)),
                "sample_weight": 1.0 if observed else 4.0,
                "treatment_propensity": 0.5, "features": [float(score > 0), float(u % 2)],
                "history_item_idx": [int(x) for x in rng.integers(n_items, size=3)],
                "user_text": f"user {u % 4}", "item_text": item_text[i], "is_mcar": split == "valid",
                "event_time": pd.Timestamp("2024-01-01", tz="UTC"),
            })
    return pd.DataFrame(rows)


def write_examples(cfg, df: pd.DataFrame) -> str:
    import pyarrow as pa
    import ray

    path = cfg.table_path("training_examples")
    table = pa.Table.from_pandas(df[TRAINING_EXAMPLES.names], schema=TRAINING_EXAMPLES.arrow_schema(),
                                 preserve_index=False)
    # two files per split so each of the two workers gets a shard
    ray.data.from_arrow(table).repartition(4).write_delta(path, partition_by=["split"])
    return path


@pytest.fixture
def train_cfg(cfg, tmp_path):
    cfg.train.num_workers = 2
    cfg.train.cpus_per_worker = 0.5
    cfg.train.batch_size = 64
    cfg.train.embedding_dim = 8
    cfg.train.learning_rate = 0.05
    cfg.train.early_stopping_patience = 0
    cfg.train.max_failures = 0
    cfg.storage.checkpoint_dir = str(tmp_path / "ckpt")
    return cfg


def _epochs(row) -> list:
    return json.loads(row["metrics_json"])["epochs"]


def test_mf_two_workers_loss_falls_and_resumes(ray_local, train_cfg):
    from causalrec.context import Context
    from causalrec.train.checkpoint import load_checkpoint
    from causalrec.train.job import latest_train_run, run

    cfg = train_cfg
    write_examples(cfg, synthetic_examples())
    import pyarrow as pa
    from deltalake import write_deltalake

    from causalrec.schemas import ID_INDEX

    ids = pd.DataFrame({"kind": ["user"] * 30 + ["item"] * 40, "id": [f"u{k}" for k in range(30)] +
                        [f"i{k}" for k in range(40)], "idx": list(range(30)) + list(range(40))})
    write_deltalake(cfg.table_path("id_index"), pa.Table.from_pandas(ids, schema=ID_INDEX.arrow_schema(),
                                                                     preserve_index=False))
    cfg.train.model, cfg.train.objective, cfg.train.epochs = "mf", "ips", 3
    tracking = f"sqlite:///{cfg.checkpoint_dir}/mlflow.db"  # a real MLflow tracking store
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    cfg.train.mlflow_tracking_uri = tracking
    summary = run(Context(cfg))
    cfg.train.mlflow_tracking_uri = None
    assert summary["valid_mode"] == "mcar"  # the valid split is MCAR
    assert summary["id_index_version"] == 0
    row = latest_train_run(cfg)
    epochs = _epochs(row)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] * 0.8
    assert epochs[0]["valid_rows"] == 120  # both workers' shards were all-reduced

    # MLflow got the run: its name, the hyperparameters and every epoch's metrics, as train_runs has them
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    (logged,) = client.search_runs(experiment_ids=["0"])
    assert logged.info.run_name == row["run_id"]
    hyper = json.loads(row["hyperparameters_json"])
    assert logged.data.params["learning_rate"] == str(hyper["learning_rate"])
    history = client.get_metric_history(logged.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (e["epoch"], pytest.approx(e["train_loss"], rel=1e-9)) for e in epochs]
    assert len(client.get_metric_history(logged.info.run_id, "valid_metric")) == 3

    model, mc, meta = load_checkpoint(row["checkpoint_path"])
    assert mc["model"] == "mf" and mc["n_users"] == 30 and meta["train_state"]["epoch"] >= 1
    assert meta["id_index_version"] == 0  # what scoring reads id_index at
    assert type(model).__name__ == "MF"

    # resume from the last epoch's checkpoint: training continues at epoch 3, loss where it stopped
    last_ckpt = sorted((p for p in __import__("pathlib").Path(cfg.checkpoint_dir, row["run_id"]).glob("epoch_*")))[-1]
    cfg.train.resume_from, cfg.train.epochs = str(last_ckpt), 5
    run(Context(cfg))
    resumed = _epochs(latest_train_run(cfg))
    # the history carries over from the checkpoint; only epochs 3 and 4 were trained now
    assert [e["epoch"] for e in resumed] == [0, 1, 2, 3, 4]
    assert [e["train_loss"] for e in resumed[:3]] == [e["train_loss"] for e in epochs]
    assert resumed[3]["train_loss"] < epochs[0]["train_loss"] * 0.8  # continued, not restarted

    # deterministic shards (train.deterministic): one uninterrupted 5-epoch run reproduces the
    # stopped-and-resumed one epoch for epoch - same rows, same order, same optimizer state
    cfg.train.resume_from = None
    run(Context(cfg))
    straight = _epochs(latest_train_run(cfg))
    assert [e["train_loss"] for e in straight] == pytest.approx([e["train_loss"] for e in resumed], rel=1e-6)
    assert [e["valid_metric"] for e in straight] == pytest.approx([e["valid_metric"] for e in resumed], rel=1e-6)

    # resuming a finished run (epoch 5 of 5) trains nothing and records it, instead of failing
    done_ckpt = sorted(Path(cfg.checkpoint_dir, latest_train_run(cfg)["run_id"]).glob("epoch_*"))[-1]
    cfg.train.resume_from = str(done_ckpt)
    from deltalake import DeltaTable

    # a tracking store that fails fails the stage before its train_runs commit: a rerun adds one row, not two
    cfg.train.mlflow_tracking_uri = "no-such-scheme://tracking"
    with pytest.raises(Exception, match="no-such-scheme"):
        run(Context(cfg))
    assert len(DeltaTable(cfg.table_path("train_runs")).to_pandas()) == 3
    cfg.train.mlflow_tracking_uri = None
    run(Context(cfg))
    assert [e["epoch"] for e in _epochs(latest_train_run(cfg))] == [0, 1, 2, 3, 4]
    # every recorded checkpoint is the one of the run's recorded best epoch
    runs = DeltaTable(cfg.table_path("train_runs")).to_pandas()
    assert len(runs) == 4
    for _, r in runs.iterrows():
        meta = json.loads((Path(r["checkpoint_path"]) / "meta.json").read_text())
        assert meta["metrics"]["epoch"] == r["best_epoch"] == meta["train_state"]["best_epoch"]


def test_minilm_two_tower_two_workers(ray_local, train_cfg):
    from causalrec.context import Context
    from causalrec.train.checkpoint import load_checkpoint
    from causalrec.train.job import latest_train_run, run

    cfg = train_cfg
    df = synthetic_examples(n_train=240, n_valid=64)
    write_examples(cfg, df)
    cfg.train.model, cfg.train.objective, cfg.train.epochs = "two_tower", "snips", 2
    cfg.train.max_seq_len, cfg.train.freeze_layers, cfg.train.learning_rate = 16, 5, 0.02
    cfg.train.batch_size = 40
    cfg.features.history_length = 3
    run(Context(cfg))
    row = latest_train_run(cfg)
    epochs = _epochs(row)
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]
    model, mc, _ = load_checkpoint(row["checkpoint_path"])
    assert mc["model"] == "two_tower" and mc["max_seq_len"] == 16
    assert "tokenizer" in mc["tokenizer_path"]  # the checkpoint carries its tokenizer
    # it standardises its features with the train split's moments (the valid rows' differ), read by Ray Data
    train_features = np.array(df.loc[df["split"] == "train", "features"].tolist())
    np.testing.assert_allclose(mc["feature_mean"], train_features.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(mc["feature_std"], train_features.std(axis=0), rtol=1e-9)
    assert model.feature_scale is not None


def test_fit_local_early_stops_on_a_custom_valid_fn():
    import torch

    from causalrec.train.local import fit_local

    df = synthetic_examples(n_users=10, n_items=12, n_train=80, n_valid=0)
    train = df[df["observed"] == 1].reset_index(drop=True)
    scripted, snapshots = iter([3.0, 1.0, 2.0, 2.5, 0.5]), []

    def valid_fn(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scripted)

    mc = {"model": "mf", "task": "rating", "n_users": 10, "n_items": 12, "dim": 4, "global_bias": 3.0}
    fit = fit_local(mc, "naive", train, None, epochs=5, batch_size=16, patience=2, valid_fn=valid_fn)
    assert [h["valid_metric"] for h in fit["history"]] == [3.0, 1.0, 2.0, 2.5]  # stopped after 2 bad epochs
    assert fit["best_epoch"] == 1 and fit["best_valid"] == 1.0
    assert all(torch.equal(v, snapshots[1][k]) for k, v in fit["model"].state_dict().items())


def test_tune_apply_params_updates_the_loop_config():
    from causalrec.train.tune import apply_params, search_space

    lc = {"lr": 0.01, "weight_decay": 0.0, "clip": 0.01, "model_config": {"dim": 8}, "hyperparameters": {"epochs": 3}}
    new = apply_params(lc, {"learning_rate": 0.05, "embedding_dim": 32, "ips_clip": 0.1, "weight_decay": 1e-3})
    assert (new["lr"], new["model_config"]["dim"], new["clip"], new["weight_decay"]) == (0.05, 32, 0.1, 1e-3)
    assert lc["model_config"]["dim"] == 8  # the original is untouched
    assert new["hyperparameters"]["epochs"] == 3 and new["hyperparameters"]["embedding_dim"] == 32
    assert "ips_clip" not in search_space("naive", "mf") and "ips_clip" in search_space("ips", "mf")
    # the two-tower's text-match temperature is searched only where the path exists
    assert "text_match_init" in search_space("naive", "two_tower", text_match=True)
    assert "text_match_init" not in search_space("naive", "two_tower") | search_space("naive", "mf", True)
    assert apply_params(lc, {"text_match_init": 20.0})["model_config"]["text_match_init"] == 20.0
    # DR-JL's label-fit weight: searched for dr_jl only, and the trial's objective is built with it
    assert "dr_label_fit_weight" in search_space("dr_jl", "mf") and "dr_label_fit_weight" not in search_space("ips", "mf")
    assert apply_params(lc, {"dr_label_fit_weight": 0.5})["dr_label_fit_weight"] == 0.5


def test_tune_records_the_validation_error_a_trial_was_chosen_on():
    """get_best_result(scope="all") picks a trial by its best epoch, but Result.metrics is its last
    report: a trial reporting 1.0 then 3.0 was recorded as 3.0, worse than a trial not chosen."""
    from types import SimpleNamespace

    from causalrec.train.tune import best_reported

    chosen = SimpleNamespace(metrics={"valid_metric": 3.0, "training_iteration": 2},
                             metrics_dataframe=pd.DataFrame({"valid_metric": [1.0, 3.0]}))
    assert best_reported(chosen) == 1.0
    # a trial with no per-epoch frame (or only NaN in it) falls back to its last report
    assert best_reported(SimpleNamespace(metrics={"valid_metric": 2.0}, metrics_dataframe=None)) == 2.0
    assert best_reported(SimpleNamespace(metrics={"valid_metric": 2.0},
                                         metrics_dataframe=pd.DataFrame({"valid_metric": [np.nan]}))) == 2.0


@pytest.mark.parametrize("main, baseline", [("naive", "dr_jl"), ("dr_jl", "naive"), ("uplift", "naive"),
                                            ("ips", "uplift")])
def test_a_baseline_run_builds_the_model_its_own_objective_needs(cfg, main, baseline):
    """Baselines were built for the main objective: naive beside dr_jl carried an imputation model no loss
    used (DDP's reduction fails on it), and dr_jl beside naive had none (its first step raised)."""
    from causalrec.train.job import run_config
    from causalrec.train.objectives import needs_imputation, needs_uplift

    cfg.train.model, cfg.train.objective = "mf", main
    shape = dict(n_users=10, n_items=12, n_features=3)
    for objective in (None, baseline):
        lc = run_config(cfg, shape, None, "ips", objective)
        mc = lc["model_config"]
        assert lc["objective"] == (objective or main)
        assert (mc["imputation"], mc["uplift"]) == (needs_imputation(lc["objective"]), needs_uplift(lc["objective"]))


def test_dr_label_fit_weight_reaches_the_objective_from_the_config(cfg):
    """train.dr_label_fit_weight -> loop config -> the objective the Ray loop and fit_local build."""
    from causalrec.train.job import loop_config_from
    from causalrec.train.objectives import build_objective, objective_options

    cfg.train.objective, cfg.train.dr_label_fit_weight = "dr_jl", 0.25
    lc = loop_config_from(cfg, {"model": "mf"}, "ips")
    assert lc["hyperparameters"]["dr_label_fit_weight"] == 0.25
    assert build_objective("dr_jl", "rating", 0.01, **objective_options("dr_jl", lc)).label_fit_weight == 0.25
    assert objective_options("ips", lc) == {}  # other objectives take no such option


def test_mlflow_logging_sends_params_and_per_epoch_metrics(monkeypatch, cfg):
    """The MLflow calls the train stage makes (a recording stand-in for the mlflow module)."""
    import contextlib
    import sys
    import types

    from causalrec.train.job import _log_mlflow

    calls = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    fake.start_run = lambda run_name: (calls.append(("run", run_name)), contextlib.nullcontext())[1]
    fake.log_params = lambda p: calls.append(("params", p))
    fake.log_metrics = lambda m, step: calls.append(("metrics", step, m))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    metrics = {"epochs": [{"epoch": 0, "train_loss": 2.0, "valid_metric": 1.5},
                          {"epoch": 1, "train_loss": 1.0, "valid_metric": None}]}
    _log_mlflow(cfg, "run-1", {"learning_rate": 0.01, "tuned": {"x": 1}}, metrics)
    assert calls == []  # no tracking URI configured: nothing is logged
    cfg.train.mlflow_tracking_uri = "file:///tmp/mlruns"
    _log_mlflow(cfg, "run-1", {"learning_rate": 0.01, "tuned": {"x": 1}}, metrics)
    assert calls == [("uri", "file:///tmp/mlruns"), ("run", "run-1"), ("params", {"learning_rate": 0.01}),
                     ("metrics", 0, {"train_loss": 2.0, "valid_metric": 1.5}), ("metrics", 1, {"train_loss": 1.0})]


@pytest.mark.slow
def test_tune_optuna_asha_picks_and_records_values(ray_local, train_cfg):
    from causalrec.context import Context
    from causalrec.train.checkpoint import load_checkpoint
    from causalrec.train.job import latest_train_run, run

    cfg = train_cfg
    write_examples(cfg, synthetic_examples())
    cfg.train.model, cfg.train.objective, cfg.train.epochs = "mf", "snips", 3
    cfg.train.tune_trials = 3
    run(Context(cfg))
    row = latest_train_run(cfg)
    tuned = json.loads(row["hyperparameters_json"])["tuned"]
    assert {"learning_rate", "weight_decay", "embedding_dim", "valid_metric"} <= set(tuned)
    _, mc, meta = load_checkpoint(row["checkpoint_path"])
    assert mc["dim"] == tuned["embedding_dim"]
    assert meta["hyperparameters"]["learning_rate"] == tuned["learning_rate"]


def test_table_stats_marks_the_ids_training_reaches(cfg):
    """Catalogue ids (id_index) with no observed train row are not 'known'; DR-JL's prediction model
    also learns from the unobserved rows, its imputation model does not."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from causalrec.schemas import ID_INDEX
    from causalrec.train.job import known_ids, table_stats

    base = synthetic_examples(n_users=6, n_items=8, n_train=1, n_valid=0).iloc[0].to_dict()
    rows = [("train", 0, 0, 1), ("train", 1, 1, 1), ("train", 2, 2, 0), ("train", 0, 3, 1), ("valid", 3, 4, 1)]
    df = pd.DataFrame([{**base, "split": s, "user_idx": u, "item_idx": i, "observed": o, "label": 3.0 if o else None}
                       for s, u, i, o in rows])
    table = pa.Table.from_pandas(df[TRAINING_EXAMPLES.names], schema=TRAINING_EXAMPLES.arrow_schema(),
                                 preserve_index=False)
    write_deltalake(cfg.table_path("training_examples"), table, partition_by=["split"])
    ids = pd.DataFrame({"kind": ["user"] * 5 + ["item"] * 6, "id": [f"x{k}" for k in range(11)],
                        "idx": list(range(5)) + list(range(6))})
    write_deltalake(cfg.table_path("id_index"), pa.Table.from_pandas(ids, schema=ID_INDEX.arrow_schema(),
                                                                     preserve_index=False))
    stats = table_stats(cfg)
    assert (stats["shape"]["n_users"], stats["shape"]["n_items"]) == (5, 6)
    assert stats["id_index_version"] == 0  # the version the run's checkpoints record for scoring
    ips = known_ids(stats["known"], "ips")
    assert ips["user"].tolist() == [True, True, False, False, False]  # 2: unobserved only; 3: valid only
    assert ips["item"].tolist() == [True, True, False, True, False, False]
    dr = known_ids(stats["known"], "dr_jl")
    assert dr["user"].tolist() == [True, True, True, False, False]
    assert dr["item"].tolist() == [True, True, True, True, False, False]
    assert dr["imputation_item"].tolist() == ips["item"].tolist()


def test_table_stats_takes_the_id_index_version_the_rows_record(cfg):
    """training_set records in the training_examples commit the id_index version the rows were indexed
    with; a run that failed after writing the next id_index leaves the current id_index one version ahead.
    table_stats (and so every checkpoint's meta.json) takes the recorded version and sizes the model from
    that index, not from the current one; a version that can no longer be read fails naming both."""
    import os

    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable, write_deltalake

    from causalrec.schemas import ID_INDEX
    from causalrec.train.job import table_stats

    base = synthetic_examples(n_users=2, n_items=1, n_train=1, n_valid=0).iloc[0].to_dict()
    df = pd.DataFrame([{**base, "example_id": f"e{u}", "user_id": f"u{u}", "user_idx": u, "item_idx": 0}
                       for u in range(2)])
    table = pa.Table.from_pandas(df[TRAINING_EXAMPLES.names], schema=TRAINING_EXAMPLES.arrow_schema(),
                                 preserve_index=False)

    def index(users):
        ids = pd.DataFrame({"kind": ["user"] * len(users) + ["item"], "id": users + ["i0"],
                            "idx": list(range(len(users))) + [0]})
        write_deltalake(cfg.table_path("id_index"), pa.Table.from_pandas(ids, schema=ID_INDEX.arrow_schema(),
                                                                         preserve_index=False), mode="overwrite")

    index(["u0", "u1"])  # version 0: what the rows are indexed with
    write_deltalake(cfg.table_path("training_examples"), table, partition_by=["split"],
                    commit_properties=CommitProperties(custom_metadata={"causalrec": json.dumps(
                        {"id_index_version": 0})}))
    index(["u0", "u1", "u2", "u3"])  # version 1: the rerun that failed before writing training_examples
    stats = table_stats(cfg)
    assert stats["id_index_version"] == 0
    assert (stats["shape"]["n_users"], stats["shape"]["n_items"]) == (2, 1)
    for uri in DeltaTable(cfg.table_path("id_index"), version=0).file_uris():
        os.remove(uri.removeprefix("file://"))  # vacuumed
    with pytest.raises(RuntimeError, match=r"indexed with id_index version 0, but .*now at version 1"):
        table_stats(cfg)


def test_fit_local_scores_items_without_training_rows_from_the_unknown_row():
    """An id_index item that has no training row scores exactly like an unseen (-1) item."""
    from causalrec.train.local import fit_local, predict_frame

    df = synthetic_examples(n_users=10, n_items=12, n_train=200, n_valid=0)
    train = df[(df["observed"] == 1) & (df["item_idx"] < 10)].reset_index(drop=True)
    mc = {"model": "mf", "task": "rating", "n_users": 10, "n_items": 12, "dim": 4, "global_bias": 3.0}
    known = {"user": np.isin(np.arange(10), train["user_idx"]), "item": np.isin(np.arange(12), train["item_idx"])}
    assert not known["item"][10:].any()
    fit = fit_local(mc, "naive", train, train, epochs=2, batch_size=32, known_ids=known)
    q = pd.DataFrame({"user_idx": [0, 0, 0], "item_idx": [10, 11, -1]})
    rel = predict_frame(fit["model"], mc, q)["relevance"]
    assert rel[0] == rel[1] == rel[2]


def test_tune_trials_are_validated_with_one_clip(monkeypatch, cfg):
    """Searched ips_clip changes the training objective only; validation keeps train.ips_clip."""
    import causalrec.train.local as local
    from causalrec.train.job import loop_config_from
    from causalrec.train.local import fit_local
    from causalrec.train.tune import _trial, apply_params

    cfg.train.ips_clip = 0.02
    lc = loop_config_from(cfg, {"model": "mf", "n_users": 10, "n_items": 12, "dim": 4}, "ips", "ips")
    assert lc["valid_clip"] == 0.02
    tuned = apply_params(lc, {"ips_clip": 0.1})
    assert (tuned["clip"], tuned["valid_clip"]) == (0.1, 0.02)

    seen = {}
    monkeypatch.setattr(local, "fit_local", lambda *a, **kw: seen.update(kw))
    _trial({"ips_clip": 0.1}, {**lc, "known_ids": {"user": [True] * 10, "item": [True] * 12}}, None, None)
    assert (seen["clip"], seen["valid_clip"]) == (0.1, 0.02) and len(seen["known_ids"]["item"]) == 12

    # fit_local validates with valid_clip: two clips, no learning (lr 0), one metric
    df = synthetic_examples(n_users=10, n_items=12, n_train=80, n_valid=60)
    train, valid = df[df["split"] == "train"], df[df["split"] == "valid"]
    valid = valid.assign(exposure_propensity=np.linspace(0.005, 0.3, len(valid)))
    mc = {"model": "mf", "task": "rating", "n_users": 10, "n_items": 12, "dim": 4, "global_bias": 3.0}
    runs = {c: fit_local(mc, "ips", train, valid, epochs=1, lr=0.0, clip=c, valid_clip=0.02)["history"][0]
            for c in (0.01, 0.1)}
    assert runs[0.01]["valid_metric"] == runs[0.1]["valid_metric"]
    own = fit_local(mc, "ips", train, valid, epochs=1, lr=0.0, clip=0.1)["history"][0]
    assert own["valid_metric"] != runs[0.1]["valid_metric"]  # the clip does move the metric


def test_resumed_runs_record_the_best_epochs_checkpoint(tmp_path):
    """After resume_from the new run holds only later epochs: the state remembers the older best
    epoch's folder, and the job records that checkpoint, not the best of the new run."""
    from causalrec.train.job import best_checkpoint
    from causalrec.train.loop_state import early_stopping_update, initial_state, resumed_in_new_run

    old_run = tmp_path / "run-a"
    for e in range(3):
        (old_run / f"epoch_{e:04d}").mkdir(parents=True)
    state = initial_state()
    for e, v in enumerate([2.0, 1.0, 1.5]):
        early_stopping_update(state, e, v, 0)
    state["epoch"] = 3
    resumed_in_new_run(state, str(old_run / "epoch_0002") + "/")
    assert state["best_checkpoint"] == str(old_run / "epoch_0001")
    resumed_in_new_run(state, str(tmp_path / "run-b" / "epoch_0004"))  # a resume of the resume keeps it
    assert state["best_checkpoint"] == str(old_run / "epoch_0001")

    class Ckpt:
        def __init__(self, path):
            self.path = path

    class Result:  # the new run: epochs 3 and 4, both worse than epoch 1
        best_checkpoints = [(Ckpt("b/epoch_0003"), {"epoch": 3, "valid_metric": 1.2}),
                            (Ckpt("b/epoch_0004"), {"epoch": 4, "valid_metric": 1.3})]
        checkpoint = best_checkpoints[-1][0]

        def get_best_checkpoint(self, metric, mode):
            return self.best_checkpoints[0][0]

    for e, v in ((3, 1.2), (4, 1.3)):
        early_stopping_update(state, e, v, 0)
    ckpt, epoch = best_checkpoint(Result(), state)
    assert (ckpt.path, epoch) == (str(old_run / "epoch_0001"), 1)
    early_stopping_update(state, 5, 0.5, 0)  # an improvement in this run: its own checkpoint
    assert state["best_checkpoint"] is None
    Result.best_checkpoints.append((Ckpt("b/epoch_0005"), {"epoch": 5, "valid_metric": 0.5}))
    assert best_checkpoint(Result(), state)[0].path == "b/epoch_0005"
    # no validation metric at all: Ray's best (by train loss), epoch unknown as before
    assert best_checkpoint(Result(), initial_state()) == (Result.best_checkpoints[0][0], -1)


def test_epoch_rng_depends_on_seed_and_epoch_only():
    """Each epoch reseeds torch, so a resumed run (fresh process, different draws before) makes the
    same id-dropout draws in epoch 3 as an uninterrupted one."""
    import torch

    from causalrec.train.loop_state import epoch_seed

    torch.manual_seed(42)
    for epoch in range(3):  # the uninterrupted run's earlier epochs
        torch.manual_seed(epoch_seed(42, epoch))
        torch.rand(1000)
    torch.manual_seed(epoch_seed(42, 3))
    straight = torch.rand(8)
    torch.manual_seed(42)  # the resumed process: model built, nothing else drawn
    torch.rand(7)
    torch.manual_seed(epoch_seed(42, 3))
    assert torch.equal(torch.rand(8), straight)
    assert len({epoch_seed(s, e) for s in (42, 43) for e in range(5)}) == 10


def test_no_validation_metric_never_stops_early():
    """A NaN validation error (no labelled validation row) is no evidence of overfitting: it neither
    improves nor counts as a bad epoch, in the state the Ray loop and fit_local share."""
    from causalrec.train.loop_state import early_stopping_update, initial_state

    state = initial_state()
    assert [early_stopping_update(state, e, float("nan"), 2) for e in range(6)] == [False] * 6
    assert (state["best_epoch"], state["bad_epochs"]) == (-1, 0)
    # a real metric later still early-stops as before
    assert [early_stopping_update(state, e, v, 2) for e, v in zip(range(6, 10), (1.0, 1.5, float("nan"), 2.0))] == \
        [False, False, False, True]
    assert state["best_epoch"] == 6


def test_fit_local_without_labelled_validation_rows_trains_every_epoch():
    """Validation rows without a label, or none at all: every epoch trains, none is 'stopped early',
    and the returned weights are the epoch with the lowest train loss (what the Ray loop's checkpoint
    ranking picks then: it reports the train loss as valid_metric)."""
    import torch

    from causalrec.models.featurize import Featurizer
    from causalrec.train.local import featurize_frame, fit_local

    df = synthetic_examples(n_users=10, n_items=12, n_train=120, n_valid=30)
    train = df[(df["split"] == "train") & (df["observed"] == 1)].reset_index(drop=True)
    unlabelled = df[df["split"] == "valid"].assign(observed=0, label=np.nan)
    mc = {"model": "mf", "task": "rating", "n_users": 10, "n_items": 12, "dim": 4, "global_bias": 3.0}
    for valid in (unlabelled, train.head(0), None):
        fit = fit_local(mc, "ips", train, valid, epochs=6, batch_size=32, patience=2, lr=0.05)
        hist = fit["history"]
        assert len(hist) == 6 and all(np.isnan(h["valid_metric"]) for h in hist)
        assert fit["best_epoch"] == -1
        assert int(np.argmin([h["train_loss"] for h in hist])) == 5  # falling train loss: the last epoch
    # a train loss that jumps about (lr 1): the weights are those of its lowest epoch, not the last
    fit = fit_local(mc, "naive", train, None, epochs=6, batch_size=32, lr=1.0)
    losses = [h["train_loss"] for h in fit["history"]]
    best = int(np.argmin(losses))
    assert best < 5 and losses[5] > losses[best]
    upto = fit_local(mc, "naive", train, None, epochs=best + 1, batch_size=32, lr=1.0)  # same path, cut there
    assert all(torch.equal(v, upto["model"].state_dict()[k]) for k, v in fit["model"].state_dict().items())
    empty = featurize_frame(Featurizer(mc), train.head(0))
    assert empty["user_idx"].shape == (0,) and empty["label"].dtype == torch.float32


def test_every_checkpoint_records_the_id_index_version(monkeypatch, tmp_path):
    """The Ray loop's checkpoints carry the id_index version the rows were indexed with (the job puts
    table_stats' version into the loop config), so scoring can read the same id map back."""
    import ray.train

    from causalrec.models import build_model
    from causalrec.train.checkpoint import trained_id_index_version
    from causalrec.train.loop import _report
    from causalrec.train.loop_state import initial_state

    saved = {}

    def fake_report(metrics, checkpoint=None, checkpoint_dir_name=None):
        saved["version"] = trained_id_index_version(checkpoint.path)

    monkeypatch.setattr(ray.train, "report", fake_report)
    mc = {"model": "mf", "task": "rating", "n_users": 3, "n_items": 4, "dim": 2}
    _report(0, {"epoch": 0}, initial_state(), rank=0, model=build_model(mc), mc=mc, optimizer=None,
            config={"objective": "naive", "id_index_version": 7}, valid_mode="ips")
    assert saved["version"] == 7


def test_checkpoints_record_the_feature_layout_the_rows_were_built_with(cfg, monkeypatch, caplog):
    """training_set records the names of the ``features`` slots in the training_examples commit; table_stats
    reads them (and every checkpoint's meta.json records them), so scoring can map served vectors onto the
    trained layout by name. A table without the record (or whose record does not match its rows' width)
    gives None, with a warning."""
    import logging

    import pyarrow as pa
    import ray.train
    from deltalake import CommitProperties, write_deltalake

    from causalrec.models import build_model
    from causalrec.train.checkpoint import trained_feature_names
    from causalrec.train.job import table_stats
    from causalrec.train.loop import _report
    from causalrec.train.loop_state import initial_state

    df = synthetic_examples(n_users=2, n_items=2, n_train=4, n_valid=0)  # features: 2 slots
    table = pa.Table.from_pandas(df[TRAINING_EXAMPLES.names], schema=TRAINING_EXAMPLES.arrow_schema(),
                                 preserve_index=False)

    def write(meta):
        props = CommitProperties(custom_metadata={"causalrec": json.dumps(meta)}) if meta is not None else None
        write_deltalake(cfg.table_path("training_examples"), table, partition_by=["split"], mode="overwrite",
                        commit_properties=props)

    write(None)
    with caplog.at_level(logging.WARNING, logger="causalrec.train.job"):
        assert table_stats(cfg)["feature_names"] is None
    assert any("does not record its feature layout" in r.getMessage() for r in caplog.records)
    write({"id_index_version": 0, "feature_names": ["user:a", "item:b", "pair:c"]})  # 3 names, 2 slots
    assert table_stats(cfg)["feature_names"] is None
    names = ["user:attr=red", "item:attr=wool"]
    write({"id_index_version": 0, "feature_names": names})
    stats = table_stats(cfg)
    assert stats["feature_names"] == names and stats["shape"]["n_features"] == 2

    saved = {}
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None, checkpoint_dir_name=None:
                        saved.update(names=trained_feature_names(checkpoint.path)))
    mc = {"model": "mf", "task": "rating", "n_users": 3, "n_items": 4, "dim": 2, "n_features": 2}
    _report(0, {"epoch": 0}, initial_state(), rank=0, model=build_model(mc), mc=mc, optimizer=None,
            config={"objective": "naive", "feature_names": stats["feature_names"]}, valid_mode="ips")
    assert saved["names"] == names


# --------------------------------------------------------------------------- the Ray loop in-process


class _FakeShard:
    """A Ray Data shard stand-in: yields the collated rows in the order ``local_shuffle_seed`` shuffles
    them (like Ray's local shuffle, from ``np.random.default_rng(seed)``) and records every call."""

    def __init__(self, df: pd.DataFrame, calls: list):
        self.df, self.calls = df.reset_index(drop=True), calls

    def iter_torch_batches(self, *, batch_size, collate_fn, local_shuffle_seed=None, **kwargs):
        self.calls.append({"local_shuffle_seed": local_shuffle_seed, **kwargs})
        order = np.arange(len(self.df))
        if local_shuffle_seed is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(order)
        for s in range(0, len(order), batch_size):
            yield collate_fn(self.df.iloc[order[s:s + batch_size]])


def run_loop_in_process(monkeypatch, tmp_path, config: dict, df: pd.DataFrame, world: int = 1,
                        device: str = "cpu") -> dict:
    """``train_loop_per_worker(config)`` as rank 0 of ``world`` workers, without Ray: fake context, shards
    (:class:`_FakeShard`), ``prepare_model`` (identity) and ``report`` (each epoch's metrics and a copy
    of its checkpoint folder). With ``world > 1`` torch.distributed is a stand-in group whose all-reduce
    doubles every tensor (two identical workers) and records the tensors' devices."""
    import shutil

    import ray.train
    import ray.train.torch
    import torch

    import causalrec.train.loop as loop

    rec = {"metrics": [], "checkpoints": [], "train_calls": [], "collective_devices": []}
    shards = {"train": _FakeShard(df[df["split"] == "train"], rec["train_calls"]),
              "valid": _FakeShard(df[df["split"] == "valid"], [])}

    class Ctx:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return world

    def report(metrics, checkpoint=None, checkpoint_dir_name=None):
        rec["metrics"].append(dict(metrics))
        if checkpoint is not None:
            dest = tmp_path / f"{len(rec['checkpoints'])}-{checkpoint_dir_name}"
            shutil.copytree(checkpoint.path, dest)
            rec["checkpoints"].append(str(dest))

    monkeypatch.setattr(ray.train, "get_context", lambda: Ctx())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shards[name])
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device(device))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kwargs: model)
    if world > 1:
        import torch.distributed as dist

        def all_reduce(tensor, op=None):
            rec["collective_devices"].append(tensor.device)
            tensor.mul_(2)

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
    threads = torch.get_num_threads()
    try:
        loop.train_loop_per_worker(config)
    finally:  # the loop's process-wide settings
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    return rec


def _loop_config(df: pd.DataFrame, **kw) -> dict:
    mc = {"model": "mf", "task": "rating", "n_users": 30, "n_items": 40, "dim": 4, "global_bias": 3.0}
    return {"model_config": mc, "objective": "naive", "epochs": 3, "batch_size": 32, "lr": 0.05,
            "valid_mode": "naive", "seed": 42, "torch_threads": 1, **kw}


def test_loop_shuffle_seeds_are_distinct_across_seeds_and_survive_a_resume(monkeypatch, tmp_path):
    """Each epoch's local shuffle comes from (seed, epoch) like the torch draws: seed 42's epoch e+1 does
    not replay seed 43's epoch e (seed + epoch did), and a run resumed from epoch 0's checkpoint
    shuffles epochs 1 and 2 exactly as the uninterrupted run."""
    df = synthetic_examples(n_train=96, n_valid=32)
    runs = {s: run_loop_in_process(monkeypatch, tmp_path / f"s{s}", _loop_config(df, seed=s), df) for s in (42, 43)}
    seeds = {s: [c["local_shuffle_seed"] for c in r["train_calls"]] for s, r in runs.items()}
    assert all(len(v) == 3 and len(set(v)) == 3 for v in seeds.values())
    assert not set(seeds[42]) & set(seeds[43]), seeds
    resumed = run_loop_in_process(monkeypatch, tmp_path / "resumed",
                                  _loop_config(df, resume_from=runs[42]["checkpoints"][0]), df)
    assert [c["local_shuffle_seed"] for c in resumed["train_calls"]] == seeds[42][1:]
    assert [m["train_loss"] for m in resumed["metrics"]] == pytest.approx(
        [m["train_loss"] for m in runs[42]["metrics"][1:]], rel=1e-6)


def test_a_run_whose_patience_ran_out_on_its_last_epoch_stays_stopped_when_resumed_longer(monkeypatch, tmp_path):
    """Patience can run out on the last configured epoch, where ``stopped_early`` stays False (there was
    no epoch left to skip). A resume with more epochs must stop there too, as the uninterrupted run with
    those epochs did; it used to train on."""
    df = synthetic_examples(n_train=96, n_valid=32)
    base = _loop_config(df, objective="ips", valid_mode="ips", patience=1, lr=0.3)
    straight = run_loop_in_process(monkeypatch, tmp_path / "straight", {**base, "epochs": 8}, df)
    stopped_after = straight["metrics"][-1]["epoch"]
    assert straight["metrics"][-1]["stopped_early"] and stopped_after < 7  # this setting overfits at once
    short = run_loop_in_process(monkeypatch, tmp_path / "short", {**base, "epochs": stopped_after + 1}, df)
    state = json.loads((Path(short["checkpoints"][-1]) / "meta.json").read_text())["train_state"]
    assert state["bad_epochs"] >= 1 and not state["stopped_early"]
    resumed = run_loop_in_process(monkeypatch, tmp_path / "resumed",
                                  {**base, "epochs": 8, "resume_from": short["checkpoints"][-1]}, df)
    assert resumed["train_calls"] == []  # nothing trained
    assert [m["epoch"] for m in resumed["metrics"]] == [stopped_after]  # the saved state, reported once
    assert resumed["metrics"][0]["stopped_early"] and resumed["metrics"][0]["best_epoch"] == straight[
        "metrics"][-1]["best_epoch"]


def test_loop_reduces_its_epoch_totals_on_the_training_device(monkeypatch, tmp_path):
    """Under DDP the loop sums its epoch totals (train loss, steps, rows and the validation sums) in one
    collective through step.all_reduce_sum on the worker's training device (``get_device()``), which
    moves them there (a GPU worker's nccl group takes CUDA tensors only,
    tests/test_ddp.py::test_all_reduce_sum_reduces_on_the_training_device); before, the loop all-reduced
    its CPU tensors directly."""
    import torch

    import causalrec.train.loop as loop
    from causalrec.train.step import all_reduce_sum

    seen = []

    def spy(t, device):
        seen.append((t.shape[0], device))
        return all_reduce_sum(t, device)

    monkeypatch.setattr(loop, "all_reduce_sum", spy, raising=False)
    df = synthetic_examples(n_train=96, n_valid=32)
    single = run_loop_in_process(monkeypatch, tmp_path / "one", _loop_config(df, epochs=2), df)
    # the training device is "cpu:0", which differs from a plain torch.device("cpu") a loop could hard-code
    two = run_loop_in_process(monkeypatch, tmp_path / "two", _loop_config(df, epochs=2), df, world=2, device="cpu:0")
    assert seen == [(3 + 3, torch.device("cpu:0"))] * 2  # one fused call per epoch: 3 train + 3 validation sums
    assert set(two["collective_devices"]) == {torch.device("cpu")}
    # two identical workers: the same mean loss and validation error, twice the rows
    for a, b in zip(single["metrics"], two["metrics"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["valid_metric"] == pytest.approx(a["valid_metric"], rel=1e-6)
        assert (b["train_rows"], b["valid_rows"]) == (2 * a["train_rows"], 2 * a["valid_rows"])


def test_loop_validates_the_uplift_heads_for_the_uplift_objective(monkeypatch, tmp_path, capsys):
    """train.objective=uplift: the per-epoch valid_metric (early stopping, best checkpoint, Tune) adds the
    uplift heads' causal errors (IPW y1 / y0 errors and the transformed-outcome error) to the relevance
    error, names each part in the metrics and says so in valid_metric_source and the epoch log line."""
    df = synthetic_examples(n_train=96, n_valid=40)
    cfg = _loop_config(df, objective="uplift", valid_mode="ips", epochs=2)
    cfg["model_config"] = {**cfg["model_config"], "task": "click", "global_bias": 0.0, "uplift": True}
    rec = run_loop_in_process(monkeypatch, tmp_path, cfg, df)
    for m in rec["metrics"]:
        assert "transformed-outcome" in m["valid_metric_source"] and m["valid_metric_source"].startswith("ips")
        parts = [m.get(f"valid_{k}", np.nan) for k in ("relevance", "y1", "y0", "transformed_outcome")]
        assert all(np.isfinite(parts)) and m["valid_metric"] == pytest.approx(sum(parts), rel=1e-9)
        assert m["valid_causal_rows"] == 40  # every validation row: observed, treated flag, propensity 0.5
    out = capsys.readouterr().out
    assert "valid(ips+uplift)=" in out and "transformed_outcome=" in out
