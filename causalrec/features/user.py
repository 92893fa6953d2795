"""User features as of a cutoff: activity by event type and window, recency, rating moments,
attribute/category affinities and the bounded history of recent items.

One ``groupBy(user_id)`` with conditional sums computes every count/window in a single
pass over the events (its one exact distinct count, ``n_distinct_items``, makes Spark aggregate
per (user, item) first, then per user); the history reduces the events to one row per (user, item)
(its latest interaction), then keeps a window bounded to ``history_length`` of them.
"""
from __future__ import annotations

from typing import Sequence

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from causalrec.features.common import Cutoff, cutoff_lit, events_before, is_interaction, item_tokens, safe_name


def activity_columns(event_types: Sequence[str], windows_days: Sequence[int]) -> list[str]:
    cols = [f"n_{safe_name(t)}" for t in event_types]
    cols += [f"n_{safe_name(t)}_{int(w)}d" for t in event_types for w in windows_days]
    return cols


def user_activity(events: DataFrame, cutoff: Cutoff, event_types: Sequence[str],
                  windows_days: Sequence[int]) -> DataFrame:
    """Counts by type (all time and per window), recency, rating mean/variance."""
    ev = events_before(events, cutoff)
    c = cutoff_lit(cutoff)
    aggs = [F.count(F.lit(1)).alias("n_events")]
    for t in event_types:
        aggs.append(F.sum(F.when(F.col("event_type") == t, 1).otherwise(0)).cast("long").alias(f"n_{safe_name(t)}"))
    for t in event_types:
        for w in windows_days:
            in_window = (F.col("event_type") == t) & (F.col("event_time") >= c - F.expr(f"INTERVAL {int(w)} DAYS"))
            aggs.append(F.sum(F.when(in_window, 1).otherwise(0)).cast("long").alias(f"n_{safe_name(t)}_{int(w)}d"))
    rating = F.when(F.col("event_type") == "rating", F.col("value"))
    aggs += [
        F.count(rating).alias("n_rated"),
        F.avg(rating).alias("rating_mean"),
        F.var_pop(rating).alias("rating_var"),
        F.sum(F.when(is_interaction(), 1).otherwise(0)).cast("long").alias("n_interactions"),
        # exact, not HyperLogLog (already 19 for 20 items): the training set takes a train row's own
        # item out of it exactly (one less when the pair has no other row)
        F.countDistinct("item_id").alias("n_distinct_items"),
        F.max("event_time").alias("last_event_time"),
    ]
    out = ev.groupBy("user_id").agg(*aggs)
    return out.withColumn(
        "recency_days", (c.cast("double") - F.col("last_event_time").cast("double")) / 86400.0
    )


def user_history(events: DataFrame, cutoff: Cutoff, history_length: int) -> DataFrame:
    """(user_id, history_item_ids): the last ``history_length`` distinct interacted items, most recent first.

    One entry per (user, item), placed at its latest interaction (event_time, then event_id for ties):
    one exposure logs several interaction rows (a clicked impression, its click, a purchase) and a repeat
    click repeats the item, so ranking rows would fill the history with copies of the same few items.
    The training set and scoring both take their histories from here (the training set one item longer,
    so a train row that leaves its own item out still holds ``history_length``:
    :func:`causalrec.training_set.with_history_columns`).
    """
    ev = events_before(events, cutoff).where(is_interaction())
    last = ev.groupBy("user_id", "item_id").agg(F.max(F.struct("event_time", "event_id")).alias("_last"))
    w = Window.partitionBy("user_id").orderBy(F.col("_last.event_time").desc(), F.col("_last.event_id").desc(),
                                              F.col("item_id"))
    recent = last.withColumn("_rn", F.row_number().over(w))
    recent = recent.where(F.col("_rn") <= int(history_length))
    return recent.groupBy("user_id").agg(
        F.transform(F.sort_array(F.collect_list(F.struct("_rn", "item_id"))), lambda s: s["item_id"]).alias(
            "history_item_ids"
        )
    )


def user_item_counts(events: DataFrame, cutoff: Cutoff) -> DataFrame:
    """(user_id, item_id, n_ui): interactions per pair before the cutoff (pre-aggregated once)."""
    return (
        events_before(events, cutoff)
        .where(is_interaction())
        .groupBy("user_id", "item_id")
        .agg(F.count(F.lit(1)).alias("n_ui"))
    )


def user_attribute_counts(events: DataFrame, items: DataFrame, cutoff: Cutoff) -> DataFrame:
    """(user_id, token, n_ut, n_u): how many of the user's interactions touched items with each token.

    Counts, not shares, so pair features can leave the label item out (see pair.py).
    Events are first reduced to (user, item) counts, then joined to the item tokens (items x tokens rows).
    """
    ui = user_item_counts(events, cutoff)
    n_u = ui.groupBy("user_id").agg(F.sum("n_ui").alias("n_u"))
    tokens = item_tokens(items)
    ut = ui.join(tokens, "item_id").groupBy("user_id", "token").agg(F.sum("n_ui").alias("n_ut"))
    return ut.join(n_u, "user_id")


def user_top_attributes(attr_counts: DataFrame, k: int = 5) -> DataFrame:
    """(user_id, top_attributes, top_category, top_attribute_share)."""
    w = Window.partitionBy("user_id").orderBy(F.col("n_ut").desc(), F.col("token"))
    ranked = attr_counts.withColumn("_r", F.row_number().over(w))
    top = ranked.where(F.col("_r") <= k).groupBy("user_id").agg(
        F.transform(F.sort_array(F.collect_list(F.struct("_r", "token"))), lambda s: s["token"]).alias("top_attributes"),
        F.max(F.when(F.col("_r") == 1, F.col("n_ut") / F.col("n_u"))).alias("top_attribute_share"),
    )
    wc = Window.partitionBy("user_id").orderBy(F.col("n_ut").desc(), F.col("token"))
    cat = (
        attr_counts.where(F.col("token").startswith("category:"))
        .withColumn("_r", F.row_number().over(wc))
        .where(F.col("_r") == 1)
        .select("user_id", F.expr("substring(token, 10)").alias("top_category"))
    )
    return top.join(cat, "user_id", "left")


def user_features(events: DataFrame, users: DataFrame, items: DataFrame, cutoff: Cutoff, *,
                  event_types: Sequence[str], windows_days: Sequence[int], history_length: int,
                  attribute_vocab: Sequence[str]) -> DataFrame:
    """One row per user in ``users`` or in the events, as of ``cutoff``.

    ``feature_vector`` (array<float>, names from :func:`user_feature_names`) is the
    numeric input for MLlib and torch: log1p counts, recency, rating moments and a
    one-hot of the user's own attribute tokens from ``attribute_vocab``.
    """
    act = user_activity(events, cutoff, event_types, windows_days)
    hist = user_history(events, cutoff, history_length)
    top = user_top_attributes(user_attribute_counts(events, items, cutoff))
    ids = users.select("user_id").unionByName(act.select("user_id")).distinct()
    df = (
        ids.join(act, "user_id", "left")
        .join(hist, "user_id", "left")
        .join(top, "user_id", "left")
        .join(users.select("user_id", "attributes", "text", "segment"), "user_id", "left")
    )
    count_cols = ["n_events", "n_interactions", "n_rated", "n_distinct_items"] + activity_columns(event_types, windows_days)
    df = df.fillna(0, subset=count_cols)
    vec = [F.log1p(F.col(c).cast("double")) for c in count_cols]
    vec += [
        F.coalesce(F.least(F.col("recency_days") / 365.0, F.lit(10.0)), F.lit(10.0)),
        F.coalesce(F.col("rating_mean"), F.lit(0.0)),
        F.coalesce(F.col("rating_var"), F.lit(0.0)),
        F.coalesce(F.col("top_attribute_share"), F.lit(0.0)),
    ]
    attrs = F.coalesce(F.col("attributes"), F.array().cast("array<string>"))
    vec += [F.array_contains(attrs, F.lit(tok)).cast("double") for tok in attribute_vocab]
    # a missing statistic (no ratings, no clicks) is 0 in the vector: MLlib rejects null elements
    df = df.withColumn("feature_vector", F.array(*[F.coalesce(v.cast("float"), F.lit(0.0).cast("float")) for v in vec]))
    return df.withColumn("history_item_ids", F.coalesce(F.col("history_item_ids"), F.array().cast("array<string>")))


def user_feature_names(event_types: Sequence[str], windows_days: Sequence[int], attribute_vocab: Sequence[str]) -> list[str]:
    count_cols = ["n_events", "n_interactions", "n_rated", "n_distinct_items"] + activity_columns(event_types, windows_days)
    return ([f"log1p_{c}" for c in count_cols] + ["recency_years", "rating_mean", "rating_var", "top_attribute_share"]
            + [f"attr={t}" for t in attribute_vocab])
