"""A/B analysis: Welch difference, CUPED variance reduction, SRM check; the stage end to end."""
import datetime as dt

import numpy as np
import pandas as pd
import pytest

from causalrec.abtest import ArmStats, cuped, diff_in_means, srm_check


def test_diff_in_means_matches_welch_by_hand():
    t, c = np.array([1.0, 2, 3, 4]), np.array([0.0, 1, 1, 2, 1])
    r = diff_in_means(ArmStats.from_arrays(t), ArmStats.from_arrays(c))
    assert r["estimate"] == pytest.approx(2.5 - 1.0)
    assert r["std_err"] == pytest.approx(np.sqrt(t.var(ddof=1) / 4 + c.var(ddof=1) / 5))
    assert r["relative_lift"] == pytest.approx(1.5)
    # two-sided normal p-value, 2 * P(Z > |est| / se): a one-sided p (half of it) would read as twice the evidence
    from scipy.stats import norm

    assert r["p_value"] == pytest.approx(2 * norm.sf(1.5 / r["std_err"]))
    assert r["p_value"] == pytest.approx(0.0369040, abs=1e-6)


def test_cuped_keeps_the_effect_and_reduces_variance_by_about_corr_squared():
    rng = np.random.default_rng(0)
    n = 20000
    x = rng.normal(size=n)
    arm = rng.integers(0, 2, n)
    y = 0.1 * arm + 0.8 * x + rng.normal(scale=0.6, size=n)  # corr(x, y)^2 = .64
    T, C = ArmStats.from_arrays(y[arm == 1], x[arm == 1]), ArmStats.from_arrays(y[arm == 0], x[arm == 0])
    raw, adj = diff_in_means(T, C), cuped(T, C)
    assert adj["theta"] == pytest.approx(0.8, abs=0.02)
    assert adj["variance_reduction"] == pytest.approx(0.64, abs=0.03)
    assert adj["std_err"] < raw["std_err"] * 0.65
    assert adj["ci_low"] < 0.1 < adj["ci_high"]
    # equals the explicit adjusted-outcome computation
    theta = np.cov(y, x, bias=True)[0, 1] / x.var()
    ya = y - theta * (x - x.mean())
    assert adj["estimate"] == pytest.approx(ya[arm == 1].mean() - ya[arm == 0].mean(), abs=1e-9)


def test_moments_do_not_cancel_when_the_spread_is_tiny_next_to_the_mean():
    """Raw sums of squares lost every digit here: SE 0.0 for y = 1e8 + N(0, 1), theta off by 4%."""
    rng = np.random.default_rng(1)
    t, c = 1e8 + rng.normal(size=400), 1e8 + rng.normal(size=500)
    r = diff_in_means(ArmStats.from_arrays(t), ArmStats.from_arrays(c))
    assert r["std_err"] == pytest.approx(np.sqrt(t.var(ddof=1) / 400 + c.var(ddof=1) / 500), rel=1e-6)
    x = 1e4 + rng.normal(scale=1e-3, size=900)
    y = 5.0 + 112.0 * (x - 1e4) + rng.normal(scale=1e-3, size=900)
    adj = cuped(ArmStats.from_arrays(y[:400], x[:400]), ArmStats.from_arrays(y[400:], x[400:]))
    assert adj["theta"] == pytest.approx(np.cov(y, x, bias=True)[0, 1] / x.var(), rel=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.1, 0.3, 7.7])
def test_constant_covariate_leaves_the_plain_difference(value):
    """A constant x carries no information: theta 0, CUPED = difference in means (theta was -8 at 0.1)."""
    t, c = np.array([1.0, 2, 3, 4]), np.array([0.0, 1, 1, 2, 1])
    T, C = ArmStats.from_arrays(t, np.full(4, value)), ArmStats.from_arrays(c, np.full(5, value))
    adj, raw = cuped(T, C), diff_in_means(T, C)
    assert adj["theta"] == 0.0
    assert (adj["estimate"], adj["std_err"]) == pytest.approx((raw["estimate"], raw["std_err"]))


def test_arm_stats_in_spark_equal_numpy_and_nan_covariate_reads_zero(spark):
    from causalrec.abtest import arm_stats, unit_outcomes

    rng = np.random.default_rng(5)
    t0 = dt.datetime(2024, 1, 10)
    rows, cov = [], []
    for u in range(60):
        arm = "B" if u % 2 else "A"
        y = 1e6 + rng.normal()
        rows.append((u, arm, "purchase", float(y), t0))
        cov.append((u, float("nan") if u == 3 else float(rng.normal())))
    ev = spark.createDataFrame(rows, "user_id int, policy string, event_type string, value double, event_time timestamp")
    covariate = spark.createDataFrame(cov, "user_id int, x double")
    units, _ = unit_outcomes(ev, "policy", "2024-01-01", covariate)
    pdf = units.toPandas()
    assert pdf.loc[pdf.user_id == 3, "x"].item() == 0.0
    st = arm_stats(units)
    for arm in ("A", "B"):
        g = pdf[pdf.arm == arm]
        ref = ArmStats.from_arrays(g.y.to_numpy(), g.x.to_numpy())
        got = st[arm]
        assert (got.n, got.my, got.mx) == pytest.approx((ref.n, ref.my, ref.mx), rel=1e-12)
        assert (got.cyy, got.cxx, got.cxy) == pytest.approx((ref.cyy, ref.cxx, ref.cxy), rel=1e-6)
        assert got.n_nonzero == ref.n_nonzero == 30
    assert np.isfinite(cuped(st["B"], st["A"])["estimate"])


def test_an_arm_with_few_outcome_events_is_warned_about(caplog):
    """One or two conversions per arm (a 0.1% rate on 1,000 units): the Welch interval covered 78.7% at 95%
    in simulation, silently. The analysis says which arm has how few units with an outcome."""
    import logging

    from causalrec.abtest import analyse

    rare_t, rare_c, common = np.zeros(1000), np.zeros(1000), (np.arange(1000) % 10 == 0).astype(float)
    rare_t[[3, 700]] = 1.0
    rare_c[5] = 1.0
    with caplog.at_level(logging.WARNING, logger="causalrec.abtest"):
        res = analyse({"B": ArmStats.from_arrays(rare_t), "A": ArmStats.from_arrays(rare_c)}, "B", "A")
        assert res["few_outcomes"] == {"B": 2, "A": 1}
        assert analyse({"B": ArmStats.from_arrays(common), "A": ArmStats.from_arrays(common)}, "B", "A")["few_outcomes"] == {}
    warned = [r.getMessage() for r in caplog.records if "nonzero outcome" in r.getMessage()]
    assert len(warned) == 1 and "arm 'B' has 2, arm 'A' has 1" in warned[0], warned


def test_arms_are_named_when_the_events_hold_more_than_two():
    """With three arms and none configured the stage compared the first and last in sort order and
    dropped the third without a word; one configured arm refused with "needs two arms" on two arms."""
    from causalrec.abtest import pick_arms

    assert pick_arms(["a", "b"], None, None) == ("b", "a")
    with pytest.raises(ValueError, match=r"found \['a', 'b', 'c'\]: set ope.abtest_treatment / ope.abtest_control"):
        pick_arms(["a", "b", "c"], None, None)
    assert pick_arms(["a", "z"], None, "z") == ("a", "z")  # z is the default treatment in sort order
    assert pick_arms(["a", "z"], "a", None) == ("a", "z")
    assert pick_arms(["a", "b", "c"], "c", "a") == ("c", "a")
    with pytest.raises(ValueError, match=r"'b' is set, and events.policy has 2 other arms \['a', 'c'\]: set ope.abtest_control"):
        pick_arms(["a", "b", "c"], "b", None)
    with pytest.raises(ValueError, match="both 'a'"):
        pick_arms(["a", "b"], "a", "a")
    with pytest.raises(ValueError, match=r"found \['a'\]$"):
        pick_arms(["a"], None, None)
    with pytest.raises(ValueError, match=r"name \['x'\], which events.policy does not have; its arms: \['a', 'b'\]"):
        pick_arms(["a", "b"], "x", None)


def test_srm_flags_a_broken_split_only():
    assert not srm_check(5050, 4950)["mismatch"]
    bad = srm_check(5300, 4700)
    assert bad["mismatch"] and bad["p_value"] < 1e-6


def test_abtest_stage_on_events(ctx, spark):
    _write_purchase_events(ctx, spark, label_pre=True)
    ctx.cfg.ope.abtest_start = "2024-01-10"
    from causalrec.abtest import run

    s = run(ctx)
    assert (s["treatment"], s["control"]) == ("b", "a") and s["n_treatment"] == s["n_control"] == 200
    assert not s["srm"]["mismatch"]
    assert s["variance_reduction"] > 0.5  # the pre-period outcome explains most of the variance
    res = ctx.store.read("abtest_results").toPandas().set_index("method")
    assert res.loc["cuped", "ci_low"] < 0.3 < res.loc["cuped", "ci_high"]
    assert res.loc["cuped", "std_err"] < res.loc["diff_in_means", "std_err"]


def test_printed_interval_uses_the_configured_level():
    from causalrec.abtest import summary_line

    t, c = ArmStats.from_arrays([1.0, 2, 3, 4]), ArmStats.from_arrays([0.0, 1, 1, 2, 1])
    r = dict(diff_in_means(t, c, alpha=0.1), method="diff_in_means", variance_reduction=0.0)
    line = summary_line(r, "b", "a", 0.1)
    assert "90% CI" in line and "95%" not in line
    assert f"± {1.6448536 * r['std_err']:.5f}" in line  # z_{0.95}, not 1.96


@pytest.mark.parametrize("start", [None, "2024-01-05"])
def test_cuped_covariate_is_every_pre_experiment_event_of_the_user(spark, start):
    """Before the experiment events carry no arm: the covariate must still be the user's mean over
    them (it was 0 for everyone), and with ``start`` None the start is the first arm-labelled event,
    not the median of labelled events (which measured x inside the treated window: x = u + 1)."""
    from causalrec.abtest import unit_outcomes

    t0 = dt.datetime(2024, 1, 1)
    rows = [(u, arm, "click", y, t0 + dt.timedelta(days=day + k))
            for u in range(1, 7) for arm, y, day in ((None, float(u), 0), ("A" if u % 2 else "B", u + 1.0, 10))
            for k in range(3)]
    ev = spark.createDataFrame(rows, "user_id int, policy string, event_type string, value double, event_time timestamp")
    units, contaminated = unit_outcomes(ev, "policy", start)
    got = sorted((r["user_id"], r["arm"], r["y"], r["x"]) for r in units.collect())
    assert contaminated == 0
    assert got == [(u, "A" if u % 2 else "B", u + 1.0, float(u)) for u in range(1, 7)]


def test_metric_event_counts_assigned_users_without_the_event_as_zero(spark):
    """With ``metric_event`` every user with an arm-labelled event in the window is a unit; one who
    never produced the metric event counts with y = 0 (it was dropped: 20 vs 40 units, diff 0)."""
    from causalrec.abtest import analyse, arm_stats, unit_outcomes

    t0 = dt.datetime(2024, 1, 10)
    rows = []
    for u in range(200):
        arm = "B" if u % 2 else "A"
        rows.append((f"u{u}", arm, "impression", None, t0))
        if (u // 2) % 10 < (4 if arm == "B" else 2):  # purchase rate 20% (A) vs 40% (B)
            rows.append((f"u{u}", arm, "purchase", 1.0, t0 + dt.timedelta(hours=1)))
    rows.append(("u0", None, "purchase", 5.0, t0 - dt.timedelta(days=3)))  # pre-period: metric events only
    rows.append(("u0", None, "impression", 7.0, t0 - dt.timedelta(days=2)))
    ev = spark.createDataFrame(rows, "user_id string, policy string, event_type string, value double, "
                                     "event_time timestamp")
    units, contaminated = unit_outcomes(ev, "policy", "2024-01-01T12:00:00", None, metric_event="purchase")
    st = arm_stats(units)
    assert contaminated == 0 and {a: int(s.n) for a, s in st.items()} == {"A": 100, "B": 100}
    res = analyse(st, "B", "A")
    assert res["diff_in_means"]["estimate"] == pytest.approx(0.40 - 0.20)
    assert st["A"].mean() == pytest.approx(0.2) and not res["srm"]["mismatch"]
    # the start is explicit and before u0's pre-period: those events are in the window, unlabelled, so
    # they count nowhere; with a later start the pre-period covariate is the metric events' mean
    units, _ = unit_outcomes(ev, "policy", "2024-01-09", None, metric_event="purchase")
    x = {r["user_id"]: r["x"] for r in units.where("user_id in ('u0', 'u1')").collect()}
    assert x == {"u0": 5.0, "u1": 0.0}


def _write_purchase_events(ctx, spark, label_pre: bool = False):
    """400 users, one purchase before (day 1) and one after (day 20) the start; arm b adds 0.3 after.
    ``label_pre``: the pre-period events carry the arm too."""
    from causalrec.schemas import EVENTS, conform

    rng = np.random.default_rng(3)
    rows = []
    for u in range(400):
        arm = "b" if u % 2 else "a"
        skill = rng.normal()
        for period, day in (("pre", 1), ("post", 20)):
            y = max(0.0, 1 + skill + (0.3 if (arm == "b" and period == "post") else 0) + rng.normal(scale=0.3))
            rows.append(dict(event_id=f"{u}{period}", user_id=f"u{u}", item_id="i", event_type="purchase",
                             value=y, policy=arm if (period == "post" or label_pre) else None,
                             event_time=pd.Timestamp(2024, 1, day, tz="UTC"), event_date=dt.date(2024, 1, day),
                             ingest_batch="t"))
    ctx.store.write(conform(spark.createDataFrame(pd.DataFrame(rows)), EVENTS), "events", spec=EVENTS)
    return pd.DataFrame(rows)


def test_covariate_from_user_features_must_be_computed_before_the_experiment(ctx, spark):
    """user_features are as of features.cutoff (default: after the last event), so a column of them can
    average the treated window and bias CUPED towards 0: the stage refuses a covariate whose as-of
    time is after the experiment start, and uses one computed at or before it."""
    from causalrec.abtest import run

    ev = _write_purchase_events(ctx, spark)
    ctx.cfg.ope.abtest_start = "2024-01-10"
    ctx.cfg.ope.abtest_covariate = "purchase_mean"

    def features(as_of: str, window: pd.DataFrame):
        uf = window.groupby("user_id", as_index=False)["value"].mean().rename(columns={"value": "purchase_mean"})
        uf["as_of"] = pd.Timestamp(as_of, tz="UTC")
        ctx.store.write(spark.createDataFrame(uf), "user_features", mode="overwrite", overwrite_schema=True)

    features("2024-01-20T00:00:01", ev)  # the default cutoff: after the last event, the window included
    with pytest.raises(ValueError) as err:
        run(ctx)
    msg = str(err.value)
    assert "ope.abtest_covariate" in msg and "2024-01-20 00:00:01" in msg and "2024-01-10 00:00:00" in msg
    assert "features.cutoff" in msg
    assert not ctx.store.exists("abtest_results")
    features("2024-01-10", ev[ev.event_time < pd.Timestamp("2024-01-10", tz="UTC")])  # as of the start
    s = run(ctx)
    res = ctx.store.read("abtest_results").toPandas().set_index("method")
    assert s["variance_reduction"] > 0.5 and res.loc["cuped", "ci_low"] < 0.3 < res.loc["cuped", "ci_high"]
