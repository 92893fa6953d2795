"""Train stage: fine-tune the recommender on Ray Train from the ``training_examples`` Delta table.

Extract: ``ray.data.read_delta`` of training_examples, split by the ``split``
partition into train and valid (streamed, sharded one per worker by Ray Train).
Transform: ``TorchTrainer(train_loop_per_worker)`` with the configured model and
debiased objective; optionally a Ray Tune + Optuna search first
(``train.tune_trials > 0``). Load: the best checkpoint's folder and the per-epoch
metrics into one ``train_runs`` row, which scoring reads to find the model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from datetime import datetime, timezone

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["split", "user_idx", "item_idx", "observed", "label", "outcome", "treated", "exposure_propensity",
                 "sample_weight", "treatment_propensity", "features", "history_item_idx", "user_text", "item_text", "is_mcar"]


def model_config_from(cfg, n_users: int, n_items: int, n_features: int, global_bias: float = 0.0,
                      objective: str | None = None, feature_scaling: dict | None = None) -> dict:
    """The model config the trainer, the checkpoint and the scorer share.

    ``feature_scaling``: the train split's feature moments (:mod:`causalrec.models.feature_scaling`),
    recorded for the text models, which standardise their features with them.
    """
    from causalrec.models import TEXT_MODELS
    from causalrec.train.objectives import needs_imputation, needs_uplift

    t = cfg.train
    objective = objective or t.objective
    mc = {
        "model": t.model, "task": t.task, "n_users": int(n_users), "n_items": int(n_items),
        "n_features": int(n_features), "dim": int(t.embedding_dim), "global_bias": float(global_bias),
        "uplift": needs_uplift(objective), "imputation": needs_imputation(objective),
    }
    if t.model in TEXT_MODELS:
        from causalrec.models.text import default_encoder_path

        mc.update({
            "encoder_path": t.model_path or default_encoder_path(), "max_seq_len": int(t.max_seq_len),
            "history_len": int(cfg.features.history_length), "freeze_layers": -1 if t.freeze_encoder else int(t.freeze_layers),
            "id_dropout": float(t.id_dropout),
        })
        if feature_scaling:
            mc.update(feature_scaling)
        if t.model == "two_tower":
            if t.text_match is not None:  # else the model's default (on for task=click)
                mc["text_match"] = bool(t.text_match)
            if t.text_match_init is not None:
                mc["text_match_init"] = float(t.text_match_init)
    return mc


def loop_config_from(cfg, model_config: dict, valid_mode: str, objective: str | None = None) -> dict:
    t = cfg.train
    threads = t.torch_threads or max(1, int(round(t.cpus_per_worker)))
    return {
        "model_config": model_config, "objective": objective or t.objective, "task": t.task, "clip": t.ips_clip,
        "valid_clip": t.ips_clip,  # one validation metric for every Tune trial, whatever clip it trains with
        "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.learning_rate, "encoder_lr": t.encoder_lr,
        "weight_decay": t.weight_decay, "patience": t.early_stopping_patience, "valid_mode": valid_mode,
        "bf16": t.bf16, "prefetch_batches": t.prefetch_batches, "torch_threads": threads, "seed": cfg.project.seed,
        "resume_from": t.resume_from, "deterministic": t.deterministic, "dr_label_fit_weight": t.dr_label_fit_weight,
        "hyperparameters": {"learning_rate": t.learning_rate, "weight_decay": t.weight_decay,
                            "embedding_dim": t.embedding_dim, "batch_size": t.batch_size, "epochs": t.epochs,
                            "ips_clip": t.ips_clip, "encoder_lr": t.encoder_lr,
                            "dr_label_fit_weight": t.dr_label_fit_weight},
    }


def run_config(cfg, shape: dict, feature_scaling: dict | None, valid_mode: str, objective: str | None = None) -> dict:
    """One training run's loop config, its model built for that run's own objective: a baseline
    (``train.baseline_objectives``) needs or lacks the imputation and uplift heads as its loss does
    (an unused head breaks DDP's gradient reduction; a missing one fails DR-JL's first step)."""
    mc = model_config_from(cfg, **shape, objective=objective, feature_scaling=feature_scaling)
    return loop_config_from(cfg, mc, valid_mode, objective)


def table_stats(cfg) -> dict:
    """Shape of the training data, streamed from the Delta files' two int columns (constant memory).

    n_users / n_items come from ``id_index`` when present (so ids that only occur in valid/test
    still get rows), else from the largest index in training_examples; also the feature width, the
    observed-label mean (the global bias the model starts from), the row counts per split and
    ``known``: which ids the train split's observed rows (``observed``) and all its rows (``all``)
    hold, as bool masks per id (:func:`known_ids`); ``id_index_version``: the id_index Delta version the rows
    were indexed with, as training_set recorded it in the training_examples commit (not the current
    id_index version, which a training_set run that failed after writing id_index has moved on), read
    at that version (None without an id_index); the run's checkpoints record it so scoring and
    evaluation map ids as training did.
    """
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    from deltalake import DeltaTable

    from causalrec.storage.store import commit_metadata_of
    from causalrec.training_set import recorded_feature_names, recorded_id_index_version

    dt = DeltaTable(cfg.table_path("training_examples"))
    ds = dt.to_pyarrow_dataset()
    label = "label" if cfg.train.task == "rating" else "outcome"
    max_u = max_i = -1
    n = {"train": 0, "valid": 0}
    lab_sum, lab_n, n_valid_mcar, n_features = 0.0, 0, 0, None
    seen = {"observed": {}, "all": {}}
    for split in ("train", "valid"):
        scan = ds.scanner(columns=["user_idx", "item_idx", "observed", label, "is_mcar"],
                          filter=pads.field("split") == split)
        for b in scan.to_batches():
            if b.num_rows == 0:
                continue
            n[split] += b.num_rows
            max_u = max(max_u, pc.max(b.column("user_idx")).as_py())
            max_i = max(max_i, pc.max(b.column("item_idx")).as_py())
            obs = pc.equal(b.column("observed"), 1)
            if split == "train":
                vals = pc.filter(b.column(label), obs)
                lab_sum += float(pc.sum(vals).as_py() or 0.0)
                lab_n += len(vals) - vals.null_count
                _mark_ids(seen["observed"], b, pc.and_(obs, pc.is_valid(b.column(label))))
                _mark_ids(seen["all"], b)
            else:
                n_valid_mcar += int(pc.sum(pc.and_(obs, pc.fill_null(b.column("is_mcar"), False))).as_py() or 0)
    head = ds.head(64, columns=["features"], filter=pads.field("split") == "train").column("features").to_pylist()
    n_features = max((len(f) for f in head if f is not None), default=0)
    recorded = commit_metadata_of(dt.history())  # training_set's records in the training_examples commits
    feature_names = recorded_feature_names(recorded)
    if feature_names is not None and len(feature_names) != n_features:
        log.warning("train: %s records %d feature names but its rows hold %d features; the checkpoints will not "
                    "record the layout (scoring then cannot map served features by name). Rerun training_set",
                    cfg.table_path("training_examples"), len(feature_names), n_features)
        feature_names = None
    elif feature_names is None and n_features:
        log.warning("train: %s does not record its feature layout (written before causalrec recorded it); "
                    "scoring will assume the served feature vectors keep the trained slots. Rerun training_set "
                    "to record it", cfg.table_path("training_examples"))
    idx_path = cfg.table_path("id_index")
    id_index_version = recorded_id_index_version(recorded)
    if DeltaTable.is_deltatable(idx_path):
        if id_index_version is None:  # training_examples from before the version was recorded
            id_index_version = int(DeltaTable(idx_path).version())
            log.warning("train: %s does not record the id_index version its rows were indexed with (written "
                        "before causalrec recorded it); assuming the current id_index (version %s). Rerun "
                        "training_set to record it", cfg.table_path("training_examples"), id_index_version)
        try:  # scoring and evaluation read the index at this version: the one the rows were indexed with
            t = DeltaTable(idx_path, version=id_index_version).to_pyarrow_table(columns=["kind", "idx"]).to_pandas()
        except Exception as exc:
            raise RuntimeError(
                f"train: {cfg.table_path('training_examples')} was indexed with id_index version "
                f"{id_index_version}, but {idx_path} (now at version {DeltaTable(idx_path).version()}) cannot be "
                f"read at that version ({type(exc).__name__}); rerun training_set so the two match") from exc
        n_users = int(t.loc[t["kind"] == "user", "idx"].max() + 1)
        n_items = int(t.loc[t["kind"] == "item", "idx"].max() + 1)
    else:
        n_users, n_items = max_u + 1, max_i + 1
    mean = lab_sum / lab_n if lab_n else 0.0
    if cfg.train.task == "click":
        p = min(max(mean, 1e-4), 1 - 1e-4)
        mean = float(np.log(p / (1 - p)))
    known = {rows: {kind: _mask(ids.get(f"{kind}_idx"), size) for kind, size in (("user", n_users), ("item", n_items))}
             for rows, ids in seen.items()}
    return {"shape": {"n_users": n_users, "n_items": n_items, "n_features": n_features, "global_bias": float(mean)},
            "rows": n, "valid_mcar_rows": n_valid_mcar, "known": known, "id_index_version": id_index_version,
            "feature_names": feature_names}


def _mark_ids(seen: dict, batch, rows=None) -> None:
    """``seen[col][id] = True`` for the ids in ``batch`` (``rows``: a boolean filter), growing the arrays."""
    import numpy as np
    import pyarrow.compute as pc

    for col in ("user_idx", "item_idx"):
        ids = batch.column(col) if rows is None else pc.filter(batch.column(col), rows)
        a = ids.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
        a = a[a >= 0]
        if not a.size:
            continue
        have = seen.get(col, np.zeros(0, dtype=bool))
        if a.max() >= have.size:
            have = np.concatenate([have, np.zeros(max(int(a.max()) + 1, 2 * have.size) - have.size, dtype=bool)])
        have[a] = True
        seen[col] = have


def _mask(seen, size: int):
    import numpy as np

    out = np.zeros(size, dtype=bool)
    if seen is not None:
        k = min(size, seen.size)
        out[:k] = seen[:k]
    return out


def known_ids(known: dict, objective: str) -> dict:
    """The ids training with ``objective`` reaches (:func:`causalrec.models.mf.set_known_ids`).

    The losses weigh observed rows only, except DR-JL's imputed term, which trains the
    prediction model on every row (its imputation model still sees observed rows only).
    """
    from causalrec.train.objectives import trains_on_unobserved

    observed = known["observed"]
    if not trains_on_unobserved(objective):
        return dict(observed)
    return {**known["all"], "imputation_user": observed["user"], "imputation_item": observed["item"]}


def resolve_valid_mode(cfg, valid_mcar_rows: int) -> str:
    mode = cfg.train.valid_metric
    if mode != "auto":
        return mode
    return "mcar" if valid_mcar_rows > 0 else "ips"


def shard_config(deterministic: bool):
    """How Ray Train splits the datasets between workers.

    Deterministic: blocks keep the Delta files' order, so the greedy splitter hands every
    worker the same rows in the same order on every run (locality hints are ignored, which
    costs nothing on one node and some network on a cluster).
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = bool(deterministic)
    return DataConfig(execution_options=options)


def load_splits(cfg):
    import ray

    path = cfg.table_path("training_examples")
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        raise FileNotFoundError(f"training_examples table {path} does not exist; run the training_set stage first")
    present = set(DeltaTable(path).schema().to_arrow().names)
    # sample_weight arrived later: tables written before it still train (weight 1)
    ds = ray.data.read_delta(path, columns=[c for c in TRAIN_COLUMNS if c in present or c != "sample_weight"])
    train = ds.filter(expr="split == 'train'")
    valid = ds.filter(expr="split == 'valid'")
    return train, valid


def run(ctx) -> dict:
    """Train ``train.baseline_objectives`` (e.g. naive, for the report's side-by-side) then the main objective.

    The main run is written last, so the latest ``train_runs`` row (what scoring uses) is it.
    """
    data = read_training_data(ctx)
    baselines = []
    for objective in ctx.cfg.train.baseline_objectives:
        if objective == ctx.cfg.train.objective:
            continue
        baselines.append(_run_one(ctx, data, objective)["run_id"])
    summary = _run_one(ctx, data, None)
    if baselines:
        summary["baseline_runs"] = baselines
    return summary


def read_training_data(ctx) -> dict:
    """The splits as Ray Datasets, the table's shape (:func:`table_stats`) and, for a text model with
    ``train.standardize_features``, the train split's feature moments: read once for every objective."""
    cfg = ctx.cfg
    ctx.ray()  # starts (or joins) Ray before the datasets are built
    with ctx.step("train: read training_examples"):
        train_ds, valid_ds = load_splits(cfg)
        stats = table_stats(cfg)
        n_train, n_valid = stats["rows"]["train"], stats["rows"]["valid"]
        if n_train == 0:
            raise ValueError(f"training_examples at {cfg.table_path('training_examples')} has no split='train' rows")
        ctx.log_rows("training_examples[train]", n_train, "in")
        ctx.log_rows("training_examples[valid]", n_valid, "in")
    from causalrec.models import TEXT_MODELS

    scaling = {}
    n_features = stats["shape"]["n_features"]
    if cfg.train.standardize_features and n_features and cfg.train.model in TEXT_MODELS:
        from causalrec.models.feature_scaling import dataset_feature_scaling

        with ctx.step(f"train: moments of {n_features} features"):
            scaling = dataset_feature_scaling(train_ds, n_features)
    return {"train": train_ds, "valid": valid_ds, "stats": stats, "feature_scaling": scaling}


def _run_one(ctx, data: dict, objective: str | None) -> dict:
    cfg = ctx.cfg
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from causalrec.train.loop import train_loop_per_worker

    train_ds, valid_ds, stats = data["train"], data["valid"], data["stats"]
    valid_mode = resolve_valid_mode(cfg, stats["valid_mcar_rows"])
    n_train, n_valid = stats["rows"]["train"], stats["rows"]["valid"]
    loop_config = run_config(cfg, stats["shape"], data["feature_scaling"], valid_mode, objective)
    loop_config["known_ids"] = known_ids(stats["known"], loop_config["objective"])
    # into every checkpoint's meta.json: scoring reads id_index at this version (causalrec.scoring.trained_id_index)
    loop_config["id_index_version"] = stats["id_index_version"]
    # and the names of the feature slots: scoring maps served vectors onto them (causalrec.training_set.align_features)
    loop_config["feature_names"] = stats["feature_names"]
    tuned = None
    if cfg.train.tune_trials > 0 and objective is None:
        from causalrec.train.tune import tune_hyperparameters

        with ctx.step(f"train: tune {cfg.train.tune_trials} trials"):
            tuned = tune_hyperparameters(cfg, loop_config, train_ds, valid_ds)
        loop_config = tuned["loop_config"]

    run_id = f"{cfg.train.model}-{loop_config['objective']}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    storage = cfg.checkpoint_dir
    if "://" not in storage:
        storage = os.path.abspath(storage)
        os.makedirs(storage, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets={"train": train_ds, "valid": valid_ds},
        dataset_config=shard_config(cfg.train.deterministic),
        run_config=RunConfig(name=run_id, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="valid_metric",
                                                                checkpoint_score_order="min")),
    )
    with ctx.step(f"train: fit {cfg.train.model}/{loop_config['objective']} on {cfg.train.num_workers} workers"):
        result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_id} reported no checkpoint")
    # the full per-epoch history (including epochs before a resume) travels in the checkpoint's meta
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "meta.json")) as f:
            state = json.load(f)["train_state"]
    best, best_epoch = best_checkpoint(result, state)
    history = state["history"]
    metrics = {"epochs": [{k: _jsonable(r.get(k)) for k in ("epoch", "train_loss", "valid_metric", "valid_rows")}
                          for r in history],
               "valid_mode": valid_mode, "stopped_early": state.get("stopped_early", False),
               "final": {k: _jsonable(v) for k, v in (result.metrics or {}).items()}}
    hyper = dict(loop_config["hyperparameters"])
    if tuned:
        hyper["tuned"] = tuned["best"]
    row = {
        "run_id": run_id, "model": cfg.train.model, "objective": loop_config["objective"], "model_version": run_id,
        "checkpoint_path": best.path, "metrics_json": json.dumps(metrics), "best_epoch": None if best_epoch is None or best_epoch < 0 else int(best_epoch),
        "hyperparameters_json": json.dumps(hyper, default=str), "created_at": datetime.now(timezone.utc),
    }
    _log_mlflow(cfg, run_id, hyper, metrics)  # first: a tracking failure leaves train_runs as it was
    write_train_run(cfg, row)
    ctx.log_rows("train_runs", 1)
    return {"run_id": run_id, "checkpoint_path": best.path, "valid_mode": valid_mode, "train_rows": n_train,
            "valid_rows": n_valid, "best_epoch": row["best_epoch"], "best_valid_metric": _jsonable(
                state.get("best_valid")), "epochs": len(history), "id_index_version": stats["id_index_version"]}


def best_checkpoint(result, state: dict):
    """``(checkpoint, epoch)``: the checkpoint of the epoch the train state records as best.

    Ray ranks only the checkpoints of this run; after ``resume_from`` the best epoch may be
    older, and then the state names its folder (:func:`causalrec.train.loop_state.resumed_in_new_run`).
    Without a validation metric (best epoch -1) Ray's best by ``valid_metric`` (the train loss) is taken.
    """
    from ray.train import Checkpoint

    epoch = state.get("best_epoch")
    kept = list(result.best_checkpoints or [])
    if epoch is not None and epoch >= 0:
        for ckpt, m in kept:
            if m.get("epoch") == epoch:
                return ckpt, epoch
        path = state.get("best_checkpoint")
        if path and os.path.isdir(path):
            return Checkpoint(path), epoch
    best = result.get_best_checkpoint(metric="valid_metric", mode="min") or result.checkpoint
    found = next((m.get("epoch") for ckpt, m in kept if ckpt.path == best.path), None)
    if epoch is not None and epoch >= 0:
        log.warning("train: the best epoch %s has no checkpoint left (%s); recording epoch %s's", epoch,
                    state.get("best_checkpoint"), found)
        return best, found
    return best, epoch


def _jsonable(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


def write_train_run(cfg, row: dict) -> None:
    """Append one row to the ``train_runs`` Delta table (schema from :data:`causalrec.schemas.TRAIN_RUNS`)."""
    import pyarrow as pa
    import ray
    from ray.data import SaveMode

    from causalrec.schemas import TRAIN_RUNS

    table = pa.Table.from_pylist([row], schema=TRAIN_RUNS.arrow_schema())
    ray.data.from_arrow(table).write_delta(cfg.table_path("train_runs"), mode=SaveMode.APPEND)


def latest_train_run(cfg, model: str | None = None) -> dict:
    """The newest ``train_runs`` row (optionally for one model type): what scoring loads."""
    from deltalake import DeltaTable

    path = cfg.table_path("train_runs")
    if not DeltaTable.is_deltatable(path):
        raise FileNotFoundError(f"train_runs table {path} does not exist; run the train stage first")
    df = DeltaTable(path).to_pyarrow_table().to_pandas()
    if model:
        df = df[df["model"] == model]
    if df.empty:
        raise LookupError(f"train_runs at {path} has no run" + (f" for model {model!r}" if model else ""))
    return df.sort_values("created_at").iloc[-1].to_dict()


def _log_mlflow(cfg, run_id: str, hyper: dict, metrics: dict) -> None:
    uri = cfg.train.mlflow_tracking_uri
    if not uri:
        return
    try:
        import mlflow
    except ImportError:
        log.warning("train.mlflow_tracking_uri is %r but mlflow is not installed (pip install 'causalrec[mlflow]'); "
                    "the run is not logged to MLflow", uri)
        return
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name=run_id):
        mlflow.log_params({k: v for k, v in hyper.items() if not isinstance(v, dict)})
        for r in metrics["epochs"]:
            step = int(r["epoch"]) if r.get("epoch") is not None else 0
            mlflow.log_metrics({k: float(r[k]) for k in ("train_loss", "valid_metric") if r.get(k) is not None}, step=step)
