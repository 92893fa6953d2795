"""A/B test analysis: difference in means, CUPED, and a sample-ratio-mismatch check.

Why sufficient statistics: per arm we need only n, the means of y and x and their centred
second moments (y = the unit's outcome in the experiment window, x = its pre-period covariate).
One Spark ``groupBy(arm)`` computes them over any number of units with Spark's numerically
stable moment aggregates (raw sums of squares would cancel when the spread is tiny next to the
mean); the pure functions below turn them into estimates, so the same code serves numpy tests
and the Spark stage.

* Difference in means with a Welch (unequal-variance) CLT interval.
* CUPED (Deng, Xu, Kohavi & Walker 2013): ``y_adj = y - theta (x - mean(x))`` with the pooled
  ``theta = cov(y, x) / var(x)``; same difference, smaller variance. ``x`` must be measured
  before the experiment (the pre-period: every event of the user before the start, see
  :func:`unit_outcomes`); a covariate the treatment affects biases the difference. The
  variance reduction achieved, ``1 - var(y_adj)/var(y)`` (about ``corr(x, y)^2``), is reported.
* Sample ratio mismatch (Fabijan et al. 2019): chi-square of unit counts against the design
  ratio; ``p < 0.001`` flags a broken randomisation, and the estimates should not be trusted.
"""
from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

import numpy as np
from scipy import stats as sps

from causalrec.explain import ci_level

log = logging.getLogger(__name__)

SRM_P_THRESHOLD = 0.001
# fewer units than this with a nonzero outcome in an arm: the normal interval is warned about (in simulation,
# a 0.1% conversion rate on 1,000 units - one or two conversions per arm - covered 78.7% at 95%; four per arm 94%)
MIN_OUTCOME_UNITS = 5


@dataclass
class ArmStats:
    """One arm's moments: n, means, and centred sums of products (cyy = sum (y - my)^2, ...)."""

    n: float
    my: float
    cyy: float
    mx: float = 0.0
    cxx: float = 0.0
    cxy: float = 0.0
    n_nonzero: Optional[float] = None  # units whose outcome is not 0 (rare events: see MIN_OUTCOME_UNITS)

    @classmethod
    def from_arrays(cls, y, x=None) -> "ArmStats":
        y = np.asarray(y, dtype=float)
        x = np.zeros_like(y) if x is None else np.asarray(x, dtype=float)
        dy, dx = y - y.mean(), x - x.mean()
        return cls(float(len(y)), float(y.mean()), float(dy @ dy), float(x.mean()), float(dx @ dx), float(dx @ dy),
                   float(np.count_nonzero(y)))

    def mean(self) -> float:
        return self.my

    def var(self) -> float:
        return max(self.cyy, 0.0) / (self.n - 1)


def _interval(est: float, se: float, alpha: float) -> dict:
    z = float(sps.norm.ppf(1 - alpha / 2))
    p = float(2 * sps.norm.sf(abs(est) / se)) if se > 0 else (0.0 if est != 0 else 1.0)
    return {"estimate": est, "std_err": se, "ci_low": est - z * se, "ci_high": est + z * se, "p_value": p}


def diff_in_means(t: ArmStats, c: ArmStats, alpha: float = 0.05) -> dict:
    """mean_t - mean_c with the Welch standard error sqrt(s_t^2/n_t + s_c^2/n_c)."""
    if t.n < 2 or c.n < 2:
        raise ValueError(f"A/B test: each arm needs at least 2 units (treatment {int(t.n)}, control {int(c.n)})")
    est = t.mean() - c.mean()
    se = math.sqrt(t.var() / t.n + c.var() / c.n)
    out = _interval(est, se, alpha)
    out["relative_lift"] = est / c.mean() if c.mean() != 0 else float("nan")
    return out


def _constant(var: float, mean: float) -> bool:
    """A variance indistinguishable from rounding noise at this mean (a constant covariate)."""
    return var <= (1e-12 * abs(mean)) ** 2


def cuped(t: ArmStats, c: ArmStats, alpha: float = 0.05) -> dict:
    """CUPED-adjusted difference; ``theta`` pooled over both arms, covariate centred at its pooled mean.

    Pooled moments combine the arms' centred ones (Chan, Golub & LeVeque), so nothing cancels; a
    constant covariate gives ``theta = 0`` (the plain difference), not a ratio of rounding noise.
    """
    n = t.n + c.n
    mx = (t.n * t.mx + c.n * c.mx) / n
    between = t.n * c.n / n
    cxx = t.cxx + c.cxx + between * (t.mx - c.mx) ** 2
    cxy = t.cxy + c.cxy + between * (t.mx - c.mx) * (t.my - c.my)
    theta = 0.0 if _constant(cxx / n, mx) else cxy / cxx

    def adjusted(a: ArmStats) -> ArmStats:
        # y' = y - theta (x - mx): its arm mean and centred square follow from the arm's moments
        return ArmStats(a.n, a.my - theta * (a.mx - mx), a.cyy - 2 * theta * a.cxy + theta ** 2 * a.cxx)

    ta, ca = adjusted(t), adjusted(c)
    out = diff_in_means(ta, ca, alpha)
    raw = diff_in_means(t, c, alpha)
    out["theta"] = theta
    out["variance_reduction"] = 1 - (out["std_err"] ** 2) / (raw["std_err"] ** 2) if raw["std_err"] > 0 else 0.0
    return out


def srm_check(n_treatment: int, n_control: int, expected_treatment_share: float = 0.5) -> dict:
    """Chi-square goodness of fit of the arm sizes to the design split."""
    n = n_treatment + n_control
    exp = np.array([expected_treatment_share, 1 - expected_treatment_share]) * n
    chi2, p = sps.chisquare([n_treatment, n_control], exp)
    return {"chi2": float(chi2), "p_value": float(p), "mismatch": bool(p < SRM_P_THRESHOLD)}


# -------------------------------------------------------------------- Spark side


def experiment_start(events, arm_column: str, start=None) -> datetime:
    """The experiment start as a UTC datetime: ``start`` (ISO timestamp or datetime; without a zone,
    UTC) or, when None, the time of the first arm-labelled event (one scalar aggregate)."""
    from pyspark.sql import functions as F

    if start is not None:
        from causalrec.config import iso_utc

        return iso_utc(start, "ope.abtest_start")
    # epoch microseconds, not a collected timestamp (PySpark would read that in the driver's OS time zone)
    first = events.where(F.col(arm_column).isNotNull()).agg(F.unix_micros(F.min("event_time"))).first()[0]
    if first is None:
        raise ValueError(f"A/B test: no event carries an arm in events.{arm_column}")
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(first))


def unit_outcomes(events, arm_column: str, start, covariate=None, metric_event: Optional[str] = None):
    """events -> per-unit (user) frame: arm, y (mean outcome in the experiment window), x (pre-period covariate).

    Experiment window: the arm-labelled events from ``start`` on (see :func:`experiment_start`);
    a user's arm is its label there, and every user with such an event is a unit, whatever the
    event's type. ``y``: the mean value of the user's window events, or with ``metric_event`` of
    its window events of that type only; 0 for a unit without any (assigned, never converted:
    dropping it would compare converters only and skew the arm sizes).
    Pre-period covariate (CUPED, Deng et al. 2013): the user's mean outcome (the same events:
    all, or those of ``metric_event``) over ALL of its events before ``start``, labelled or not
    (before the experiment there is no arm to label them with), so it is measured before
    treatment and does not depend on the assignment; 0 for users without pre-period events. A
    covariate measured inside the treated window would absorb part of the effect (it is a
    mediator) and bias CUPED towards 0. ``covariate`` (user_id, x), e.g. a user_features column
    computed before the start, replaces it. Users seen in more than one arm are dropped
    (contaminated) and counted.
    """
    from pyspark.sql import functions as F

    start_ts = F.lit(experiment_start(events, arm_column, start)).cast("timestamp")
    is_metric = (F.col("event_type") == metric_event) if metric_event else F.lit(True)
    ev = events.withColumn("y", F.coalesce(F.col("value").cast("double"), F.lit(0.0)))
    post = ev.where(F.col(arm_column).isNotNull() & (F.col("event_time") >= start_ts))
    pre = ev.where((F.col("event_time") < start_ts) & is_metric)
    # units and arms from every labelled window event; y from the metric events among them (avg skips nulls)
    arms = post.groupBy("user_id").agg(F.countDistinct(arm_column).alias("n_arms"), F.first(arm_column).alias("arm"),
                                       F.avg(F.when(is_metric, F.col("y"))).alias("y"))
    contaminated = arms.where("n_arms > 1").count()
    units = arms.where("n_arms = 1").drop("n_arms").withColumn("y", F.coalesce(F.col("y"), F.lit(0.0)))
    if covariate is None:
        covariate = pre.groupBy("user_id").agg(F.avg("y").alias("x"))
    # a missing or NaN covariate reads 0: any fixed pre-period value keeps CUPED unbiased, NaN would void it
    x = F.col("x").cast("double")
    units = units.join(covariate, "user_id", "left").withColumn(
        "x", F.coalesce(F.nanvl(x, F.lit(None).cast("double")), F.lit(0.0)))
    return units, contaminated


def covariate_as_of(user_features):
    """The time user_features were computed as of (features.cutoff: only events strictly before it were
    used), from its ``as_of`` column; None when the table does not record it."""
    from pyspark.sql import functions as F

    if "as_of" not in user_features.columns:
        return None
    t = user_features.agg(F.unix_micros(F.max("as_of"))).first()[0]
    return None if t is None else datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(t))


def _utc(t: datetime) -> str:
    return t.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ") + " UTC"


def arm_stats(units) -> dict:
    """One groupBy: sufficient statistics per arm (Spark's moment aggregates are merge-stable)."""
    from pyspark.sql import functions as F

    rows = units.groupBy("arm").agg(
        F.count("*").alias("n"), F.avg("y").alias("my"), F.var_pop("y").alias("vy"),
        F.avg("x").alias("mx"), F.var_pop("x").alias("vx"), F.covar_pop("x", "y").alias("cxy"),
        F.count(F.when(F.col("y") != 0, 1)).alias("nz")).collect()
    return {r["arm"]: ArmStats(float(r["n"]), r["my"], r["vy"] * r["n"], r["mx"], r["vx"] * r["n"], r["cxy"] * r["n"],
                               float(r["nz"])) for r in rows}


def analyse(stats: dict, treatment: str, control: str, expected_share: float = 0.5, alpha: float = 0.05) -> dict:
    for a in (treatment, control):
        if a not in stats:
            raise ValueError(f"A/B test: arm {a!r} has no units; arms present: {sorted(stats)}")
    t, c = stats[treatment], stats[control]
    few = {a: int(s.n_nonzero) for a, s in ((treatment, t), (control, c))
           if s.n_nonzero is not None and s.n_nonzero < MIN_OUTCOME_UNITS}
    if few:
        log.warning("A/B test: %s with fewer than %d units with a nonzero outcome: the normal (Welch) interval "
                    "is unreliable with so few events and may not cover at its stated level; collect more units",
                    ", ".join(f"arm {a!r} has {k}" for a, k in few.items()), MIN_OUTCOME_UNITS)
    return {"diff_in_means": diff_in_means(t, c, alpha), "cuped": cuped(t, c, alpha),
            "srm": srm_check(int(t.n), int(c.n), expected_share), "n_treatment": int(t.n), "n_control": int(c.n),
            "few_outcomes": few}


def pick_arms(arms: list, treatment: Optional[str], control: Optional[str], arm_col: str = "policy") -> tuple[str, str]:
    """(treatment, control) of ``arms`` (sorted): the configured ones; an unset one is the only other
    arm; with neither set and exactly two arms, the last and the first in sort order. More arms than
    that must be named: picking two of them silently would drop the rest from the analysis."""
    where = "ope.abtest_treatment / ope.abtest_control"
    missing = [a for a in (treatment, control) if a and a not in arms]
    if missing:
        raise ValueError(f"A/B test: {where} name {missing}, which events.{arm_col} does not have; its arms: {arms}")
    if treatment and control:
        if treatment == control:
            raise ValueError(f"A/B test: {where} are both {treatment!r}; name two different arms of {arms}")
        return treatment, control
    if treatment or control:
        given = treatment or control
        rest = [a for a in arms if a != given]
        if len(rest) != 1:
            unset = "ope.abtest_control" if treatment else "ope.abtest_treatment"
            raise ValueError(f"A/B test: {given!r} is set, and events.{arm_col} has "
                             f"{'no other arm' if not rest else f'{len(rest)} other arms {rest}'}: set {unset}")
        return (given, rest[0]) if treatment else (rest[0], given)
    if len(arms) != 2:
        raise ValueError(f"A/B test needs two arms in events.{arm_col}; found {arms}"
                         + (f": set {where} to pick two" if len(arms) > 2 else ""))
    return arms[-1], arms[0]


def summary_line(r: dict, treatment: str, control: str, alpha: float) -> str:
    """One printed result: estimate ± the half-width of its (1 - alpha) interval, labelled with that level."""
    return (f"{r['method']:<14} {treatment} - {control}: {r['estimate']:+.5f} ± {r['ci_high'] - r['estimate']:.5f} "
            f"({ci_level(alpha)} CI; p={r['p_value']:.3g}; variance reduction {r['variance_reduction']:.1%})")


def run(ctx) -> dict:
    from causalrec.schemas import ABTEST_RESULTS

    cfg, store = ctx.cfg, ctx.store
    oc = cfg.ope
    events = store.read("events")
    arm_col = oc.abtest_arm_column
    covariate = None
    if oc.abtest_covariate:
        if not store.exists("user_features"):
            raise ValueError(f"ope.abtest_covariate={oc.abtest_covariate!r} needs the user_features table")
        uf = store.read("user_features")
        if oc.abtest_covariate not in uf.columns:
            raise ValueError(f"user_features has no column {oc.abtest_covariate!r} (columns: {uf.columns})")
        covariate = uf.select("user_id", uf[oc.abtest_covariate].alias("x"))
    start = experiment_start(events, arm_col, oc.abtest_start)
    if covariate is not None:
        # user_features are as of features.cutoff (default: after the last event): a covariate that saw
        # the treated window absorbs part of the effect and biases CUPED towards 0
        as_of = covariate_as_of(uf)
        if as_of is None or as_of > start:
            when = (f"do not record when they were computed (no as_of column), so they may postdate the "
                    f"experiment start {_utc(start)}" if as_of is None else
                    f"were computed as of {_utc(as_of)}, after the experiment start {_utc(start)}")
            raise ValueError(
                f"ope.abtest_covariate={oc.abtest_covariate!r}: user_features {when}; the covariate may then "
                "include treated events and bias CUPED towards 0. Rebuild the features with "
                f"features.cutoff at or before the start (causalrec features <config> --set "
                f"features.cutoff={start.astimezone(timezone.utc).replace(tzinfo=None).isoformat()}), or drop "
                "ope.abtest_covariate to use the pre-period covariate (every event of the user before the start)")
    with ctx.step("abtest: unit outcomes"):
        units, contaminated = unit_outcomes(events, arm_col, start, covariate, oc.abtest_metric_event)
        stats = arm_stats(units)
    treatment, control = pick_arms(sorted(stats), oc.abtest_treatment, oc.abtest_control, arm_col)
    others = {a: int(stats[a].n) for a in stats if a not in (treatment, control)}
    if others:
        log.warning("abtest: comparing %r with %r; other arms in events.%s left out: %s", treatment, control,
                    arm_col, ", ".join(f"{a} ({n} units)" for a, n in sorted(others.items())))
    res = analyse(stats, treatment, control, oc.abtest_expected_share, oc.alpha)
    run_id = uuid.uuid4().hex[:12]
    now = datetime.now(timezone.utc)
    recs = []
    for method in ("diff_in_means", "cuped"):
        r = res[method]
        recs.append(dict(run_id=run_id, arm_column=arm_col, treatment=treatment, control=control, method=method,
                         estimate=r["estimate"], std_err=r["std_err"], ci_low=r["ci_low"], ci_high=r["ci_high"],
                         p_value=r["p_value"], relative_lift=r.get("relative_lift"),
                         variance_reduction=r.get("variance_reduction", 0.0), n_treatment=res["n_treatment"],
                         n_control=res["n_control"], contaminated_units=int(contaminated),
                         srm_p_value=res["srm"]["p_value"], srm_mismatch=res["srm"]["mismatch"], created_at=now))
    import pandas as pd

    df = ctx.spark.createDataFrame(pd.DataFrame(recs, columns=ABTEST_RESULTS.names), schema=ABTEST_RESULTS.spark_schema())
    store.write(df, "abtest_results", mode="overwrite", spec=ABTEST_RESULTS, overwrite_schema=True)
    ctx.log_rows("abtest_results", len(recs))
    for r in recs:
        print(summary_line(r, treatment, control, oc.alpha))
    if res["srm"]["mismatch"]:
        print(f"WARNING: sample ratio mismatch (p={res['srm']['p_value']:.2g}): do not trust these estimates")
    return {"run_id": run_id, "treatment": treatment, "control": control, "rows_out": len(recs),
            "n_treatment": res["n_treatment"], "n_control": res["n_control"], "srm": res["srm"],
            "diff_in_means": res["diff_in_means"]["estimate"], "cuped": res["cuped"]["estimate"],
            "variance_reduction": res["cuped"]["variance_reduction"], "few_outcomes": res["few_outcomes"]}
