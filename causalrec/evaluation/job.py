"""The ``evaluate`` stage: every metric the available tables allow, into the ``metrics`` table.

Extract: whichever of training_examples, train_runs, scores, recommendations,
item_features, users, ground_truth, exposure_propensity, ranking_summary exist
(each missing input is recorded, never fatal unless nothing can be evaluated).
Transform: predictions for the held-out test pairs (each training run's
checkpoint scored in Spark ``mapInPandas``, else the ``scores`` table), then the
metric library in :mod:`causalrec.evaluation.metrics`. Load: the long-format
``metrics`` Delta table (overwritten: a rerun replaces, never duplicates) and
``<reports_dir>/evaluation.json`` with the numbers plus the small curves the
report plots (Lorenz, Qini, reliability, histograms).
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from typing import Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from causalrec.evaluation import metrics as M
from causalrec.schemas import METRICS

log = logging.getLogger(__name__)

OPTIONAL_TABLES = ("training_examples", "train_runs", "scores", "recommendations", "item_features", "items", "users",
                   "ground_truth", "exposure_propensity", "treatment_propensity", "ranking_summary")
OBJECTIVE_FAMILY = {"naive": "naive", "ips": "debiased", "snips": "debiased", "dr_jl": "debiased", "uplift": "causal"}


class MetricRows:
    """Accumulates long-format metric rows."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, metric: str, value, *, model: str, slice_: str, k: Optional[int] = None, details: Optional[dict] = None):
        if isinstance(value, M.MetricValue):
            v, lo, hi, n = value.value, value.ci_low, value.ci_high, value.n
        else:
            v, lo, hi, n = value, None, None, None
        if v is None:
            return
        self.rows.append({"metric": metric, "k": k, "slice": slice_, "model": model, "value": float(v),
                          "ci_low": None if lo is None else float(lo), "ci_high": None if hi is None else float(hi),
                          "n": None if n is None else int(n),
                          "details_json": json.dumps(details or {}, default=str, sort_keys=True)})

    def add_all(self, values: dict, **kw):
        for name, v in values.items():
            self.add(name, v, **kw)


# --------------------------------------------------------------------------- extract


def available_tables(store) -> dict[str, bool]:
    # an ingest empties a table its source no longer produces (ground_truth): empty reads as absent
    return {t: store.has_rows(t) if t == "ground_truth" else store.exists(t) for t in OPTIONAL_TABLES}


def train_runs_to_evaluate(store, objectives: list) -> list[dict]:
    """Latest run per (model, objective), optionally only the configured objectives."""
    rows = store.read_arrow("train_runs").to_pylist()
    latest: dict = {}
    for r in sorted(rows, key=lambda r: r["created_at"]):
        if objectives and r["objective"] not in objectives:
            continue
        latest[(r["model"], r["objective"])] = r
    return list(latest.values())


def examples_layout(store) -> tuple[Optional[int], Optional[list]]:
    """(``id_index`` version, ``features`` slot names) ``training_examples``' rows were built with, as
    training_set recorded them in their commit (:func:`causalrec.training_set.recorded_id_index_version`,
    :func:`~causalrec.training_set.recorded_feature_names`). A table written before the version was
    recorded: the current ``id_index`` version (the one the stage wrote beside it), or None without an
    ``id_index``; names None when unrecorded."""
    from causalrec.training_set import recorded_feature_names, recorded_id_index_version

    recorded = store.commit_metadata("training_examples")
    version = recorded_id_index_version(recorded)
    return (version if version is not None else store.version("id_index")), recorded_feature_names(recorded)


def reindex_examples(examples: DataFrame, id_index: DataFrame, indexed_with: DataFrame) -> DataFrame:
    """``examples`` with ``user_idx``, ``item_idx`` and ``history_item_idx`` as ``id_index`` numbers the ids.

    ``indexed_with``: the id_index ``examples`` were built with (it maps their history indices back to
    item ids). Ids ``id_index`` lacks are unseen, as scoring serves them
    (:func:`causalrec.scoring.build_scoring_input`): user_idx / item_idx -1, and history items without
    an index left out (:func:`causalrec.training_set.indexed_history`).
    """
    def side(df, kind, id_col, idx_col):
        return df.where(F.col("kind") == kind).select(F.col("id").alias(id_col), F.col("idx").alias(idx_col))

    users, items = side(id_index, "user", "user_id", "_new_u"), side(id_index, "item", "item_id", "_new_i")
    # history: old index -> item id -> new index; items the new index lacks drop out (inner join)
    old_to_new = side(indexed_with, "item", "item_id", "_old_h").join(
        side(id_index, "item", "item_id", "_new_h"), "item_id").select("_old_h", "_new_h")
    hist = (examples.select("example_id", F.posexplode("history_item_idx").alias("_pos", "_old_h"))
            .join(old_to_new, "_old_h")
            .groupBy("example_id").agg(F.sort_array(F.collect_list(F.struct("_pos", "_new_h"))).alias("_h")))
    out = (examples.join(users, "user_id", "left").join(items, "item_id", "left")
           .join(hist, "example_id", "left"))
    new_hist = F.coalesce(F.transform("_h", lambda s: s["_new_h"]), F.array().cast("array<int>"))
    out = (out.withColumn("user_idx", F.coalesce("_new_u", F.lit(-1)).cast("int"))
           .withColumn("item_idx", F.coalesce("_new_i", F.lit(-1)).cast("int"))
           .withColumn("history_item_idx", F.when(F.col("history_item_idx").isNull(), F.lit(None))
                       .otherwise(new_hist).cast("array<int>")))
    return out.select(*examples.columns)


def checkpoint_test_rows(store, test: DataFrame, checkpoint_path: str, rows_version: Optional[int],
                         model: str) -> tuple[DataFrame, dict]:
    """(``test`` indexed as the checkpoint was trained, provenance for the summary).

    The checkpoint's meta.json records the ``id_index`` version its rows were indexed with;
    ``rows_version`` is the one the current ``training_examples`` were (:func:`examples_layout`).
    They differ when training_set ran again after training (new users or items shift the dense
    indices): the test rows' indices would then feed the model other ids' embeddings, so their ids are
    mapped through the trained version (:func:`causalrec.scoring.trained_id_index`, as scoring does;
    ids new since training are unseen). A trained version that can no longer be read raises
    RuntimeError naming both versions.
    """
    from causalrec.scoring import trained_id_index
    from causalrec.train.checkpoint import trained_id_index_version

    trained = trained_id_index_version(checkpoint_path)
    info = {"id_index_version": trained, "test_rows_id_index_version": rows_version, "reindexed": False}
    if trained is None:
        if rows_version is not None:
            log.warning("evaluation: %s does not record the id_index version it was trained with (trained before "
                        "causalrec recorded it); scoring its test rows with their own indices (id_index version "
                        "%s): if training_set ran since training, ids map to other users' and items' embeddings. "
                        "Retrain to record it", model, rows_version)
        return test, info
    if trained == rows_version:
        return test, info
    if rows_version is None:
        raise RuntimeError(f"evaluation: {model} was trained with id_index version {trained}, but "
                           f"{store.path('id_index')} does not exist, so the test rows' indices cannot be mapped "
                           "to the trained ones. Rerun training_set and train")
    log.warning("evaluation: %s was trained with id_index version %s, but training_examples were rebuilt since "
                "(indexed with version %s): its test rows' ids are mapped through version %s; ids new since "
                "training are scored as unseen", model, trained, rows_version, trained)
    trained_idx = trained_id_index(store, trained, model, stage="evaluation")
    try:
        rows_idx = store.read("id_index", version=rows_version)
        rows_idx.count()  # fail here, not inside the scoring tasks
    except Exception as exc:
        raise RuntimeError(
            f"evaluation: training_examples were indexed with id_index version {rows_version}, which "
            f"{store.path('id_index')} (now at version {store.version('id_index')}) cannot be read at "
            f"({type(exc).__name__}), so their history indices cannot be mapped to the ones {model} was trained "
            f"with (id_index version {trained}). Rerun training_set") from exc
    return reindex_examples(test, trained_idx, rows_idx), dict(info, reindexed=True)


def checkpoint_features(test: DataFrame, rows_names: Optional[list], checkpoint_path: str, model: str) -> DataFrame:
    """``test``'s ``features`` in the layout the checkpoint was trained with, mapped by name.

    ``rows_names``: the layout training_examples were built with (their commit metadata,
    :func:`causalrec.training_set.recorded_feature_names`). training_set rebuilds the attribute one-hots
    from the current users/items tables, so rows rebuilt after training may hold other features in the
    model's slots; they are mapped as scoring maps served vectors (:func:`causalrec.training_set.align_features`).
    Either layout unrecorded: the rows as they are.
    """
    from causalrec.train.checkpoint import trained_feature_names
    from causalrec.training_set import align_features

    trained = trained_feature_names(checkpoint_path)
    if trained is None or rows_names is None or "features" not in test.columns:
        return test
    return align_features(test, rows_names, trained, what="evaluation", model=model)


# --------------------------------------------------------------------------- transforms


SCORE_INPUT_COLUMNS = ("user_idx", "item_idx", "features", "history_item_idx", "user_text", "item_text")


def score_with_checkpoint(examples: DataFrame, checkpoint_path: str, batch_size: int = 1024) -> DataFrame:
    """(example_id, prediction, uplift) from a checkpoint, scored inside Spark tasks.

    Each task loads the checkpoint once (safetensors + JSON config) and runs the
    model on pandas batches, so test sets of any size score in parallel.
    """
    cols = ["example_id"] + [c for c in SCORE_INPUT_COLUMNS if c in examples.columns]

    def score(batches):
        import numpy as np
        import pandas as pd
        import torch

        from causalrec.models.featurize import Featurizer
        from causalrec.train.checkpoint import load_checkpoint

        model, mc, _ = load_checkpoint(checkpoint_path)
        featurize = Featurizer(mc)
        for pdf in batches:
            for start in range(0, len(pdf), batch_size):
                b = pdf.iloc[start:start + batch_size].reset_index(drop=True)
                with torch.no_grad():
                    out = model(featurize(b))
                up = out.get("uplift")
                yield pd.DataFrame({
                    "example_id": b["example_id"].astype(str),
                    "prediction": out["relevance"].float().cpu().numpy().astype("float64"),
                    "uplift": (up.float().cpu().numpy().astype("float64") if up is not None
                               else np.full(len(b), np.nan)),
                })

    return examples.select(*cols).mapInPandas(score, "example_id string, prediction double, uplift double")


SCORES_EMPTY = "scores table is empty"


def latest_scores(scores: DataFrame) -> Optional[DataFrame]:
    """The rows of the latest scored model version; None when the table holds no scored row."""
    latest = scores.agg(F.max("scored_at")).collect()[0][0]
    if latest is None:
        return None
    version = scores.where(F.col("scored_at") == latest).select("model_version").first()[0]
    return scores.where(F.col("model_version") == version)


def test_predictions_from_scores(test: DataFrame, scores: DataFrame) -> tuple[Optional[DataFrame], float]:
    """The latest model version's scores on every test pair, null where it scored none; returns (df, share
    of test pairs scored), (None, 0.0) when the scores table is empty.

    Every test row stays: an unscored relevant item is a miss of the ranking metrics (they rank only
    scored rows), where an inner join dropped it from the truth and raised recall and NDCG."""
    latest = latest_scores(scores)
    if latest is None:
        return None, 0.0
    s = latest.select("user_id", "item_id", F.col("relevance").alias("prediction"), F.col("uplift").alias("uplift"))
    j = test.join(s, ["user_id", "item_id"], "left")
    r = j.agg(F.count(F.lit(1)).alias("n"), F.count("prediction").alias("scored")).first()
    return j, (r["scored"] / r["n"] if r["n"] else 0.0)


def ips_population(examples: DataFrame) -> Optional[float]:
    """The number of user-item pairs an IPS rating metric over the observed MNAR test rows speaks for.

    ``exposure_propensity`` is the chance a pair was observed anywhere in the log, but the test split
    holds only a share ``f`` of the observed pairs, so ``sum_test err / p`` estimates ``f`` times the
    sum over all pairs: with ``N = users x items`` alone (Schnabel et al. 2016, eq. 7, for a test set
    that is the whole log) the IPS errors came out ``f`` times too small. Returns
    ``users x items x f``, ``f`` = the test split's share of the observed MNAR rows (None without
    any). One aggregation over ``training_examples``.
    """
    obs = (F.col("observed") == 1) & ~F.col("is_mcar")
    r = examples.agg(F.countDistinct("user_id").alias("u"), F.countDistinct("item_id").alias("i"),
                     F.count(F.when(obs, 1)).alias("n_obs"),
                     F.count(F.when(obs & (F.col("split") == "test"), 1)).alias("n_test")).first()
    if not r["n_obs"] or not r["n_test"]:
        return None
    return float(r["u"]) * float(r["i"]) * r["n_test"] / r["n_obs"]


def evaluate_predictions(rows: MetricRows, pred: DataFrame, model: str, ks: list, threshold: float, task: str,
                         clip: float, calib_bins: int, curves: dict, details: dict,
                         ips_n: Optional[float] = None, clip_treatment: float = 0.01) -> Optional[DataFrame]:
    """Rating, AUC and ranking metrics of one model's test predictions on every slice.

    ``ips_n``: the population the IPS rating metrics divide by (:func:`ips_population`);
    ``clip_treatment``: the treatment propensity clip of the Qini curve's arm weights. Returns the
    per-user ranking metrics of the primary slice (MCAR when there is one) for the user-group gap.
    """
    pred = pred.persist()
    per_user_primary = None
    target = "label" if task == "rating" else "outcome"
    slices = []
    if pred.where("is_mcar").limit(1).count():
        slices.append(("mcar_test", pred.where("is_mcar"), ["none"]))
    if pred.where("NOT is_mcar").limit(1).count():
        slices.append(("mnar_test", pred.where("NOT is_mcar"), ["none", "ips", "snips"]))
    for name, d, weightings in slices:
        for weighting in weightings:
            sl = name if weighting == "none" else f"{name}_{weighting}"
            kw = dict(col_propensity="exposure_propensity" if weighting != "none" else None, weighting=weighting,
                      clip=clip)
            det = dict(details, weighting=weighting, target=target,
                       **({"ips_population": ips_n} if weighting == "ips" and ips_n else {}))
            rm = M.rating_metrics(d, col_rating=target, col_prediction="prediction",
                                  population_size=ips_n if weighting == "ips" else None, **kw)
            rows.add_all(rm, model=model, slice_=sl, details=det)
            if d.where(F.col("outcome").isNotNull()).limit(1).count():
                rows.add("auc", M.auc(d, col_label="outcome", col_prediction="prediction", **kw), model=model,
                         slice_=sl, details=dict(det, target="outcome"))
            relevant_at = threshold if task == "rating" else 0.5  # a click outcome is 0/1
            for k in ks:
                per_user = M.ranking_metrics_by_user(d, d, k=k, col_rating=target, col_prediction="prediction",
                                                     relevance_threshold=relevant_at, **kw)
                rows.add_all(M.mean_with_interval(per_user, list(M.RANKING_METRICS)), model=model, slice_=sl, k=k,
                             details=dict(det, relevance_threshold=relevant_at))
                if weighting == "none" and per_user_primary is None and k == max(ks):
                    per_user_primary = per_user
        if task == "click":
            cal = M.calibration(d, col_label="outcome", col_prediction="prediction", n_bins=calib_bins)
            rows.add("ece", cal["ece"], model=model, slice_=name, details={"bins": calib_bins})
            rows.add("brier", cal["brier"], model=model, slice_=name)
            curves.setdefault("calibration", {})[f"{model} ({name})"] = cal
    has_uplift = pred.where(F.col("uplift").isNotNull() & ~F.isnan("uplift") & F.col("treated").isNotNull()
                            & F.col("outcome").isNotNull()).limit(1).count()
    if has_uplift:
        # the logged treatment was a policy's choice: its propensity weighs the arms (see qini_curve)
        weighted = "treatment_propensity" in pred.columns and \
            pred.where(F.col("treatment_propensity").isNotNull()).limit(1).count() > 0
        q = M.qini_curve(pred, col_uplift="uplift", col_treatment="treated", col_outcome="outcome",
                         col_propensity="treatment_propensity" if weighted else None, clip=clip_treatment)
        rows.add("qini_coefficient", q["qini_coefficient"], model=model, slice_="test",
                 details=dict(details, propensity_weighted=weighted))
        curves.setdefault("qini", {})[model] = dict(q, propensity_weighted=weighted)
    return per_user_primary


def user_groups(users: DataFrame, attribute: str) -> Optional[DataFrame]:
    """(user_id, group) from users.segment or from an attribute token 'name:value'."""
    if attribute == "segment":
        g = users.select("user_id", F.col("segment").alias("group")).where(F.col("group").isNotNull())
    else:
        prefix = attribute + ":"
        g = users.select("user_id", F.explode_outer("attributes").alias("a")).where(F.col("a").startswith(prefix)) \
            .groupBy("user_id").agg(F.min(F.expr(f"substring(a, {len(prefix) + 1})")).alias("group"))
    return g if g.limit(1).count() else None


def held_out_effects(examples: DataFrame, clip: float) -> Optional[DataFrame]:
    """Per-pair IPS effects of recommending (:func:`metrics.ips_effect_estimates`) from the test split's
    logged rows only: the models were fitted to the train split's outcomes, and effects estimated from
    those rows too would grade a ranking partly on its own training data. None without such rows."""
    logged = examples.where((F.col("split") == "test") & F.col("treated").isNotNull() & F.col("outcome").isNotNull()
                            & F.col("treatment_propensity").isNotNull())
    if not logged.limit(1).count():
        return None
    return M.ips_effect_estimates(logged, clip=clip)


def ground_truth_effects(gt: DataFrame) -> DataFrame:
    eff = F.coalesce(F.col("p_y1") - F.col("p_y0"), F.col("y1") - F.col("y0"))
    return gt.select("user_id", "item_id", eff.alias("effect")).where(F.col("effect").isNotNull())


def evaluate_recommendations(rows: MetricRows, recs: DataFrame, k: int, n_catalog: Optional[int],
                             groups: Optional[DataFrame], effects: dict, curves: dict,
                             fair_base: Optional[str] = None) -> dict:
    """Exposure, fairness and causal metrics of each recommendation policy.

    ``fair_base``: the policy whose top-K the fair re-ranker started from; its Lorenz curve is
    marked ``before_fair_reranking`` (the report labels it so)."""
    out = {}
    policies = [r[0] for r in recs.select("policy").distinct().collect()]
    for policy in sorted(policies):
        r = recs.where(F.col("policy") == policy).where(F.col("rank") <= k)
        model = f"policy:{policy}"
        exp = M.item_exposure(r).persist()
        g = M.gini(exp, n_total=n_catalog)
        rows.add("exposure_gini", g, model=model, slice_="recommendations", k=k, details={"n_catalog": n_catalog})
        if n_catalog:
            rows.add("catalog_coverage", M.catalog_coverage(r, n_catalog), model=model, slice_="recommendations", k=k)
        curves.setdefault("lorenz", {})[policy] = dict(M.lorenz_curve(exp, n_total=n_catalog), gini=g)
        if policy == fair_base:
            curves["lorenz"][policy]["before_fair_reranking"] = True
        if groups is not None:
            by = M.exposure_by_group(exp, groups)
            for grp, v in by.items():
                rows.add(f"exposure_share:{grp}", v["exposure_share"], model=model, slice_="recommendations", k=k,
                         details=v)
        for source, eff in effects.items():
            cm = M.causal_metrics(r, eff, k=k)
            rows.add_all(cm, model=model, slice_=f"causal_{source}", k=k, details={"effects": source})
        out[policy] = {"gini": g}
        exp.unpersist()
    return out


def policy_top_k(scores: DataFrame, k: int, policy: str, blend_weight: float = 0.5) -> Optional[DataFrame]:
    """Each user's unconstrained top-K under ``policy``'s score from the latest scored model version,
    as the recommend stage ranks it (:func:`causalrec.ranking.policy_top_k`): the list a policy departs from and ranking_summary's "before" (relevance for uplift and
    blend, ``ranking.fair_base_policy`` for fair). Per user in pandas: candidate lists are bounded.
    None when the scores table is empty."""
    latest = latest_scores(scores)
    if latest is None:
        return None

    def rank(pdf):
        import numpy as np
        import pandas as pd

        from causalrec.ranking import policy_top_k

        ids = pdf["item_id"].astype(str).to_numpy()
        rel = pd.to_numeric(pdf["relevance"], errors="coerce").to_numpy("float64")
        upl = pd.to_numeric(pdf["uplift"], errors="coerce").to_numpy("float64")
        _, picked, _ = policy_top_k(rel, upl, ids, policy, blend_weight, k)
        return pd.DataFrame({"user_id": pdf["user_id"].to_numpy()[picked], "item_id": ids[picked],
                             "rank": np.arange(1, len(picked) + 1, dtype="int32"), "policy": policy})

    return (latest.select(F.col("user_id").cast("string"), F.col("item_id").cast("string"), "relevance", "uplift")
            .groupBy("user_id").applyInPandas(rank, "user_id string, item_id string, rank int, policy string"))


def propensity_curves(store, avail: dict, clip: float, curves: dict, rows: MetricRows) -> None:
    """Histograms of exposure propensities and inverse weights on observed pairs; ESS of the weights."""
    if avail.get("exposure_propensity"):
        ep = store.read("exposure_propensity")
        obs = ep.where(F.col("observed") == 1) if "observed" in ep.columns else ep
        obs = obs.select(F.col("exposure_propensity").alias("p")).withColumn(
            "w", F.lit(1.0) / F.greatest(F.col("p"), F.lit(clip)))
        curves["propensity_hist"] = M.histogram(obs, "p", bins=30, lo=0.0, hi=1.0)
        curves["weight_hist"] = M.histogram(obs, "w", bins=30, log=True)
        st = obs.agg(F.sum("w").alias("s"), F.sum(F.col("w") * F.col("w")).alias("s2"), F.max("w").alias("mx"),
                     F.count(F.lit(1)).alias("n")).collect()[0]
        if st["n"]:
            ess = float(st["s"]) ** 2 / float(st["s2"])
            rows.add("weight_ess", ess, model="exposure_propensity", slice_="observed",
                     details={"n": int(st["n"]), "ess_ratio": ess / st["n"]})
            rows.add("weight_max", float(st["mx"]), model="exposure_propensity", slice_="observed")
    if avail.get("treatment_propensity"):
        tp = store.read("treatment_propensity")
        curves["treatment_propensity_hist"] = M.histogram(tp, "treatment_propensity", bins=30, lo=0.0, hi=1.0)


# --------------------------------------------------------------------------- the stage


def run(ctx) -> dict:
    cfg, store = ctx.cfg, ctx.store
    ks = sorted({int(k) for k in cfg.evaluation.k}) or [10]
    threshold = cfg.evaluation.relevance_threshold
    if threshold is None:
        threshold = cfg.training_set.positive_threshold
    clip = cfg.evaluation.propensity_clip
    avail = available_tables(store)
    missing = {t: "not found" for t, ok in avail.items() if not ok}
    rows, curves, models = MetricRows(), {}, []
    per_user_by_model: dict[str, DataFrame] = {}

    with ctx.step("evaluate: test predictions"):
        test = None
        if avail["training_examples"]:
            te = store.read("training_examples")
            test = te.where((F.col("split") == "test") & (F.col("observed") == 1)).persist()
            ctx.log_rows("training_examples[test]", test.count(), "in")
        if test is not None and avail["train_runs"]:
            rows_version, rows_names = examples_layout(store)
            for run_row in train_runs_to_evaluate(store, cfg.evaluation.models):
                name = f"{run_row['model']}:{run_row['objective']}"
                try:
                    from causalrec.train.checkpoint import load_checkpoint

                    _, mc, _ = load_checkpoint(run_row["checkpoint_path"])
                except (FileNotFoundError, OSError) as exc:
                    missing[f"checkpoint {name}"] = str(exc)
                    continue
                try:  # the ids as this checkpoint's embedding rows number them
                    inp, ids = checkpoint_test_rows(store, test, run_row["checkpoint_path"], rows_version,
                                                    f"model {name} ({run_row['checkpoint_path']})")
                except RuntimeError as exc:
                    log.error("%s", exc)
                    missing[f"checkpoint {name}"] = str(exc)
                    continue
                inp = checkpoint_features(inp, rows_names, run_row["checkpoint_path"],
                                          f"model {name} ({run_row['checkpoint_path']})")
                scored = score_with_checkpoint(inp, run_row["checkpoint_path"], cfg.scoring.batch_size)
                pred = test.join(scored, "example_id", "inner")
                models.append({"model": name, "run_id": run_row["run_id"], "objective": run_row["objective"],
                               "family": OBJECTIVE_FAMILY.get(run_row["objective"], run_row["objective"]),
                               "task": mc.get("task", cfg.train.task), "source": "checkpoint", **ids,
                               "pred": pred})
        if test is not None and not models and avail["scores"]:
            pred, covered = test_predictions_from_scores(test, store.read("scores"))
            if pred is None:
                missing["scores"] = SCORES_EMPTY
            elif covered >= 0.5:
                models.append({"model": "scores", "run_id": None, "objective": None, "family": None,
                               "task": cfg.train.task, "source": f"scores table ({covered:.0%} of test pairs)",
                               "pred": pred, "coverage": covered})
            else:
                missing["test predictions"] = (f"scores cover {covered:.0%} of test pairs and no checkpoint "
                                               "could be loaded: run the train stage")

    with ctx.step("evaluate: model metrics"):
        ips_n = ips_population(te) if models else None
        for m in models:
            details = {"run_id": m["run_id"], "objective": m["objective"], "family": m["family"],
                       "source": m["source"]}
            # the IPS rating errors sum over the scored test rows: they speak for that share of the population
            pu = evaluate_predictions(rows, m["pred"], m["model"], ks, threshold, m["task"], clip,
                                      cfg.evaluation.calibration_bins, curves, details,
                                      ips_n * m.get("coverage", 1.0) if ips_n else ips_n, cfg.propensity.treatment_eps)
            if pu is not None:
                per_user_by_model[m["model"]] = pu

    groups_df = None
    if avail["users"]:
        groups_df = user_groups(store.read("users"), cfg.evaluation.user_group_attribute)
    if groups_df is not None:
        with ctx.step("evaluate: user-group gaps"):
            for name, pu in per_user_by_model.items():
                gap = M.user_group_gap(pu, groups_df.withColumnRenamed("group", "segment"), "ndcg")
                rows.add("user_group_gap:ndcg", gap["gap"], model=name, slice_="primary_test", k=max(ks),
                         details={"attribute": cfg.evaluation.user_group_attribute, **gap})
    elif per_user_by_model:
        missing["user groups"] = f"users table has no '{cfg.evaluation.user_group_attribute}' groups"

    effects: dict[str, DataFrame] = {}
    if avail["ground_truth"]:
        effects["ground_truth"] = ground_truth_effects(store.read("ground_truth"))
    if avail["training_examples"]:
        held_out = held_out_effects(store.read("training_examples"), cfg.propensity.treatment_eps)
        if held_out is not None:
            effects["ips_logged"] = held_out
    if not effects:
        missing["causal effects"] = "no ground_truth table and no test-split rows with logged treatment, outcome " \
                                    "and treatment propensity"

    # causal metrics of each model's own test ranking, when effects are known
    for m in models:
        for source, eff in effects.items():
            score_col = "uplift" if m["pred"].where(F.col("uplift").isNotNull() & ~F.isnan("uplift")).limit(1).count() \
                else "prediction"
            for k in ks:
                cm = M.causal_metrics(m["pred"], eff, k=k, col_rank=None, col_prediction=score_col)
                rows.add_all(cm, model=m["model"], slice_=f"test_causal_{source}", k=k,
                             details={"ranked_by": score_col, "effects": source})

    n_catalog = None
    item_groups = None
    if avail["item_features"]:
        itf = store.read("item_features")
        n_catalog = itf.select("item_id").distinct().count()
        item_groups = itf.select("item_id", "popularity_group")
    elif avail["items"]:
        n_catalog = store.read("items").select("item_id").distinct().count()
    rec_summary = {}
    if avail["recommendations"]:
        with ctx.step("evaluate: recommendations (exposure, fairness, causal)"):
            recs = store.read("recommendations")
            present = {r[0] for r in recs.select("policy").distinct().collect()}  # a handful of policies
            fair_base = cfg.ranking.fair_base_policy if "fair" in present else None
            # the unconstrained list each policy departs from, as ranking_summary's "before": the fair
            # base policy's top-K for fair, the relevance top-K for uplift and blend
            bases = sorted({fair_base if p == "fair" else "relevance" for p in present} - present)
            for base in bases if avail["scores"] else []:
                top = policy_top_k(store.read("scores"), int(cfg.ranking.k), base, cfg.ranking.blend_weight)
                if top is None:
                    missing["scores"] = SCORES_EMPTY
                    break
                recs = recs.unionByName(top, allowMissingColumns=True)
            recs = recs.persist()
            ctx.log_rows("recommendations", recs.count(), "in")
            rec_summary = evaluate_recommendations(rows, recs, int(cfg.ranking.k), n_catalog, item_groups, effects,
                                                   curves, fair_base)
            recs.unpersist()

    with ctx.step("evaluate: propensity distributions"):
        propensity_curves(store, avail, clip, curves, rows)

    if not rows.rows:
        raise RuntimeError(
            "evaluate: nothing to evaluate - no test predictions, recommendations or propensities were found "
            f"(missing: {sorted(missing)}). Run ingest, training_set, train and recommend first.")

    created = datetime.now(timezone.utc)
    out_rows = [dict(r, created_at=created) for r in rows.rows]
    df = ctx.spark.createDataFrame(out_rows, schema=METRICS.spark_schema())
    with ctx.step("evaluate: write metrics"):
        store.write(df, "metrics", mode="overwrite", spec=METRICS, overwrite_schema=True)
        ctx.log_rows("metrics", len(out_rows))
    summary = {
        "data": cfg.data.source,
        "created_at": created.isoformat(),
        "k": ks,
        "models": [{k: v for k, v in m.items() if k != "pred"} for m in models],
        "recommendations": rec_summary,
        "missing": missing,
        "metrics": rows.rows,
        "curves": curves,
    }
    path = write_json(cfg.reports_dir, "evaluation.json", summary)
    if test is not None:
        test.unpersist()
    return {"metrics_rows": len(out_rows), "models": [m["model"] for m in models], "json": path,
            "missing": missing}


def write_json(folder: str, name: str, obj) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean_json(obj), f, indent=1, default=str, allow_nan=False)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def clean_json(obj):
    """NaN and infinity become null so the JSON is strict (browsers and jq reject NaN)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return clean_json(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    return obj
