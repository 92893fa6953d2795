"""OPE stage on OBD-shaped and Coat-shaped events written through the store."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from causalrec.schemas import EVENTS, OPE_RESULTS


def _events(spark, rows):
    pdf = pd.DataFrame(rows)
    if "event_time" not in pdf:
        pdf["event_time"] = pd.Timestamp("2024-01-01", tz="UTC")
    pdf["event_date"] = dt.date(2024, 1, 1)
    pdf["ingest_batch"] = "t"
    from causalrec.schemas import conform

    return conform(spark.createDataFrame(pdf), EVENTS)


def obd_like(n=900, n_items=6, seed=0):
    rng = np.random.default_rng(seed)
    ctr = np.linspace(0.05, 0.4, n_items)
    item = rng.integers(0, n_items, n)
    pos = rng.integers(1, 4, n)
    click = rng.binomial(1, ctr[item] / pos)
    return [dict(event_id=f"e{i}", user_id=f"u{i}", item_id=f"i{item[i]}", event_type="impression",
                 value=float(click[i]), position=int(pos[i]), logged_propensity=1.0 / n_items, policy="random",
                 context=json.dumps({"campaign": "all"})) for i in range(n)], ctr


def test_ope_job_on_uniformly_logged_impressions(ctx, spark):
    rows, ctr = obd_like()
    ctx.store.write(_events(spark, rows), "events", spec=EVENTS)
    ctx.cfg.ope.strategies = ["random", "popular", "recommendations"]
    ctx.cfg.ope.bootstrap_replicates = 8
    from causalrec.estimators.ope import NO_INTERVAL
    from causalrec.ope.job import run

    summary = run(ctx)
    assert summary["mode"] == "logged_propensity" and summary["rows_in"] == 900
    assert summary["skipped"] == {"recommendations": "no recommendations table"}
    res = ctx.store.read("ope_results").toPandas()
    assert set(res.columns) == set(OPE_RESULTS.names)
    assert (res.logged_policy == "logged_propensity").all()  # the table says what pi_b was
    assert (res.alpha == ctx.cfg.ope.alpha).all()  # and the level of its intervals, for a later report
    dm = res[res.estimator == "dm"]  # no interval, analytic or bootstrap, and the rows say why
    assert len(dm) == 4 and (dm.interval_method == NO_INTERVAL).all() and dm.ci_low.isna().all()
    assert len(res) == 2 * 2 * 8  # 2 policies x 8 estimators x (analytic, bootstrap)
    a = res[res.interval_method == "analytic"].set_index(["policy", "estimator"])
    mean_click = np.mean([r["value"] for r in rows])
    # logging is uniform -> every weight of the random policy is 1: IPS = SNIPS = mean reward, ESS = n
    assert a.loc[("random", "ips"), "estimate"] == pytest.approx(mean_click)
    assert a.loc[("random", "snips"), "estimate"] == pytest.approx(mean_click)
    assert a.loc[("random", "ips"), "ess"] == pytest.approx(900)
    # the popular policy always shows the best item (per slot): its value is higher, and the paired
    # difference to the random baseline is positive with an interval
    assert a.loc[("popular", "ips"), "diff_to_baseline"] > 0
    # the paired DR difference and its interval, recomputed by hand from the per-row frame the job builds
    from causalrec.estimators.base import z_value
    from causalrec.ope.job import attach_policies, logged_rows, reward_model

    lr, _ = logged_rows(ctx.store.read("events"))
    iq = reward_model(lr)
    per_row = attach_policies(lr, iq, ["random", "popular"])[0].toPandas()
    phi = {p: per_row[f"q_hat_pi__{p}"] + per_row[f"pi_e__{p}"] / per_row.pscore * (per_row.reward - per_row.q_hat)
           for p in ("random", "popular")}
    d = (phi["popular"] - phi["random"]).to_numpy()
    half = z_value(ctx.cfg.ope.alpha) * d.std(ddof=1) / np.sqrt(len(d))
    dr = a.loc[("popular", "dr")]
    assert dr.diff_to_baseline == pytest.approx(d.mean(), abs=1e-9)
    assert (dr.diff_ci_low, dr.diff_ci_high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-9)
    assert dr.estimate - a.loc[("random", "dr"), "estimate"] == pytest.approx(d.mean(), abs=1e-9)
    assert a.loc[("popular", "ips"), "max_weight"] == pytest.approx(6.0)
    # rerun overwrites: no duplicates
    run(ctx)
    assert ctx.store.read("ope_results").count() == 32


def test_ope_job_on_ratings_uses_exposure_propensities(ctx, spark):
    rng = np.random.default_rng(1)
    rows, ep = [], []
    for u in range(30):
        for i in range(10):
            p = 0.2 + 0.06 * i
            ep.append(dict(user_id=f"u{u}", item_id=f"i{i}", exposure_propensity=p))
            if rng.uniform() < p:
                rows.append(dict(event_id=f"r{u}_{i}", user_id=f"u{u}", item_id=f"i{i}", event_type="rating",
                                 value=float(rng.integers(1, 6))))
    ctx.store.write(_events(spark, rows), "events", spec=EVENTS)
    ctx.store.write(spark.createDataFrame(pd.DataFrame(ep)), "exposure_propensity")
    recs = pd.DataFrame([dict(user_id=f"u{u}", item_id=f"i{k}", rank=k + 1) for u in range(30) for k in range(2)])
    ctx.store.write(spark.createDataFrame(recs), "recommendations")
    ctx.cfg.ope.strategies = ["random", "recommendations"]
    ctx.cfg.ope.estimators = ["ips", "snips", "dr"]
    ctx.cfg.ope.bootstrap_replicates = 0
    from causalrec.ope.job import run

    s = run(ctx)
    assert s["mode"] == "exposure" and s["policies"] == ["random", "recommendations"]
    res = ctx.store.read("ope_results").toPandas().set_index(["policy", "estimator"])
    assert len(res) == 6 and (res.interval_method == "analytic").all() and (res.logged_policy == "exposure").all()
    # pscore = p_ui / sum_j p_uj; a random policy's weight is (1/10) / pscore -> known max weight
    assert res.loc[("random", "ips"), "max_weight"] == pytest.approx((1 / 10) / (0.2 / sum(0.2 + 0.06 * i for i in range(10))))
    # the random policy's IPS and its interval, by hand: w = (1/10) / pscore, reward = rating >= 4
    from causalrec.estimators.base import z_value

    p_tot = sum(0.2 + 0.06 * i for i in range(10))
    wr = np.array([(0.1 / ((0.2 + 0.06 * int(r["item_id"][1:])) / p_tot)) * (r["value"] >= 4) for r in rows])
    half = z_value(ctx.cfg.ope.alpha) * wr.std(ddof=1) / np.sqrt(len(wr))
    ips = res.loc[("random", "ips")]
    assert ips.estimate == pytest.approx(wr.mean(), rel=1e-9)
    assert (ips.ci_low, ips.ci_high) == pytest.approx((wr.mean() - half, wr.mean() + half), rel=1e-9)
    for _, r in res.iterrows():  # every analytic interval is estimate -/+ z * std_err at the configured level
        assert (r.ci_low, r.ci_high) == pytest.approx((r.estimate - z_value(ctx.cfg.ope.alpha) * r.std_err,
                                                       r.estimate + z_value(ctx.cfg.ope.alpha) * r.std_err), abs=1e-12)


def _simulator_shaped(spark):
    """Two logged decisions as the simulator writes them: every event of a decision carries its
    propensity; u1's impression was clicked (value 1) and purchased, u2's was not."""
    ev = [("sim:0:1:1:impression", "u1", "impression", 1.0), ("sim:0:1:1:click", "u1", "click", 1.0),
          ("sim:0:1:1:purchase", "u1", "purchase", 1.0), ("sim:0:2:1:impression", "u2", "impression", 0.0)]
    return _events(spark, [dict(event_id=e, user_id=u, item_id="i1", event_type=t, value=v, position=1,
                                logged_propensity=0.5, policy="logging", session_id=f"s{u}") for e, u, t, v in ev])


def test_logged_rows_are_one_per_decision_with_its_reward(spark):
    """Click and purchase events are outcomes of the impression, not more logged rows: counting
    them gave 4 rows with mean reward 0.75 for a click rate of 0.5 (selection on the outcome)."""
    from causalrec.ope.job import logged_rows

    events = _simulator_shaped(spark)
    rows, mode = logged_rows(events)
    assert mode == "logged_propensity"
    assert sorted((r["user_id"], r["reward"]) for r in rows.collect()) == [("u1", 1.0), ("u2", 0.0)]
    rows, _ = logged_rows(events, reward_event="purchase")  # ope.reward_event: the decision's purchases
    assert sorted((r["user_id"], r["reward"], r["pscore"]) for r in rows.collect()) == [("u1", 1.0, 0.5),
                                                                                      ("u2", 0.0, 0.5)]
    with pytest.raises(ValueError, match="reward_event='add_to_cart'"):
        logged_rows(events, reward_event="add_to_cart")


def test_a_purchase_without_a_position_goes_to_the_sessions_impression_of_its_item(spark):
    """Real logs seldom give a purchase a slot: read as slot 0, it matched no impression shown in slot 2
    and every reward_event outcome of such a log was 0. An explicit position still has to match."""
    from causalrec.ope.job import logged_rows

    t0 = pd.Timestamp("2024-01-01 10:00", tz="UTC")
    ev = [("imp1", "u1", "impression", 0.0, 2, t0), ("imp2", "u1", "impression", 0.0, 1, t0 + pd.Timedelta("1s")),
          ("buy1", "u1", "purchase", 1.0, None, t0 + pd.Timedelta("60s")),
          ("imp3", "u2", "impression", 0.0, 3, t0), ("buy3", "u2", "purchase", 1.0, 1, t0 + pd.Timedelta("60s"))]
    events = _events(spark, [dict(event_id=e, user_id=u, item_id="i1", event_type=t, value=v, position=pos,
                                  logged_propensity=0.5, policy="logging", session_id=u, event_time=ts)
                             for e, u, t, v, pos, ts in ev])
    rows, _ = logged_rows(events, reward_event="purchase")
    got = sorted((r["user_id"], r["slot"], r["reward"]) for r in rows.collect())
    # u1: the latest impression of i1 before the purchase (slot 1) takes it; u2's purchase names slot 1: none
    assert got == [("u1", 1, 1.0), ("u1", 2, 0.0), ("u2", 3, 0.0)]


def test_decisions_without_a_logged_propensity_are_counted_in_a_warning(spark, caplog):
    """They cannot be weighted and are left out; that must not pass silently."""
    from causalrec.ope.job import logged_rows

    ev = [("sim:0:1:1:impression", "u1", 0.5), ("sim:0:2:1:impression", "u2", None),
          ("sim:0:3:1:impression", "u3", None)]
    events = _events(spark, [dict(event_id=e, user_id=u, item_id="i1", event_type="impression", value=1.0,
                                  position=1, logged_propensity=p, policy="logging", session_id=u)
                             for e, u, p in ev])
    with caplog.at_level("WARNING", logger="causalrec.ope.job"):
        rows, mode = logged_rows(events)
    assert mode == "logged_propensity" and rows.count() == 1
    assert "2 'impression' events have no logged_propensity and are left out" in caplog.text


def _treatment_logged(spark):
    """A simulator-shaped log: one impression per observed pair, its logged_propensity the recommend-or-not
    coin (pi if recommended, with a position; 1 - pi if not, no position), u1/i1 clicked and purchased
    (same session and slot), u2/i1 clicked; and the exposure table of those pairs."""
    ev = [("u1", "i1", "impression", 1.0, 2, 0.8), ("u1", "i1", "click", 1.0, 2, 0.8),
          ("u1", "i1", "purchase", 1.0, 2, 0.8), ("u1", "i2", "impression", 0.0, None, 0.7),
          ("u2", "i1", "impression", 1.0, None, 0.4), ("u2", "i3", "impression", 0.0, 1, 0.9)]
    events = _events(spark, [dict(event_id=f"sim:0:{u}:{i}:{t}", user_id=u, item_id=i, event_type=t, value=v,
                                  position=pos, recommended=pos is not None, logged_propensity=lp, policy="softmax",
                                  session_id=f"s{u}") for u, i, t, v, pos, lp in ev])
    # sum_j p_uj: u1 0.4, u2 0.8
    ep = spark.createDataFrame([("u1", "i1", 0.1), ("u1", "i2", 0.3), ("u2", "i1", 0.6), ("u2", "i3", 0.2)],
                               "user_id string, item_id string, exposure_propensity double")
    return events, ep


def test_treatment_propensities_leave_pi_b_to_the_exposure_table(spark):
    """ope.logged_propensity: treatment - the events' propensity is a recommend-or-not coin, not
    pi_b(item): OPE used it as pscore (0.8 / 0.7 / 0.4 / 0.9 here), dividing a pi_e over items by it.
    pi_b(i | u) = p_ui / sum_j p_uj from exposure_propensity; one row per impression, slot 0."""
    from causalrec.ope.job import logged_rows

    events, ep = _treatment_logged(spark)

    def got(rows):
        return sorted((r["user_id"], r["item_id"], r["slot"], r["reward"], round(r["pscore"], 12))
                      for r in rows.collect())

    rows, mode = logged_rows(events, ep, logged_propensity="treatment")
    assert mode == "exposure_on_impressions"
    assert got(rows) == [("u1", "i1", 0, 1.0, 0.25), ("u1", "i2", 0, 0.0, 0.75),
                         ("u2", "i1", 0, 1.0, 0.75), ("u2", "i3", 0, 0.0, 0.25)]
    # ope.reward_event: attributed on the logged slot and session (u1/i1's purchase is in slot 2)
    rows, _ = logged_rows(events, ep, reward_event="purchase", logged_propensity="treatment")
    assert [r[3] for r in got(rows)] == [1.0, 0.0, 0.0, 0.0]
    # no exposure table: the fallback is the item's share of the impressions (i1 2 of 4)
    rows, mode = logged_rows(events, logged_propensity="treatment")
    assert mode == "exposure_item_popularity_on_impressions"
    assert [(r[1], r[4]) for r in got(rows)] == [("i1", 0.5), ("i2", 0.25), ("i1", 0.5), ("i3", 0.25)]
    with pytest.raises(ValueError, match="no propensity for user 'u2' item 'i3'; the table must cover every "
                                         "logged pair"):
        logged_rows(events, ep.where("item_id != 'i3'"), logged_propensity="treatment")
    # the default ("action", OBD) keeps reading the events' propensity as pi_b of the shown item at its slot
    rows, mode = logged_rows(events, ep)
    assert mode == "logged_propensity"
    assert got(rows) == [("u1", "i1", 2, 1.0, 0.8), ("u1", "i2", 0, 0.0, 0.7),
                         ("u2", "i1", 0, 1.0, 0.4), ("u2", "i3", 1, 0.0, 0.9)]
    with pytest.raises(ValueError, match=r"ope.logged_propensity='item': expected one of 'action', 'treatment'"):
        logged_rows(events, ep, logged_propensity="item")


def test_ope_job_under_treatment_propensities_names_its_mode(ctx, spark, capsys):
    events, ep = _treatment_logged(spark)
    ctx.store.write(events, "events", spec=EVENTS)
    ctx.store.write(ep, "exposure_propensity")
    ctx.cfg.ope.logged_propensity = "treatment"
    ctx.cfg.ope.strategies = ["random"]
    ctx.cfg.ope.estimators = ["ips"]
    ctx.cfg.ope.bootstrap_replicates = 0
    from causalrec.ope.job import run

    s = run(ctx)
    assert s["mode"] == "exposure_on_impressions" and s["logged_propensity"] == "treatment" and s["rows_in"] == 4
    assert "logged policy: exposure_on_impressions (ope.logged_propensity: treatment)" in capsys.readouterr().out
    # random = 1/3 over {i1, i2, i3}; IPS = mean((1/3) / pscore * click) = (4/3 + 4/9) / 4
    ips = ctx.store.read("ope_results").toPandas().set_index(["policy", "estimator"]).loc[("random", "ips")]
    assert ips.estimate == pytest.approx(4 / 9, rel=1e-12)


def test_logged_propensity_kind_is_checked_at_load(tmp_path):
    import typing

    from causalrec.config import ConfigError, OPEConfig, load_config
    from causalrec.ope.job import LOGGED_PROPENSITY_KINDS

    f = tmp_path / "c.yaml"
    f.write_text("ope:\n  logged_propensity: propensity\n")
    with pytest.raises(ConfigError, match=r"ope.logged_propensity: got 'propensity', expected one of 'action', "
                                          r"'treatment'"):
        load_config(f)
    assert load_config().ope.logged_propensity == "action"  # default: OBD's item propensities
    conf = Path(__file__).resolve().parents[1] / "conf"
    assert load_config(conf / "simulated.yaml").ope.logged_propensity == "treatment"
    assert typing.get_args(typing.get_type_hints(OPEConfig)["logged_propensity"]) == LOGGED_PROPENSITY_KINDS


def test_reward_event_goes_to_the_latest_decision_at_or_before_it_within_the_window(spark):
    """ope.reward_event attribution: the old key-only join credited all four purchases (15.0) to both
    impressions of u1/i1/s1 in slot 1 - the purchase before both, and each one's purchases to the other."""
    from causalrec.ope.job import logged_rows

    t0 = pd.Timestamp("2024-01-01 12:00", tz="UTC")
    ev = [("p0", "purchase", -10, 8.0, 1),  # before any decision: credited to none
          ("A", "impression", 0, 0.0, 1), ("p1", "purchase", 60, 1.0, 1),
          ("B", "impression", 100, 1.0, 1), ("C", "impression", 105, 0.0, 2),  # C: slot 2, no purchase in it
          ("p2", "purchase", 110, 2.0, 1), ("p3", "purchase", 200, 4.0, 1)]
    events = _events(spark, [dict(event_id=e, user_id="u1", item_id="i1", event_type=t, value=v, position=pos,
                                  event_time=t0 + pd.Timedelta(seconds=s), logged_propensity=0.5, policy="logging",
                                  session_id="s1") for e, t, s, v, pos in ev])

    row_ids = {r["h"]: r["event_id"] for r in events.selectExpr("event_id", "xxhash64(event_id) AS h").collect()}

    def rewards(window=None):  # impression -> reward, one row per impression
        rows, _ = logged_rows(events, reward_event="purchase", attribution_window_s=window)
        got = [(row_ids[r["row_id"]], r["reward"]) for r in rows.collect()]
        assert len(got) == 3
        return dict(got)

    assert rewards() == {"A": 1.0, "B": 6.0, "C": 0.0}
    assert rewards(60) == {"A": 1.0, "B": 2.0, "C": 0.0}  # the window is inclusive: p1 is 60 s after A
    assert rewards(30) == {"A": 0.0, "B": 2.0, "C": 0.0}  # p1 (60 s) and p3 (100 s after B) are too late
    # the impression's own value (no reward_event) is untouched by the rule
    rows, _ = logged_rows(events, attribution_window_s=30)
    assert sorted(r["reward"] for r in rows.collect()) == [0.0, 0.0, 1.0]


def test_reward_event_across_sessions_follows_attribution_scope(spark):
    """ope.attribution_scope: "session" (the default) credits a purchase in another session to no
    impression; "user" credits it to the latest impression of the user and item in any session and
    slot (a purchase carries no position: slot 0), within ope.attribution_window_s when set."""
    from causalrec.ope.job import logged_rows

    day0 = pd.Timestamp("2024-01-01 12:00", tz="UTC")
    h = 3600
    ev = [("p0", "u1", "i1", "purchase", -24 * h, 8.0, None, "s0"),  # before any decision: credited to none
          ("A", "u1", "i1", "impression", 0, 0.0, 2, "s1"),
          ("D", "u1", "i2", "impression", 0, 0.0, 1, "s1"),  # another item: no purchase of i1 is its
          ("pA", "u1", "i1", "purchase", 22 * h, 1.0, None, "s2"),  # next day, new session, no position
          ("B", "u1", "i1", "impression", 48 * h, 0.0, 1, "s3"),
          ("pB", "u1", "i1", "purchase", 48 * h + 60, 2.0, 1, "s3"),  # B's own session and slot
          ("pX", "u1", "i1", "purchase", 49 * h, 4.0, None, "s9"),  # later B (s3) takes it over A (s1)
          ("C", "u1", "i1", "impression", 72 * h, 0.0, 3, "s4"),
          ("pC", "u1", "i1", "purchase", 95 * h, 16.0, None, "s5")]
    events = _events(spark, [dict(event_id=e, user_id=u, item_id=i, event_type=t, value=v, position=pos,
                                  event_time=day0 + pd.Timedelta(seconds=s), logged_propensity=0.5,
                                  policy="logging", session_id=sess) for e, u, i, t, s, v, pos, sess in ev])
    row_ids = {r["h"]: r["event_id"] for r in events.selectExpr("event_id", "xxhash64(event_id) AS h").collect()}

    def rewards(scope, window=None):
        rows, _ = logged_rows(events, reward_event="purchase", attribution_window_s=window, attribution_scope=scope)
        got = {row_ids[r["row_id"]]: (r["reward"], r["slot"]) for r in rows.collect()}
        assert len(got) == 4
        assert {k: s for k, (_, s) in got.items()} == {"A": 2, "B": 1, "C": 3, "D": 1}  # decisions keep their slot
        return {k: r for k, (r, _) in got.items()}

    assert rewards("session") == {"A": 0.0, "B": 2.0, "C": 0.0, "D": 0.0}
    assert rewards("user") == {"A": 1.0, "B": 6.0, "C": 16.0, "D": 0.0}  # no window: the latest before it, any age
    assert rewards("user", 12 * h) == {"A": 0.0, "B": 6.0, "C": 0.0, "D": 0.0}  # pA 22 h, pC 23 h after: too late
    assert rewards("user", 23 * h) == {"A": 1.0, "B": 6.0, "C": 16.0, "D": 0.0}  # inclusive
    with pytest.raises(ValueError, match=r"ope.attribution_scope='global': expected one of 'session', 'user'"):
        logged_rows(events, reward_event="purchase", attribution_scope="global")


def test_bootstrap_rows_say_how_many_replicates_were_dropped(spark):
    from causalrec.estimators.base import EstimateResult
    from causalrec.ope.job import results_frame

    r = EstimateResult(policy="p", estimator="snips", estimate=0.5, std_err=0.1, ci_low=0.3, ci_high=0.7,
                       interval_method="analytic", n=10, boot_std_err=0.1, boot_ci_low=0.3, boot_ci_high=0.7,
                       boot_dropped=13)
    ok = EstimateResult(**dict(r.as_dict(), estimator="ips", boot_dropped=0))
    got = results_frame(spark, [r, ok], "run", 200, 64).toPandas()
    assert got.interval_method.tolist() == ["analytic", "bootstrap_poisson_B200_G64_dropped13",
                                            "analytic", "bootstrap_poisson_B200_G64"]


def _policy_world(spark):
    """Two strata whose action sets share the id "A" (as OBD's per-campaign item ids do): s1 = {A: 1,
    B: 0}, s2 = {A: 0, C: 1}; uniform logging (pscore 1/2), every user logged every item of each set,
    deterministic reward = the exact reward model."""
    q = {("s1", "A"): 1.0, ("s1", "B"): 0.0, ("s2", "A"): 0.0, ("s2", "C"): 1.0}
    item_q = spark.createDataFrame([(s, 0, i, v) for (s, i), v in q.items()],
                                   "stratum string, slot int, item_id string, q_hat_item double")
    rows = spark.createDataFrame(
        [(k * 10 + j, f"u{k}", i, s, 0, v, 0.5, v) for k in range(5) for j, ((s, i), v) in enumerate(q.items())],
        "row_id long, user_id string, item_id string, stratum string, slot int, reward double, pscore double, "
        "q_hat double")
    return rows, item_q


@pytest.mark.parametrize("kind", ["recommendations", "score"])
def test_topk_and_score_policies_give_ips_and_the_reward_model_the_same_distribution(spark, kind):
    """base.py's contract q_hat_pi = sum_a pi_e(a|x) q_hat(x, a) over the row's action set: with an
    exact reward model and deterministic rewards DM == DR == IPS, and pi_e sums to 1 per action set.
    Lists/scores name items outside a set (Z, Y; C in s1, B in s2) and some users have none."""
    from causalrec.estimators import DM, DR, IPS, evaluate
    from causalrec.ope import policies as P

    rows, item_q = _policy_world(spark)
    if kind == "recommendations":
        # u0 [A, Z]; u1 [C, B]; u2 [Z, Y] (nothing showable: uniform); u3 [A, B, C]; u4 no list (uniform)
        lists = {"u0": "AZ", "u1": "CB", "u2": "ZY", "u3": "ABC"}
        topk = spark.createDataFrame([(u, i) for u, its in lists.items() for i in its],
                                     "user_id string, item_id string")
        df = P.add_topk_policy(rows, topk, item_q, "pol")
        # s1 / s2 values: u0 A->1 / A->0, u1 B->0 / C->1, u2 .5 / .5, u3 (A+B)/2 / (A+C)/2, u4 .5 / .5
        expected_dm = (1 + 0 + 0 + 1 + .5 + .5 + .5 + .5 + .5 + .5) / 10
    else:
        # u0 best Z (outside both sets) then A: A in both; u1 only Z: uniform; u2 no scores: uniform;
        # u3 C > B > A: B in s1, C in s2; u4 a null score for A and B: uniform in s1, C in s2
        sc = [("u0", "Z", 0.9), ("u0", "A", 0.5), ("u1", "Z", 0.3), ("u3", "C", 0.9), ("u3", "B", 0.8),
              ("u3", "A", 0.1), ("u4", "A", None), ("u4", "B", None), ("u4", "C", 0.2)]
        df = P.add_score_policy(rows, spark.createDataFrame(sc, "user_id string, item_id string, rel double"), "rel",
                                item_q, "pol")
        expected_dm = (1 + 0 + .5 + .5 + .5 + .5 + 0 + 1 + .5 + 1) / 10
    pdf = df.toPandas()
    assert len(pdf) == 20
    np.testing.assert_allclose(pdf.groupby(["user_id", "stratum"])["pi_e__pol"].sum(), 1.0)
    # q_hat_pi is the pi_e-weighted reward model of the same (user, action set)
    pdf["pq"] = pdf["pi_e__pol"] * pdf["q_hat"]
    g = pdf.groupby(["user_id", "stratum"]).agg(pq=("pq", "sum"), lo=("q_hat_pi__pol", "min"),
                                                hi=("q_hat_pi__pol", "max"))
    np.testing.assert_allclose(g.lo, g.pq, atol=1e-12)
    np.testing.assert_allclose(g.hi, g.pq, atol=1e-12)
    res = {r.estimator: r.estimate for r in evaluate(df, [IPS(), DM(), DR()], {"pol": ("pi_e__pol", "q_hat_pi__pol")},
                                                     engine="sql")}
    assert res["dm"] == pytest.approx(expected_dm, abs=1e-12)
    assert res["dr"] == pytest.approx(expected_dm, abs=1e-12)
    assert res["ips"] == pytest.approx(expected_dm, abs=1e-12)


def test_results_table_labels_the_configured_interval_level():
    from causalrec.estimators import IPS
    from causalrec.ope.job import format_table

    res = IPS().estimate_interval(np.array([1.0, 0.0, 1.0]), np.full(3, 0.5), np.full(3, 0.5), alpha=0.1)
    assert "90% CI" in format_table([res], None, alpha=0.1) and "95%" not in format_table([res], None, alpha=0.1)
    assert "95% CI" in format_table([res], None)


def test_exposure_pscore_sums_over_every_item_with_the_sampled_pairs_weights(spark):
    """The exposure_propensity table holds a user's observed pairs and a *sample* of the unobserved
    ones, each with weight = unobserved items / sampled ones. pi_b(i | u) = p_ui / sum_j p_uj sums over
    every item: the plain sum over the table's rows covered only the sampled items and made every
    pscore about 3 times too large on Coat (importance weights 3 times too small)."""
    from causalrec.ope.job import logged_rows

    # 10 items; u0 rated i0-i2 (p 0.5, 0.6, 0.7); the other 7 items all have p 0.1, 2 of them sampled
    ep = [dict(user_id="u0", item_id=f"i{i}", exposure_propensity=0.5 + 0.1 * i, weight=1.0) for i in range(3)]
    ep += [dict(user_id="u0", item_id=f"i{i}", exposure_propensity=0.1, weight=7 / 2) for i in (5, 8)]
    rows = [dict(event_id=f"r{i}", user_id="u0", item_id=f"i{i}", event_type="rating", value=5.0) for i in range(3)]
    out, mode = logged_rows(_events(spark, rows), spark.createDataFrame(pd.DataFrame(ep)))
    got = dict(out.select("item_id", "pscore").collect())
    total = 0.5 + 0.6 + 0.7 + 7 * 0.1  # every item's p: the weighted sample is exact for equal p
    assert mode == "exposure"
    assert got == pytest.approx({f"i{i}": (0.5 + 0.1 * i) / total for i in range(3)}, rel=1e-12)
