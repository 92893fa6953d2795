"""User-item pair features for the pairs a stage asks for (training pairs, candidate pairs).

Both features leave the pair's own item out of the user's profile, so a training
pair whose item is already in the user's past scores like an unseen one would:
otherwise the model learns "item in history" as a label proxy that is absent at
serving time.

* ``attr_match``: mean over the item's tokens of the user's share of (other)
  interactions with that token.
* ``cooc_score``: mean over the user's recent items h != i of how many other users
  have both h and i in their recent history (bounded: history_length^2 per user).
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from causalrec.features.common import item_tokens

PAIR_FEATURE_NAMES = ["attr_match", "log1p_cooc_score"]


def item_cooccurrence(history: DataFrame) -> DataFrame:
    """(item_a, item_b, n_cooc): users with both items in their recent history (a != b)."""
    h = history.select("user_id", F.explode("history_item_ids").alias("item_id")).distinct()
    a = h.withColumnRenamed("item_id", "item_a")
    b = h.withColumnRenamed("item_id", "item_b")
    return (
        a.join(b, "user_id").where(F.col("item_a") != F.col("item_b"))
        .groupBy("item_a", "item_b").agg(F.count(F.lit(1)).alias("n_cooc"))
    )


def attribute_match(pairs: DataFrame, attr_counts: DataFrame, ui_counts: DataFrame, items: DataFrame) -> DataFrame:
    """(user_id, item_id, attr_match) for each distinct pair; leave-the-item-out shares."""
    p = pairs.select("user_id", "item_id").distinct()
    tokens = item_tokens(items)
    n_tok = tokens.groupBy("item_id").agg(F.count(F.lit(1)).alias("n_tok"))
    pt = p.join(tokens, "item_id").join(ui_counts, ["user_id", "item_id"], "left").fillna(0, subset=["n_ui"])
    pt = pt.join(attr_counts, ["user_id", "token"], "left").fillna(0, subset=["n_ut", "n_u"])
    share = F.when(
        F.col("n_u") - F.col("n_ui") > 0,
        (F.col("n_ut") - F.col("n_ui")) / (F.col("n_u") - F.col("n_ui")),
    ).otherwise(0.0)
    out = pt.groupBy("user_id", "item_id").agg(F.sum(share).alias("_s")).join(n_tok, "item_id")
    out = out.select("user_id", "item_id", (F.col("_s") / F.col("n_tok")).alias("attr_match"))
    return p.join(out, ["user_id", "item_id"], "left").fillna(0.0, subset=["attr_match"])


def history_cooccurrence(pairs: DataFrame, history: DataFrame, cooc: DataFrame) -> DataFrame:
    """(user_id, item_id, cooc_score); the user's own contribution to n_cooc is removed."""
    p = pairs.select("user_id", "item_id").distinct()
    hist = history.select("user_id", "history_item_ids")
    ph = p.join(hist, "user_id", "left")
    ph = ph.withColumn("_self", F.array_contains(F.coalesce("history_item_ids", F.array().cast("array<string>")), F.col("item_id")).cast("int"))
    ph = ph.withColumn("_hlen", F.size(F.array_distinct(F.coalesce("history_item_ids", F.array().cast("array<string>")))) - F.col("_self"))
    ex = ph.select("user_id", "item_id", "_self", "_hlen", F.explode(F.array_distinct("history_item_ids")).alias("item_a"))
    ex = ex.where(F.col("item_a") != F.col("item_id"))
    j = ex.join(cooc.withColumnRenamed("item_b", "item_id"), ["item_a", "item_id"], "left").fillna(0, subset=["n_cooc"])
    score = j.groupBy("user_id", "item_id").agg(
        (F.sum(F.col("n_cooc") - F.col("_self")) / F.max("_hlen")).alias("cooc_score")
    )
    return p.join(score, ["user_id", "item_id"], "left").fillna(0.0, subset=["cooc_score"])


def pair_features(pairs: DataFrame, *, attr_counts: DataFrame, ui_counts: DataFrame, items: DataFrame,
                  history: DataFrame, cooc: DataFrame) -> DataFrame:
    """(user_id, item_id, attr_match, cooc_score, pair_vector array<float>) per distinct pair."""
    am = attribute_match(pairs, attr_counts, ui_counts, items)
    co = history_cooccurrence(pairs, history, cooc)
    out = am.join(co, ["user_id", "item_id"])
    return out.withColumn(
        "pair_vector", F.array(F.col("attr_match").cast("float"), F.log1p(F.greatest(F.col("cooc_score"), F.lit(0.0))).cast("float"))
    )
