"""Treatment propensity P(recommended | user, item, context).

When the log carries the logging policy's own probabilities (Open Bandit Dataset,
the simulator), they ARE the propensities: passed through, not re-estimated (that would
only add error); a control row's logged probability of its action becomes 1 - it. Otherwise they are estimated with Spark MLlib (logistic regression or
gradient-boosted trees) on the adjustment-set features and clipped to [eps, 1 - eps]
so every inverse weight is bounded (positivity in practice).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def logged_treatment(events: DataFrame) -> DataFrame:
    """Rows with a logged propensity: (event_id, user_id, item_id, treated, treatment_propensity, raw, source).

    ``events.logged_propensity`` is the logging policy's probability of the action it took, so
    for a row it did not recommend it is P(not recommended); the table holds P(recommended).
    """
    lp = F.col("logged_propensity")
    p_rec = F.when(F.col("recommended"), lp).otherwise(F.lit(1.0) - lp)
    return events.where(lp.isNotNull() & F.col("recommended").isNotNull()).select(
        "event_id", "user_id", "item_id", F.col("recommended").cast("int").alias("treated"),
        p_rec.alias("treatment_propensity"), p_rec.alias("raw_propensity"),
        F.lit("logged").alias("source"),
    )


@dataclass
class EstimatedTreatment:
    """MLlib classifier of ``treated`` on concat(feature_cols); ``method`` = logistic or gbt."""

    method: str = "logistic"
    eps: float = 0.01
    reg_param: float = 0.01
    max_iter: int = 50
    feature_cols: tuple = ("uvec", "ivec")
    seed: int = 42

    def _vector(self, df):
        from pyspark.ml.functions import array_to_vector

        return df.withColumn("_features", array_to_vector(F.concat(*[F.col(c) for c in self.feature_cols])))

    def fit(self, df: DataFrame) -> "EstimatedTreatment":
        from pyspark.ml.classification import GBTClassifier, LogisticRegression

        if self.method == "logistic":
            clf = LogisticRegression(featuresCol="_features", labelCol="_label", regParam=self.reg_param, maxIter=self.max_iter)
        elif self.method == "gbt":
            clf = GBTClassifier(featuresCol="_features", labelCol="_label", maxIter=self.max_iter, maxDepth=4, seed=self.seed)
        else:
            raise ValueError(f"propensity.treatment_method: unknown {self.method!r}; expected logged, logistic or gbt")
        classes = df.select("treated").distinct().count()
        if classes < 2:
            raise ValueError("treatment propensity: every row has the same 'recommended' value, so P(recommended) "
                             "cannot be estimated; it needs logged propensities (events.logged_propensity)")
        self.model_ = clf.fit(self._vector(df).withColumn("_label", F.col("treated").cast("double")))
        return self

    def predict(self, df: DataFrame) -> DataFrame:
        from pyspark.ml.functions import vector_to_array

        out = self.model_.transform(self._vector(df)).withColumn("raw_propensity", vector_to_array("probability")[1])
        out = out.withColumn("treatment_propensity",
                             F.least(F.greatest(F.col("raw_propensity"), F.lit(self.eps)), F.lit(1.0 - self.eps)))
        return out.drop("_features", "rawPrediction", "probability", "prediction").withColumn("source", F.lit(self.method))
