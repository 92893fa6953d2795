"""Helpers shared by the feature transforms: the cutoff, what counts as an interaction, item tokens."""
from __future__ import annotations

import datetime as dt
from typing import Optional, Union

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from causalrec.config import iso_utc

Cutoff = Union[str, dt.datetime]


def parse_cutoff(cutoff: Cutoff, what: str = "cutoff") -> dt.datetime:
    """An aware UTC datetime for ``cutoff``: an ISO string or a naive datetime is read as UTC."""
    return iso_utc(cutoff, what)


def cutoff_lit(cutoff: Cutoff) -> Column:
    """A timestamp literal for ``cutoff`` (ISO string or naive datetime, read as UTC, or an aware datetime).

    Strings are parsed here, not cast by Spark, which would read them in spark.sql.session.timeZone.
    """
    return F.lit(parse_cutoff(cutoff)).cast("timestamp")


def resolve_cutoff(events: DataFrame, cutoff: Optional[Cutoff]) -> dt.datetime:
    """The configured cutoff, or just after the last event (one scalar aggregate, no event collect)."""
    if cutoff is not None:
        return parse_cutoff(cutoff, "features.cutoff")
    # epoch microseconds, not a collected timestamp: PySpark turns those into naive datetimes in the
    # driver's OS time zone, whatever spark.sql.session.timeZone says
    last = events.agg(F.unix_micros(F.max("event_time")).alias("t")).collect()[0]["t"]
    if last is None:
        raise ValueError("features: the events table is empty, so there is no cutoff to compute features at")
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(last) + 1)


def events_before(events: DataFrame, cutoff: Cutoff) -> DataFrame:
    """Events strictly before ``cutoff``: the point-in-time guarantee lives here."""
    return events.where(F.col("event_time") < cutoff_lit(cutoff))


def is_interaction() -> Column:
    """An event that shows interest: anything but an unclicked impression."""
    return (F.col("event_type") != F.lit("impression")) | (F.coalesce(F.col("value"), F.lit(0.0)) > 0)


def item_tokens(items: DataFrame) -> DataFrame:
    """(item_id, token): attribute tokens plus ``category:<c>``; a small dimension table."""
    attrs = items.select("item_id", F.explode_outer("attributes").alias("token"))
    cats = items.where(F.col("category").isNotNull()).select(
        "item_id", F.concat(F.lit("category:"), F.col("category")).alias("token")
    )
    return attrs.unionByName(cats).where(F.col("token").isNotNull()).distinct()


def safe_name(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)
