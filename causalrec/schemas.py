"""The table contract: every Delta table causalrec reads or writes, declared once.

Why one module: stages run in different processes (Spark executors, Ray workers)
and on different engines; declaring each table here as a list of typed columns and
deriving both the Spark ``StructType`` and the Arrow schema from it keeps them from
drifting. ``validate_columns`` gives the error every stage raises on a mismatch.

Types use a small vocabulary: string, long, int, double, float, boolean, timestamp,
date, decimal(p,s), array<T>.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True
    doc: str = ""


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()
    doc: str = ""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def spark_schema(self):
        from pyspark.sql import types as T

        return T.StructType([T.StructField(c.name, spark_type(c.type), c.nullable) for c in self.columns])

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, arrow_type(c.type), c.nullable) for c in self.columns])

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name!r} has no column {name!r}")


class SchemaMismatch(ValueError):
    """A DataFrame does not match a declared table; the message names the column."""


# --------------------------------------------------------------------------- type mapping


def spark_type(t: str):
    from pyspark.sql import types as T

    t = t.strip()
    if t.startswith("array<") and t.endswith(">"):
        return T.ArrayType(spark_type(t[6:-1]), True)
    if t.startswith("decimal("):
        p, s = t[8:-1].split(",")
        return T.DecimalType(int(p), int(s))
    simple = {
        "string": T.StringType(),
        "long": T.LongType(),
        "int": T.IntegerType(),
        "double": T.DoubleType(),
        "float": T.FloatType(),
        "boolean": T.BooleanType(),
        "timestamp": T.TimestampType(),
        "date": T.DateType(),
    }
    if t not in simple:
        raise ValueError(f"unknown column type {t!r}")
    return simple[t]


def arrow_type(t: str) -> pa.DataType:
    t = t.strip()
    if t.startswith("array<") and t.endswith(">"):
        return pa.list_(arrow_type(t[6:-1]))
    if t.startswith("decimal("):
        p, s = t[8:-1].split(",")
        return pa.decimal128(int(p), int(s))
    simple = {
        "string": pa.string(),
        "long": pa.int64(),
        "int": pa.int32(),
        "double": pa.float64(),
        "float": pa.float32(),
        "boolean": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "date": pa.date32(),
    }
    if t not in simple:
        raise ValueError(f"unknown column type {t!r}")
    return simple[t]


def spark_type_name(dt) -> str:
    """Inverse of :func:`spark_type` for error messages and checks."""
    from pyspark.sql import types as T

    if isinstance(dt, T.ArrayType):
        return f"array<{spark_type_name(dt.elementType)}>"
    if isinstance(dt, T.DecimalType):
        return f"decimal({dt.precision},{dt.scale})"
    return {
        T.StringType: "string",
        T.LongType: "long",
        T.IntegerType: "int",
        T.DoubleType: "double",
        T.FloatType: "float",
        T.BooleanType: "boolean",
        T.TimestampType: "timestamp",
        T.TimestampNTZType: "timestamp_ntz",
        T.DateType: "date",
        T.ShortType: "short",
        T.ByteType: "byte",
        T.BinaryType: "binary",
    }.get(type(dt), dt.simpleString())


def validate_columns(df, spec: TableSpec, *, source: str = "", allow_extra: bool = False) -> None:
    """Raise :class:`SchemaMismatch` naming the first missing or mistyped column."""
    where = f" in {source}" if source else ""
    have = {f.name: f.dataType for f in df.schema.fields}
    for c in spec.columns:
        if c.name not in have:
            if c.nullable and c.name in OPTIONAL_ON_INPUT.get(spec.name, ()):
                continue
            raise SchemaMismatch(
                f"table {spec.name!r}: column {c.name!r} is missing{where}; expected type {c.type}"
            )
        got = spark_type_name(have[c.name])
        if got != c.type:
            raise SchemaMismatch(
                f"table {spec.name!r}: column {c.name!r} has type {got}{where}; expected {c.type}"
            )
    if not allow_extra:
        extra = [n for n in have if n not in spec.names]
        if extra:
            raise SchemaMismatch(f"table {spec.name!r}: unexpected column(s) {extra}{where}")


def conform(df, spec: TableSpec):
    """Select the spec's columns in order, adding absent nullable ones as typed nulls."""
    from pyspark.sql import functions as F

    have = set(df.columns)
    cols = []
    for c in spec.columns:
        if c.name in have:
            cols.append(F.col(c.name).cast(spark_type(c.type)).alias(c.name))
        elif c.nullable:
            cols.append(F.lit(None).cast(spark_type(c.type)).alias(c.name))
        else:
            raise SchemaMismatch(f"table {spec.name!r}: required column {c.name!r} is missing")
    return df.select(*cols)


def _cols(*specs: Iterable) -> tuple[Column, ...]:
    return tuple(Column(*s) for s in specs)


# --------------------------------------------------------------------------- logged world

EVENT_TYPES = ("impression", "click", "purchase", "rating", "view", "add_to_cart")

EVENTS = TableSpec(
    "events",
    _cols(
        ("event_id", "string", False, "unique id of the logged event"),
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("event_time", "timestamp", False, "UTC"),
        ("event_date", "date", False, "partition column, derived from event_time"),
        ("event_type", "string", False, "one of EVENT_TYPES"),
        ("value", "double", True, "rating or revenue; click/impression: 1.0 or 0.0"),
        ("position", "int", True, "slot shown, 1-based"),
        ("recommended", "boolean", True, "treatment: the logging policy recommended the item"),
        ("logged_propensity", "double", True, "logging policy's probability of this action"),
        ("policy", "string", True, "logging policy name"),
        ("session_id", "string", True, ""),
        ("context", "string", True, "JSON object of context fields (campaign, device, ...)"),
        ("ingest_batch", "string", False, "id of the ingest batch that wrote the row"),
    ),
    partition_by=("event_date",),
    doc="One row per logged event.",
)

# Raw input needs only the identifying columns; the rest may be absent and become null.
OPTIONAL_ON_INPUT = {
    "events": (
        "event_date",
        "value",
        "position",
        "recommended",
        "logged_propensity",
        "policy",
        "session_id",
        "context",
        "ingest_batch",
    )
}

USERS = TableSpec(
    "users",
    _cols(
        ("user_id", "string", False, ""),
        ("attributes", "array<string>", True, "tokens 'name:value', e.g. 'gender:women'"),
        ("text", "string", True, "plain-language description for the language model"),
        ("segment", "string", True, "user group for fairness/heterogeneity reports"),
    ),
)

ITEMS = TableSpec(
    "items",
    _cols(
        ("item_id", "string", False, ""),
        ("attributes", "array<string>", True, "tokens 'name:value'"),
        ("category", "string", True, "main category, for affinity features"),
        ("text", "string", True, "title/description, or composed from attributes"),
        ("price", "double", True, ""),
    ),
)

# The randomised-exposure (MCAR) slice uses the events contract so one metric code path serves both.
MCAR_EVENTS = TableSpec("mcar_events", EVENTS.columns, EVENTS.partition_by, "Random-exposure feedback.")

GROUND_TRUTH = TableSpec(
    "ground_truth",
    _cols(
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("true_preference", "double", True, "latent affinity"),
        ("exposure_propensity", "double", True, "P(pair observed)"),
        ("treatment_propensity", "double", True, "P(recommended | user, item)"),
        ("p_y0", "double", True, "P(outcome=1 | not recommended)"),
        ("p_y1", "double", True, "P(outcome=1 | recommended)"),
        ("y0", "double", True, "realised potential outcome without recommendation"),
        ("y1", "double", True, "realised potential outcome with recommendation"),
    ),
    doc="Simulator only: the truth every estimator can be checked against.",
)

EVENTS_QUARANTINE = TableSpec(
    "events_quarantine",
    _cols(
        ("ingest_batch", "string", False, ""),
        ("source", "string", True, "file or table the row came from"),
        ("source_row", "long", True, "row number within the source, 0-based"),
        ("reason", "string", False, "reason code, e.g. NULL_ID, BAD_TIMESTAMP"),
        ("detail", "string", True, "human-readable explanation naming the field"),
        ("payload", "string", True, "original row as JSON"),
        ("quarantined_at", "timestamp", False, ""),
    ),
    doc="Rejected event rows (events and mcar_events input), one per row, with the first reason code; "
        "reason codes in causalrec.ingest.validate. For CSV / JSON lines input the detail ends with the "
        "row's line in its file (see causalrec.ingest.sources.line_numbers).",
)

# The events quarantine's columns plus the table the row was meant for: one reader serves both.
DIMENSION_QUARANTINE = TableSpec(
    "dimension_quarantine",
    EVENTS_QUARANTINE.columns[:1]
    + _cols(("table_name", "string", False, "users, items or ground_truth: the table the row was meant for"))
    + EVENTS_QUARANTINE.columns[1:],
    doc="Rejected users / items / ground_truth rows (reason NULL_ID or DUPLICATE_ID): a null or empty key, "
        "or a key shared by rows of differing content (all of them); the payload is the row cast to the "
        "table's types with its key as read; reason codes in causalrec.ingest.dimensions.",
)


INGEST_LOG = TableSpec(
    "ingest_log",
    _cols(
        ("ingest_batch", "string", False, ""),
        ("table_name", "string", False, ""),
        ("source", "string", True, ""),
        ("rows_read", "long", False, ""),
        ("rows_accepted", "long", False, ""),
        ("rows_quarantined", "long", False, ""),
        ("rows_already_present", "long", True,
         "events: rows already in the table (idempotent rerun); dimensions: exact copies collapsed into a kept row"),
        ("reasons", "string", True, "JSON object reason -> count"),
        ("started_at", "timestamp", False, ""),
        ("finished_at", "timestamp", False, ""),
    ),
)

# --------------------------------------------------------------------------- modelling tables

TRAINING_EXAMPLES = TableSpec(
    "training_examples",
    _cols(
        ("example_id", "string", False, ""),
        ("split", "string", False, "train / valid / test (partition column)"),
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("user_idx", "int", False, "dense index for embeddings, from the user_index table"),
        ("item_idx", "int", False, "dense index for embeddings, from the item_index table"),
        ("observed", "int", False, "1 = logged feedback, 0 = sampled unobserved pair (DR joint learning)"),
        ("label", "double", True, "rating or click/purchase value; null when not observed"),
        ("outcome", "double", True, "binary outcome (rating >= threshold, click, purchase)"),
        ("treated", "int", True, "1 = recommended by the logging policy"),
        ("exposure_propensity", "double", False, "P(observed | user, item), clipped"),
        ("sample_weight", "double", True, "inverse sampling probability of the row: 1 when observed, the "
                                          "number of unobserved pairs it stands for when sampled (DR joint learning)"),
        ("treatment_propensity", "double", True, "P(recommended | user, item, context), clipped"),
        ("features", "array<float>", True, "dense numeric user/item/pair features"),
        ("history_item_idx", "array<int>", True, "user's recent items before the cutoff"),
        ("user_text", "string", True, "user attributes / recent-history text"),
        ("item_text", "string", True, ""),
        ("is_mcar", "boolean", False, "from the random-exposure slice"),
        ("event_time", "timestamp", True, ""),
    ),
    partition_by=("split",),
)

ID_INDEX = TableSpec(
    "id_index",
    _cols(
        ("kind", "string", False, "user or item"),
        ("id", "string", False, ""),
        ("idx", "int", False, "dense 0-based index"),
    ),
)

CANDIDATES = TableSpec(
    "candidates",
    _cols(
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("source", "string", False, "the source that ranked it highest"),
        ("sources", "array<string>", True, "every source that proposed it"),
        ("source_score", "double", True, ""),
    ),
)

SCORES = TableSpec(
    "scores",
    _cols(
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("relevance", "double", False, "predicted rating or click/purchase probability"),
        ("uplift", "double", True, "estimated causal effect of recommending"),
        ("uplift_se", "double", True, "standard error of the uplift, when available"),
        ("model_version", "string", False, ""),
        ("scored_at", "timestamp", False, ""),
    ),
)

RECOMMENDATIONS = TableSpec(
    "recommendations",
    _cols(
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("rank", "int", False, "1-based"),
        ("score", "double", False, "the ranking score of the chosen policy (fair: of its base policy; "
                                   "rank, not score, gives the re-ranked order)"),
        ("relevance", "double", True, ""),
        ("uplift", "double", True, ""),
        ("policy", "string", False, "relevance / uplift / blend / fair"),
        ("fairness_boosted", "boolean", False, ""),
        ("explanation", "string", False, "plain-language reason built from the numbers"),
        ("model_version", "string", False, ""),
    ),
)

OPE_RESULTS = TableSpec(
    "ope_results",
    _cols(
        ("run_id", "string", False, ""),
        ("policy", "string", False, "evaluated strategy"),
        ("estimator", "string", False, ""),
        ("estimate", "double", True, ""),
        ("std_err", "double", True, ""),
        ("ci_low", "double", True, ""),
        ("ci_high", "double", True, ""),
        ("interval_method", "string", True, "analytic or bootstrap_...; suffix _bias_aware: the hull with the unbiased "
         "reference's interval (switch_dr, dr_os); none: ... (dm, no interval)"),
        ("logged_policy", "string", True, "where pi_b came from: logged_propensity (the events' action "
                                          "probability) or exposure[_item_popularity][_on_impressions]"),
        ("ess", "double", True, "effective sample size of the weights"),
        ("max_weight", "double", True, ""),
        ("n", "long", True, ""),
        ("diff_to_baseline", "double", True, ""),
        ("diff_ci_low", "double", True, ""),
        ("diff_ci_high", "double", True, ""),
        ("created_at", "timestamp", False, ""),
        ("alpha", "double", True, "ci_low/ci_high are a 1 - alpha interval (ope.alpha of the OPE run)"),
    ),
)

ITEM_EMBEDDINGS = TableSpec(
    "item_embeddings",
    _cols(
        ("item_id", "string", False, ""),
        ("embedding", "array<float>", False, "mean-pooled, L2-normalised text embedding"),
        ("text_hash", "string", True, "hash of the encoded text: re-encode only when it changes"),
        ("encoder", "string", True, "text encoder name"),
    ),
    doc="One text embedding per item, computed once (candidates, scoring, explanations).",
)

SCORING_INPUT = TableSpec(
    "scoring_input",
    _cols(
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("user_idx", "int", False, "-1 = user unseen in training"),
        ("item_idx", "int", False, "-1 = item unseen in training (cold)"),
        ("features", "array<float>", True, ""),
        ("history_item_idx", "array<int>", True, ""),
        ("user_text", "string", True, ""),
        ("item_text", "string", True, ""),
        ("prior_uplift", "double", True, "per-item effect from uplift_effects, when the model has no uplift head"),
        ("prior_uplift_se", "double", True, ""),
    ),
    doc="Candidates joined with everything the Featurizer needs (built by Spark, read by Ray Data).",
)

RANKING_SUMMARY = TableSpec(
    "ranking_summary",
    _cols(
        ("policy", "string", False, ""),
        ("k", "int", False, ""),
        ("fairness_attribute", "string", True, ""),
        ("fairness_strength", "double", True, ""),
        ("n_users", "long", False, ""),
        ("relevance_unconstrained", "double", True, "sum of relevance of the unconstrained top-K"),
        ("relevance_policy", "double", True, "sum of relevance of this policy's top-K"),
        ("relevance_cost", "double", True, "1 - relevance_policy / relevance_unconstrained"),
        ("gini_before", "double", True, "Gini of recommendation counts across catalogue items, unconstrained top-K"),
        ("gini_after", "double", True, "Gini of recommendation counts across catalogue items, this policy's top-K"),
        ("group_exposure_before", "string", True, "JSON group -> share of slots"),
        ("group_exposure_after", "string", True, "JSON group -> share of slots"),
        ("n_boosted", "long", True, "recommendations boosted for fairness"),
        ("model_version", "string", True, ""),
        ("created_at", "timestamp", False, ""),
    ),
)

# --------------------------------------------------------------------------- features and propensities

USER_FEATURES = TableSpec(
    "user_features",
    _cols(
        ("user_id", "string", False, ""),
        ("as_of", "timestamp", False, "cutoff: only events strictly before it were used"),
        ("n_events", "long", False, ""),
        ("n_interactions", "long", False, "events other than unclicked impressions"),
        ("n_rated", "long", False, ""),
        ("n_distinct_items", "long", False, "exact count of distinct items"),
        ("last_event_time", "timestamp", True, ""),
        ("recency_days", "double", True, "days from the last event to the cutoff"),
        ("rating_mean", "double", True, ""),
        ("rating_var", "double", True, ""),
        ("top_attributes", "array<string>", True, "the user's most frequent item tokens"),
        ("top_category", "string", True, ""),
        ("top_attribute_share", "double", True, ""),
        ("history_item_ids", "array<string>", False, "recent interacted items, most recent first, bounded"),
        ("attributes", "array<string>", True, ""),
        ("text", "string", True, ""),
        ("segment", "string", True, ""),
        ("feature_vector", "array<float>", False, "numeric features; names in the commit metadata"),
    ),
    doc="Point-in-time user features; extra columns n_<event_type>[_<w>d] per configured window.",
)

ITEM_FEATURES = TableSpec(
    "item_features",
    _cols(
        ("item_id", "string", False, ""),
        ("as_of", "timestamp", False, ""),
        ("n_exposures", "long", False, "logged rows of the item"),
        ("n_interactions", "long", False, ""),
        ("n_clicks", "double", False, ""),
        ("n_purchases", "long", False, ""),
        ("n_ratings", "long", False, ""),
        ("n_users", "long", False, "exact count of distinct users"),
        ("click_rate", "double", False, "Bayesian-smoothed (beta prior at the global rate)"),
        ("purchase_rate", "double", False, "Bayesian-smoothed"),
        ("rating_mean", "double", True, "Bayesian-smoothed; null when the data has no ratings at all "
                                        "(as the user table's; 0 in feature_vector)"),
        ("popularity_rank", "int", False, "1 = most interactions"),
        ("popularity_pct", "double", False, "rank / number of items"),
        ("popularity_group", "string", False, "head / mid / tail (features.popularity_groups)"),
        ("attributes", "array<string>", True, ""),
        ("category", "string", True, ""),
        ("text", "string", True, ""),
        ("price", "double", True, ""),
        ("feature_vector", "array<float>", False, "numeric features; names in the commit metadata"),
    ),
    doc="Point-in-time item features; extra columns n_exposures_<w>d, n_interactions_<w>d.",
)

EXPOSURE_PROPENSITY = TableSpec(
    "exposure_propensity",
    _cols(
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("observed", "int", False, "1 = pair in the logged (MNAR) feedback, 0 = sampled unobserved pair"),
        ("value", "double", True, "observed rating/outcome (null when unobserved)"),
        ("raw_propensity", "double", True, "model output before clipping/normalising"),
        ("exposure_propensity", "double", False, "P(observed | user, item), clipped (and self-normalised)"),
        ("method", "string", False, "popularity / naive_bayes / logistic"),
        ("weight", "double", True, "inverse sampling probability: 1 for observed pairs, (items not observed by "
                                   "the user) / (pairs sampled for the user) for sampled unobserved pairs"),
    ),
)

TREATMENT_PROPENSITY = TableSpec(
    "treatment_propensity",
    _cols(
        ("event_id", "string", False, ""),
        ("user_id", "string", False, ""),
        ("item_id", "string", False, ""),
        ("treated", "int", False, "1 = recommended by the logging policy"),
        ("treatment_propensity", "double", False, "P(recommended | user, item, context), clipped to [eps, 1-eps]"),
        ("raw_propensity", "double", True, ""),
        ("source", "string", False, "logged / logistic / gbt / choice"),
    ),
)

PROPENSITY_DIAGNOSTICS = TableSpec(
    "propensity_diagnostics",
    _cols(
        ("run_id", "string", False, ""),
        ("propensity", "string", False, "exposure or treatment"),
        ("method", "string", False, ""),
        ("metric", "string", False, "ece, reliability, share_at_clip, ess, ess_ratio, overlap, truth_corr, ..."),
        ("bin", "int", True, "reliability/overlap bin, null for scalars"),
        ("value", "double", True, ""),
        ("pred_mean", "double", True, "reliability: mean predicted propensity in the bin"),
        ("obs_rate", "double", True, "reliability: observed (weighted) rate in the bin"),
        ("n", "double", True, "rows (or weight) behind the number"),
        ("created_at", "timestamp", False, ""),
    ),
)

TRAIN_RUNS = TableSpec(
    "train_runs",
    _cols(
        ("run_id", "string", False, ""),
        ("model", "string", False, "mf / two_tower / cross_encoder"),
        ("objective", "string", False, "naive / ips / snips / dr_jl / uplift"),
        ("model_version", "string", False, "written into scores.model_version"),
        ("checkpoint_path", "string", False, "folder for causalrec.train.checkpoint.load_checkpoint"),
        ("metrics_json", "string", True, "per-epoch train loss and unbiased validation metric"),
        ("best_epoch", "int", True, "0-based"),
        ("hyperparameters_json", "string", True, "the values trained with (chosen by tuning when run)"),
        ("created_at", "timestamp", False, ""),
    ),
    doc="One row per training run; scoring reads the latest.",
)

METRICS = TableSpec(
    "metrics",
    _cols(
        ("metric", "string", False, "mse, mae, auc, ndcg, recall, map, precision, causal_precision, cdcg, gini, ..."),
        ("k", "int", True, "cut-off for @K metrics, null otherwise"),
        ("slice", "string", False, "data the number is computed on, e.g. mcar_test, mnar_test_snips, policy:fair"),
        ("model", "string", False, "model (model:objective) or recommendation policy evaluated"),
        ("value", "double", True, ""),
        ("ci_low", "double", True, "95% interval, when one is computed"),
        ("ci_high", "double", True, ""),
        ("n", "long", True, "rows or users behind the number"),
        ("details_json", "string", True, "JSON: weighting, run_id, per-group values, ..."),
        ("created_at", "timestamp", False, ""),
    ),
    doc="Evaluation results in long format: one row per (metric, k, slice, model).",
)

ABTEST_RESULTS = TableSpec(
    "abtest_results",
    _cols(
        ("run_id", "string", False, ""),
        ("arm_column", "string", False, "events column whose values are the arms"),
        ("treatment", "string", False, ""),
        ("control", "string", False, ""),
        ("method", "string", False, "diff_in_means or cuped"),
        ("estimate", "double", True, "treatment mean - control mean (per unit)"),
        ("std_err", "double", True, ""),
        ("ci_low", "double", True, ""),
        ("ci_high", "double", True, ""),
        ("p_value", "double", True, ""),
        ("relative_lift", "double", True, ""),
        ("variance_reduction", "double", True, "CUPED: 1 - var(adjusted)/var(raw)"),
        ("n_treatment", "long", True, ""),
        ("n_control", "long", True, ""),
        ("contaminated_units", "long", True, "units seen in more than one arm (dropped)"),
        ("srm_p_value", "double", True, "sample ratio mismatch chi-square p-value"),
        ("srm_mismatch", "boolean", True, "p < 0.001: randomisation is suspect"),
        ("created_at", "timestamp", False, ""),
    ),
)

UPLIFT_EFFECTS = TableSpec(
    "uplift_effects",
    _cols(
        ("run_id", "string", False, ""),
        ("level", "string", False, "overall, item or segment"),
        ("item_id", "string", True, "set when level = item"),
        ("segment", "string", True, "set when level = segment"),
        ("method", "string", False, "ips or dr"),
        ("effect", "double", True, "E[Y(1) - Y(0)]: effect of recommending on the outcome"),
        ("se", "double", True, ""),
        ("ci_low", "double", True, ""),
        ("ci_high", "double", True, ""),
        ("n", "long", True, "rows"),
        ("n_treated", "long", True, ""),
        ("refutation", "string", True, "JSON: placebo, random common cause, subset reruns (overall rows)"),
        ("created_at", "timestamp", False, ""),
        ("alpha", "double", True, "ci_low/ci_high are a 1 - alpha interval (ope.alpha of the uplift run)"),
        ("outcome", "string", True, "ope.uplift_outcome_event whose summed value is the outcome (null: the decision's own value)"),
        ("outcome_binary", "boolean", True, "every outcome was 0 or 1: the effect is a change in probability"),
    ),
)

ALL_TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        EVENTS,
        USERS,
        ITEMS,
        MCAR_EVENTS,
        GROUND_TRUTH,
        EVENTS_QUARANTINE,
        DIMENSION_QUARANTINE,
        INGEST_LOG,
        TRAINING_EXAMPLES,
        ID_INDEX,
        CANDIDATES,
        SCORES,
        RECOMMENDATIONS,
        OPE_RESULTS,
        TRAIN_RUNS,
        USER_FEATURES,
        ITEM_FEATURES,
        EXPOSURE_PROPENSITY,
        TREATMENT_PROPENSITY,
        PROPENSITY_DIAGNOSTICS,
        ITEM_EMBEDDINGS,
        SCORING_INPUT,
        RANKING_SUMMARY,
        METRICS,
        ABTEST_RESULTS,
        UPLIFT_EFFECTS,
    )
}


def spec(name: str) -> TableSpec:
    try:
        return ALL_TABLES[name]
    except KeyError:
        raise KeyError(f"no declared table {name!r}; declared: {sorted(ALL_TABLES)}") from None


def names(cols: Sequence[Column]) -> list[str]:
    return [c.name for c in cols]
