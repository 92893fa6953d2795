"""Causal effect of recommending: treatment = recommended, outcome = click/purchase.

Estimands: the average effect ``tau = E[Y(1) - Y(0)]`` and conditional effects per item and per
user segment (the ``uplift_effects`` table feeds ranking by causal effect). With the treatment
propensity ``e(x) = P(T=1 | x)`` (``treatment_propensity`` table; adjustment set from the causal
graph) and outcome models ``m_t(x)``, per-row scores are

* IPS (Horvitz-Thompson): ``phi = T Y / e - (1 - T) Y / (1 - e)``
* DR / AIPW (Robins, Rotnitzky & Zhao 1994): ``phi = m1 - m0 + T (Y - m1) / e - (1 - T)(Y - m0) / (1 - e)``

and every effect is ``mean(phi)`` over its group with a CLT interval - one grouped Spark
aggregation per level. Both arms must be observed: an effect is only reported for a group
(overall, item, segment) with at least ``min_rows`` treated AND ``min_rows`` control rows (without
one arm, ``E[Y(t)]`` of the missing arm is not identified and any number would be made up); the
stage stops with a named error when the whole log lacks an arm (e.g. OBD: every logged event was
recommended). Refutation checks (DoWhy-style, Sharma & Kiciman 2020) run on a
sample: a placebo treatment (permuted T: the effect must vanish), an added random common cause
(the estimate must not move), and reruns on random data subsets (it must be stable).
"""
from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone
from typing import NamedTuple, Optional

import numpy as np
from scipy import stats as sps


# -------------------------------------------------------------------- pure functions


# uplift_effects holds every estimate once per method; readers that need one use this order:
# DR is the primary estimate, IPS the fallback
METHOD_PREFERENCE = ("dr", "ips")


class EffectScale(NamedTuple):
    """What uplift_effects' effects are a change in: ``unit`` PROBABILITY when every outcome was 0 or 1, else
    VALUE, the summed value of ``outcome`` events (e.g. revenue). One rule for every reader (explanations,
    the report's axes)."""
    unit: str = "probability"
    outcome: Optional[str] = None

    @classmethod
    def of(cls, overall: Optional[dict]) -> "EffectScale":
        """From an uplift_effects overall row (``outcome``, ``outcome_binary``); no row, or one written before
        the stage recorded its outcome, reads as a probability change."""
        from causalrec.explain import PROBABILITY, VALUE

        overall = overall or {}
        return cls(PROBABILITY if overall.get("outcome_binary") is not False else VALUE, overall.get("outcome"))


def primary_method(methods) -> Optional[str]:
    """The method readers of ``uplift_effects`` use, among those present (None when there are none)."""
    have = {m for m in methods if m is not None}
    return next((m for m in METHOD_PREFERENCE if m in have), min(have) if have else None)


def scores(y, t, e, m1=None, m0=None, method: str = "dr") -> np.ndarray:
    """Per-row effect scores (see module docstring)."""
    y, t, e = (np.asarray(a, dtype=float) for a in (y, t, e))
    if np.any((e <= 0) | (e >= 1)):
        i = int(np.flatnonzero((e <= 0) | (e >= 1))[0])
        raise ValueError(f"uplift: treatment propensity row {i} is {e[i]!r}; expected a value in (0, 1) (clip it)")
    if method == "ips":
        return t * y / e - (1 - t) * y / (1 - e)
    if method == "dr":
        if m1 is None or m0 is None:
            raise ValueError("uplift: method 'dr' needs the outcome models m1 and m0 (see cell_outcome_model)")
        m1, m0 = np.asarray(m1, dtype=float), np.asarray(m0, dtype=float)
        return m1 - m0 + t * (y - m1) / e - (1 - t) * (y - m0) / (1 - e)
    raise ValueError(f"uplift: method must be 'ips' or 'dr', got {method!r}")


def mean_interval(phi: np.ndarray, alpha: float = 0.05) -> dict:
    phi = np.asarray(phi, dtype=float)
    n = phi.shape[0]
    if n < 2:
        raise ValueError(f"uplift: need at least 2 rows for an interval, got {n}")
    est = float(phi.mean())
    se = float(phi.std(ddof=1) / math.sqrt(n))
    z = float(sps.norm.ppf(1 - alpha / 2))
    return {"effect": est, "se": se, "ci_low": est - z * se, "ci_high": est + z * se, "n": n}


def check_arms(n_treated: int, n_control: int, min_rows: int = 2) -> None:
    """Raise, naming the arm, unless both arms have ``min_rows`` rows: without control rows (or
    treated ones) the effect is not identified, whatever the scores' arithmetic returns."""
    for arm, k, flag in (("treated", n_treated, "True"), ("control", n_control, "False")):
        if k < min_rows:
            raise ValueError(f"uplift: {int(k)} {arm} row(s) (recommended = {flag}) of {int(n_treated + n_control)}; "
                             f"the effect of recommending needs at least {min_rows} rows in each arm (logs where "
                             f"every event was recommended, like OBD's, have no control arm)")


def cell_outcome_model(y, t, cell, prior: float = 10.0):
    """m_t(x) = mean outcome of arm t in the row's cell (item), shrunk to the arm's overall mean.
    Both arms must have rows (:func:`check_arms`)."""
    y, t, cell = np.asarray(y, float), np.asarray(t, float), np.asarray(cell)
    check_arms(int((t == 1).sum()), int((t == 0).sum()), 1)
    codes, inv = np.unique(cell, return_inverse=True)
    out = {}
    for arm in (0, 1):
        mask = t == arm
        mu = y[mask].mean()
        s = np.bincount(inv[mask], weights=y[mask], minlength=len(codes))
        c = np.bincount(inv[mask], minlength=len(codes))
        out[arm] = ((s + prior * mu) / (c + prior))[inv]
    return out[1], out[0]


def refute(y, t, e, cell, *, seed: int = 0, n_subsets: int = 5, subset_share: float = 0.5, alpha: float = 0.05) -> dict:
    """Refutation checks of the DR average effect on a (driver-sized) sample.

    * placebo: T permuted at random -> effect ~ 0; ``passed`` if its interval covers 0. The permuted
      T is assigned at random, so its propensity is its share, not the logged ``e``: weighting a
      random T by the real ``e`` reweights whatever in ``y`` goes with ``e`` inside a cell (the
      confounding the cells do not capture) and fails the placebo on a correct design.
    * random_common_cause: a N(0,1) covariate W joins the adjustment set (propensity refit on
      logit(e) and W; outcome model per (cell, sign W)) -> ``passed`` if the estimate moves by less
      than one standard error.
    * subsets: reruns on random ``subset_share`` subsets -> ``passed`` if every rerun's interval
      contains the full-sample estimate; None (not checked) when no subset had both arms and 10 rows.

    Intervals (the placebo's, the subsets') are ``1 - alpha``, as the effects the stage writes.
    """
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    y, t, e, cell = np.asarray(y, float), np.asarray(t, float), np.asarray(e, float), np.asarray(cell)

    def dr(yy, tt, ee, cc):
        m1, m0 = cell_outcome_model(yy, tt, cc)
        return mean_interval(scores(yy, tt, ee, m1, m0, "dr"), alpha)

    base = dr(y, t, e, cell)
    tp = rng.permutation(t)
    placebo = dr(y, tp, np.full_like(e, tp.mean()), cell)
    w = rng.normal(size=y.shape[0])
    X = np.column_stack([np.log(e / (1 - e)), w])
    e2 = LogisticRegression().fit(X, t).predict_proba(X)[:, 1].clip(0.01, 0.99) if len(np.unique(t)) == 2 else e
    cell2 = np.char.add(cell.astype(str), np.where(w > 0, "|+", "|-"))
    rcc = dr(y, t, e2, cell2)
    subs = []
    for _ in range(n_subsets):
        idx = rng.random(y.shape[0]) < subset_share
        if idx.sum() >= 10 and 0 < t[idx].sum() < idx.sum():  # both arms in the subset
            subs.append(dr(y[idx], t[idx], e[idx], cell[idx]))
    return {
        "sample_rows": int(y.shape[0]),
        "estimate": base["effect"], "se": base["se"],
        "placebo": {"effect": placebo["effect"], "ci_low": placebo["ci_low"], "ci_high": placebo["ci_high"],
                    "passed": bool(placebo["ci_low"] <= 0 <= placebo["ci_high"])},
        "random_common_cause": {"effect": rcc["effect"], "change": rcc["effect"] - base["effect"],
                                "passed": bool(abs(rcc["effect"] - base["effect"]) < base["se"])},
        # no rerun, no check: all([]) would pass a sample too small or unbalanced to split
        "subsets": {"effects": [s["effect"] for s in subs], "reruns": len(subs), "of": int(n_subsets),
                    "passed": bool(all(s["ci_low"] <= base["effect"] <= s["ci_high"] for s in subs)) if subs else None},
    }


# -------------------------------------------------------------------- Spark transforms


def treatment_rows(events, treatment_propensity=None, outcome_event: Optional[str] = None, eps: float = 0.01,
                   attribution_window_s: Optional[float] = None, attribution_scope: str = "session"):
    """events -> rows: event_id, user_id, item_id, t, y, e (propensity clipped to [eps, 1-eps]).

    One row per treatment decision (:mod:`causalrec.decisions`): the impressions with a
    ``recommended`` flag, or every flagged row of a log without impressions (one row per
    decision). ``y``: the decision's own value (the click), or with ``outcome_event``
    (``ope.uplift_outcome_event``, e.g. ``purchase``) the summed value of that type's events
    attributed to the decision: same user, item and session (``attribution_scope`` "user",
    ``ope.attribution_scope``: same user and item in any session), at or after it and before the
    next such decision, within ``attribution_window_s`` (``ope.attribution_window_s``) when set
    (:func:`causalrec.decisions.with_outcome`). Without a ``treatment_propensity`` table, e = the
    item's share of recommended decisions (a propensity that adjusts for the item only; flagged by
    the caller).
    """
    from pyspark.sql import functions as F

    from causalrec.decisions import DECISION_EVENT, with_outcome

    session = F.coalesce(F.col("session_id").cast("string"), F.lit("")) if "session_id" in events.columns else F.lit("")
    events = events.withColumn("_session", session)
    flagged = events.where(F.col("recommended").isNotNull())
    decisions = flagged.where(F.col("event_type") == DECISION_EVENT)
    if decisions.limit(1).count() == 0:
        decisions = flagged
    decisions = with_outcome(decisions, events, outcome_event, ["user_id", "item_id"], "ope.uplift_outcome_event",
                             decision_id="event_id", window_s=attribution_window_s, scope=attribution_scope,
                             session_keys=["_session"])
    rows = decisions.select("event_id", "user_id", "item_id", F.col("recommended").cast("double").alias("t"),
                            F.col("outcome").alias("y"))
    if treatment_propensity is not None:
        tp = treatment_propensity.select("event_id", F.col("treatment_propensity").cast("double").alias("e"))
        rows = rows.join(tp, "event_id", "left")
        missing = rows.where(F.col("e").isNull()).limit(1).collect()
        if missing:
            raise ValueError(f"treatment_propensity: no row for event_id {missing[0]['event_id']!r}")
    else:
        ip = rows.groupBy("item_id").agg(F.avg("t").alias("e"))
        rows = rows.join(ip, "item_id")
    return rows.withColumn("e", F.least(F.greatest(F.col("e"), F.lit(eps)), F.lit(1 - eps)))


def add_scores(rows, prior: float = 10.0):
    """Add the per-item outcome models m1, m0 (shrunk cell means) and the IPS and DR scores."""
    from pyspark.sql import functions as F

    arm = rows.groupBy().agg(F.avg(F.when(F.col("t") == 1, F.col("y"))).alias("mu1"),
                             F.avg(F.when(F.col("t") == 0, F.col("y"))).alias("mu0"))
    cell = rows.groupBy("item_id").agg(
        F.sum(F.col("t") * F.col("y")).alias("s1"), F.sum("t").alias("c1"),
        F.sum((1 - F.col("t")) * F.col("y")).alias("s0"), F.sum(1 - F.col("t")).alias("c0"))
    # an arm without rows has no mean (null, not 0): its scores are null and no effect is made up
    m = cell.crossJoin(arm).select(
        "item_id",
        ((F.col("s1") + prior * F.col("mu1")) / (F.col("c1") + prior)).alias("m1"),
        ((F.col("s0") + prior * F.col("mu0")) / (F.col("c0") + prior)).alias("m0"))
    r = rows.join(m, "item_id")
    t, y, e = F.col("t"), F.col("y"), F.col("e")
    r = r.withColumn("phi_ips", t * y / e - (1 - t) * y / (1 - e))
    r = r.withColumn("phi_dr", F.col("m1") - F.col("m0") + t * (y - F.col("m1")) / e
                     - (1 - t) * (y - F.col("m0")) / (1 - e))
    return r


def grouped_effects(scored, keys: list, alpha: float = 0.05, min_rows: int = 2):
    """One aggregation: effect, se, CI, n per group (keys=[] -> overall) for both methods.

    Groups with fewer than ``min_rows`` treated or fewer than ``min_rows`` control rows are left
    out: their effect is not identified (see module docstring).
    """
    from pyspark.sql import functions as F

    z = float(sps.norm.ppf(1 - alpha / 2))
    aggs = [F.count("*").alias("n"), F.sum("t").cast("long").alias("n_treated")]
    for mth in ("ips", "dr"):
        aggs += [F.avg(f"phi_{mth}").alias(f"effect_{mth}"), F.stddev_samp(f"phi_{mth}").alias(f"sd_{mth}")]
    g = scored.groupBy(*keys).agg(*aggs) \
        .where((F.col("n_treated") >= min_rows) & (F.col("n") - F.col("n_treated") >= min_rows))
    out = None
    for mth in ("ips", "dr"):
        se = F.col(f"sd_{mth}") / F.sqrt(F.col("n"))
        part = g.select(*keys, F.lit(mth).alias("method"), F.col(f"effect_{mth}").alias("effect"), se.alias("se"),
                        "n", "n_treated")
        part = part.withColumn("ci_low", F.col("effect") - z * F.col("se")).withColumn(
            "ci_high", F.col("effect") + z * F.col("se"))
        out = part if out is None else out.unionByName(part)
    return out


def run(ctx) -> dict:
    from pyspark.sql import functions as F

    from causalrec.schemas import UPLIFT_EFFECTS, conform

    cfg, store = ctx.cfg, ctx.store
    oc = cfg.ope
    events = store.read("events")
    tp = store.read("treatment_propensity") if store.exists("treatment_propensity") else None
    with ctx.step("uplift: rows and scores"):
        rows = treatment_rows(events, tp, oc.uplift_outcome_event, cfg.propensity.treatment_eps,
                              oc.attribution_window_s, oc.attribution_scope)
        if store.exists("users") and "segment" in store.read("users").columns:
            seg = store.read("users").select("user_id", F.coalesce(F.col("segment"), F.lit("unknown")).alias("segment"))
            rows = rows.join(seg, "user_id", "left").fillna({"segment": "unknown"})
        else:
            rows = rows.withColumn("segment", F.lit("all"))
        scored = add_scores(rows).persist()
        # binary: every outcome 0 or 1, so effects are probability changes (readers say "percentage
        # points"); a summed value (revenue, two purchases credited to one decision) is not
        n, n_treated, n_other = scored.agg(F.count("*"), F.sum("t"),
                                           F.count(F.when(~F.col("y").isin(0.0, 1.0), 1))).first()
        n_treated = int(n_treated or 0)
        check_arms(n_treated, n - n_treated)
    ctx.log_rows("events (with recommended)", n, "in")
    with ctx.step("uplift: effects"):
        overall = grouped_effects(scored, [], oc.alpha).withColumn("level", F.lit("overall"))
        items = grouped_effects(scored, ["item_id"], oc.alpha, oc.uplift_min_rows).withColumn("level", F.lit("item"))
        segs = grouped_effects(scored, ["segment"], oc.alpha, oc.uplift_min_rows).withColumn("level", F.lit("segment"))
    with ctx.step("uplift: refutations on a sample"):
        frac = min(1.0, oc.uplift_refutation_sample, oc.uplift_refutation_max_rows / max(n, 1))  # driver-sized
        sample = scored.sample(fraction=frac, seed=cfg.project.seed).select("y", "t", "e", "item_id").toPandas()
        ref = refute(sample.y.values, sample.t.values, sample.e.values, sample.item_id.values, seed=cfg.project.seed,
                     alpha=oc.alpha) \
            if len(sample) >= 20 and sample.t.nunique() == 2 else {"skipped": f"sample of {len(sample)} rows is too small"}
    run_id = uuid.uuid4().hex[:12]
    now = datetime.now(timezone.utc)
    out = overall.withColumn("refutation", F.lit(json.dumps(ref))).unionByName(
        items.withColumn("refutation", F.lit(None).cast("string")), allowMissingColumns=True).unionByName(
        segs.withColumn("refutation", F.lit(None).cast("string")), allowMissingColumns=True)
    out = out.withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.lit(now).cast("timestamp"))
    # the level its intervals are at: readers (report, ranking) may run under another ope.alpha
    out = out.withColumn("alpha", F.lit(float(oc.alpha)))
    out = out.withColumn("outcome", F.lit(oc.uplift_outcome_event).cast("string")) \
        .withColumn("outcome_binary", F.lit(n_other == 0))
    out = conform(out, UPLIFT_EFFECTS)
    store.write(out, "uplift_effects", mode="overwrite", spec=UPLIFT_EFFECTS, overwrite_schema=True)
    res = store.read("uplift_effects").where(F.col("level") == "overall").collect()
    n_out = store.row_count("uplift_effects")
    ctx.log_rows("uplift_effects", n_out)
    scored.unpersist()
    summary = {"run_id": run_id, "rows_in": n, "rows_out": n_out,
               "propensity_source": "treatment_propensity" if tp is not None else "item_share_recommended",
               "refutation": ref, "refutation_rows": len(sample), "outcome_binary": n_other == 0}
    for r in res:
        summary[f"ate_{r['method']}"] = {"effect": r["effect"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
        print(f"average effect of recommending ({r['method']}): {r['effect']:+.5f} [{r['ci_low']:+.5f}, {r['ci_high']:+.5f}]")
    return summary
