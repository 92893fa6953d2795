"""Logged decisions and their outcomes: one row per decision, never one per outcome event.

A log writes a decision (``impression``: the item shown, or not recommended, in a slot) and then
its outcomes as events of their own (the simulator: a click 5 s and a purchase 60 s later, both
carrying the decision's ``recommended`` flag and propensity). Taking every such row as a unit
counts a clicked decision two or three times and an unclicked one once: selection on the outcome,
which biases any mean over units (OPE's policy values, the uplift stage's effects). So the unit is
the decision, and its outcome is either the decision's own ``value`` (OBD and the simulator: the
click, 0/1) or the summed ``value`` of a named event type attributed to it (:func:`with_outcome`).

Attribution of an outcome event to a decision (both stages, one rule):

* same keys and a time at or after the decision's: an outcome that happened before the decision
  was not caused by it. The keys follow ``ope.attribution_scope``:

  - ``session`` (the default): same user, item and session; OPE also the slot (the outcome's
    ``position``), so an outcome in another session is credited to no decision. An outcome with no
    position (a purchase seldom has one) takes the slot of the latest decision on that item in its
    session at or before it: it used to read as slot 0 and so matched no impression shown in a slot;
  - ``user``: same user and item, in any session and any slot. The slot is a position in one
    session's list and means nothing in another session, and an outcome such as a purchase
    seldom carries one: the outcome's own position is ignored, and the decision it is credited
    to keeps its slot (OPE's unit is still the decision at its position). A purchase the next day
    in a new session goes to the latest impression of that item to that user before it;

* of several decisions with those keys, only the latest at or before the outcome gets it (no
  outcome counts for two decisions; decisions at the same instant: the greatest ``decision_id``);
  under ``user`` scope that is the latest in any session, so a later impression in a new session
  takes the outcome over an earlier one;
* with ``ope.attribution_window_s``, only within that many seconds after the decision (inclusive).
  Without a window ``user`` scope still credits each outcome to one decision only, the latest
  before it however old (last touch); set a window (e.g. 7 days) to credit none past that age.

A row whose ``event_time`` is null cannot be placed in time: a null-time outcome is credited to no
decision and a null-time decision gets outcome 0 (the events contract declares the column non-null,
so only hand-built frames have such rows).
"""
from __future__ import annotations

from functools import reduce
from typing import Optional, Sequence

DECISION_EVENT = "impression"
TIME_COLUMN = "event_time"
# ope.attribution_scope's values (causalrec.config.OPEConfig's Literal lists the same)
ATTRIBUTION_SCOPES = ("session", "user")


def with_outcome(decisions, events, outcome_event: Optional[str], keys: Sequence[str], setting: str, *,
                 decision_id: str, window_s: Optional[float] = None, scope: str = "session",
                 session_keys: Sequence[str] = (), fill_keys: Sequence[str] = ()):
    """``decisions`` plus ``outcome``: the decision's own value, or (``outcome_event``) the summed value
    of that type's ``events`` attributed to it by the module's rule (0 when it has none).

    ``keys`` are matched in every scope (user, item); ``session_keys`` only in ``scope`` "session"
    (the session; OPE also the slot), ``scope`` being ``ope.attribution_scope``;
    ``setting`` names the config key in the error raised when no event has that type;
    ``decision_id`` is a column of ``decisions`` that orders decisions at the same instant;
    ``window_s`` is ``ope.attribution_window_s`` (None: no window); ``fill_keys`` (among
    ``session_keys``) may be null on an outcome, which then takes the value of the latest decision
    at or before it on the other keys (OPE's slot).

    One shuffle by ``keys``: decisions and outcome events are unioned, ordered by time within their
    keys (a decision before an outcome at the same instant), each decision opens a group that holds
    the outcomes up to the next decision, and a window sums the group's credited outcomes onto its
    decision. No join of every decision with every outcome of its keys.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    value = F.coalesce(F.col("value").cast("double"), F.lit(0.0))
    if outcome_event in (None, DECISION_EVENT):
        return decisions.withColumn("outcome", value)
    if window_s is not None and not 0 < window_s < float("inf"):
        raise ValueError(f"ope.attribution_window_s={window_s!r}: expected a finite number of seconds > 0")
    if scope not in ATTRIBUTION_SCOPES:
        raise ValueError(f"ope.attribution_scope={scope!r}: expected one of {', '.join(map(repr, ATTRIBUTION_SCOPES))}")
    keys = [*keys, *session_keys] if scope == "session" else list(keys)
    for name, df in (("decisions", decisions), ("events", events)):
        if TIME_COLUMN not in df.columns:
            raise ValueError(f"{setting}={outcome_event!r}: the {name} have no {TIME_COLUMN!r} column; "
                             f"an outcome is attributed to the latest decision at or before its time")
    outcomes = events.where(F.col("event_type") == outcome_event)
    if outcomes.limit(1).count() == 0:
        raise ValueError(f"{setting}={outcome_event!r}: the events hold no event of that type")

    at = F.unix_micros(F.col(TIME_COLUMN).cast("timestamp"))  # exact integer microseconds
    fill = [k for k in fill_keys if k in keys]
    placeable = reduce(lambda a, b: a & b, [F.col(k).isNotNull() for k in keys if k not in fill], at.isNotNull())
    helpers = ["_wo_at", "_wo_dec", "_wo_v", "_wo_grp"]
    both = decisions.withColumn("_wo_at", at).withColumn("_wo_dec", F.lit(1)).withColumn(
        "_wo_v", F.lit(None).cast("double")).unionByName(
        outcomes.where(placeable).select(*keys, at.alias("_wo_at"), F.lit(0).alias("_wo_dec"), value.alias("_wo_v")),
        allowMissingColumns=True)
    order = [F.col("_wo_at").asc_nulls_first(), F.col("_wo_dec").desc(), F.col(decision_id).asc_nulls_last()]
    if fill:  # an outcome without the key takes the latest decision's at or before it (one more window)
        before = Window.partitionBy(*[k for k in keys if k not in fill]).orderBy(*order).rowsBetween(
            Window.unboundedPreceding, Window.currentRow)
        for k in fill:
            latest = F.last(F.when(F.col("_wo_dec") == 1, F.col(k)), ignorenulls=True).over(before)
            both = both.withColumn(k, F.when(F.col("_wo_dec") == 0, F.coalesce(F.col(k), latest)).otherwise(F.col(k)))
        both = both.where(reduce(lambda a, b: a & b, [F.col(k).isNotNull() for k in fill]) | (F.col("_wo_dec") == 1))
    upto = Window.partitionBy(*keys).orderBy(*order).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    group = Window.partitionBy(*keys, "_wo_grp")
    decided_at = F.max(F.when(F.col("_wo_dec") == 1, F.col("_wo_at"))).over(group)  # null for a null-time decision
    credited = (F.col("_wo_dec") == 0) & (F.col("_wo_at") >= decided_at)
    if window_s is not None:
        credited = credited & (F.col("_wo_at") <= decided_at + F.lit(int(round(window_s * 1e6))))
    return (both.withColumn("_wo_grp", F.sum("_wo_dec").over(upto))
            .withColumn("outcome", F.coalesce(F.sum(F.when(credited, F.col("_wo_v"))).over(group), F.lit(0.0)))
            .where(F.col("_wo_dec") == 1).drop(*helpers))
