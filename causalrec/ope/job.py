"""OPE stage: each strategy's value with every configured estimator, from ONE pass over the log.

Extract -> transform -> load:

* extract: ``events`` (+ ``exposure_propensity``, ``recommendations``, ``scores`` when present);
* transform (pure DataFrame -> DataFrame functions, unit-tested):
  :func:`logged_rows` -> per-row reward / pscore / stratum / slot,
  :func:`reward_model` -> smoothed mean reward per (stratum, slot, item) = q_hat,
  the policies of :mod:`causalrec.ope.policies` -> ``pi_e__<name>``, ``q_hat_pi__<name>``;
  then :func:`causalrec.estimators.evaluate` (one pass, analytic + Poisson-bootstrap intervals,
  paired differences to ``ope.baseline``);
* load: ``ope_results`` (overwritten: a rerun never duplicates) and a printed table.

Which log is the "logged policy" (``ope.logged_propensity`` says what the events' propensity is):

* ``action`` (the default; OBD): rows with ``logged_propensity`` carry the logging policy's own
  probability of showing that item at that slot, the action space of the strategies' pi_e;
  the unit is (context, position) with position-specific propensities. One row per logged
  decision, i.e. per ``impression`` event; its reward is the impression's ``value`` (OBD and the
  simulator: the click, 0/1) or, with ``ope.reward_event``, the summed ``value`` of the events of
  that type attributed to the decision (same user, item, slot and session - with
  ``ope.attribution_scope: user``, same user and item in any session and slot - at or after it and
  before the next such decision, within ``ope.attribution_window_s`` when set; 0 without one;
  :mod:`causalrec.decisions`). Click and purchase events are outcomes, not decisions: the
  simulator also writes the propensity on them, and counting them as rows would count a clicked
  decision 2-3 times (selection on the outcome).
* ``treatment`` (the simulator): ``logged_propensity`` is the probability of the logged
  recommend-or-not coin (pi if recommended, else 1 - pi), not of the item being shown, so dividing
  a pi_e over items by it would mix two action spaces. The log is read as in the next case; a log
  without ratings gives one row per impression, with the reward of the ``action`` case.
* no logging propensities (Coat): the logged "policy" is the MNAR exposure. A rated pair is
  treated as a draw from ``pi_b(i | u) = p_ui / sum_j p_uj`` with ``p_ui`` from the
  ``exposure_propensity`` table (fallback: item popularity, flagged in the summary), and the
  reward is ``rating >= training_set.positive_threshold``. The estimate then reads: the share of
  the strategy's recommendations the user would rate >= threshold, averaged over users as they
  appear in the log - valid if ratings are missing at random given the exposure propensities
  (Schnabel et al. 2016). Impressions (``treatment``) get the same pscore; their slot is 0 as for
  ratings, since pi_b has no slot.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Optional

from causalrec.context import Context
from causalrec.decisions import DECISION_EVENT, with_outcome
from causalrec.estimators import evaluate, make_estimators
from causalrec.estimators.ope import BIAS_AWARE, NO_INTERVAL
from causalrec.ope import policies as P
from causalrec.schemas import OPE_RESULTS

log = logging.getLogger(__name__)



# -------------------------------------------------------------------- transforms


LOGGED_PROPENSITY_KINDS = ("action", "treatment")  # ope.logged_propensity: what the events' propensity is


def _with_reward(decisions, events, reward_event, attribution_window_s, attribution_scope):
    """decisions -> the same rows with ``reward``: the decision's own value, or its attributed
    ``reward_event`` outcome (attributed on the logged slot and session; an outcome without a
    position, such as a purchase, on the session's latest decision of its item)."""
    from pyspark.sql import functions as F

    outcomes = events.withColumn("slot", F.col("position").cast("int"))  # null stays null: no slot given
    return with_outcome(decisions, outcomes, reward_event, ["user_id", "item_id"], "ope.reward_event",
                        decision_id="row_id", window_s=attribution_window_s, scope=attribution_scope,
                        session_keys=["slot", "session"], fill_keys=["slot"]).withColumnRenamed("outcome", "reward")


def logged_rows(events, exposure_propensity=None, positive_threshold: float = 4.0,
                reward_event: Optional[str] = None, attribution_window_s: Optional[float] = None,
                attribution_scope: str = "session", logged_propensity: str = "action"):
    """events -> (rows, mode): row_id, user_id, item_id, stratum, slot, reward, pscore.

    ``mode`` names the logged policy: "logged_propensity", "exposure" / "exposure_item_popularity"
    (ratings), or those with "_on_impressions" (see module docstring). ``logged_propensity``
    (``ope.logged_propensity``): "action" = the events' propensity is pi_b of the shown item;
    "treatment" = a recommend-or-not probability, so it is ignored. ``reward_event``
    (``ope.reward_event``; impressions only): None = the impression's own value;
    ``attribution_window_s`` (``ope.attribution_window_s``) and ``attribution_scope``
    (``ope.attribution_scope``: "session" matches user, item, slot and session; "user" user and item
    only): see :func:`causalrec.decisions.with_outcome`.
    """
    from pyspark.sql import functions as F

    if logged_propensity not in LOGGED_PROPENSITY_KINDS:
        raise ValueError(f"ope.logged_propensity={logged_propensity!r}: expected one of "
                         f"{', '.join(map(repr, LOGGED_PROPENSITY_KINDS))}")
    stratum = F.coalesce(F.get_json_object(F.col("context"), "$.campaign"), F.lit("all")) \
        if "context" in events.columns else F.lit("all")
    session = F.coalesce(F.col("session_id"), F.lit("")) if "session_id" in events.columns else F.lit("")
    base = events.select(
        F.xxhash64("event_id").alias("row_id"), "user_id", "item_id",
        stratum.alias("stratum"),
        F.coalesce(F.col("position"), F.lit(0)).cast("int").alias("slot"), "position", session.alias("session"),
        "event_type", F.col("value").cast("double").alias("value"),
        F.col("logged_propensity").cast("double").alias("logged_propensity"),
        *(["event_time"] if "event_time" in events.columns else []),
    )
    cols = ["row_id", "user_id", "item_id", "stratum", "slot", "reward"]
    with_p = base.where(F.col("logged_propensity").isNotNull())
    if logged_propensity == "action" and with_p.limit(1).count() > 0:
        decisions = with_p.where(F.col("event_type") == DECISION_EVENT)
        if decisions.limit(1).count() == 0:
            raise ValueError(f"events: rows with logged_propensity but no {DECISION_EVENT!r} event among them; "
                             f"OPE counts one row per logged decision (impression)")
        missing = base.where((F.col("event_type") == DECISION_EVENT) & F.col("logged_propensity").isNull()).count()
        if missing:  # pi_b unknown: they cannot be weighted, and the estimate covers only the others
            log.warning("ope: %d %r events have no logged_propensity and are left out; the policy values "
                        "describe only the decisions logged with one", missing, DECISION_EVENT)
        rows = _with_reward(decisions, base, reward_event, attribution_window_s, attribution_scope).select(
            *cols, F.col("logged_propensity").alias("pscore"))
        bad = rows.where((F.col("pscore") <= 0) | (F.col("pscore") > 1)).limit(1).collect()
        if bad:
            raise ValueError(f"events: logged_propensity {bad[0]['pscore']!r} for row_id {bad[0]['row_id']} "
                             f"is outside (0, 1]")
        return rows, "logged_propensity"
    ratings = base.where(F.col("event_type") == "rating")
    impressions = base.where(F.col("event_type") == DECISION_EVENT)
    if ratings.limit(1).count() > 0:
        units, unit_name, suffix = ratings.withColumn(
            "reward", (F.col("value") >= F.lit(positive_threshold)).cast("double")), "rated", ""
    elif logged_propensity == "treatment" and impressions.limit(1).count() > 0:
        units, unit_name, suffix = _with_reward(impressions, base, reward_event, attribution_window_s,
                                                attribution_scope), "logged", "_on_impressions"
    elif logged_propensity == "treatment":
        raise ValueError(f"events: no rating and no {DECISION_EVENT!r} events; OPE with "
                         f"ope.logged_propensity=treatment needs one of them")
    else:
        raise ValueError("events: no rows with logged_propensity and no rating events; OPE needs one of them")
    units = units.withColumn("slot", F.lit(0))  # pi_b(i | u) has no slot
    if exposure_propensity is not None:
        # the table holds the observed pairs and a sample of the unobserved ones, each sampled pair
        # weighted by its inverse sampling probability: the weighted sum estimates sum_j p_uj over every item
        weight = (F.coalesce(F.col("weight").cast("double"), F.lit(1.0)) if "weight" in exposure_propensity.columns
                  else F.lit(1.0))
        ep = exposure_propensity.select("user_id", "item_id", F.col("exposure_propensity").cast("double").alias("p"),
                                        weight.alias("w"))
        tot = ep.groupBy("user_id").agg(F.sum(F.col("p") * F.col("w")).alias("p_tot"))
        pb = ep.join(tot, "user_id").select("user_id", "item_id", (F.col("p") / F.col("p_tot")).alias("pscore"))
        mode = "exposure"
    else:
        n_units = units.count()
        pb = units.groupBy("item_id").agg((F.count("*") / F.lit(n_units)).alias("pscore"))
        mode = "exposure_item_popularity"
    keys = ["user_id", "item_id"] if exposure_propensity is not None else ["item_id"]
    rows = units.join(pb, keys, "left").select(*cols, "pscore")
    missing = rows.where(F.col("pscore").isNull()).limit(1).collect()
    if missing:
        raise ValueError(f"exposure_propensity: no propensity for user {missing[0]['user_id']!r} item "
                         f"{missing[0]['item_id']!r}; the table must cover every {unit_name} pair")
    return rows, mode + suffix


def reward_model(rows, prior_strength: float = 10.0):
    """q_hat per (stratum, slot, item): mean reward shrunk to the (stratum, slot) mean.

    A deliberately simple, scalable reward model (one groupBy); DR-type estimators stay
    unbiased whatever its quality. Actions seen in a stratum form its action set.
    """
    from pyspark.sql import functions as F

    unit = rows.groupBy("stratum", "slot").agg(F.avg("reward").alias("mu"))
    items = rows.select("stratum", "item_id").distinct()
    slots = rows.select("stratum", "slot").distinct()
    cells = rows.groupBy("stratum", "slot", "item_id").agg(F.sum("reward").alias("s"), F.count("*").alias("n"))
    grid = slots.join(items, "stratum").join(cells, ["stratum", "slot", "item_id"], "left").join(unit, ["stratum", "slot"])
    return grid.select("stratum", "slot", "item_id", (
        (F.coalesce(F.col("s"), F.lit(0.0)) + prior_strength * F.col("mu"))
        / (F.coalesce(F.col("n"), F.lit(0)) + prior_strength)).alias("q_hat_item"))


def attach_policies(rows, item_q, strategies, store=None):
    """Add pi_e__/q_hat_pi__ columns for each strategy; return (df, {name: (pi_e col, q_hat_pi col)}, skipped)."""
    from pyspark.sql import functions as F

    df = rows.join(item_q.withColumnRenamed("q_hat_item", "q_hat"), ["stratum", "slot", "item_id"], "left") \
        .withColumn("q_hat", F.coalesce(F.col("q_hat"), F.lit(0.0)))
    pols, skipped = {}, {}
    for s in strategies:
        if s == "random":
            df = P.add_random_policy(df, item_q, s)
        elif s == "popular":
            df = P.add_popular_policy(df, item_q, s)
        elif s == "recommendations":
            if store is None or not store.exists("recommendations"):
                skipped[s] = "no recommendations table"
                continue
            df = P.add_topk_policy(df, store.read("recommendations"), item_q, s)
        elif s.startswith("score:"):
            col = s.split(":", 1)[1]
            if store is None or not store.exists("scores"):
                skipped[s] = "no scores table"
                continue
            df = P.add_score_policy(df, store.read("scores"), col, item_q, s)
        else:
            raise ValueError(f"ope.strategies: unknown strategy {s!r}; expected random, popular, recommendations "
                             f"or score:<column>")
        pols[s] = (P.pi_e_col(s), P.q_hat_pi_col(s))
    return df, pols, skipped


def results_frame(spark, results, run_id: str, n_boot: int, boot_buckets: int = 0, logged_policy: str | None = None,
                  alpha: float | None = None):
    """EstimateResults -> ope_results rows (one analytic row, plus one bootstrap row when B > 0), each with
    the ``logged_policy`` mode of :func:`logged_rows` (what the estimates' pi_b is) and the ``alpha`` its
    intervals are at (a report run later under another ope.alpha labels them by this one)."""
    import pandas as pd

    now = datetime.now(timezone.utc)
    recs = []
    for r in results:
        recs.append(dict(run_id=run_id, policy=r.policy, estimator=r.estimator, estimate=r.estimate,
                         std_err=r.std_err, ci_low=r.ci_low, ci_high=r.ci_high, interval_method=r.interval_method,
                         logged_policy=logged_policy, ess=r.ess, max_weight=r.max_weight, n=r.n, diff_to_baseline=r.diff_to_baseline,
                         diff_ci_low=r.diff_ci_low, diff_ci_high=r.diff_ci_high, created_at=now, alpha=alpha))
        if n_boot:
            # replicates without a value (0/0: a resample without rows or weight) are left out: say how many
            dropped = max(r.boot_dropped or 0, r.diff_boot_dropped or 0)
            method = NO_INTERVAL if r.interval_method == NO_INTERVAL else (
                f"bootstrap_poisson_B{n_boot}" + (f"_G{boot_buckets}" if boot_buckets else "")
                + (f"_dropped{dropped}" if dropped else "") + (BIAS_AWARE if r.interval_method.endswith(BIAS_AWARE) else ""))
            recs.append(dict(recs[-1], std_err=r.boot_std_err, ci_low=r.boot_ci_low, ci_high=r.boot_ci_high,
                             interval_method=method, diff_ci_low=r.diff_boot_ci_low,
                             diff_ci_high=r.diff_boot_ci_high))
    pdf = pd.DataFrame(recs, columns=OPE_RESULTS.names)
    return spark.createDataFrame(pdf, schema=OPE_RESULTS.spark_schema())


def format_table(results, baseline, alpha: float = 0.05) -> str:
    from causalrec.explain import ci_level

    ci = f"{ci_level(alpha)} CI"  # the analytic interval's level (ope.alpha)
    lines = [f"{'policy':<18}{'estimator':<12}{'estimate':>10}{'std_err':>10}{ci:>22}{'ESS':>10}"
             f"{'max w':>9}{'diff vs ' + str(baseline):>26}"]
    for r in results:
        diff = "" if r.diff_to_baseline is None else \
            f"{r.diff_to_baseline:+.4f} [{r.diff_ci_low:+.4f},{r.diff_ci_high:+.4f}]"
        lines.append(f"{r.policy:<18}{r.estimator:<12}{r.estimate:>10.4f}{r.std_err:>10.4f}"
                     f"{f'[{r.ci_low:.4f}, {r.ci_high:.4f}]':>22}{r.ess:>10.1f}{r.max_weight:>9.2f}{diff:>26}")
    return "\n".join(lines)


# -------------------------------------------------------------------- the stage


def run(ctx: Context) -> dict:
    cfg, store = ctx.cfg, ctx.store
    oc = cfg.ope
    with ctx.step("ope: extract"):
        events = store.read("events")
        ep = store.read("exposure_propensity") if store.exists("exposure_propensity") else None
    with ctx.step("ope: logged rows, reward model, policies"):
        rows, mode = logged_rows(events, ep, cfg.training_set.positive_threshold, oc.reward_event,
                                 oc.attribution_window_s, oc.attribution_scope, oc.logged_propensity)
        rows = rows.persist()
        item_q = reward_model(rows).persist()
        strategies = list(dict.fromkeys(oc.strategies))
        df, pols, skipped = attach_policies(rows, item_q, strategies, store)
        if not pols:
            raise ValueError(f"ope: none of the strategies {strategies} could be built ({skipped})")
        baseline = oc.baseline if oc.baseline in pols else None
        if baseline is None:
            log.warning("ope: the baseline strategy %r could not be built (%s): no differences to a baseline are "
                        "reported", oc.baseline, skipped.get(oc.baseline, "not among the strategies"))
    estimators = make_estimators(oc.estimators, clip_max_weight=oc.clip_max_weight,
                                 switch_lambdas=oc.switch_dr_lambdas, dr_os_lambdas=oc.dr_os_lambdas,
                                 tuning_method=oc.tuning_method)
    with ctx.step("ope: estimate (one pass)"):
        results = evaluate(df, estimators, pols, baseline=baseline, alpha=oc.alpha,
                           n_boot=oc.bootstrap_replicates, seed=cfg.project.seed, boot_buckets=oc.bootstrap_buckets)
    n = results[0].n
    ctx.log_rows("events (logged units)", n, "in")
    run_id = uuid.uuid4().hex[:12]
    with ctx.step("ope: load"):
        out = results_frame(ctx.spark, results, run_id, oc.bootstrap_replicates, oc.bootstrap_buckets, mode, oc.alpha)
        store.write(out, "ope_results", mode="overwrite", spec=OPE_RESULTS, overwrite_schema=True)
        ctx.log_rows("ope_results", out.count())
    print(f"logged policy: {mode} (ope.logged_propensity: {oc.logged_propensity})")
    print(format_table(results, baseline, oc.alpha))
    rows.unpersist()
    item_q.unpersist()
    return {
        "run_id": run_id, "mode": mode, "logged_propensity": oc.logged_propensity, "rows_in": n,
        "policies": list(pols), "skipped": skipped,
        "baseline": baseline, "estimators": [e.estimator_name for e in estimators],
        "rows_out": len(results) * (2 if oc.bootstrap_replicates else 1),
        "estimates": {f"{r.policy}/{r.estimator}": round(r.estimate, 6) for r in results},
        "boot_dropped": {f"{r.policy}/{r.estimator}": r.boot_dropped for r in results if r.boot_dropped},
    }
