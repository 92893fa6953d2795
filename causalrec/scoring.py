"""Bulk scoring on Ray Data: candidates -> ``scores`` with relevance, uplift and model version.

Two steps, each on the engine that suits it:

1. **Spark builds ``scoring_input``**: candidates joined with the id index the model was
   trained with (user_idx/item_idx; -1 for cold ids), the user's history and text and the
   item's text in the training set's layout, and a per-item uplift prior from
   ``uplift_effects`` (item-level rows of one method, see :func:`item_uplift`). These are shuffle joins of a users x candidates table with
   dimension tables, left to Spark's join planning (it broadcasts the small ones; a 10M-item text
   table is not small, so no broadcast is forced); materialising
   the result in Delta makes the model step restartable without redoing joins, and
   gives Ray a plain columnar read with no joins on the actor path.
2. **Ray Data scores it**: ``read_delta`` -> ``map_batches`` over a pool of model
   actors (``concurrency=scoring.num_actors``; ``num_gpus=1`` each when
   ``scoring.use_gpu``, else ``num_cpus=scoring.cpus_per_actor``), batches of
   ``scoring.batch_size`` rows -> ``write_delta(mode=overwrite)``.

Atomicity: Ray's Delta sink writes parquet files from the workers and commits one
Delta version on the driver only after every block succeeded, so a job killed or
failing midway leaves ``scores`` at its previous version (orphan files are removed
by ``vacuum``); overwrite mode means a rerun replaces rather than duplicates.

Two-tower models: item vectors are computed once per item and cached in the actor
(``encode_items``), user vectors once per user per batch (candidates arrive grouped
by user), so the text encoder runs O(users + items) times, not O(pairs).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from causalrec.schemas import SCORES, SCORING_INPUT

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- step 1: Spark


def item_uplift(uplift_effects):
    """One row per item of ``uplift_effects``: item-level rows of one method (DR when present, else IPS).

    Why: ``uplift.run`` writes overall, item and segment rows, each once per method, so a join on
    item_id alone would duplicate every candidate (and the same item would fill several slots
    of a top-K). Mixing methods across items would rank by two different estimators.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ue = uplift_effects.where(F.col("item_id").isNotNull())
    if "level" in ue.columns:
        ue = ue.where(F.col("level") == "item")
    if "method" in ue.columns:
        from causalrec.uplift import primary_method

        method = primary_method(r[0] for r in ue.select("method").distinct().collect())  # one row per method
        if method is not None:
            ue = ue.where(F.col("method") == method)
    order = [F.col(c).desc_nulls_last() for c in ("created_at", "run_id") if c in ue.columns]
    w = Window.partitionBy("item_id").orderBy(*order, F.col("effect").desc_nulls_last())
    return ue.withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1).drop("_r")


def build_scoring_input(spark, candidates, id_index=None, user_features=None, users=None, items=None,
                        uplift_effects=None, feature_vectors: Optional[Callable] = None,
                        history_length: Optional[int] = None):
    """Candidates + everything the Featurizer needs, one row per (user, item) candidate.

    ``id_index``: the one the model was trained with (:func:`trained_id_index`). History and
    user text come from ``user_features`` (the user's recent items as of the features stage,
    ``history_item_ids``, most recent first), built by the training set's own helpers
    (:func:`causalrec.training_set.indexed_history`, :func:`~causalrec.training_set.with_history_columns`)
    so scoring sees the layout the model trained on, but with the user's whole history: the
    training set takes a train row's own item out of that row's history (a label proxy), which a
    served candidate has no reason for. Users the features stage never saw get their ``users``
    text and no history; item text comes from ``items``. ``feature_vectors`` (DataFrame -> DataFrame
    with a ``features`` column, e.g. :func:`causalrec.training_set.with_feature_vectors` bound to
    the feature tables) gives each candidate pair the feature vector training used; without
    it ``features`` is null and a model trained with features sees zeros. ``history_length``
    (``features.history_length``): histories are cut to it, as the training set cuts a train row's.
    """
    from pyspark.sql import functions as F

    from causalrec.training_set import indexed_history, with_history_columns

    df = candidates.select("user_id", "item_id")
    if id_index is not None:
        uidx = id_index.filter(F.col("kind") == "user").select(F.col("id").alias("user_id"),
                                                               F.col("idx").alias("user_idx"))
        iidx = id_index.filter(F.col("kind") == "item").select(F.col("id").alias("item_id"),
                                                               F.col("idx").alias("item_idx"))
        df = df.join(uidx, "user_id", "left").join(iidx, "item_id", "left")
    else:
        iidx = spark.createDataFrame([], "item_id string, item_idx int")
        df = df.withColumn("user_idx", F.lit(None).cast("int")).withColumn("item_idx", F.lit(None).cast("int"))
    df = df.fillna({"user_idx": -1, "item_idx": -1})

    item_part = None
    if items is not None and "text" in items.columns:
        item_part = items.select("item_id", F.col("text").alias("item_text"))
    user_dim = (users.select("user_id", F.col("text").alias("_u_text"))
                if users is not None and "text" in users.columns else None)
    user_part = None
    if user_features is not None:
        texts = item_part.withColumnRenamed("item_text", "text") if item_part is not None else \
            spark.createDataFrame([], "item_id string, text string")
        uf_text = F.col("text") if "text" in user_features.columns else F.lit(None).cast("string")
        user_part = user_features.select("user_id", uf_text.alias("_uf_text")).join(
            indexed_history(user_features, iidx, texts), "user_id", "left")
        user_part = (user_part.join(user_dim, "user_id", "full") if user_dim is not None
                     else user_part.withColumn("_u_text", F.lit(None).cast("string")))
        user_part = with_history_columns(user_part, F.coalesce("_uf_text", "_u_text"),
                                         history_length=history_length).select(
            "user_id", "history_item_idx", "user_text")
    elif user_dim is not None:
        user_part = user_dim.select("user_id", F.lit(None).cast("array<int>").alias("history_item_idx"),
                                    F.col("_u_text").alias("user_text"))
    if user_part is not None:
        df = df.join(user_part, "user_id", "left")
    if item_part is not None:
        df = df.join(item_part, "item_id", "left")
    if uplift_effects is not None:
        ue = item_uplift(uplift_effects).select("item_id", F.col("effect").alias("prior_uplift"),
                                                F.col("se").alias("prior_uplift_se"))
        df = df.join(ue, "item_id", "left")
    if feature_vectors is not None:
        df = feature_vectors(df)
    else:
        df = df.withColumn("features", F.lit(None).cast("array<float>"))
    # candidates of one user stay together so per-batch user encoding is reused
    return df.repartition("user_id").sortWithinPartitions("user_id", "item_id")


# --------------------------------------------------------------------------- step 2: Ray actors


class CheckpointLoader:
    """Picklable loader: the actor calls it once to get (model, featurizer, model_config)."""

    def __init__(self, checkpoint_path: str):
        self.checkpoint_path = checkpoint_path

    def __call__(self):
        from causalrec.models.featurize import Featurizer
        from causalrec.train.checkpoint import load_checkpoint

        model, mc, _meta = load_checkpoint(self.checkpoint_path)
        return model, Featurizer(mc), mc


class ScoreBatch:
    """The actor body: one model per actor, scores a pandas batch into SCORES rows (Arrow).

    Output rows follow the input order; ``uplift`` comes from the model's uplift heads
    when it has them, else from the per-item prior in ``scoring_input`` (else null).
    """

    ITEM_CACHE_MAX = 100_000  # two-tower item vectors kept per actor (least recently used go first)

    def __init__(self, loader: Callable, model_version: str, scored_at, use_gpu: bool = False,
                 amp_dtype: Optional[str] = None, item_cache_max: Optional[int] = None):
        from collections import OrderedDict

        import torch

        self.torch = torch
        self.model, self.featurize, self.mc = loader()
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.amp = getattr(torch, amp_dtype) if amp_dtype else None
        self.model_version = model_version
        self.scored_at = pd.Timestamp(scored_at)
        self.kind = (self.mc or {}).get("model")
        self.item_cache: OrderedDict = OrderedDict()  # item_id -> two-tower item vector, bounded:
        self.item_cache_max = item_cache_max or self.ITEM_CACHE_MAX  # a 10M catalogue would fill the actor
        self.schema = SCORES.arrow_schema()
        self.stats = {"pairs": 0, "items_encoded": 0, "users_encoded": 0, "model_s": 0.0}

    def _to(self, inputs: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def _two_tower(self, batch: pd.DataFrame) -> dict:
        torch = self.torch
        model = self.model
        item_ids = batch["item_id"].to_numpy()
        vecs = {}  # this batch's item vectors: an eviction below cannot take one it needs
        new = []
        for i in pd.unique(item_ids):
            if i in self.item_cache:
                self.item_cache.move_to_end(i)
                vecs[i] = self.item_cache[i]
            else:
                new.append(i)
        if new:
            first = batch.drop_duplicates("item_id").set_index("item_id").loc[new].reset_index()
            first = first.assign(user_text="")  # item tower only: skip user tokenisation cost
            for k, v in zip(new, model.encode_items(self._to(self.featurize(first)))):
                vecs[k] = self.item_cache[k] = v
            self.stats["items_encoded"] += len(new)
            while len(self.item_cache) > self.item_cache_max:
                self.item_cache.popitem(last=False)
        iv = torch.stack([vecs[i] for i in item_ids])
        n_features = int((self.mc or {}).get("n_features", 0))
        if n_features:  # pair features enter the user tower: one user vector per row
            inputs = self._to(self.featurize(batch.assign(item_text="")))
            uv = model.encode_users(inputs)
            self.stats["users_encoded"] += len(batch)
        else:
            codes, uniq = pd.factorize(batch["user_id"])
            firsts = batch.iloc[pd.Series(range(len(batch))).groupby(codes).first().to_numpy()]
            uvecs = model.encode_users(self._to(self.featurize(firsts.assign(item_text=""))))
            uv = uvecs[torch.as_tensor(codes, device=uvecs.device)]
            self.stats["users_encoded"] += len(uniq)
            inputs = self._to(self.featurize(batch[["user_idx", "item_idx"]].assign(
                user_text="", item_text="")))
        return model.score(uv, iv, inputs["user_idx"], inputs["item_idx"])

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            ctx = torch.autocast(self.device, dtype=self.amp) if self.amp else _null()
            with ctx:
                if self.kind == "two_tower" and hasattr(self.model, "encode_items"):
                    out = self._two_tower(batch)
                else:
                    out = self.model(self._to(self.featurize(batch)))
        self.stats["model_s"] += time.perf_counter() - t0
        self.stats["pairs"] += len(batch)
        rel = out["relevance"].float().cpu().numpy().astype("float64")
        if "uplift" in out:
            upl = out["uplift"].float().cpu().numpy().astype("float64")
            se = np.full(len(batch), np.nan)
        elif "prior_uplift" in batch.columns:
            upl = pd.to_numeric(batch["prior_uplift"], errors="coerce").to_numpy(dtype="float64")
            se = pd.to_numeric(batch.get("prior_uplift_se"), errors="coerce").to_numpy(dtype="float64")
        else:
            upl = se = np.full(len(batch), np.nan)
        if not np.isfinite(rel).all():
            bad = batch.iloc[int(np.flatnonzero(~np.isfinite(rel))[0])]
            raise ValueError(f"scoring: non-finite relevance for user {bad['user_id']!r}, item {bad['item_id']!r}")
        return pa.table({
            "user_id": pa.array(batch["user_id"].astype(str).to_numpy(), pa.string()),
            "item_id": pa.array(batch["item_id"].astype(str).to_numpy(), pa.string()),
            "relevance": pa.array(rel, pa.float64()),
            "uplift": pa.array(upl, pa.float64(), mask=~np.isfinite(upl)),
            "uplift_se": pa.array(se, pa.float64(), mask=~np.isfinite(se)),
            "model_version": pa.array([self.model_version] * len(batch), pa.string()),
            "scored_at": pa.array([self.scored_at.to_pydatetime()] * len(batch), pa.timestamp("us", tz="UTC")),
        }, schema=self.schema)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def score_to_delta(input_path: str, output_path: str, loader: Callable, model_version: str, *,
                   batch_size: int, num_actors: int, cpus_per_actor: float, use_gpu: bool,
                   amp_dtype: Optional[str] = None, scored_at=None) -> dict:
    """Ray Data: read ``input_path`` (Delta) -> actor pool -> overwrite ``output_path`` (Delta)."""
    import ray
    from ray.data import ActorPoolStrategy, SaveMode

    scored_at = scored_at or pd.Timestamp.now(tz="UTC").floor("us")
    cols = [c for c in SCORING_INPUT.names]
    ds = ray.data.read_delta(input_path, columns=None)
    have = set(ds.columns())
    ds = ds.select_columns([c for c in cols if c in have])
    remote = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_actor}
    scored = ds.map_batches(
        ScoreBatch,
        fn_constructor_kwargs=dict(loader=loader, model_version=model_version, scored_at=scored_at,
                                   use_gpu=use_gpu, amp_dtype=amp_dtype),
        batch_size=batch_size,
        batch_format="pandas",
        compute=ActorPoolStrategy(size=num_actors),
        **remote,
    )
    t0 = time.perf_counter()
    scored.write_delta(output_path, mode=SaveMode.OVERWRITE)  # one commit after all blocks: atomic
    return {"seconds": round(time.perf_counter() - t0, 3), "scored_at": str(scored_at)}


# --------------------------------------------------------------------------- job


def resolve_model(cfg) -> dict:
    """The train_runs row to score with: ``scoring.run_id`` or the latest run."""
    from causalrec.train.job import latest_train_run

    if cfg.scoring.run_id:
        from deltalake import DeltaTable

        df = DeltaTable(cfg.table_path("train_runs")).to_pyarrow_table().to_pandas()
        df = df[df["run_id"] == cfg.scoring.run_id]
        if df.empty:
            raise LookupError(f"scoring.run_id={cfg.scoring.run_id!r} is not in {cfg.table_path('train_runs')}")
        return df.iloc[-1].to_dict()
    return latest_train_run(cfg)


def trained_id_index(store, version: Optional[int], model: str = "the model", stage: str = "scoring"):
    """``id_index`` as ``model`` was trained with it: at ``version`` (time travel) when recorded.

    ``build_id_index`` numbers ids densely in sorted order, so a rebuilt index (new users or items)
    shifts the indices and the current table would hand candidates other ids' embeddings. A
    version that can no longer be read (vacuumed, table recreated) fails, naming both versions.
    ``version`` None (a checkpoint from before the version was recorded): the current table, with a
    warning. ``stage``: who asks, for the messages (scoring; evaluation maps test rows through it too).
    """
    current = store.version("id_index")
    if version is None:
        if current is not None:
            log.warning("%s: %s does not record the id_index version it was trained with (trained before "
                        "causalrec recorded it); using the current id_index (version %s): if training_set ran "
                        "since, ids map to other users' and items' embeddings. Retrain to record it", stage, model,
                        current)
        return store.read("id_index") if current is not None else None
    if version == current:
        return store.read("id_index")
    try:
        df = store.read("id_index", version=version)
        df.count()  # touches every file of that version: fail here, not halfway through scoring
    except Exception as exc:
        raise RuntimeError(
            f"{stage}: {model} was trained with id_index version {version}, but {store.path('id_index')} "
            f"({'now at version ' + str(current) if current is not None else 'which no longer exists'}) "
            f"cannot be read at that version ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); {stage} with the current "
            f"version would map ids to other users' and items' embeddings. Retrain on the current "
            f"training_examples (causalrec train) or restore id_index version {version}") from exc
    log.info("%s: id_index is at version %s; using version %s, the one %s was trained with", stage, current,
             version, model)
    return df


def prepare_input(ctx, id_index_version: Optional[int] = None, model: str = "the model",
                  feature_names: Optional[list] = None, history_length: Optional[int] = None) -> int:
    """Spark step: write ``scoring_input``; returns its row count.

    ``id_index_version``: the id_index version the model was trained with (:func:`trained_id_index`).
    ``feature_names``: the feature layout it was trained with (checkpoint meta.json,
    :func:`causalrec.train.checkpoint.trained_feature_names`): the served vectors, built from the stored
    feature tables in their own layout (the attribute one-hots follow the users/items tables at the last
    features run), are mapped onto it by name (:func:`causalrec.training_set.align_features`). None: served
    as built (a checkpoint from before the layout was recorded). ``history_length``: the one the model was
    trained with (its config's ``history_len``), else ``features.history_length``: a history text longer
    than in training would feed the model items it never read there.
    """
    from pyspark.sql import functions as F

    store = ctx.store
    read = lambda n: store.read(n) if store.exists(n) else None  # noqa: E731
    cands = store.read("candidates")
    from causalrec.features.job import stored_feature_tables
    from causalrec.training_set import align_features, feature_layout, with_feature_vectors

    ft = stored_feature_tables(store)
    fv = None  # the feature-vector builder, when the stored tables allow one
    if ft is not None and store.exists("events") and store.exists("items"):
        events, items = store.read("events"), store.read("items")
        served = feature_layout(ft)

        def vectors(df):
            df = with_feature_vectors(df, ft, events, items, ctx.cfg)
            return df if feature_names is None else align_features(df, served, feature_names, model=model)
        fv = vectors
    else:
        log.warning("scoring: no user_features/item_features tables with recorded names; pair features are null")
    user_features = ft.users if ft is not None else read("user_features")
    if user_features is None:
        log.warning("scoring: no user_features table; candidates are scored without the users' history")
    df = build_scoring_input(ctx.spark, cands, trained_id_index(store, id_index_version, model), user_features,
                             read("users"), read("items"), read("uplift_effects"), feature_vectors=fv,
                             history_length=history_length or ctx.cfg.features.history_length)
    store.write(df, "scoring_input", mode="overwrite", spec=SCORING_INPUT, overwrite_schema=True)
    # scores is checked against this count, so a duplicated input would pass unseen downstream
    dup = (store.read("scoring_input").groupBy("user_id", "item_id").count()
           .where(F.col("count") > 1).limit(1).collect())
    if dup:
        raise RuntimeError(f"scoring_input has {dup[0]['count']} rows for (user {dup[0]['user_id']!r}, item "
                           f"{dup[0]['item_id']!r}); expected one row per candidate pair (duplicated candidates "
                           "or a join that fans out)")
    return store.row_count("scoring_input")


def run(ctx, loader: Optional[Callable] = None, model_version: Optional[str] = None) -> dict:
    """Score every candidate. ``loader``/``model_version`` override the train_runs checkpoint (tests, benchmarks)."""
    cfg = ctx.cfg
    store = ctx.store
    if loader is None:
        run_row = resolve_model(cfg)
        loader = CheckpointLoader(run_row["checkpoint_path"])
        model_version = model_version or str(run_row["model_version"])
    if not model_version:
        raise ValueError("scoring.run: a model_version is required with a custom loader")
    # the id map the checkpoint was trained with (a custom loader of another kind: the current one)
    idx_version, model, names, history_len = None, f"model {model_version}", None, None
    if isinstance(loader, CheckpointLoader):
        from causalrec.train.checkpoint import saved_model_config, trained_feature_names, trained_id_index_version

        idx_version = trained_id_index_version(loader.checkpoint_path)
        history_len = saved_model_config(loader.checkpoint_path).get("history_len")
        model = f"model {model_version} ({loader.checkpoint_path})"
        # and the feature layout it was trained with: served vectors are mapped onto it by name
        names = trained_feature_names(loader.checkpoint_path)
        if names is None:
            log.warning("scoring: %s does not record the feature layout it was trained with (trained before "
                        "causalrec recorded it); serving the stored feature tables' vectors as they are: if the "
                        "attribute vocabulary changed since training, the model reads other features in its "
                        "slots. Retrain to record it", model)
    with ctx.step("score: build scoring_input (Spark)"):
        n_in = prepare_input(ctx, idx_version, model, names, history_len)
    ctx.log_rows("scoring_input", n_in, "in")
    prev = store.version("scores")
    ctx.ray()
    with ctx.step("score: Ray Data map_batches -> Delta"):
        info = score_to_delta(store.path("scoring_input"), store.path("scores"), loader, model_version,
                              batch_size=cfg.scoring.batch_size, num_actors=cfg.scoring.num_actors,
                              cpus_per_actor=cfg.scoring.cpus_per_actor, use_gpu=cfg.scoring.use_gpu,
                              amp_dtype="bfloat16" if cfg.scoring.use_gpu else None)
    n_out = store.row_count("scores")
    ctx.log_rows("scores", n_out)
    if n_out != n_in:  # the write committed: put the previous scores back before failing
        kept = f"scores restored to version {prev}" if prev is not None else "scores holds the bad write"
        if prev is not None:
            store.restore("scores", prev)
        raise RuntimeError(f"scores has {n_out} rows but scoring_input has {n_in}: the write lost or duplicated "
                           f"rows; {kept}")
    return {"rows_in": {"scoring_input": n_in}, "rows_out": {"scores": n_out}, "model_version": model_version,
            "id_index_version": idx_version if idx_version is not None else store.version("id_index"),
            "previous_version": prev, "version": store.version("scores"),
            "pairs_per_s": round(n_out / max(info["seconds"], 1e-9), 1), **info}
