"""Exposure propensity P(O_ui = 1 | user, item) for missing-not-at-random feedback.

Schnabel et al., "Recommendations as Treatments: Debiasing Learning and Evaluation"
(ICML 2016): an IPS estimate of a quantity over all user-item pairs weights each
observed pair by 1 / P(O_ui = 1). The estimators share one interface
(``fit(pairs, universe)`` / ``predict(pairs)``) and differ only in how they model O:

* :class:`PopularityExposure`  P(O=1 | i) = c * (n_i + 1)^alpha (power law in popularity),
  c chosen so the expected number of observations equals the observed one.
* :class:`NaiveBayesExposure`  P(O=1 | Y=r) = P(Y=r | O=1) P(O=1) / P(Y=r), with P(Y=r)
  from a small MCAR sample (Schnabel et al. 2016, section 5.1, their Yahoo! R3 method).
* :class:`LogisticExposure`  logistic regression of O on user and item features
  (Spark MLlib; their Coat method). Unobserved pairs are sampled, and each sampled pair
  carries the inverse of its sampling probability as weight, so the weighted likelihood
  estimates the full-universe model (no bias from negative subsampling).

Clipping: p -> max(p, clip_min), which bounds every inverse weight by 1/clip_min.
Self-normalisation (optional): p is rescaled so that sum over observed pairs of 1/p
equals the number of user-item pairs, the SNIPS normalisation of the weights. The factor
multiplies the clipped p and only the cap at 1 is applied again (exact unless some p reach
it), so the smallest propensity is then ``clip_min x factor``: clipping at ``clip_min`` again
undid the rescaling on sparse data, where many p sit at the clip.

``pairs`` columns: user_id, item_id, observed (1/0), value (rating/outcome or null),
weight (inverse sampling probability; 1 for observed), plus ``uvec``/``ivec``
(array<float>) for the feature-based estimator.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


@dataclass
class Universe:
    """The population an IPS estimate is about: every user with an observed pair in the fit x every item.

    Users without one (no label event, or first seen after a time split's cutoff) are left out by
    every method alike: the logistic model's sampled unobserved pairs are drawn from observed users
    (:func:`sample_unobserved`), so a universe counting the others too gave it a density about
    their share too high next to popularity and naive Bayes. The evaluation's IPS population
    (:func:`causalrec.evaluation.job.ips_population`) counts labelled users too.
    """

    n_users: int
    n_items: int
    n_observed: int

    @property
    def n_pairs(self) -> int:
        return self.n_users * self.n_items

    @property
    def density(self) -> float:
        return self.n_observed / max(self.n_pairs, 1)


@dataclass
class ExposureEstimator(ABC):
    clip_min: float = 0.01
    self_normalize: bool = False
    name: str = field(default="", init=False)
    scale_: Optional[float] = field(default=None, init=False, repr=False)  # fixed self-normalisation factor

    @abstractmethod
    def fit(self, pairs: DataFrame, universe: Universe, mcar: Optional[DataFrame] = None) -> "ExposureEstimator":
        """Learn from ``pairs`` (observed + weighted sampled unobserved)."""

    @abstractmethod
    def predict_raw(self, pairs: DataFrame) -> DataFrame:
        """``pairs`` plus ``raw_propensity`` (unclipped)."""

    def _clipped(self, pairs: DataFrame) -> DataFrame:
        p = F.least(F.greatest(F.col("raw_propensity"), F.lit(self.clip_min)), F.lit(1.0))
        return self.predict_raw(pairs).withColumn("exposure_propensity", p)

    def fix_scale(self, pairs: DataFrame, universe: Universe) -> "ExposureEstimator":
        """Fix the self-normalisation factor on ``pairs``' observed rows (the fit period's).

        Pairs scored later (e.g. observed after a time split's cutoff) then get the same function
        of their features instead of a factor renormalised over data the model was not fitted on.
        """
        if self.self_normalize:
            inv = self._clipped(pairs).where(F.col("observed") == 1).agg(
                F.sum(1.0 / F.col("exposure_propensity")).alias("s")).collect()[0]["s"]
            self.scale_ = (inv or 0.0) / max(universe.n_pairs, 1)
        return self

    def predict(self, pairs: DataFrame, universe: Optional[Universe] = None) -> DataFrame:
        """``pairs`` plus ``raw_propensity`` and ``exposure_propensity`` (clipped, optionally normalised;
        the factor comes from :meth:`fix_scale`, else from ``pairs`` themselves)."""
        if self.self_normalize and self.scale_ is None:
            if universe is None:
                raise ValueError("self_normalize needs the universe (number of user-item pairs)")
            self.fix_scale(pairs, universe)
        df = self._clipped(pairs)
        if self.self_normalize and self.scale_ > 0:
            df = df.withColumn(
                "exposure_propensity",
                F.least(F.col("exposure_propensity") * F.lit(self.scale_), F.lit(1.0)),
            )
        return df.withColumn("method", F.lit(self.name))


@dataclass
class PopularityExposure(ExposureEstimator):
    """P(O=1 | i) = min(1, c (n_i + 1)^alpha); alpha = 0 is uniform exposure, alpha = 1 proportional."""

    power: float = 0.5
    name: str = field(default="popularity", init=False)
    _item_p: Optional[DataFrame] = field(default=None, init=False, repr=False)

    def fit(self, pairs, universe, mcar=None):
        counts = pairs.where(F.col("observed") == 1).groupBy("item_id").agg(F.count(F.lit(1)).alias("n_i"))
        items = pairs.select("item_id").distinct().join(counts, "item_id", "left").fillna(0, subset=["n_i"])
        items = items.withColumn("pw", F.pow(F.col("n_i") + 1.0, F.lit(float(self.power))))
        tot = items.agg(F.sum("pw").alias("s"), F.count(F.lit(1)).alias("k")).collect()[0]
        # items never seen in pairs contribute (0+1)^alpha each
        unseen = max(universe.n_items - int(tot["k"]), 0)
        denom = universe.n_users * (float(tot["s"] or 0.0) + unseen)
        c = universe.n_observed / denom if denom > 0 else 0.0
        self.c_ = c
        self._item_p = items.select("item_id", F.least(F.lit(c) * F.col("pw"), F.lit(1.0)).alias("_p"))
        self._default_p = min(c, 1.0)
        return self

    def predict_raw(self, pairs):
        if self._item_p is None:
            raise RuntimeError("PopularityExposure: call fit() before predict()")
        return pairs.join(self._item_p, "item_id", "left").withColumn(
            "raw_propensity", F.coalesce(F.col("_p"), F.lit(self._default_p))
        ).drop("_p")


@dataclass
class NaiveBayesExposure(ExposureEstimator):
    """Per-value propensity from Bayes' rule with an MCAR sample giving P(Y = r).

    Needs ``value`` on observed pairs (ratings, or 0/1 outcomes); unobserved pairs
    (value unknown) get the marginal P(O=1). Values are rounded to the nearest integer.
    Add-one smoothing keeps rare values finite.
    """

    name: str = field(default="naive_bayes", init=False)

    def fit(self, pairs, universe, mcar=None):
        if mcar is None:
            raise ValueError("naive_bayes exposure needs an MCAR sample (mcar_events); use popularity or logistic")
        obs = pairs.where((F.col("observed") == 1) & F.col("value").isNotNull())
        p_r_obs = {int(r["r"]): r["n"] for r in obs.groupBy(F.round("value").cast("int").alias("r")).agg(F.count(F.lit(1)).alias("n")).collect()}
        p_r = {int(r["r"]): r["n"] for r in mcar.where(F.col("value").isNotNull()).groupBy(F.round("value").cast("int").alias("r")).agg(F.count(F.lit(1)).alias("n")).collect()}
        values = sorted(set(p_r_obs) | set(p_r))
        if not values:
            raise ValueError("naive_bayes exposure: no rated/valued observations to learn P(Y=r | O=1) from")
        n_obs = sum(p_r_obs.values()) + len(values)
        n_mcar = sum(p_r.values()) + len(values)
        marg = universe.density
        self.table_ = {r: min(1.0, ((p_r_obs.get(r, 0) + 1) / n_obs) * marg / ((p_r.get(r, 0) + 1) / n_mcar)) for r in values}
        self.marginal_ = marg
        return self

    def predict_raw(self, pairs):
        expr = F.lit(self.marginal_)
        for r, p in self.table_.items():
            expr = F.when(F.round(F.col("value")).cast("int") == r, F.lit(p)).otherwise(expr)
        return pairs.withColumn("raw_propensity", F.when(F.col("value").isNull(), F.lit(self.marginal_)).otherwise(expr))


@dataclass
class LogisticExposure(ExposureEstimator):
    """MLlib logistic regression of ``observed`` on concat(uvec, ivec), weighted by ``weight``."""

    reg_param: float = 0.01
    max_iter: int = 50
    feature_cols: tuple = ("uvec", "ivec")
    name: str = field(default="logistic", init=False)

    def _vector(self, pairs):
        from pyspark.ml.functions import array_to_vector

        arr = F.concat(*[F.col(c) for c in self.feature_cols])
        return pairs.withColumn("_features", array_to_vector(arr))

    def fit(self, pairs, universe, mcar=None):
        from pyspark.ml.classification import LogisticRegression

        lr = LogisticRegression(featuresCol="_features", labelCol="_label", weightCol="weight",
                                regParam=self.reg_param, maxIter=self.max_iter, standardization=True)
        train = self._vector(pairs).withColumn("_label", F.col("observed").cast("double"))
        self.model_ = lr.fit(train)
        return self

    def predict_raw(self, pairs):
        from pyspark.ml.functions import vector_to_array

        out = self.model_.transform(self._vector(pairs))
        out = out.withColumn("raw_propensity", vector_to_array("probability")[1])
        return out.drop("_features", "rawPrediction", "probability", "prediction")


ESTIMATORS = {"popularity": PopularityExposure, "naive_bayes": NaiveBayesExposure, "logistic": LogisticExposure}


def make_exposure_estimator(method: str, pcfg) -> ExposureEstimator:
    if method == "popularity":
        return PopularityExposure(clip_min=pcfg.clip_min, self_normalize=pcfg.self_normalize, power=pcfg.popularity_power)
    if method == "naive_bayes":
        return NaiveBayesExposure(clip_min=pcfg.clip_min, self_normalize=pcfg.self_normalize)
    if method == "logistic":
        return LogisticExposure(clip_min=pcfg.clip_min, self_normalize=pcfg.self_normalize, reg_param=pcfg.reg_param,
                                max_iter=pcfg.max_iter)
    raise ValueError(f"propensity.exposure_method: unknown {method!r}; expected one of {sorted(ESTIMATORS)}")


# --------------------------------------------------------------------------- data preparation

LABEL_PRIORITY = ("rating", "impression", "purchase", "click")


def label_event_type(events: DataFrame, configured: Optional[str] = None) -> str:
    """The event type that carries the feedback: configured, else the first present of LABEL_PRIORITY."""
    present = {r["event_type"] for r in events.select("event_type").distinct().collect()}
    if configured:
        if configured not in present:
            raise ValueError(f"training_set.label_event_type={configured!r} but the events hold only {sorted(present)}")
        return configured
    for t in LABEL_PRIORITY:
        if t in present:
            return t
    raise ValueError(f"no feedback events: expected one of {LABEL_PRIORITY}, events hold {sorted(present)}")


def observed_pairs(events: DataFrame, event_type: str) -> DataFrame:
    """(user_id, item_id, observed=1, value, weight=1): one row per logged pair (value averaged)."""
    return (
        events.where(F.col("event_type") == event_type)
        .groupBy("user_id", "item_id")
        .agg(F.avg("value").alias("value"))
        .withColumn("observed", F.lit(1))
        .withColumn("weight", F.lit(1.0))
    )


def sample_unobserved(observed: DataFrame, item_ids: DataFrame, n_items: int, ratio: float, seed: int) -> DataFrame:
    """About ``ratio`` unobserved pairs per observed pair, items drawn uniformly within each user.

    Each sampled pair's ``weight`` is (n_items - n_obs_u) / n_sampled_u: the inverse of
    its probability of being sampled among the user's unobserved pairs, so weighted
    sums over samples estimate sums over all the user's unobserved pairs.
    """
    if ratio <= 0:
        return observed.limit(0).select("user_id", "item_id", F.lit(0).alias("observed"),
                                        F.lit(None).cast("double").alias("value"), F.lit(1.0).alias("weight"))
    k = max(1, int(math.ceil(ratio * 1.25)))  # oversample a little to make up for collisions
    idx = item_ids.select("item_id").distinct().withColumn("_pos", F.row_number().over(Window.orderBy("item_id")) - 1)
    # a hash of (observed pair, draw, seed), not rand(): rand depends on how rows fall into
    # partitions after a shuffle, so reruns would sample different pairs
    draws = observed.select("user_id", "item_id").withColumn("_k", F.explode(F.sequence(F.lit(1), F.lit(k))))
    draws = draws.select("user_id", F.pmod(F.xxhash64("user_id", "item_id", "_k", F.lit(seed)),
                                           F.lit(n_items)).cast("int").alias("_pos"))
    cand = draws.join(idx, "_pos").select("user_id", "item_id").distinct()
    neg = cand.join(observed.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
    n_obs_u = observed.groupBy("user_id").agg(F.count(F.lit(1)).alias("_nobs"))
    n_neg_u = neg.groupBy("user_id").agg(F.count(F.lit(1)).alias("_nneg"))
    w = n_obs_u.join(n_neg_u, "user_id").select(
        "user_id", ((F.lit(n_items) - F.col("_nobs")) / F.col("_nneg")).alias("weight"))
    return neg.join(w, "user_id").select(
        "user_id", "item_id", F.lit(0).alias("observed"), F.lit(None).cast("double").alias("value"), "weight")
