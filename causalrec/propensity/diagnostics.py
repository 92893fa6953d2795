"""Propensity diagnostics: is the model calibrated, are the weights usable, do groups overlap?

* reliability bins + expected calibration error (ECE) on held-out pairs: bins of equal
  row count (unweighted quantiles of the predicted propensity); within a bin the mean
  prediction and observed rate are weighted, and ECE = sum_b W_b/W |mean p_b - observed rate_b|
  (Guo et al. 2017) weighs each bin by its weighted mass W_b. Sampled unobserved pairs carry
  their inverse sampling weight, so bins are not of equal weighted mass.
* share at the clipping bound: how much of the estimate rests on the clip, not the model.
* effective sample size of the inverse weights w = 1/p: (sum w)^2 / sum w^2 (Kish).
* treated/control overlap: histogram overlap coefficient sum_b min(f_t, f_c) and the
  share of rows outside the common support.
* simulated data: Pearson correlation (raw and log) and calibration error vs the truth.

All are Spark aggregations returning a few numbers; rows are dicts for the
``propensity_diagnostics`` table.
"""
from __future__ import annotations

from typing import Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def _row(propensity, method, metric, value=None, bin=None, pred_mean=None, obs_rate=None, n=None) -> dict:
    f = lambda v: None if v is None else float(v)  # noqa: E731
    return {"propensity": propensity, "method": method, "metric": metric, "bin": bin, "value": f(value),
            "pred_mean": f(pred_mean), "obs_rate": f(obs_rate), "n": f(n)}


def reliability(df: DataFrame, pred: str, label: str, weight: Optional[str] = None, bins: int = 10) -> tuple[list, float]:
    """Equal-count bins by ``pred`` (edges ignore ``weight``): [(bin, weight, weighted mean pred,
    weighted observed rate)], and the weighted ECE."""
    w = F.col(weight) if weight else F.lit(1.0)
    qs = df.approxQuantile(pred, [i / bins for i in range(1, bins)], 0.001) if bins > 1 else []
    edges = sorted(set(qs))
    b = F.lit(0)
    for e in edges:
        b = b + (F.col(pred) > F.lit(e)).cast("int")
    g = (
        df.withColumn("_bin", b).withColumn("_w", w)
        .groupBy("_bin")
        .agg(F.sum("_w").alias("W"), (F.sum(F.col("_w") * F.col(pred)) / F.sum("_w")).alias("pm"),
             (F.sum(F.col("_w") * F.col(label)) / F.sum("_w")).alias("orate"))
        .orderBy("_bin").collect()
    )
    total = sum(r["W"] for r in g) or 1.0
    ece = sum(r["W"] / total * abs(r["pm"] - r["orate"]) for r in g)
    return [(int(r["_bin"]), float(r["W"]), float(r["pm"]), float(r["orate"])) for r in g], float(ece)


def weight_stats(df: DataFrame, p: str, raw: str, clip_low: float, clip_high: Optional[float] = None) -> dict:
    """ESS of 1/p, share of rows whose raw propensity was clipped, weight range."""
    clipped = F.col(raw) < F.lit(clip_low)
    if clip_high is not None:
        clipped = clipped | (F.col(raw) > F.lit(clip_high))
    r = df.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(1.0 / F.col(p)).alias("s1"),
        F.sum(1.0 / (F.col(p) * F.col(p))).alias("s2"),
        F.avg(F.coalesce(clipped, F.lit(False)).cast("double")).alias("clip_share"),
        F.max(1.0 / F.col(p)).alias("max_w"),
        F.avg(F.col(p)).alias("mean_p"),
    ).collect()[0]
    n = int(r["n"] or 0)
    ess = (r["s1"] ** 2 / r["s2"]) if r["s2"] else 0.0
    return {"n": n, "ess": ess, "ess_ratio": ess / n if n else 0.0, "share_at_clip": r["clip_share"] or 0.0,
            "max_weight": r["max_w"] or 0.0, "mean_propensity": r["mean_p"] or 0.0}


def overlap(df: DataFrame, p: str, treated: str, bins: int = 20) -> dict:
    """Histogram overlap of treated vs control propensities on [0, 1] and the share off common support."""
    b = F.least(F.floor(F.col(p) * bins), F.lit(bins - 1)).cast("int")
    h = df.groupBy(b.alias("_b"), F.col(treated).alias("_t")).agg(F.count(F.lit(1)).alias("n")).collect()
    nt = sum(r["n"] for r in h if r["_t"] == 1)
    nc = sum(r["n"] for r in h if r["_t"] == 0)
    if nt == 0 or nc == 0:
        return {"overlap_coefficient": None, "off_support_share": None, "n_treated": nt, "n_control": nc}
    ft = {r["_b"]: r["n"] / nt for r in h if r["_t"] == 1}
    fc = {r["_b"]: r["n"] / nc for r in h if r["_t"] == 0}
    coef = sum(min(ft.get(k, 0.0), fc.get(k, 0.0)) for k in set(ft) | set(fc))
    mm = df.groupBy(F.col(treated).alias("_t")).agg(F.min(p).alias("lo"), F.max(p).alias("hi")).collect()
    lo = max(r["lo"] for r in mm)
    hi = min(r["hi"] for r in mm)
    off = df.agg(F.avg(((F.col(p) < lo) | (F.col(p) > hi)).cast("double")).alias("s")).collect()[0]["s"]
    return {"overlap_coefficient": coef, "off_support_share": off, "n_treated": nt, "n_control": nc}


def versus_truth(est: DataFrame, truth: DataFrame, est_col: str, true_col: str, keys=("user_id", "item_id"), bins: int = 10) -> dict:
    """Correlation and calibration of estimated vs true propensities on the pairs both have."""
    j = est.select(*keys, F.col(est_col).alias("_e")).join(
        truth.select(*keys, F.col(true_col).alias("_t")), list(keys)).where(F.col("_t").isNotNull())
    r = j.agg(F.count(F.lit(1)).alias("n"), F.corr("_e", "_t").alias("corr"),
              F.corr(F.log("_e"), F.log(F.greatest("_t", F.lit(1e-12)))).alias("corr_log"),
              F.avg(F.abs(F.col("_e") - F.col("_t"))).alias("mae")).collect()[0]
    if not r["n"]:
        return {"n": 0, "corr": None, "corr_log": None, "mae": None, "calibration_error": None}
    _, cal = reliability(j, "_e", "_t", None, bins)
    return {"n": int(r["n"]), "corr": r["corr"], "corr_log": r["corr_log"], "mae": r["mae"], "calibration_error": cal}


def exposure_rows(method: str, holdout_scored: DataFrame, observed_scored: DataFrame, clip_min: float, bins: int) -> list:
    """Diagnostic rows for one exposure estimator."""
    rel, ece = reliability(holdout_scored, "exposure_propensity", "observed", "weight", bins)
    rows = [_row("exposure", method, "ece", ece, n=sum(r[1] for r in rel))]
    rows += [_row("exposure", method, "reliability", bin=b, pred_mean=pm, obs_rate=o, n=w) for b, w, pm, o in rel]
    ws = weight_stats(observed_scored, "exposure_propensity", "raw_propensity", clip_min)
    for k in ("share_at_clip", "ess", "ess_ratio", "max_weight", "mean_propensity"):
        rows.append(_row("exposure", method, k, ws[k], n=ws["n"]))
    return rows
