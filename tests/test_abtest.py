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


def test_srm_flags_a_broken_split_only():
    assert not srm_check(5050, 4950)["mismatch"]
    bad = srm_check(5300, 4700)
    assert bad["mismatch"] and bad["p_value"] < 1e-6


def test_abtest_stage_on_events(ctx, spark):
    from causalrec.schemas import EVENTS, conform

    rng = np.random.default_rng(3)
    rows = []
    for u in range(400):
        arm = "b" if u % 2 else "a"
        skill = rng.normal()
        for period, day in (("pre", 1), ("post", 20)):
            y = max(0.0, 1 + skill + (0.3 if (arm == "b" and period == "post") else 0) + rng.normal(scale=0.3))
            rows.append(dict(event_id=f"{u}{period}", user_id=f"u{u}", item_id="i", event_type="purchase",
                             value=y, policy=arm, event_time=pd.Timestamp(2024, 1, day, tz="UTC"),
                             event_date=dt.date(2024, 1, day), ingest_batch="t"))
    ctx.store.write(conform(spark.createDataFrame(pd.DataFrame(rows)), EVENTS), "events", spec=EVENTS)
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
