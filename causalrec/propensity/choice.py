"""Treatment propensity of a slot-filling logging policy: P(this item chosen for this slot).

In slate logs such as the Open Bandit Dataset every logged row is a recommendation
(``recommended`` is always true), so P(recommended | user, item) has a single class and
cannot be fitted. What the logging policy did was choose one item of a catalogue for each
slot, and the propensity inverse weighting needs is that choice probability (Saito et al.
2021, the ``pscore`` of obp). When a log does not carry it, this module estimates it.

Model, per choice group (a logging policy x its catalogue, e.g. ``policy`` and the OBD
campaign): multinomial logistic regression over the group's catalogue (Spark MLlib,
``family="multinomial"``) on one-hot slot position and one-hot time bucket (optionally the
user feature vector), so the logit of item a is ``alpha[a, position] + beta[a, time]``
(+ ``gamma[a] . x_user``). The time term follows a policy that learns while it logs (a
Bernoulli Thompson-sampling posterior drifts over the week); a context-free random policy
gets flat coefficients back. Propensities are clipped to [eps, 1 - eps]. The model has one
class per catalogue item, which suits slot policies over catalogues of up to a few thousand
items (OBD: 34-80); the rows themselves can be event-scale.

Diagnostics (held-out rows, never fitted on): reliability over every (row, candidate item)
pair, the choice model's own calibration since the chosen item is the only label; the mean
uniform-policy weight ``mean 1 / (K p)``, which is 1 in expectation for correct
propensities (a balancing check needing no truth); and, where the log also carries the
policy's own propensities, correlation and calibration against them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from causalrec.features.common import cutoff_lit

log = logging.getLogger(__name__)


def group_expression(keys) -> "F.Column":
    """``policy`` / ``context.<key>`` names -> one string column (missing parts read "all")."""
    parts = []
    for k in keys:
        if k.startswith("context."):
            parts.append(F.coalesce(F.get_json_object(F.col("context"), f"$.{k[len('context.'):]}"), F.lit("all")))
        else:
            parts.append(F.coalesce(F.col(k).cast("string"), F.lit("all")))
    return F.concat_ws("|", *parts) if parts else F.lit("all")


def choice_rows(events: DataFrame, group_keys, time_buckets: int, span_before=None) -> DataFrame:
    """Recommended rows with their choice group, slot position and time bucket within the group's span.

    ``span_before``: a cutoff; the span is then that of the rows before it (the ones fitted on), and
    later rows fall in the last bucket, the policy as last seen, rather than in buckets no model
    coefficient was fitted for. A group with no row before it takes its span from all its rows.
    """
    df = events.where(F.col("recommended") == F.lit(True)).select(
        "event_id", "user_id", "item_id", "event_time", "event_type", "logged_propensity",
        group_expression(group_keys).alias("choice_group"),
        F.coalesce(F.col("position"), F.lit(0)).cast("int").alias("position"))
    early = F.lit(True) if span_before is None else F.col("event_time") < cutoff_lit(span_before)
    span = df.groupBy("choice_group").agg(
        F.coalesce(F.min(F.when(early, F.col("event_time"))), F.min("event_time")).alias("_t0"),
        F.coalesce(F.max(F.when(early, F.col("event_time"))), F.max("event_time")).alias("_t1"))
    secs = lambda c: F.col(c).cast("double")  # noqa: E731
    frac = (secs("event_time") - secs("_t0")) / F.greatest(secs("_t1") - secs("_t0"), F.lit(1e-9))
    bucket = F.least(F.floor(frac * time_buckets), F.lit(time_buckets - 1)).cast("int")
    return df.join(F.broadcast(span), "choice_group").withColumn("time_bucket", bucket).drop("_t0", "_t1")


@dataclass
class ItemChoiceTreatment:
    """Multinomial LR of the chosen item on (position, time bucket[, user features]) per choice group."""

    eps: float = 0.001
    reg_grid: tuple = (1e-4, 1e-3, 1e-2)  # L2 strengths tried per group; the held-out log-loss picks one
    max_iter: int = 100
    time_buckets: int = 48
    user_features: bool = False
    models_: dict = field(default_factory=dict)  # group -> (fitted MLlib model, catalogue list)
    chosen_reg_: dict = field(default_factory=dict)  # group -> (reg_param, validation log-loss)
    encoder_: object = None

    def _fit_encoder(self, df: DataFrame, max_position=None) -> None:
        """One-hot sizes fixed from the largest position and the bucket count, so every group
        and every split encode alike (an encoder fitted per split would size by what it saw)."""
        from pyspark.ml.feature import OneHotEncoder

        max_pos = (max_position if max_position is not None else df.agg(F.max("position")).first()[0]) or 0
        top = df.sparkSession.createDataFrame([(float(max_pos), float(self.time_buckets - 1))],
                                              "position double, time_bucket double")
        self.encoder_ = OneHotEncoder(inputCols=["position", "time_bucket"], outputCols=["_pos_oh", "_time_oh"],
                                      dropLast=False).fit(top)

    def _features(self, df: DataFrame) -> DataFrame:
        from pyspark.ml.feature import VectorAssembler

        df = df.withColumn("position", F.col("position").cast("double")) \
               .withColumn("time_bucket", F.col("time_bucket").cast("double"))
        out = self.encoder_.transform(df)
        cols = ["_pos_oh", "_time_oh"]
        if self.user_features:
            from pyspark.ml.functions import array_to_vector

            out = out.withColumn("_uvec", array_to_vector("uvec"))
            cols.append("_uvec")
        return VectorAssembler(inputCols=cols, outputCol="_features").transform(out).drop("_pos_oh", "_time_oh", "_uvec")

    def fit(self, df: DataFrame, catalogues: dict, max_position=None) -> "ItemChoiceTreatment":
        """``catalogues``: group -> item ids in label order (every item the group ever logged).
        ``max_position``: the largest slot of the rows to be scored, when they are more than ``df``
        (a slot first used after a cutoff still encodes).

        With more than one value in ``reg_grid``, a hashed tenth of each group's rows scores
        every strength by log-loss, and the winner is refitted on all rows. A group too small for
        that split (no row in the tenth, or none outside it) takes the first value, as the log says.
        """
        if not catalogues:
            raise ValueError("treatment propensity (choice): no event has recommended = true, so there is no "
                             "logged choice to model")
        self._fit_encoder(df, max_position)
        for g, items in catalogues.items():
            rows = self._features(self._labelled(df.where(F.col("choice_group") == g), items)).cache()
            if rows.limit(1).count() == 0:
                raise ValueError(f"treatment propensity (choice): group {g!r} has no training rows")
            reg = self.reg_grid[0]
            if len(self.reg_grid) > 1:
                h = (F.abs(F.xxhash64(F.lit("choice-valid"), "event_id")) % 10) == 0
                fit_rows, valid = rows.where(~h), rows.where(h)
                losses = None
                if fit_rows.limit(1).count() and valid.limit(1).count():
                    losses = {r: self._log_loss(self._clf(r).fit(fit_rows), valid) for r in self.reg_grid}
                if losses is None or any(v is None for v in losses.values()):
                    self.chosen_reg_[g] = (reg, None)
                    log.info("treatment propensity (choice) %s: no validation rows to pick reg_param with (the "
                             "group is too small for a hashed validation tenth beside its fit rows); using the "
                             "first of propensity.choice_reg_grid, %g", g, reg)
                else:
                    reg = min(losses, key=losses.get)
                    self.chosen_reg_[g] = (reg, losses[reg])
                    log.info("treatment propensity (choice) %s: log-loss by reg_param %s -> %g", g,
                             {k: round(v, 4) for k, v in losses.items()}, reg)
            self.models_[g] = (self._clf(reg).fit(rows), list(items))
            rows.unpersist()
        return self

    def _clf(self, reg: float):
        from pyspark.ml.classification import LogisticRegression

        return LogisticRegression(featuresCol="_features", labelCol="_label", family="multinomial", regParam=reg,
                                  elasticNetParam=0.0, maxIter=self.max_iter, standardization=False)

    def _log_loss(self, model, rows: DataFrame) -> float:
        from pyspark.ml.functions import vector_to_array

        p = F.element_at(vector_to_array("probability"), F.col("_label").cast("int") + 1)
        return model.transform(rows).agg(F.avg(-F.log(F.greatest(p, F.lit(1e-12))))).first()[0]

    @staticmethod
    def _labelled(df: DataFrame, items: list) -> DataFrame:
        # the label column declares the catalogue size, so an item seen only in held-out rows
        # still has a class (MLlib reads numClasses from this metadata)
        idx = F.create_map(*[x for i, it in enumerate(items) for x in (F.lit(it), F.lit(float(i)))])
        meta = {"ml_attr": {"type": "nominal", "num_vals": len(items), "name": "_label"}}
        return df.select("*", idx[F.col("item_id")].alias("_label", metadata=meta))

    def predict(self, df: DataFrame) -> DataFrame:
        """Rows + ``probs`` (the whole choice distribution), ``raw_propensity``, clipped ``treatment_propensity``."""
        from pyspark.ml.functions import vector_to_array

        parts = []
        for g, (model, items) in self.models_.items():
            rows = self._features(self._labelled(df.where(F.col("choice_group") == g), items))
            scored = model.transform(rows).withColumn("probs", vector_to_array("probability"))
            parts.append(scored.withColumn("catalogue_size", F.lit(len(items)))
                         .drop("_features", "rawPrediction", "probability", "prediction"))
        out = parts[0]
        for p in parts[1:]:
            out = out.unionByName(p)
        raw = F.element_at("probs", F.col("_label").cast("int") + 1)
        return (out.withColumn("raw_propensity", raw)
                .withColumn("treatment_propensity",
                            F.least(F.greatest(F.col("raw_propensity"), F.lit(self.eps)), F.lit(1.0 - self.eps)))
                .withColumn("source", F.lit("choice")))


MAX_CHOICE_ITEMS = 2000  # classes of one group's multinomial model (its coefficients: classes x features)


def catalogues_of(df: DataFrame, max_items: int = MAX_CHOICE_ITEMS) -> dict:
    """group -> its items, most logged first: one class each in the group's multinomial model, so a
    catalogue is bounded (``max_items``, checked in Spark before any item reaches the driver)."""
    sizes = df.groupBy("choice_group").agg(F.countDistinct("item_id").alias("n")).where(F.col("n") > max_items)
    big = sizes.orderBy(F.desc("n")).limit(1).collect()
    if big:
        raise ValueError(
            f"treatment propensity (choice): choice group {big[0]['choice_group']!r} logs {big[0]['n']} distinct "
            f"items; the choice model has one class per item, at most {max_items}. For a large catalogue use "
            "propensity.treatment_method=logistic or gbt (a recommended-or-not model per logged pair), or log "
            "the policy's own propensities (treatment_method=logged)")
    counts = df.groupBy("choice_group", "item_id").agg(F.count(F.lit(1)).alias("n")).collect()
    out: dict = {}
    for r in sorted(counts, key=lambda r: (r["choice_group"], -r["n"], r["item_id"])):
        out.setdefault(r["choice_group"], []).append(r["item_id"])
    return out


def candidate_pairs(scored: DataFrame) -> DataFrame:
    """One row per (logged row, catalogue item): predicted choice probability and whether it was chosen."""
    return scored.select(F.posexplode("probs").alias("_k", "p"), "_label") \
                 .select("p", (F.col("_k") == F.col("_label").cast("int")).cast("double").alias("chosen"))


def uniform_weight_means(scored: DataFrame) -> dict:
    """group -> (mean of 1 / (K p), rows), in one aggregation: 1 in expectation when p is the true
    choice probability. Key ``None`` is every group pooled."""
    w = 1.0 / (F.col("catalogue_size") * F.col("treatment_propensity"))
    per = scored.groupBy("choice_group").agg(F.sum(w).alias("s"), F.count(F.lit(1)).alias("n")).collect()
    out = {r["choice_group"]: (r["s"] / r["n"], r["n"]) for r in per}
    n = sum(r["n"] for r in per)
    out[None] = (sum(r["s"] for r in per) / n if n else None, n)
    return out
