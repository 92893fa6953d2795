"""Uplift: IPS/DR effect scores, per-item effects, refutation checks."""
import numpy as np
import pandas as pd
import pytest

from causalrec.uplift import cell_outcome_model, mean_interval, refute, scores


def confounded(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 5, n)
    e = np.array([0.2, 0.35, 0.5, 0.65, 0.8])[item]  # popular items are recommended more...
    t = rng.binomial(1, e)
    base = np.array([0.05, 0.1, 0.15, 0.2, 0.25])[item]  # ...and bought more anyway
    tau = np.array([0.0, 0.02, 0.04, 0.06, 0.08])[item]
    y = rng.binomial(1, base + tau * t).astype(float)
    return y, t, e, item, float(tau.mean())


def test_ips_and_dr_recover_the_effect_that_the_naive_difference_overstates():
    y, t, e, item, ate = confounded(seed=2)
    naive = y[t == 1].mean() - y[t == 0].mean()
    m1, m0 = cell_outcome_model(y, t, item)
    ips = mean_interval(scores(y, t, e, method="ips"))
    dr = mean_interval(scores(y, t, e, m1, m0, "dr"))
    assert naive > ate + 0.04  # confounded by item popularity
    for r in (ips, dr):
        assert r["ci_low"] <= ate <= r["ci_high"]
    assert dr["se"] < ips["se"]


def test_dr_score_formula_on_one_row():
    assert scores([1.0], [1], [0.25], [0.6], [0.2], "dr")[0] == pytest.approx(0.6 - 0.2 + (1 - 0.6) / 0.25)
    assert scores([1.0], [0], [0.25], [0.6], [0.2], "dr")[0] == pytest.approx(0.4 - (1 - 0.2) / 0.75)
    with pytest.raises(ValueError, match="row 0"):
        scores([1.0], [1], [1.0], method="ips")


def test_refutations_pass_on_a_correct_design_and_catch_a_fake_effect():
    y, t, e, item, _ = confounded(8000, 1)
    r = refute(y, t, e, item, seed=2)
    # the placebo's 95% interval covers 0 about 19 times in 20 (a single seed may be the 20th)
    placebos = [refute(y, t, e, item, seed=s, n_subsets=0)["placebo"] for s in range(20)]
    assert sum(p["passed"] for p in placebos) >= 17 and all(abs(p["effect"]) < 3 * r["se"] for p in placebos)
    assert r["random_common_cause"]["passed"] and r["subsets"]["passed"]
    assert len(r["subsets"]["effects"]) == 5
    # an outcome that is a copy of the treatment: the placebo must NOT explain it away
    r2 = refute(t.astype(float), t, e, item, seed=2)
    assert r2["estimate"] > 0.9 and r2["placebo"]["effect"] < 0.2


def test_subset_check_without_a_rerun_is_not_a_pass():
    """all([]) passed the subset check on samples too small or unbalanced to split (and at n_subsets=0):
    now it is None (not checked), with the count of reruns that ran; the intervals follow alpha."""
    rng = np.random.default_rng(0)
    y, t = rng.random(20), np.r_[np.ones(2), np.zeros(18)]  # 2 treated: a half-sample rarely keeps both arms
    item = np.array(["a"] * 20)
    runs = [refute(y, t, np.full(20, 0.1), item, seed=s)["subsets"] for s in range(40)]
    empty = [r for r in runs if not r["effects"]]
    assert empty and all(r["passed"] is None and r["reruns"] == 0 and r["of"] == 5 for r in empty)
    assert all(r["passed"] is not None and r["reruns"] == len(r["effects"]) for r in runs if r["effects"])
    assert refute(y, t, np.full(20, 0.1), item, n_subsets=0)["subsets"]["passed"] is None
    y2, t2, e2, item2, _ = confounded(4000, 3)
    wide, narrow = (refute(y2, t2, e2, item2, seed=1, n_subsets=0, alpha=a)["placebo"] for a in (0.05, 0.10))
    assert (wide["ci_high"] - wide["ci_low"]) / (narrow["ci_high"] - narrow["ci_low"]) == pytest.approx(
        1.959964 / 1.644854, rel=1e-6)


def test_placebo_passes_when_the_propensity_varies_within_a_cell():
    """Confounding inside an item cell (users recommended more are the ones who buy more): the
    permuted treatment is random, so the placebo weights it by its share, not by the logged e."""
    rng = np.random.default_rng(7)
    n = 20000
    item = rng.integers(0, 3, n)
    skill = rng.normal(size=n)
    e = 1 / (1 + np.exp(-(1.5 * skill)))
    t = rng.binomial(1, e)
    y = rng.binomial(1, 1 / (1 + np.exp(-(-1.0 + 1.2 * skill + 0.3 * t)))).astype(float)
    placebos = [refute(y, t, e.clip(0.01, 0.99), item, seed=s, n_subsets=0)["placebo"] for s in range(10)]
    # weighted by the logged e instead, each lands near -0.9, its interval far from 0
    assert sum(p["passed"] for p in placebos) >= 8, placebos


def test_uplift_stage_writes_item_effects(ctx, spark):
    from causalrec.schemas import EVENTS, conform

    y, t, e, item, ate = confounded(3000, 4)
    pdf = pd.DataFrame(dict(event_id=[f"e{i}" for i in range(len(y))], user_id=[f"u{i % 50}" for i in range(len(y))],
                            item_id=[f"i{k}" for k in item], event_type="purchase", value=y, recommended=t.astype(bool),
                            event_time=pd.Timestamp("2024-01-01", tz="UTC"), ingest_batch="t"))
    pdf["event_date"] = pd.Timestamp("2024-01-01").date()
    ctx.store.write(conform(spark.createDataFrame(pdf), EVENTS), "events", spec=EVENTS)
    ctx.cfg.ope.uplift_refutation_sample = 1.0
    from causalrec.uplift import run

    s = run(ctx)
    assert s["propensity_source"] == "item_share_recommended" and s["rows_in"] == 3000
    assert s["ate_dr"]["ci_low"] <= ate + 0.01 and s["ate_dr"]["ci_high"] >= ate - 0.01
    eff = ctx.store.read("uplift_effects").toPandas()
    items = eff[(eff.level == "item") & (eff.method == "dr")].set_index("item_id")
    assert len(items) == 5 and (items.n >= 30).all()
    assert items.loc["i4", "effect"] > items.loc["i0", "effect"]
    assert eff[eff.level == "overall"].refutation.notna().all()
    assert s["refutation_rows"] == 3000
    assert eff.outcome_binary.all() and eff.outcome.isna().all()  # 0/1 outcomes: probability changes
    ctx.cfg.ope.uplift_refutation_max_rows = 500  # the refutations' rows are fitted on the driver: capped
    assert 400 < run(ctx)["refutation_rows"] < 600
    # a summed value (revenue 40 per purchase) is not a probability: recorded, so nobody quotes
    # an effect of +5.8 as "583 percentage points"
    pdf["value"] = 40.0 * y
    ctx.store.write(conform(spark.createDataFrame(pdf), EVENTS), "events", mode="overwrite", spec=EVENTS)
    s40 = run(ctx)
    assert s40["outcome_binary"] is False
    eff = ctx.store.read("uplift_effects").toPandas()
    assert (~eff.outcome_binary).all() and eff.outcome.isna().all()  # the decisions' own value
    assert s40["ate_dr"]["effect"] == pytest.approx(40 * s["ate_dr"]["effect"], rel=1e-6)


def test_dr_scores_need_the_outcome_models_and_one_arm_is_refused_locally():
    with pytest.raises(ValueError, match="m1 and m0"):
        scores([1.0, 0.0], [1, 0], [0.5, 0.5], method="dr")
    with pytest.raises(ValueError, match=r"0 control row\(s\) \(recommended = False\)"):
        cell_outcome_model([1.0, 0.0, 1.0], [1, 1, 1], ["a", "a", "b"])


def _scored(spark, y, t, e, item):
    from causalrec.uplift import add_scores

    pdf = pd.DataFrame(dict(item_id=[f"i{k}" for k in item], t=t.astype(float), y=y, e=e, segment="all"))
    return add_scores(spark.createDataFrame(pdf))


def test_spark_and_local_effects_agree_and_cells_need_both_arms(spark):
    """The Spark aggregation equals the local form (cell_outcome_model + scores + mean_interval) to
    1e-9; a cell is reported only with min_rows treated AND min_rows control rows, and a log without
    control rows yields no effect at all (the old form reported ~mean(y) with a tight interval)."""
    from causalrec.uplift import grouped_effects

    y, t, e, item, _ = confounded(4000, 5)
    t = np.where(item == 4, 1, t)  # item i4: recommended every time -> no control rows in its cell
    m1, m0 = cell_outcome_model(y, t, item)
    local = mean_interval(scores(y, t, e, m1, m0, "dr"))
    scored = _scored(spark, y, t, e, item)
    eff = grouped_effects(scored, [], 0.05).toPandas().set_index("method")
    for f in ("effect", "se", "ci_low", "ci_high", "n"):
        assert eff.loc["dr", f] == pytest.approx(local[f], rel=1e-9, abs=1e-12), f
    items = grouped_effects(scored, ["item_id"], 0.05, 30).toPandas()
    assert set(items.item_id) == {"i0", "i1", "i2", "i3"}
    # one arm only (every event recommended, as in OBD): no cell is reported, locally an error
    ones = np.ones_like(t)
    assert grouped_effects(_scored(spark, y, ones, np.full_like(e, 0.99), item), ["item_id"], 0.05, 2).count() == 0
    with pytest.raises(ValueError, match="control"):
        cell_outcome_model(y, ones, item)


def test_a_cell_with_exactly_min_rows_in_each_arm_is_reported(spark):
    """min_rows is inclusive on both arms: item x has exactly 2 treated and 2 control rows and is
    reported at min_rows=2 (n_treated > min_rows would drop it); item z, with 1 control row, is not.
    x's IPS scores are [2, 0, 0, -2] and its DR scores sum to 0 whatever m1, m0 (e = 0.5, the arms'
    outcomes mirror each other), so both methods give effect 0."""
    from causalrec.uplift import add_scores, grouped_effects

    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    t = np.array([1, 1, 0, 0, 1, 1, 0])
    item = np.array(["x"] * 4 + ["z"] * 3)
    pdf = pd.DataFrame(dict(item_id=item, t=t.astype(float), y=y, e=0.5, segment="all"))
    out = grouped_effects(add_scores(spark.createDataFrame(pdf)), ["item_id"], 0.05, 2).toPandas()
    assert sorted(out.method) == ["dr", "ips"] and set(out.item_id) == {"x"}
    for _, r in out.iterrows():
        assert (r["effect"], r["n"], r["n_treated"]) == (pytest.approx(0.0, abs=1e-12), 4, 2), r["method"]


def test_uplift_stage_names_the_missing_arm(ctx, spark):
    from causalrec.schemas import EVENTS, conform
    from causalrec.uplift import run

    pdf = pd.DataFrame(dict(event_id=[f"e{i}" for i in range(60)], user_id="u",
                            item_id=[f"i{i % 3}" for i in range(60)],
                            event_type="click", value=[float(i % 2) for i in range(60)], recommended=True,
                            event_time=pd.Timestamp("2024-01-01", tz="UTC"), ingest_batch="t"))
    pdf["event_date"] = pd.Timestamp("2024-01-01").date()
    ctx.store.write(conform(spark.createDataFrame(pdf), EVENTS), "events", spec=EVENTS)
    with pytest.raises(ValueError, match=r"0 control row\(s\) \(recommended = False\) of 60"):
        run(ctx)
    assert not ctx.store.exists("uplift_effects")


def test_one_row_per_decision_with_its_outcome_not_one_per_outcome_event(spark):
    """The simulator writes a decision's click and purchase as rows of their own, with its flag: counted
    as units they would put a clicked decision in the means two or three times."""
    import datetime as dt

    from causalrec.uplift import treatment_rows

    cols = "event_id string, user_id string, item_id string, event_type string, value double, recommended boolean, " \
           "session_id string, event_time timestamp"
    t0 = dt.datetime(2024, 1, 1, 12)
    at = {"imp": t0, "click": t0 + dt.timedelta(seconds=5), "buy": t0 + dt.timedelta(seconds=60)}  # as simulated
    events = spark.createDataFrame([r + (at[r[0].split(":")[1]],) for r in [
        ("a:imp", "u1", "i1", "impression", 1.0, True, "s1"), ("a:click", "u1", "i1", "click", 1.0, True, "s1"),
        ("a:buy", "u1", "i1", "purchase", 1.0, True, "s1"),
        ("b:imp", "u2", "i1", "impression", 0.0, False, "s2"),
        ("c:imp", "u3", "i1", "impression", 1.0, False, None), ("c:click", "u3", "i1", "click", 1.0, False, None),
        ("d:imp", "u1", "i1", "impression", 0.0, True, "s9"),  # the same pair in another session: no purchase
    ]], cols)
    rows = treatment_rows(events).toPandas().set_index("event_id").sort_index()
    assert list(rows.index) == ["a:imp", "b:imp", "c:imp", "d:imp"]
    assert list(rows["y"]) == [1.0, 0.0, 1.0, 0.0] and list(rows["t"]) == [1.0, 0.0, 0.0, 1.0]
    bought = treatment_rows(events, outcome_event="purchase").toPandas().set_index("event_id").sort_index()
    assert list(bought.index) == ["a:imp", "b:imp", "c:imp", "d:imp"] and list(bought["y"]) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="uplift_outcome_event='rating'"):
        treatment_rows(events, outcome_event="rating")


def test_outcome_event_attribution_by_time_ties_nulls_and_window(spark):
    """ope.uplift_outcome_event through the same rule as OPE's reward_event (causalrec.decisions): the old
    key-only join gave a:imp and b:imp of u1/i1/s1 every purchase of the session (7.0 each)."""
    import datetime as dt

    from causalrec.uplift import treatment_rows

    t0 = dt.datetime(2024, 1, 1, 12)

    def at(s):
        return None if s is None else t0 + dt.timedelta(seconds=s)

    cols = "event_id string, user_id string, item_id string, event_type string, value double, recommended boolean, " \
           "session_id string, event_time timestamp"
    rows = [("z:buy", "u1", "i1", "purchase", 4.0, True, "s1", -5),  # before every decision: nobody's
            ("a:imp", "u1", "i1", "impression", 0.0, True, "s1", 0),
            ("a:buy", "u1", "i1", "purchase", 1.0, True, "s1", 60),
            ("b:imp", "u1", "i1", "impression", 0.0, False, "s1", 300),
            ("b:buy", "u1", "i1", "purchase", 2.0, False, "s1", 301),
            # two decisions at the same instant: the outcome goes to one of them (the greater id), not to both
            ("e1:imp", "u2", "i1", "impression", 0.0, True, "s2", 0),
            ("e2:imp", "u2", "i1", "impression", 0.0, False, "s2", 0),
            ("e:buy", "u2", "i1", "purchase", 1.0, True, "s2", 0),  # at the decision's instant: credited
            # null times cannot be placed: a null-time decision gets 0, a null-time outcome goes to none
            ("n:imp", "u3", "i1", "impression", 0.0, True, "s3", None),
            ("n:buy", "u3", "i1", "purchase", 1.0, True, "s3", 9),
            ("m:imp", "u4", "i1", "impression", 0.0, True, "s4", 0),
            ("m:buy", "u4", "i1", "purchase", 1.0, True, "s4", None)]
    events = spark.createDataFrame([r[:-1] + (at(r[-1]),) for r in rows], cols)

    def y(window=None):
        got = treatment_rows(events, outcome_event="purchase", attribution_window_s=window).toPandas()
        assert got.event_id.is_unique
        return got.set_index("event_id")["y"].to_dict()

    assert y() == {"a:imp": 1.0, "b:imp": 2.0, "e1:imp": 0.0, "e2:imp": 1.0, "n:imp": 0.0, "m:imp": 0.0}
    assert y(10) == {"a:imp": 0.0, "b:imp": 2.0, "e1:imp": 0.0, "e2:imp": 1.0, "n:imp": 0.0, "m:imp": 0.0}
    with pytest.raises(ValueError, match="event_time"):  # no times: refused, not silently unattributed
        treatment_rows(events.drop("event_time"), outcome_event="purchase")
    assert treatment_rows(events.drop("event_time")).count() == 6  # the decision's own value needs no time


def test_outcome_event_in_another_session_counts_only_with_user_scope(spark):
    """ope.attribution_scope "user": a purchase the next day in a new session goes to the latest decision
    of the user and item before it, in any session; "session" (the default) credits it to none."""
    import datetime as dt

    from causalrec.uplift import treatment_rows

    t0 = dt.datetime(2024, 1, 1, 12)
    h = 3600
    cols = "event_id string, user_id string, item_id string, event_type string, value double, recommended boolean, " \
           "session_id string, event_time timestamp"
    rows = [("z:buy", "u1", "i1", "purchase", 8.0, None, "s0", -24 * h),  # before every decision: nobody's
            ("a:imp", "u1", "i1", "impression", 0.0, True, "s1", 0),
            ("a:buy", "u1", "i1", "purchase", 1.0, None, "s2", 20 * h),  # next day, new session
            ("b:imp", "u1", "i1", "impression", 0.0, False, "s3", 48 * h),
            ("b:buy", "u1", "i1", "purchase", 4.0, None, "s3", 48 * h + 10),  # b's own session
            ("c:buy", "u1", "i1", "purchase", 2.0, None, "s4", 49 * h),  # b, the later decision, takes it over a
            ("d:imp", "u2", "i1", "impression", 0.0, True, "s1", 0)]  # another user: none of u1's purchases
    events = spark.createDataFrame([r[:-1] + (t0 + dt.timedelta(seconds=r[-1]),) for r in rows], cols)

    def y(scope, window=None):
        got = treatment_rows(events, outcome_event="purchase", attribution_window_s=window,
                             attribution_scope=scope).toPandas()
        assert got.event_id.is_unique
        return got.set_index("event_id")["y"].to_dict()

    assert y("session") == {"a:imp": 0.0, "b:imp": 4.0, "d:imp": 0.0}
    assert y("user") == {"a:imp": 1.0, "b:imp": 6.0, "d:imp": 0.0}
    assert y("user", h) == {"a:imp": 0.0, "b:imp": 6.0, "d:imp": 0.0}  # inclusive: c:buy is 1 h after b
    assert y("user", 600) == {"a:imp": 0.0, "b:imp": 4.0, "d:imp": 0.0}
    with pytest.raises(ValueError, match="ope.attribution_scope='item'"):
        treatment_rows(events, outcome_event="purchase", attribution_scope="item")
