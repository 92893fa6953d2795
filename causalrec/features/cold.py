"""The feature vector a user or item without a feature row gets: the tables' own "no activity" row.

Why not zeros: the tables encode no activity as a value of their own in some slots (a user's
recency is the 10-year cap; an item's smoothed click and purchase rates are the global rates, its
rating mean the global mean, its popularity share the tail's 1.0). A zero there reads as "active at
the cutoff" or "the most popular item". An id lacks a row when neither its dimension table nor the
visible events have it: unknown users (``data.require_known_users`` off), users or items whose every
event is held out, new ones at serving. Those must look like the listed ids without activity.
"""
from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

RECENCY_CAP_YEARS = 10.0  # user recency_years of a user with no event (and the cap of every other)
COLD_POPULARITY_PCT = 1.0  # below the least popular item of the table


def float_array(values: Sequence):
    """An array<float> column (the feature tables' vector type) of numbers or columns; null reads 0."""
    cols = [v if isinstance(v, Column) else F.lit(float(v)) for v in values]
    return F.array(*[F.coalesce(c.cast("float"), F.lit(0.0).cast("float")) for c in cols]) if cols else \
        F.array().cast("array<float>")


def cold_user_vector(names: Sequence[str]) -> list[float]:
    """:func:`causalrec.features.user.user_features`' vector of a user with no event and no attribute."""
    return [RECENCY_CAP_YEARS if n == "recency_years" else 0.0 for n in names]


COLD_ITEM_VECTOR = "__cold_item_vector"


def cold_item_frame(item_features: DataFrame, names: Sequence[str], prior_strength: float) -> DataFrame:
    """One row, column :data:`COLD_ITEM_VECTOR`: :func:`causalrec.features.item.item_features`' vector of
    an item with no event, no price and no attribute, as of the same cutoff. The smoothed rates of zero
    trials are the global rates, which one aggregate over the (item-scale) table recovers exactly.
    ``prior_strength``: the table's ``features.smoothing_prior_strength``; with 0 a zero-trial rate is
    undefined, 0 in the vector. Lazy: joined into the query that uses it, where Spark reuses the
    table's computation instead of running it again for a collect."""
    k = float(prior_strength)
    n_ratings = F.col("n_ratings").cast("double")
    rates = item_features.agg(
        (F.sum("n_clicks") / F.greatest(F.sum("n_exposures"), F.lit(1))).alias("click_rate"),
        (F.sum("n_purchases") / F.greatest(F.sum("n_exposures"), F.lit(1))).alias("purchase_rate"),
        # rating_mean_i = (sum_i + k g) / (n_i + k) for every item, so g = sum_i mean_i (n_i + k) / (sum_i n_i + N k)
        (F.sum(F.col("rating_mean") * (n_ratings + k))
         / F.sum(F.when(F.col("rating_mean").isNotNull(), n_ratings + k))).alias("rating_mean"),
    )
    rated = ("click_rate", "purchase_rate", "rating_mean") if k > 0 else ()
    slots = [F.col(n) if n in rated else COLD_POPULARITY_PCT if n == "popularity_pct" else 0.0 for n in names]
    return rates.select(float_array(slots).alias(COLD_ITEM_VECTOR))


def cold_item_vector(item_features: DataFrame, names: Sequence[str], prior_strength: float) -> list[float]:
    """:func:`cold_item_frame`'s vector, collected (a cached or stored table: one small job)."""
    return [float(v) for v in cold_item_frame(item_features, names, prior_strength).first()[0]]
