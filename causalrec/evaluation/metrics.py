"""Recommendation metrics as Spark aggregations over named columns.

Why Spark aggregations: test logs and recommendation tables are event-scale, so
every metric here is a ``groupBy``/window/``agg`` plan; only the final aggregate
row (or a few hundred curve points) reaches the driver. Column names are
parameters (``col_user``, ``col_item``, ``col_rating``, ``col_prediction``,
``col_propensity`` ...), in the style of Microsoft Recommenders'
``spark_evaluation.py``, so the metrics do not depend on any table's shape.

Debiasing vocabulary used throughout (``weighting=``):

* ``"none"``  - the naive metric: every observed row counts once.
* ``"ips"``   - inverse propensity scoring, weight ``1 / p`` where ``p`` is the
  probability the row was observed (Schnabel et al. 2016, "Recommendations as
  Treatments"; Yang et al. 2018, "Unbiased offline recommender evaluation for
  missing-not-at-random implicit feedback").
* ``"snips"`` - self-normalised IPS: the same weights divided by their sum, which
  trades a little bias for much lower variance (Swaminathan & Joachims 2015).

A null or NaN label, prediction or (when weighting) propensity makes a row missing: it is left
out of that metric, never read as a top score or a maximal weight.

Causal metrics follow Sato et al. 2020 ("Unbiased Learning for the Causal Effect
of Recommendation"): the value of a ranking is the causal effect of the items it
recommends, not the outcomes that would have happened anyway.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

Z95 = 1.959963984540054
WEIGHTINGS = ("none", "ips", "snips")


# --------------------------------------------------------------------------- helpers


def _check_columns(df: DataFrame, what: str, *cols: Optional[str]) -> None:
    have = set(df.columns)
    for c in cols:
        if c is not None and c not in have:
            raise ValueError(f"{what}: column {c!r} is missing; the DataFrame has {sorted(have)}")


def _check_weighting(weighting: str, col_propensity: Optional[str]) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting != "none" and not col_propensity:
        raise ValueError(f"weighting={weighting!r} needs col_propensity (probability the row was observed)")


def _weight_expr(col_propensity: Optional[str], weighting: str, clip: float):
    if weighting == "none":
        return F.lit(1.0)
    p = F.col(col_propensity).cast("double")
    return F.lit(1.0) / F.greatest(p, F.lit(float(clip)))


def _usable(df: DataFrame, *cols: Optional[str]) -> DataFrame:
    """Rows where every named column is a number: null or NaN is missing, never a score or weight
    (Spark orders NaN above every number, and ``greatest(null, clip)`` is ``clip``: a 1/clip weight)."""
    cond = F.lit(True)
    for c in cols:
        if c:
            x = F.col(c)
            cond = cond & x.isNotNull() & ~F.isnan(x.cast("double"))
    return df.where(cond)


def _interval(mean: Optional[float], sd: Optional[float], n: Optional[float]) -> tuple:
    if mean is None or sd is None or not n or n < 2 or math.isnan(sd):
        return None, None
    half = Z95 * sd / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class MetricValue:
    """One number with an optional 95% normal interval and its sample size."""

    value: Optional[float]
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    n: Optional[int] = None

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


@contextmanager
def _prefix_sums(df: DataFrame, order_col: str, sum_cols: list[str], num_partitions: Optional[int] = None):
    """Yield ``df`` with ``<c>_cum`` = inclusive running sum of each ``sum_cols`` in ascending ``order_col``.

    Why not ``Window.orderBy`` without a partition: that moves every row into one
    task. Instead the rows are range-partitioned on the key (partition i holds only
    keys below partition i+1), each partition's totals are aggregated (a handful of
    rows reach the driver), and a running sum within each partition is offset by
    the totals of the partitions before it. ``order_col`` values must be unique
    (callers aggregate ties first). A context manager: the range-partitioned rows are
    persisted for the two passes and unpersisted on exit, so repeated metrics do not pile
    up cached data in the executors.
    """
    spark = df.sparkSession
    n = num_partitions or max(1, int(spark.conf.get("spark.sql.shuffle.partitions", "8")))
    ranged = (
        df.repartitionByRange(n, F.col(order_col))
        .withColumn("_pid", F.spark_partition_id())
        .persist()
    )
    try:
        yield _with_offsets(ranged, order_col, sum_cols)
    finally:
        ranged.unpersist()


def _with_offsets(ranged: DataFrame, order_col: str, sum_cols: list[str]) -> DataFrame:
    """The running sums of :func:`_prefix_sums` over its range-partitioned (``_pid``) rows."""
    spark = ranged.sparkSession
    totals = ranged.groupBy("_pid").agg(*[F.sum(c).alias(c) for c in sum_cols]).collect()
    running = {c: 0.0 for c in sum_cols}
    offsets = []
    for row in sorted(totals, key=lambda r: r["_pid"]):
        offsets.append((int(row["_pid"]), *[float(running[c]) for c in sum_cols]))
        for c in sum_cols:
            running[c] += float(row[c] or 0.0)
    off_df = spark.createDataFrame(offsets, ["_pid", *[f"_off_{c}" for c in sum_cols]]) if offsets else None
    w = Window.partitionBy("_pid").orderBy(order_col).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    out = ranged
    for c in sum_cols:
        out = out.withColumn(f"{c}_cum", F.sum(c).over(w))
    if off_df is not None:
        out = out.join(F.broadcast(off_df), "_pid", "left")
        for c in sum_cols:
            out = out.withColumn(f"{c}_cum", F.col(f"{c}_cum") + F.coalesce(F.col(f"_off_{c}"), F.lit(0.0)))
        out = out.drop(*[f"_off_{c}" for c in sum_cols])
    return out.drop("_pid")


# --------------------------------------------------------------------------- rating error


def rating_metrics(
    df: DataFrame,
    col_rating: str = "rating",
    col_prediction: str = "prediction",
    col_propensity: Optional[str] = None,
    weighting: str = "none",
    population_size: Optional[float] = None,
    clip: float = 1e-6,
    col_user: str = "user_id",
    col_item: str = "item_id",
) -> dict[str, MetricValue]:
    """MSE, RMSE and MAE of predicted ratings, naive or debiased.

    ``ips``: ``sum(err / p) / N`` with ``N = population_size`` - the number of
    user-item pairs the estimate speaks for; by default ``#users x #items`` in
    ``df`` (Schnabel et al. 2016, eq. 7). ``snips``: ``sum(err / p) / sum(1 / p)``.
    Intervals are normal approximations from the per-row (weighted) errors; for ``snips`` by the
    delta method, as the denominator is random too.
    """
    _check_columns(df, "rating_metrics", col_rating, col_prediction, col_propensity)
    _check_weighting(weighting, col_propensity)
    err = F.col(col_prediction).cast("double") - F.col(col_rating).cast("double")
    d = _usable(df, col_rating, col_prediction, col_propensity if weighting != "none" else None).select(
        (err * err).alias("se"), F.abs(err).alias("ae"), _weight_expr(col_propensity, weighting, clip).alias("w"),
        *( [F.col(col_user), F.col(col_item)] if weighting == "ips" and population_size is None else [] ),
    )
    aggs = [
        F.count(F.lit(1)).alias("n"),
        F.sum("w").alias("sw"),
        F.sum(F.col("w") * F.col("se")).alias("wse"),
        F.sum(F.col("w") * F.col("ae")).alias("wae"),
        F.sum(F.col("w") * F.col("w") * F.col("se") * F.col("se")).alias("wse2"),
        F.sum(F.col("w") * F.col("w") * F.col("ae") * F.col("ae")).alias("wae2"),
        F.sum(F.col("w") * F.col("w")).alias("sw2"),
        F.sum(F.col("w") * F.col("w") * F.col("se")).alias("w2se"),
        F.sum(F.col("w") * F.col("w") * F.col("ae")).alias("w2ae"),
    ]
    if weighting == "ips" and population_size is None:
        aggs += [F.countDistinct(col_user).alias("nu"), F.countDistinct(col_item).alias("ni")]
    r = d.agg(*aggs).collect()[0]
    n = int(r["n"] or 0)
    if n == 0:
        return {m: MetricValue(None, n=0) for m in ("mse", "rmse", "mae")}
    if weighting == "ips":
        N = float(population_size) if population_size is not None else float(r["nu"] * r["ni"])
    else:
        N = float(r["sw"])  # none: w = 1 so N = n; snips: sum of weights
    out = {}
    for name, s, s1, s2 in (("mse", "wse", "w2se", "wse2"), ("mae", "wae", "w2ae", "wae2")):
        mean = float(r[s]) / N
        if weighting == "snips":
            # a ratio of two random sums: the delta method's x_i = n * w_i * (e_i - mean) / N (mean 0);
            # treating the denominator as fixed (below) under-covers, 83% for a nominal 95% on an MNAR log
            x2_mean = (float(r[s2]) - 2 * mean * float(r[s1]) + mean * mean * float(r["sw2"])) * n / (N * N)
            var = max(x2_mean, 0.0) * n / max(n - 1, 1)
        else:
            # per-row contributions x_i = n * w_i * e_i / N have mean `mean`; var(mean) = var(x) / n
            x2_mean = float(r[s2]) * n / (N * N)
            var = max(x2_mean - mean * mean, 0.0) * n / max(n - 1, 1)
        lo, hi = _interval(mean, math.sqrt(var), n)
        out[name] = MetricValue(mean, lo, hi, n)
    mse = out["mse"]
    out["rmse"] = MetricValue(
        math.sqrt(mse.value),
        math.sqrt(max(mse.ci_low, 0.0)) if mse.ci_low is not None else None,
        math.sqrt(mse.ci_high) if mse.ci_high is not None else None,
        n,
    )
    return out


# --------------------------------------------------------------------------- AUC


def auc(
    df: DataFrame,
    col_label: str = "label",
    col_prediction: str = "prediction",
    col_propensity: Optional[str] = None,
    weighting: str = "none",
    clip: float = 1e-6,
) -> MetricValue:
    """Exact ROC AUC by the Mann-Whitney rank statistic, ties counted one half.

    ``AUC = sum_s w+(s) * (W-(< s) + w-(s) / 2) / (W+ * W-)`` over distinct scores
    ``s``: the probability a random positive outranks a random negative. With
    ``ips``/``snips`` each row carries weight ``1/p`` (the ratio makes both the same:
    a weighted AUC is self-normalised). Scores are aggregated per distinct value and
    the running sum of negatives uses range partitioning (:func:`_prefix_sums`), so
    no single task sees all rows. The interval is Hanley & McNeil (1982), with each class's
    effective sample size ``(sum w)^2 / sum w^2`` for its count when rows are weighted.
    """
    _check_columns(df, "auc", col_label, col_prediction, col_propensity)
    _check_weighting(weighting, col_propensity)
    w = _weight_expr(col_propensity, weighting, clip)
    y = F.col(col_label).cast("double")
    d = _usable(df, col_label, col_prediction, col_propensity if weighting != "none" else None)
    by_score = d.groupBy(F.col(col_prediction).cast("double").alias("_s")).agg(
        F.sum(F.when(y > 0, w).otherwise(0.0)).alias("pos"),
        F.sum(F.when(y > 0, 0.0).otherwise(w)).alias("neg"),
        F.sum(F.when(y > 0, 1).otherwise(0)).alias("npos"),
        F.sum(F.when(y > 0, 0).otherwise(1)).alias("nneg"),
        F.sum(F.when(y > 0, w * w).otherwise(0.0)).alias("pos2"),
        F.sum(F.when(y > 0, 0.0).otherwise(w * w)).alias("neg2"),
    )
    with _prefix_sums(by_score, "_s", ["neg"]) as cum:
        r = cum.agg(
            F.sum(F.col("pos") * (F.col("neg_cum") - F.col("neg") + 0.5 * F.col("neg"))).alias("num"),
            F.sum("pos").alias("P"),
            F.sum("neg").alias("N"),
            F.sum("npos").alias("np"),
            F.sum("nneg").alias("nn"),
            F.sum("pos2").alias("P2"),
            F.sum("neg2").alias("N2"),
        ).collect()[0]
    P, N = float(r["P"] or 0.0), float(r["N"] or 0.0)
    n_pos, n_neg = int(r["np"] or 0), int(r["nn"] or 0)
    if P <= 0 or N <= 0:
        return MetricValue(None, n=n_pos + n_neg)
    a = float(r["num"]) / (P * N)
    # weighted rows count by Kish's effective size (sum w)^2 / sum w^2: uneven IPS weights carry less
    # information than their row count, and the interval must widen with them (equal weights: n)
    e_pos, e_neg = P * P / float(r["P2"]), N * N / float(r["N2"])
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (e_pos - 1) * (q1 - a * a) + (e_neg - 1) * (q2 - a * a)) / max(e_pos * e_neg, 1)
    half = Z95 * math.sqrt(max(var, 0.0))
    return MetricValue(a, max(0.0, a - half), min(1.0, a + half), n_pos + n_neg)


# --------------------------------------------------------------------------- ranking @K


def ranking_metrics_by_user(
    rating_true: DataFrame,
    rating_pred: DataFrame,
    k: int = 10,
    col_user: str = "user_id",
    col_item: str = "item_id",
    col_rating: str = "rating",
    col_prediction: str = "prediction",
    col_propensity: Optional[str] = None,
    weighting: str = "none",
    relevance_threshold: Optional[float] = None,
    ndcg_gain: str = "binary",
    clip: float = 1e-6,
) -> DataFrame:
    """Per-user precision@K, recall@K, NDCG@K and AP@K (one row per user with a relevant item).

    ``rating_pred`` is ranked per user by ``col_prediction`` (descending, ties by
    item id). Both sides are reduced to one row per (user, item) first - logs repeat pairs (one
    row per impression) and a repeated pair must count once, or the metrics exceed 1: truth keeps
    the pair's most relevant row, predictions its highest score. A ``rating_true`` row is relevant when ``col_rating >=
    relevance_threshold`` (every row when the threshold is None). Each relevant row
    gets a weight ``v``: 1 (naive); ``1/p`` divided by the mean of ``1/p`` over all
    relevant rows (``ips``: Horvitz-Thompson with an estimated population size); or
    ``1/p`` rescaled per user to sum to the user's relevant count (``snips``, Yang et
    al. 2018). Then with hits ``h_i = [rank_i <= K]``:

    * precision = ``sum v h / K``; recall = ``sum v h / n_rel``
    * AP@K = ``sum_i v_i h_i (1 + sum_{j != i: rank_j <= rank_i} v_j h_j) / rank_i / min(n_rel, K)``:
      the row's own hit is weighted once (``v_i``, not ``v_i^2``: E[o/p * o/p] = 1/p, not 1)
    * NDCG@K = ``sum v g h / log2(rank + 1)`` over the ideal DCG@K ``sum v g / log2(ideal_rank + 1)``
      (``g``: 1 if relevant, or the rating itself under ``rating``, as scikit-learn's
      ``ndcg_score``): the same rows ordered by gain, equal gains in the model's order, so the
      weights never decide what is ideal. A ranking whose top min(n_rel, K) rows are all relevant
      scores 1 under every weighting, and binary NDCG stays <= 1; with weighted graded gains a
      user's value can exceed 1, as an IPS estimate can. Unweighted, all four match the textbook
      definitions.

    A NaN prediction ranks below every number (Spark orders NaN above them).
    """
    _check_columns(rating_true, "ranking_metrics (rating_true)", col_user, col_item, col_rating, col_propensity)
    _check_columns(rating_pred, "ranking_metrics (rating_pred)", col_user, col_item, col_prediction)
    _check_weighting(weighting, col_propensity)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ndcg_gain not in ("binary", "rating"):
        raise ValueError(f"ndcg_gain must be 'binary' or 'rating', got {ndcg_gain!r}")

    rating = F.col(col_rating).cast("double")
    rel = F.lit(1.0) if relevance_threshold is None else F.when(rating >= relevance_threshold, 1.0).otherwise(0.0)
    truth = _usable(rating_true, col_rating, col_propensity if weighting != "none" else None).select(
        F.col(col_user).alias("u"),
        F.col(col_item).alias("i"),
        rel.alias("rel"),
        (rel if ndcg_gain == "binary" else rating).alias("gain"),
        _weight_expr(col_propensity, weighting, clip).alias("w"),
    )
    # one row per pair: the most relevant one (max of the struct: rel, then gain, then its weight)
    best = F.max(F.struct("rel", "gain", "w")).alias("b")
    truth = truth.groupBy("u", "i").agg(best).select("u", "i", "b.rel", "b.gain", "b.w")
    # weight normalisation
    if weighting == "ips":
        mean_w = truth.where("rel > 0").agg(F.avg("w")).collect()[0][0] or 1.0
        truth = truth.withColumn("v", F.col("w") / F.lit(float(mean_w)))
    elif weighting == "snips":
        per_u = Window.partitionBy("u")
        scale = F.sum(F.col("rel")).over(per_u) / F.sum(F.col("w") * F.col("rel")).over(per_u)
        truth = truth.withColumn("v", F.col("w") * F.coalesce(scale, F.lit(1.0)))
    else:
        truth = truth.withColumn("v", F.lit(1.0))

    ranked = (
        _usable(rating_pred, col_prediction)
        .groupBy(F.col(col_user).alias("u"), F.col(col_item).alias("i"))
        .agg(F.max(F.col(col_prediction).cast("double")).alias("s"))
        .withColumn("rank", F.row_number().over(Window.partitionBy("u").orderBy(F.desc("s"), F.asc("i"))))
        .where(F.col("rank") <= k)
        .select("u", "i", "rank")
    )
    j = truth.join(ranked, ["u", "i"], "left")
    hit = F.when(F.col("rank").isNotNull(), 1.0).otherwise(0.0)
    j = j.withColumn("hit", hit * F.col("rel"))
    # running weighted hits by rank for AP
    w_ap = Window.partitionBy("u").orderBy(F.col("rank").asc_nulls_last()).rowsBetween(
        Window.unboundedPreceding, Window.currentRow
    )
    j = j.withColumn("cum_vh", F.sum(F.col("v") * F.col("hit")).over(w_ap))
    # the ideal ranking orders the rows by gain, equal gains in the model's order: ordering the weighted
    # gains instead scored a ranking with every relevant row on top below 1 unless its rarely-shown rows
    # came first, which rewarded tail items over equally relevant ones
    j = j.withColumn("vg", F.col("v") * F.col("gain"))
    ideal = Window.partitionBy("u").orderBy(F.desc("gain"), F.col("rank").asc_nulls_last(), F.asc("i"))
    j = j.withColumn("ideal_rank", F.row_number().over(ideal))
    disc = lambda r: F.lit(1.0) / F.log2(r.cast("double") + 1.0)  # noqa: E731
    per_user = j.groupBy("u").agg(
        F.sum("rel").alias("n_rel"),
        F.sum(F.col("v") * F.col("hit")).alias("vh"),
        F.sum(F.when(F.col("hit") > 0, F.col("v") * (F.col("cum_vh") - F.col("v") * F.col("hit") + F.col("hit"))
                     / F.col("rank")).otherwise(0.0)).alias("ap_num"),
        F.sum(F.when(F.col("rank").isNotNull(), F.col("v") * F.col("gain") * disc(F.col("rank"))).otherwise(0.0)).alias(
            "dcg"
        ),
        F.sum(F.when(F.col("ideal_rank") <= k, F.col("vg") * disc(F.col("ideal_rank"))).otherwise(0.0)).alias("idcg"),
    )
    return per_user.where(F.col("n_rel") > 0).select(
        F.col("u").alias(col_user),
        F.col("n_rel"),
        (F.col("vh") / F.lit(float(k))).alias("precision"),
        (F.col("vh") / F.col("n_rel")).alias("recall"),
        F.when(F.col("idcg") > 0, F.col("dcg") / F.col("idcg")).alias("ndcg"),
        (F.col("ap_num") / F.least(F.col("n_rel"), F.lit(float(k)))).alias("map"),
    )


RANKING_METRICS = ("precision", "recall", "ndcg", "map")


def mean_with_interval(df: DataFrame, cols: list[str]) -> dict[str, MetricValue]:
    """Mean of each column over rows (e.g. users) with a 95% normal interval; one aggregate row."""
    aggs = []
    for c in cols:
        aggs += [F.avg(c).alias(f"{c}__m"), F.stddev_samp(c).alias(f"{c}__sd"), F.count(c).alias(f"{c}__n")]
    r = df.agg(*aggs).collect()[0]
    out = {}
    for c in cols:
        m, sd, n = r[f"{c}__m"], r[f"{c}__sd"], r[f"{c}__n"]
        lo, hi = _interval(m, sd, n)
        out[c] = MetricValue(None if m is None else float(m), lo, hi, int(n or 0))
    return out


def ranking_metrics(rating_true: DataFrame, rating_pred: DataFrame, k: int = 10, **kw) -> dict[str, MetricValue]:
    """Users' mean precision@K, recall@K, NDCG@K, MAP@K (see :func:`ranking_metrics_by_user`)."""
    return mean_with_interval(ranking_metrics_by_user(rating_true, rating_pred, k, **kw), list(RANKING_METRICS))


# --------------------------------------------------------------------------- causal metrics


def top_k(
    df: DataFrame, k: int, col_user: str = "user_id", col_item: str = "item_id",
    col_prediction: Optional[str] = "prediction", col_rank: Optional[str] = None,
) -> DataFrame:
    """(user, item, rank) of each user's K best items, by an existing rank or by prediction (one
    row per item: a pair's repeated rows count once, at its highest prediction)."""
    if col_rank:
        _check_columns(df, "top_k", col_user, col_item, col_rank)
        return df.where(F.col(col_rank) <= k).select(col_user, col_item, F.col(col_rank).cast("int").alias("rank"))
    _check_columns(df, "top_k", col_user, col_item, col_prediction)
    # one row per pair (its highest score): repeated log rows must not fill several slots; NaN counts as
    # missing (ranked last with nulls), or Spark's ordering would put it above every number
    score = F.nanvl(F.col(col_prediction).cast("double"), F.lit(None).cast("double"))
    d = df.groupBy(col_user, col_item).agg(F.max(score).alias(col_prediction))
    w = Window.partitionBy(col_user).orderBy(F.desc(col_prediction), F.asc(col_item))
    return (
        d.withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= k).select(col_user, col_item, "rank")
    )


def ips_effect_estimates(
    logs: DataFrame,
    col_user: str = "user_id",
    col_item: str = "item_id",
    col_treatment: str = "treated",
    col_outcome: str = "outcome",
    col_propensity: str = "treatment_propensity",
    clip: float = 0.01,
) -> DataFrame:
    """Per (user, item) IPS estimate of the effect of recommending: mean of
    ``Z Y / e - (1 - Z) Y / (1 - e)`` over that pair's logged rows, where ``Z`` is
    the logged treatment and ``e = P(Z = 1)`` clipped to ``[clip, 1 - clip]``
    (Sato et al. 2020, section 5). Unbiased for the pair's effect when ``e`` is
    the logging policy's true treatment probability.
    """
    _check_columns(logs, "ips_effect_estimates", col_user, col_item, col_treatment, col_outcome, col_propensity)
    e = F.least(F.greatest(F.col(col_propensity).cast("double"), F.lit(clip)), F.lit(1.0 - clip))
    z = F.col(col_treatment).cast("double")
    y = F.col(col_outcome).cast("double")
    tau = z * y / e - (F.lit(1.0) - z) * y / (F.lit(1.0) - e)
    return (
        _usable(logs, col_treatment, col_outcome, col_propensity)  # a NaN propensity clipped to 1 - clip: weight 1/clip
        .groupBy(col_user, col_item)
        .agg(F.avg(tau).alias("effect"), F.count(F.lit(1)).alias("n_logged"))
    )


def causal_metrics_by_user(
    recs: DataFrame,
    effects: DataFrame,
    k: int = 10,
    col_user: str = "user_id",
    col_item: str = "item_id",
    col_rank: Optional[str] = "rank",
    col_prediction: Optional[str] = None,
    col_effect: str = "effect",
) -> DataFrame:
    """Per-user causal precision@K and causal DCG@K (Sato et al. 2020).

    ``CP@K(u) = sum_{i in top-K(u)} tau_ui / K`` and ``CDCG@K(u) = sum tau_ui / log2(1 + rank)``,
    with ``tau`` the true effect (simulator ground truth) or an estimate such as
    :func:`ips_effect_estimates`. A recommended pair with no effect row counts 0
    (as in Sato et al., where unlogged pairs carry no evidence); ``matched`` is the
    share of the user's top-K that had one, so a reader can see how much evidence
    backs the number.
    """
    _check_columns(effects, "causal_metrics (effects)", col_user, col_item, col_effect)
    top = top_k(recs, k, col_user, col_item, col_prediction, col_rank)
    eff = effects.groupBy(col_user, col_item).agg(F.avg(F.col(col_effect).cast("double")).alias("_tau"))
    j = top.join(eff, [col_user, col_item], "left")
    tau = F.coalesce(F.col("_tau"), F.lit(0.0))
    return j.groupBy(col_user).agg(
        (F.sum(tau) / F.lit(float(k))).alias("causal_precision"),
        F.sum(tau / F.log2(F.col("rank").cast("double") + 1.0)).alias("cdcg"),
        F.avg(F.when(F.col("_tau").isNotNull(), 1.0).otherwise(0.0)).alias("matched"),
    )


def causal_metrics(recs: DataFrame, effects: DataFrame, k: int = 10, **kw) -> dict[str, MetricValue]:
    """Users' mean causal precision@K, CDCG@K and matched share."""
    return mean_with_interval(causal_metrics_by_user(recs, effects, k, **kw), ["causal_precision", "cdcg", "matched"])


# --------------------------------------------------------------------------- exposure and fairness


def item_exposure(
    recs: DataFrame, col_user: str = "user_id", col_item: str = "item_id", col_rank: str = "rank",
    k: Optional[int] = None, discount: str = "log",
) -> DataFrame:
    """Exposure each item receives from a recommendation table: ``sum over users of
    1 / log2(1 + rank)`` (``discount="log"``, the position model behind DCG) or a
    plain count (``"none"``). Returns (item, exposure, n_users)."""
    _check_columns(recs, "item_exposure", col_user, col_item, col_rank)
    d = recs if k is None else recs.where(F.col(col_rank) <= k)
    weight = F.lit(1.0) if discount == "none" else F.lit(1.0) / F.log2(F.col(col_rank).cast("double") + 1.0)
    return d.groupBy(col_item).agg(F.sum(weight).alias("exposure"), F.countDistinct(col_user).alias("n_users"))


def gini(df: DataFrame, col_value: str = "exposure", n_total: Optional[int] = None) -> Optional[float]:
    """Gini coefficient of a non-negative quantity across rows (e.g. items).

    ``G = sum_i (2i - n - 1) x_(i) / (n sum x)`` with ``x`` sorted ascending, 1-based
    ``i``. ``n_total`` is the catalog size: items absent from ``df`` count as zero
    exposure (a recommender that never shows most items is unequal). 0 = everyone
    equal, ``1 - 1/n`` = one item gets everything.
    """
    _check_columns(df, "gini", col_value)
    by_val = df.where(F.col(col_value) > 0).groupBy(F.col(col_value).cast("double").alias("_x")).agg(
        F.count(F.lit(1)).cast("double").alias("c")
    )
    stats = df.agg(F.count(F.lit(1)).alias("n"), F.sum(F.when(F.col(col_value) > 0, 1).otherwise(0)).alias("npos"),
                   F.sum(F.col(col_value)).alias("s")).collect()[0]
    n_rows, n_pos, total = int(stats["n"]), int(stats["npos"] or 0), float(stats["s"] or 0.0)
    n = int(n_total) if n_total is not None else n_rows
    if n_total is not None and n_total < n_rows:
        raise ValueError(f"gini: n_total={n_total} is smaller than the {n_rows} rows given")
    if n == 0 or total <= 0:
        return None
    n_zero = n - n_pos
    # rows tied at value x occupy indices a .. a + c - 1 with a = n_zero + (count below) + 1
    a = F.lit(float(n_zero)) + F.col("c_cum") - F.col("c") + 1.0
    idx_sum = F.lit(2.0) * (F.col("c") * a + F.col("c") * (F.col("c") - 1.0) / 2.0) - F.col("c") * float(n + 1)
    with _prefix_sums(by_val, "_x", ["c"]) as cum:
        num = cum.agg(F.sum(idx_sum * F.col("_x"))).collect()[0][0] or 0.0
    return float(num) / (n * total)


def lorenz_curve(df: DataFrame, col_value: str = "exposure", n_total: Optional[int] = None, points: int = 101) -> dict:
    """Lorenz curve points (cumulative share of items, cumulative share of exposure), thinned to about
    ``points`` points for plotting.

    ``n_total``: the catalog size, its items absent from ``df`` at zero (as :func:`gini`). Spark: rows are
    counted per distinct value and running-summed in value order (:func:`_prefix_sums`); only the rows that
    hold one of the curve's points reach the driver, not one row per item.
    """
    import numpy as np

    _check_columns(df, "lorenz_curve", col_value)
    by_val = df.where(F.col(col_value).isNotNull()).groupBy(F.col(col_value).cast("double").alias("_x")).agg(
        F.count(F.lit(1)).cast("double").alias("c")).withColumn("cx", F.col("c") * F.col("_x"))
    n_rows, total = by_val.agg(F.sum("c"), F.sum("cx")).first()
    n_rows, total = int(n_rows or 0), float(total or 0.0)
    if n_total is not None and n_total < n_rows:
        raise ValueError(f"lorenz_curve: n_total={n_total} is smaller than the {n_rows} rows given")
    n = int(n_total) if n_total is not None else n_rows
    if n == 0 or total <= 0:
        return {"x": [0.0, 1.0], "y": [0.0, 0.0]}
    idx = [int(k) for k in np.unique(np.linspace(0, n, min(points, n + 1)).round().astype(int))]
    pad = n - n_rows  # the catalog's absent items: zeros, first in value order
    ranks = [k - pad for k in idx if k > pad]  # the curve's points among the given rows, 1-based
    sums = {}
    if ranks:
        targets = df.sparkSession.createDataFrame([(float(r),) for r in ranks], "_k double")
        with _prefix_sums(by_val, "_x", ["c", "cx"]) as cum:
            # the value group holding the rank-k row; the sum of the k smallest leaves out its rows above k
            hit = (F.col("_k") > F.col("c_cum") - F.col("c")) & (F.col("_k") <= F.col("c_cum"))
            rows = cum.join(F.broadcast(targets), hit).select(
                "_k", (F.col("cx_cum") - (F.col("c_cum") - F.col("_k")) * F.col("_x")).alias("s")).collect()
        sums = {int(r["_k"]): float(r["s"]) for r in rows}
    return {"x": [k / n for k in idx], "y": [min(sums.get(k - pad, 0.0) / total, 1.0) for k in idx]}


def exposure_by_group(
    exposure: DataFrame, groups: DataFrame, col_item: str = "item_id", col_group: str = "popularity_group",
    col_value: str = "exposure",
) -> dict[str, dict]:
    """Share of total exposure and share of catalog items per group (e.g. head/mid/tail).

    ``groups`` lists every catalog item with its group, so groups that get no
    exposure show 0.
    """
    _check_columns(groups, "exposure_by_group (groups)", col_item, col_group)
    j = groups.select(col_item, col_group).join(exposure.select(col_item, col_value), col_item, "left")
    rows = j.groupBy(col_group).agg(
        F.sum(F.coalesce(F.col(col_value), F.lit(0.0))).alias("exp"), F.count(F.lit(1)).alias("items")
    ).collect()
    tot_e = sum(float(r["exp"] or 0.0) for r in rows) or 1.0
    tot_i = sum(int(r["items"]) for r in rows) or 1
    return {
        str(r[col_group]): {"exposure_share": float(r["exp"] or 0.0) / tot_e, "item_share": int(r["items"]) / tot_i,
                            "items": int(r["items"])}
        for r in rows
    }


def catalog_coverage(recs: DataFrame, n_catalog: int, col_item: str = "item_id") -> Optional[float]:
    """Share of the catalog recommended to at least one user."""
    if not n_catalog:
        return None
    return recs.select(col_item).distinct().count() / float(n_catalog)


def user_group_gap(
    per_user: DataFrame, user_groups: DataFrame, col_metric: str, col_user: str = "user_id", col_group: str = "segment",
) -> dict:
    """Mean of a per-user metric in each user group and the gap (best minus worst group).

    Why a gap: a model can improve the average while serving one group worse;
    the gap is the number a fairness review asks for.
    """
    _check_columns(per_user, "user_group_gap (per_user)", col_user, col_metric)
    _check_columns(user_groups, "user_group_gap (user_groups)", col_user, col_group)
    rows = (
        per_user.join(user_groups.select(col_user, col_group), col_user, "inner")
        .where(F.col(col_group).isNotNull())
        .groupBy(col_group)
        .agg(F.avg(col_metric).alias("m"), F.count(F.lit(1)).alias("n"))
        .collect()
    )
    groups = {str(r[col_group]): {"mean": float(r["m"]) if r["m"] is not None else None, "n": int(r["n"])} for r in rows}
    means = [g["mean"] for g in groups.values() if g["mean"] is not None]
    gap = (max(means) - min(means)) if len(means) >= 2 else None
    return {"groups": groups, "gap": gap}


# --------------------------------------------------------------------------- calibration


def calibration(
    df: DataFrame, col_label: str = "label", col_prediction: str = "prediction", n_bins: int = 10,
) -> dict:
    """Reliability bins (equal width on [0, 1]) and expected calibration error.

    ``ECE = sum_b (n_b / n) |mean label_b - mean prediction_b|`` (Naeini et al.
    2015); also the Brier score. One row per non-empty bin reaches the driver.
    """
    _check_columns(df, "calibration", col_label, col_prediction)
    p = F.least(F.greatest(F.col(col_prediction).cast("double"), F.lit(0.0)), F.lit(1.0))
    b = F.least(F.floor(p * n_bins).cast("int"), F.lit(n_bins - 1))
    d = _usable(df, col_label, col_prediction)
    rows = (
        d.groupBy(b.alias("bin"))
        .agg(F.count(F.lit(1)).alias("n"), F.avg(p).alias("conf"), F.avg(F.col(col_label).cast("double")).alias("acc"),
             F.sum((p - F.col(col_label).cast("double")) ** 2).alias("sq"))
        .orderBy("bin")
        .collect()
    )
    n = sum(int(r["n"]) for r in rows)
    if n == 0:
        return {"bins": [], "ece": None, "brier": None, "n": 0}
    bins = [
        {"bin": int(r["bin"]), "lower": r["bin"] / n_bins, "upper": (r["bin"] + 1) / n_bins, "count": int(r["n"]),
         "mean_predicted": float(r["conf"]), "observed_rate": float(r["acc"])}
        for r in rows
    ]
    ece = sum(x["count"] / n * abs(x["observed_rate"] - x["mean_predicted"]) for x in bins)
    brier = sum(float(r["sq"]) for r in rows) / n
    return {"bins": bins, "ece": ece, "brier": brier, "n": n}


def histogram(df: DataFrame, col: str, bins: int = 30, lo: Optional[float] = None, hi: Optional[float] = None,
              log: bool = False) -> dict:
    """Equal-width histogram computed in Spark (edges, counts); ``log`` bins log10 of the value."""
    _check_columns(df, "histogram", col)
    x = F.col(col).cast("double")
    d = _usable(df, col)
    if log:
        d = d.where(x > 0)
        x = F.log10(x)
    st = d.agg(F.min(x).alias("lo"), F.max(x).alias("hi"), F.count(F.lit(1)).alias("n")).collect()[0]
    if not st["n"]:
        return {"edges": [], "counts": [], "n": 0, "log10": log}
    lo_v = float(st["lo"]) if lo is None else lo
    hi_v = float(st["hi"]) if hi is None else hi
    if hi_v <= lo_v:
        hi_v = lo_v + 1e-9
    width = (hi_v - lo_v) / bins
    b = F.least(F.greatest(F.floor((x - lo_v) / width).cast("int"), F.lit(0)), F.lit(bins - 1))
    rows = dict((int(r[0]), int(r[1])) for r in d.groupBy(b).count().collect())
    return {
        "edges": [lo_v + i * width for i in range(bins + 1)],
        "counts": [rows.get(i, 0) for i in range(bins)],
        "n": int(st["n"]),
        "log10": log,
    }


def qini_curve(
    df: DataFrame, col_uplift: str = "uplift", col_treatment: str = "treated", col_outcome: str = "outcome",
    points: int = 20, col_propensity: Optional[str] = None, clip: float = 0.01,
) -> dict:
    """Qini curve (Radcliffe 2007): target rows in decreasing predicted uplift; at each
    fraction ``phi`` the incremental outcomes ``Y_T(phi) - Y_C(phi) N_T(phi) / N_C(phi)``.

    ``col_propensity`` (the logged treatment probability ``e``): for a log whose treatment was not
    randomised, the arm means are inverse-propensity weighted (``1/e`` treated, ``1/(1-e)`` control,
    ``e`` clipped to ``[clip, 1 - clip]``; Hajek means), and the curve is ``N_T(phi)`` times their
    difference: raw arm means credit the ranking with whatever made the policy treat a row.
    With a constant ``e`` this is the unweighted curve; rows without ``e`` are left out.

    Rows are bucketed into ``points`` quantile groups of predicted uplift in Spark
    (``percent_rank`` is avoided: it is a single-partition window), and the curve is
    accumulated over the buckets on the driver. Returns x (fraction targeted), y
    (incremental outcomes), the random-targeting line and the Qini coefficient
    (area between them, normalised by the number of rows).
    """
    _check_columns(df, "qini_curve", col_uplift, col_treatment, col_outcome, col_propensity)
    d = _usable(df, col_uplift, col_treatment, col_outcome, col_propensity)
    qs = d.approxQuantile(col_uplift, [i / points for i in range(1, points)], 0.001)
    if not qs:
        return {"x": [], "y": [], "random": [], "qini_coefficient": None, "n": 0}
    bucket = F.lit(0)
    for q in qs:
        bucket = bucket + F.when(F.col(col_uplift) > q, 1).otherwise(0)
    z = F.col(col_treatment).cast("double")
    y = F.col(col_outcome).cast("double")
    if col_propensity:
        e = F.least(F.greatest(F.col(col_propensity).cast("double"), F.lit(clip)), F.lit(1.0 - clip))
        wt, wc = z / e, (1 - z) / (1 - e)
    else:
        wt, wc = z, 1 - z
    rows = d.groupBy(bucket.alias("b")).agg(
        F.count(F.lit(1)).alias("n"), F.sum(z).alias("nt"), F.sum(wt).alias("wt"), F.sum(wc).alias("wc"),
        F.sum(wt * y).alias("yt"), F.sum(wc * y).alias("yc"),
    ).collect()
    rows = sorted(rows, key=lambda r: -r["b"])  # highest predicted uplift first
    n_all = sum(int(r["n"]) for r in rows)
    xs, ys = [0.0], [0.0]
    n = nt = st = sc = yt = yc = 0.0
    for r in rows:
        n += r["n"]; nt += r["nt"] or 0.0; st += r["wt"] or 0.0; sc += r["wc"] or 0.0  # noqa: E702
        yt += r["yt"] or 0.0; yc += r["yc"] or 0.0  # noqa: E702
        xs.append(n / n_all)
        if st > 0 and sc > 0:
            ys.append(nt * (yt / st - yc / sc))
        else:  # no control row yet: every treated outcome counts
            ys.append(nt * yt / st if st > 0 else 0.0)
    total = ys[-1]
    rand = [total * x for x in xs]
    area = sum((xs[i] - xs[i - 1]) * ((ys[i] - rand[i]) + (ys[i - 1] - rand[i - 1])) / 2 for i in range(1, len(xs)))
    return {"x": xs, "y": ys, "random": rand, "qini_coefficient": area / max(n_all, 1) if n_all else None, "n": n_all}
