"""Logged decisions and their outcomes: one row per decision, never one per outcome event.

A log writes a decision (``impression``: the item shown, or not recommended, in a slot) and then
its outcomes as events of their own (the simulator: a click 5 s and a purchase 60 s later, both
carrying the decision's ``recommended`` flag and propensity). Taking every such row as a unit
counts a clicked decision two or three times and an unclicked one once: selection on the outcome,
which biases any mean over units (OPE's policy values, the uplift stage's effects). So the unit is
the decision, and its outcome is either the decision's own ``value`` (OBD and the simulator: the
click, 0/1) or the summed ``value`` of a named event type for the same user, item and session.
"""
from __future__ import annotations

from typing import Optional, Sequence

DECISION_EVENT = "impression"


def with_outcome(decisions, events, outcome_event: Optional[str], keys: Sequence[str], setting: str):
    """``decisions`` plus ``outcome``: the decision's own value, or (``outcome_event``) the summed value
    of that type's ``events`` with the same ``keys`` (0 when it has none).

    ``setting`` names the config key in the error raised when no event has that type.
    """
    from pyspark.sql import functions as F

    value = F.coalesce(F.col("value").cast("double"), F.lit(0.0))
    if outcome_event in (None, DECISION_EVENT):
        return decisions.withColumn("outcome", value)
    outcomes = events.where(F.col("event_type") == outcome_event)
    if outcomes.limit(1).count() == 0:
        raise ValueError(f"{setting}={outcome_event!r}: the events hold no event of that type")
    per_key = outcomes.groupBy(*keys).agg(F.sum(value).alias("outcome"))
    return decisions.join(per_key, list(keys), "left").fillna({"outcome": 0.0})
