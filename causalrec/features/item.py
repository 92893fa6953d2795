"""Item features as of a cutoff: exposure/interaction counts by window, Bayesian-smoothed rates,
popularity rank and group (head/mid/tail), attributes and text.

Hot items: every aggregate here is algebraic (count/sum), first per (item, user) and then
per item, so Spark aggregates map-side before each shuffle (two-stage aggregation) and a
hot item sends one partial row per task to the per-item step, not its events.
"""
from __future__ import annotations

from typing import Sequence

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from causalrec.features.common import Cutoff, cutoff_lit, events_before, is_interaction

POPULARITY_GROUPS = ("head", "mid", "tail")


def item_activity(events: DataFrame, cutoff: Cutoff, windows_days: Sequence[int]) -> DataFrame:
    """Per-item counts, built from per-(user, item) partial counts.

    One exposure is logged differently by different sources: OBD writes one impression row
    whose value is the click; the simulator writes that impression plus a click row 5 s
    later and a purchase row; Coat writes only ratings. Per pair, the exposures are its
    impressions when it has any (its click/purchase rows belong to them), else every row
    (a rating is its own exposure); its clicks are the larger of its clicked impressions
    and its click rows, so an impression's click is counted once however it is logged.
    """
    ev = events_before(events, cutoff)
    c = cutoff_lit(cutoff)
    is_imp = F.col("event_type") == "impression"
    one = lambda cond: F.sum(F.when(cond, 1).otherwise(0)).cast("long")  # noqa: E731
    inter = is_interaction()
    pair_aggs = [
        F.count(F.lit(1)).alias("_rows"),
        one(is_imp).alias("_imps"),
        one(inter).alias("_inter"),
        one(is_imp & (F.coalesce(F.col("value"), F.lit(0.0)) > 0)).alias("_clicked_imps"),
        one(F.col("event_type") == "click").alias("_click_rows"),
        one(F.col("event_type") == "purchase").alias("_purchases"),
        F.count(F.when(F.col("event_type") == "rating", F.col("value"))).alias("_ratings"),
        F.sum(F.when(F.col("event_type") == "rating", F.col("value"))).alias("_rating_sum"),
    ]
    for w in windows_days:
        in_w = F.col("event_time") >= c - F.expr(f"INTERVAL {int(w)} DAYS")
        pair_aggs += [one(in_w).alias(f"_rows_{int(w)}"), one(in_w & is_imp).alias(f"_imps_{int(w)}"),
                      one(in_w & inter).alias(f"_inter_{int(w)}")]
    pairs = ev.groupBy("item_id", "user_id").agg(*pair_aggs)
    has_imp = F.col("_imps") > 0
    aggs = [
        F.sum(F.when(has_imp, F.col("_imps")).otherwise(F.col("_rows"))).cast("long").alias("n_exposures"),
        F.sum("_inter").cast("long").alias("n_interactions"),
        F.sum(F.greatest("_clicked_imps", "_click_rows")).cast("double").alias("n_clicks"),
        F.sum("_purchases").cast("long").alias("n_purchases"),
        F.sum("_ratings").cast("long").alias("n_ratings"),
        F.sum("_rating_sum").alias("rating_sum"),
        F.count(F.lit(1)).alias("n_users"),  # one row per (item, user): exact
    ]
    for w in windows_days:
        aggs.append(F.sum(F.when(has_imp, F.col(f"_imps_{int(w)}")).otherwise(F.col(f"_rows_{int(w)}")))
                    .cast("long").alias(f"n_exposures_{int(w)}d"))
        aggs.append(F.sum(f"_inter_{int(w)}").cast("long").alias(f"n_interactions_{int(w)}d"))
    return pairs.groupBy("item_id").agg(*aggs)


def smoothed_rate(successes: str, trials: str, prior_mean, strength: float):
    """Beta-binomial posterior mean: (s + k*m) / (n + k), shrinks rare items to the global rate m."""
    return (F.coalesce(F.col(successes), F.lit(0.0)) + F.lit(strength) * prior_mean) / (
        F.coalesce(F.col(trials), F.lit(0)).cast("double") + F.lit(strength)
    )


def item_features(events: DataFrame, items: DataFrame, cutoff: Cutoff, *, windows_days: Sequence[int],
                  prior_strength: float, popularity_groups: Sequence[float],
                  attribute_vocab: Sequence[str]) -> DataFrame:
    """One row per item in ``items`` or in the events.

    ``popularity_rank`` is 1 for the item with the most interactions (ties by item_id);
    ``popularity_group`` is head for the top ``popularity_groups[0]`` share of items,
    mid up to ``popularity_groups[1]`` (cumulative), tail otherwise. The rank uses one
    global window over the item dimension table (items, not events).
    """
    if len(popularity_groups) != 2 or not 0 < popularity_groups[0] < popularity_groups[1] <= 1:
        raise ValueError(f"features.popularity_groups: expected two cumulative shares 0 < head < mid <= 1, got {list(popularity_groups)}")
    act = item_activity(events, cutoff, windows_days)
    glob = act.agg(
        (F.sum("n_clicks") / F.greatest(F.sum("n_exposures"), F.lit(1))).alias("g_ctr"),
        (F.sum("n_purchases") / F.greatest(F.sum("n_exposures"), F.lit(1))).alias("g_cvr"),
        (F.sum("rating_sum") / F.greatest(F.sum("n_ratings"), F.lit(1))).alias("g_rating"),
    )
    ids = items.select("item_id").unionByName(act.select("item_id")).distinct()
    df = ids.join(act, "item_id", "left").crossJoin(F.broadcast(glob))
    count_cols = ["n_exposures", "n_interactions", "n_clicks", "n_purchases", "n_ratings", "n_users"] + [
        f"n_{k}_{int(w)}d" for w in windows_days for k in ("exposures", "interactions")
    ]
    df = df.fillna(0, subset=count_cols)
    k = float(prior_strength)
    # rating_mean is null for every item when the data has no ratings (OBD, the simulator): there is no
    # global mean to shrink toward; the column is nullable like the user table's, the vector slot is 0
    df = (
        df.withColumn("click_rate", smoothed_rate("n_clicks", "n_exposures", F.col("g_ctr"), k))
        .withColumn("purchase_rate", smoothed_rate("n_purchases", "n_exposures", F.col("g_cvr"), k))
        .withColumn("rating_mean", smoothed_rate("rating_sum", "n_ratings", F.col("g_rating"), k))
        .drop("g_ctr", "g_cvr", "g_rating", "rating_sum")
    )
    w_all = Window.orderBy(F.col("n_interactions").desc(), F.col("n_exposures").desc(), F.col("item_id"))
    df = df.withColumn("popularity_rank", F.row_number().over(w_all)).withColumn(
        "n_items", F.count(F.lit(1)).over(Window.partitionBy())
    )
    share = F.col("popularity_rank") / F.col("n_items")
    df = df.withColumn(
        "popularity_pct", share.cast("double")
    ).withColumn(
        "popularity_group",
        F.when(share <= popularity_groups[0], "head").when(share <= popularity_groups[1], "mid").otherwise("tail"),
    ).drop("n_items")
    df = df.join(items.select("item_id", "attributes", "category", "text", "price"), "item_id", "left")
    vec = [F.log1p(F.col(c).cast("double")) for c in count_cols]
    vec += [F.col("click_rate"), F.col("purchase_rate"), F.col("rating_mean"), F.col("popularity_pct"),
            F.log1p(F.coalesce(F.col("price"), F.lit(0.0)))]
    attrs = F.coalesce(F.col("attributes"), F.array().cast("array<string>"))
    vec += [F.array_contains(attrs, F.lit(t)).cast("double") for t in attribute_vocab]
    # a missing statistic (no ratings, no clicks) is 0 in the vector: MLlib rejects null elements
    return df.withColumn("feature_vector", F.array(*[F.coalesce(v.cast("float"), F.lit(0.0).cast("float")) for v in vec]))


def item_feature_names(windows_days: Sequence[int], attribute_vocab: Sequence[str]) -> list[str]:
    count_cols = ["n_exposures", "n_interactions", "n_clicks", "n_purchases", "n_ratings", "n_users"] + [
        f"n_{k}_{int(w)}d" for w in windows_days for k in ("exposures", "interactions")
    ]
    return ([f"log1p_{c}" for c in count_cols] + ["click_rate", "purchase_rate", "rating_mean", "popularity_pct",
                                                  "log1p_price"] + [f"attr={t}" for t in attribute_vocab])


def attribute_vocab(frame: DataFrame, max_size: int) -> list[str]:
    """The most frequent attribute tokens of a small dimension table (users or items), sorted."""
    rows = (
        frame.select(F.explode("attributes").alias("t")).groupBy("t").count()
        .orderBy(F.col("count").desc(), F.col("t")).limit(int(max_size)).collect()
    )
    return sorted(r["t"] for r in rows if r["t"] is not None)
