"""The simulator: deterministic, and its recorded propensities and potential outcomes explain its events."""
from __future__ import annotations

import numpy as np
import pytest


def _cfg(**kw):
    from causalrec.config import SimulatorConfig

    base = dict(n_users=300, n_items=60, n_events=6000, n_latent=4, partitions=2, mcar_share=0.2,
                mcar_items_per_user=10)
    base.update(kw)
    return SimulatorConfig(**base)


@pytest.fixture(scope="module")
def world(spark):
    """One small world, materialised to pandas once (test-sized, so collecting it is fine)."""
    from causalrec.simulator import _world

    w = _world(spark, _cfg(), seed=11)
    return w, {k: v.toPandas() for k, v in w.tables.items()}


def test_deterministic_for_a_seed(spark, world):
    from causalrec.simulator import simulate

    _, t = world
    again = simulate(spark, _cfg(), seed=11)["events"].toPandas()
    a = t["events"].sort_values("event_id").reset_index(drop=True)
    b = again.sort_values("event_id").reset_index(drop=True)
    assert len(a) > 4000
    assert a.equals(b)
    other = simulate(spark, _cfg(), seed=12)["events"].select("event_id").toPandas()
    assert set(other["event_id"]) != set(a["event_id"])


def test_configured_ate_is_the_ground_truth_mean_effect(world):
    _, t = world
    gt = t["ground_truth"]
    assert abs((gt["p_y1"] - gt["p_y0"]).mean() - 0.03) < 1e-9
    assert gt["p_y0"].between(0, 1).all() and gt["p_y1"].between(0, 1).all()
    # heterogeneous: some pairs are hurt by a recommendation, some gain much more than the ATE
    eff = gt["p_y1"] - gt["p_y0"]
    assert (eff < 0).mean() > 0.02 and (eff > 0.1).mean() > 0.02
    assert ((gt["y1"] - gt["y0"]) >= -1).all() and set(gt["y0"].unique()) <= {0.0, 1.0}


def test_exposure_rate_per_popularity_bucket_matches_recorded_propensity(world):
    _, t = world
    gt = t["ground_truth"].copy()
    imp = t["events"][t["events"]["event_type"] == "impression"]
    seen = set(zip(imp["user_id"], imp["item_id"]))
    gt["observed"] = [(u, i) in seen for u, i in zip(gt["user_id"], gt["item_id"])]
    gt["item_idx"] = gt["item_id"].str[1:].astype(int)
    gt["bucket"] = np.digitize(gt["item_idx"], [5, 20])  # head / torso / tail by Zipf rank
    rates = []
    for b, g in gt.groupby("bucket"):
        e = g["exposure_propensity"]
        se = np.sqrt((e * (1 - e)).sum()) / len(g)
        assert abs(g["observed"].mean() - e.mean()) < 4 * se + 1e-9, (b, g["observed"].mean(), e.mean())
        rates.append(e.mean())
    assert rates[0] > rates[1] > rates[2]  # popularity bias is there
    # every pair with an impression is a ground-truth pair
    assert len(seen) == int(gt["observed"].sum())


def test_treatment_and_outcomes_are_consistent_with_ground_truth(world):
    _, t = world
    gt = t["ground_truth"].set_index(["user_id", "item_id"])
    ev = t["events"]
    imp = ev[ev["event_type"] == "impression"].set_index(["user_id", "item_id"])
    j = imp.join(gt, how="left")
    assert j["treatment_propensity"].notna().all()
    pi = j["treatment_propensity"]
    rec = j["recommended"].astype(bool)
    np.testing.assert_allclose(j["logged_propensity"], np.where(rec, pi, 1 - pi))
    assert j.loc[rec, "position"].between(1, 5).all() and j.loc[~rec, "position"].isna().all()
    # recommendation rate matches the policy's propensities (within sampling error)
    se = np.sqrt((pi * (1 - pi)).sum()) / len(pi)
    assert abs(rec.mean() - pi.mean()) < 4 * se
    # the observed purchase is the potential outcome of the logged treatment, pair by pair
    bought = set(zip(ev.loc[ev["event_type"] == "purchase", "user_id"], ev.loc[ev["event_type"] == "purchase", "item_id"]))
    y = np.where(rec, j["y1"], j["y0"])
    got = np.array([k in bought for k in j.index])
    assert (got == (y == 1)).all()
    # clicks always accompany purchases; impression value = click
    clicked = set(zip(ev.loc[ev["event_type"] == "click", "user_id"], ev.loc[ev["event_type"] == "click", "item_id"]))
    assert bought <= clicked
    assert (j["value"].to_numpy() == np.array([k in clicked for k in j.index], dtype=float)).all()


def test_uplift_ranking_differs_from_purchase_ranking(world):
    from scipy.stats import spearmanr

    _, t = world
    gt = t["ground_truth"].assign(effect=lambda d: d["p_y1"] - d["p_y0"])
    per_item = gt.groupby("item_id")[["effect", "p_y1"]].mean()
    rho = spearmanr(per_item["effect"], per_item["p_y1"]).statistic
    top_buy = set(per_item["p_y1"].nlargest(10).index)
    top_uplift = set(per_item["effect"].nlargest(10).index)
    assert rho < 0.8
    assert len(top_buy & top_uplift) < 8


def test_mcar_slice_is_randomised(world):
    _, t = world
    m = t["mcar_events"]
    imp = m[m["event_type"] == "impression"]
    assert len(imp) > 300 and (imp["policy"] == "uniform_random").all()
    # the random design's exposure probability (what the training set weighs MCAR rows by), not the 0.5 coin
    assert np.allclose(m["logged_propensity"], 10 / 60)
    assert abs(imp["recommended"].mean() - 0.5) < 4 * np.sqrt(0.25 / len(imp))
    per_user = imp.groupby("user_id")["item_id"].nunique()
    assert (per_user == 10).all()  # distinct items per MCAR user
    assert 0.1 < per_user.size / 300 < 0.3  # about mcar_share of users


@pytest.mark.parametrize("key, value", [("ate", 0.5), ("effect_heterogeneity", 2.0), ("recommend_rate", 0.0)])
def test_bad_knobs_fail_clearly(spark, key, value):
    from causalrec.simulator import simulate

    with pytest.raises(ValueError, match=f"simulator.{key}"):
        simulate(spark, _cfg(**{key: value}), seed=1)


def test_simulate_stage_writes_tables_and_is_idempotent(ctx):
    from causalrec import simulator

    ctx.cfg.simulator = _cfg(n_events=1500, n_users=100, n_items=30)
    first = simulator.run(ctx)
    n = ctx.store.row_count("events")
    assert n == first["tables"]["events"]["rows_accepted"] > 1000
    assert first["tables"]["events"]["rows_quarantined"] == 0
    assert ctx.store.row_count("ground_truth") == first["tables"]["ground_truth"]["rows"]
    again = simulator.run(ctx)
    assert again["tables"]["events"]["rows_already_present"] == n
    assert ctx.store.row_count("events") == n


@pytest.mark.parametrize("start, expected", [
    ("2024-01-01", "2024-01-01T00:00:00+00:00"),  # naive: UTC
    ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00+00:00"),
    ("2024-01-01T00:00:00+05:00", "2023-12-31T19:00:00+00:00"),  # the offset is honoured, not dropped
])
def test_start_date_offset_is_converted_to_utc(start, expected):
    import datetime as dt

    from causalrec.simulator import start_seconds

    assert start_seconds(start) == int(dt.datetime.fromisoformat(expected).timestamp())


def test_events_start_at_the_offset_start_date_in_utc(spark):
    """start_date 00:00+05:00 is 19:00 UTC the day before: the same event times as that naive (UTC) start."""
    from causalrec.simulator import _events_from

    x = spark.createDataFrame([(u, i, f"u{u}", f"i{i}", 0.5, 1.0, 0.0) for u in range(3) for i in range(3)],
                              "user_idx long, item_idx long, user_id string, item_id string, pi double, "
                              "y1 double, y0 double")

    def times(start):
        ev = _events_from(x, _cfg(start_date=start, n_days=1), 5, slice_name="logged", policy="p")
        return sorted((r.event_id, r.event_time) for r in ev.select("event_id", "event_time").collect())

    assert times("2024-01-01T00:00:00+05:00") == times("2023-12-31T19:00:00")


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 20.0, 100.0])
def test_softmax_offset_reaches_the_recommend_rate_at_any_temperature(rate, temperature):
    """The bisection was fixed to [-20, 20]: at T = 20 a 0.1 rate came out 0.27 with no error."""
    import numpy as np
    from scipy.special import expit

    from causalrec.simulator import softmax_offset

    c = softmax_offset(rate, temperature)
    x, w = np.polynomial.hermite_e.hermegauss(80)
    assert float((w / w.sum() * expit((x - c) / temperature)).sum()) == pytest.approx(rate, abs=1e-6)


def test_effect_scale_does_not_depend_on_how_rows_fall_into_partitions(spark):
    """mean(g) sets c = ate / mean(g) and with it every p_y1: a float sum rounds by partition layout, so
    the ground truth differed in the last bits between simulator.partitions settings."""
    from causalrec.simulator import effect_scale

    def frame(parts):  # the same three g values, split over partitions differently
        rdd = spark.sparkContext.parallelize([], len(parts)).mapPartitionsWithIndex(
            lambda i, _: iter([(v,) for v in parts[i]]))
        return spark.createDataFrame(rdd, "g double")

    a = effect_scale(frame([[1e16, 1.0], [-1e16]]))  # float: (1e16 + 1) - 1e16 = 0
    b = effect_scale(frame([[1e16, -1e16], [1.0]]))  # float: 0 + 1 = 1
    assert a == b == pytest.approx(1 / 3)


def test_the_event_count_meets_n_events_with_a_homogeneous_effect(spark):
    """The plan's probe counted purchases without the recommendation's effect and clicks twice on pairs
    that buy: with effect_heterogeneity 0 and ate 0.1 a world logged 4-5% more events than n_events."""
    from causalrec.simulator import simulate

    n = simulate(spark, _cfg(n_users=600, n_items=100, n_events=8000, mcar_share=0.0, effect_heterogeneity=0.0,
                             ate=0.1), seed=3)["events"].count()
    assert abs(n / 8000 - 1) < 0.025, n
