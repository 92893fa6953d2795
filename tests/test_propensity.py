"""Propensities: Coat exposure (LR and popularity) with diagnostics and the IPS check,
logged treatment propensities unchanged (OBD-like), estimated ones calibrated, and
simulated data against the truth."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from conftest import data_dir
from causalrec.schemas import EVENTS, ITEMS, MCAR_EVENTS, USERS


def load_coat_tables(ctx):
    """Coat into ctx.store: through the ingest stage when it is built, else the loader directly."""
    ctx.cfg.data.source = "coat"
    ctx.cfg.data.path = str(data_dir("coat"))
    try:
        from causalrec.ingest.job import run as ingest
    except ImportError:
        ingest = None
    if ingest is not None:
        ingest(ctx)
        return
    from causalrec.loaders.coat import load_coat

    data = load_coat(ctx.spark, ctx.cfg.data.path)

    def ev(df):
        return df.withColumn("event_date", F.to_date("event_time")).withColumn("ingest_batch", F.lit("test"))

    ctx.store.write(ev(data.events), "events", spec=EVENTS)
    ctx.store.write(ev(data.mcar_events), "mcar_events", spec=MCAR_EVENTS)
    ctx.store.write(data.users, "users", spec=USERS)
    ctx.store.write(data.items, "items", spec=ITEMS)


pytestmark = pytest.mark.usefixtures("few_partitions")


@pytest.fixture(scope="module")
def coat_ctx(spark, tmp_path_factory):
    """Coat ingested and featurised once for the module."""
    from causalrec.config import Config
    from causalrec.context import Context
    from causalrec.features.job import run as features

    c = Config()
    c.storage.root = str(tmp_path_factory.mktemp("coat") / "tables")
    ctx = Context(cfg=c, _spark=spark)
    load_coat_tables(ctx)
    features(ctx)
    return ctx


def _snips_mean(scored):
    o = scored.where("observed = 1")
    r = o.agg((F.sum(F.col("value") / F.col("exposure_propensity")) / F.sum(1 / F.col("exposure_propensity"))).alias("m"),
              F.avg("value").alias("raw")).first()
    return r["m"], r["raw"]


@pytest.mark.timeout(2400)  # the module's Coat ingest + features run inside this test's budget
def test_coat_exposure_lr_and_popularity_move_ratings_toward_mcar(coat_ctx):
    """Schnabel et al. 2016: self-selected Coat ratings are higher than random-exposure ones;
    weighting them by 1/propensity must move their mean toward the MCAR test mean."""
    from causalrec.propensity.job import exposure_propensities

    ctx = coat_ctx
    st = ctx.store
    mcar = st.read("mcar_events")
    res = exposure_propensities(st.read("events"), st.read("user_features"), st.read("item_features"), ctx.cfg,
                                mcar, methods=["logistic", "popularity"])
    mcar_mean = mcar.agg(F.avg("value")).first()[0]
    for m in ("popularity", "logistic"):
        ips, raw = _snips_mean(res.scored[m])
        assert raw > mcar_mean + 0.3  # the MNAR bias the test is about
        assert abs(ips - mcar_mean) < abs(raw - mcar_mean), (m, ips, raw, mcar_mean)
        diag = {r["metric"]: r["value"] for r in res.diagnostics if r["method"] == m and r["bin"] is None}
        bins = [r for r in res.diagnostics if r["method"] == m and r["metric"] == "reliability"]
        assert len(bins) >= 5
        # Coat's observation rate is 24/300 = 0.08: a calibrated model is off by far less than that
        assert diag["ece"] < 0.03, (m, diag)
        assert 0 < diag["ess_ratio"] <= 1 and 0 <= diag["share_at_clip"] <= 1
        # predictions average to the observation density over the universe (weighted pairs)
        held = [(r["n"], r["pred_mean"], r["obs_rate"]) for r in bins]
        w = sum(h[0] for h in held)
        assert sum(h[0] * h[1] for h in held) / w == pytest.approx(24 / 300, rel=0.3)


@pytest.mark.timeout(1800)
def test_coat_propensity_stage_writes_tables(coat_ctx, capsys):
    from causalrec.propensity.job import run

    coat_ctx.cfg.propensity.exposure_method = "popularity"
    coat_ctx.cfg.propensity.compare_methods = ["naive_bayes"]
    out = run(coat_ctx)
    st = coat_ctx.store
    assert out["exposure_propensity"] > 6960  # observed pairs + sampled unobserved
    ep = st.read("exposure_propensity")
    assert ep.where("observed = 1").count() == 6960
    assert ep.where("exposure_propensity < 0.01 or exposure_propensity > 1").count() == 0
    d = st.read("propensity_diagnostics")
    methods = {r["method"] for r in d.where("metric = 'ece'").collect()}
    assert methods == {"popularity", "naive_bayes"}
    assert st.row_count("treatment_propensity") == 0  # Coat logs no recommendations
    assert "propensity diagnostics" in capsys.readouterr().out
    from causalrec.storage.stage_runs import run_of  # one run id in both commits: training_set pairs them by it

    assert run_of(st, "exposure_propensity") == run_of(st, "treatment_propensity") == out["run_id"]


def test_propensities_learn_only_from_the_mcar_validation_share(spark, ctx):
    """Naive-Bayes propensities take the MCAR rating marginal: never from pairs that are tested on."""
    from causalrec.propensity.job import mcar_for_propensity
    from causalrec.training_set import is_mcar_validation_pair

    mcar = spark.createDataFrame([(f"u{u}", f"i{i}", float(1 + (u + i) % 5)) for u in range(20) for i in range(20)],
                                 "user_id string, item_id string, value double")
    ctx.cfg.training_set.mcar_valid_fraction = 0.0
    assert mcar_for_propensity(mcar, ctx.cfg).count() == 400  # no validation share: all of it (warned)
    ctx.cfg.training_set.mcar_valid_fraction = 0.25
    used = {(r["user_id"], r["item_id"]) for r in mcar_for_propensity(mcar, ctx.cfg).collect()}
    valid = {(r["user_id"], r["item_id"]) for r in mcar.where(is_mcar_validation_pair(0.25)).collect()}
    assert used == valid and 60 < len(used) < 140


def test_logged_treatment_propensities_pass_through_unchanged(spark, ctx):
    from test_features import make_events, small_world

    from causalrec.propensity.job import treatment_propensities

    _, users, items = small_world(spark)
    ps = [0.0125, 0.3333333333333333, 0.9, 0.0125, 0.5]
    events = make_events(spark, [(f"e{k}", f"u{k % 3 + 1}", f"i{k + 1}", f"2024-01-0{k + 1} 00:00", "impression",
                                  k % 2, True, p) for k, p in enumerate(ps)])
    from causalrec.features.job import build_features

    ft = build_features(events, users, items, ctx.cfg)
    t, rows = treatment_propensities(events, ft.users, ft.items, ctx.cfg)
    got = {r["event_id"]: (r["treatment_propensity"], r["source"]) for r in t.collect()}
    assert got == {f"e{k}": (p, "logged") for k, p in enumerate(ps)}  # exact, not clipped
    assert any(r["metric"] == "ess" for r in rows)


def test_logged_propensity_of_a_control_row_becomes_p_recommended(spark, ctx):
    """events.logged_propensity is the probability of the action taken: for a row the policy did
    not recommend, P(not recommended). The treatment table holds P(recommended) for every row."""
    from test_features import make_events, small_world

    from causalrec.propensity.job import treatment_propensities

    _, users, items = small_world(spark)
    rows = [("t1", "u1", "i1", "2024-01-01 00:00", "impression", 1, True, 0.8),
            ("c1", "u2", "i2", "2024-01-02 00:00", "impression", 0, False, 0.8),
            ("c2", "u3", "i3", "2024-01-03 00:00", "impression", 0, False, 0.25)]
    from causalrec.features.job import build_features

    events = make_events(spark, rows)
    ft = build_features(events, users, items, ctx.cfg)
    t, _ = treatment_propensities(events, ft.users, ft.items, ctx.cfg)
    got = {r["event_id"]: (r["treated"], r["treatment_propensity"]) for r in t.collect()}
    assert got == {"t1": (1, 0.8), "c1": (0, pytest.approx(0.2)), "c2": (0, pytest.approx(0.75))}


def _simulated(spark, n_users=600, n_items=40, seed=3):
    """A small simulated world with known propensities (exposure and treatment) from features."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    xu = rng.normal(size=n_users)
    yi = rng.normal(size=n_items)
    uf = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)], "feature_vector": [[float(x)] for x in xu]})
    itf = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "feature_vector": [[float(y)] for y in yi]})
    logit = -2.2 + 0.8 * xu[:, None] + 1.0 * yi[None, :]
    p_exp = 1 / (1 + np.exp(-logit))
    p_trt = 1 / (1 + np.exp(-(0.3 - 1.2 * xu[:, None] + 0.7 * yi[None, :])))
    obs = rng.random(p_exp.shape) < p_exp
    rec = rng.random(p_exp.shape) < p_trt
    uu, ii = np.nonzero(obs)
    ev = pd.DataFrame({
        "event_id": [f"e{u}_{i}" for u, i in zip(uu, ii)], "user_id": [f"u{u}" for u in uu], "item_id": [f"i{i}" for i in ii],
        "event_time": pd.Timestamp("2024-01-01", tz="UTC"), "event_type": "impression",
        "value": rng.integers(0, 2, len(uu)).astype(float), "recommended": rec[uu, ii]})
    truth = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users) for _ in range(n_items)],
                          "item_id": [f"i{i}" for _ in range(n_users) for i in range(n_items)],
                          "exposure_propensity": p_exp.ravel(), "treatment_propensity": p_trt.ravel()})
    from causalrec.schemas import EVENTS, conform

    events = conform(spark.createDataFrame(ev).withColumn("event_date", F.to_date("event_time"))
                     .withColumn("ingest_batch", F.lit("sim")), EVENTS)
    u = spark.createDataFrame(uf, "user_id string, feature_vector array<float>")
    i = spark.createDataFrame(itf, "item_id string, feature_vector array<float>")
    return events, u, i, spark.createDataFrame(truth)


def test_simulated_estimates_track_the_true_propensities(spark, ctx):
    """Stated thresholds: Pearson correlation with the truth >= 0.9 (exposure LR and treatment LR),
    treatment ECE on ~700 held-out events in 5 bins <= 0.08 (sampling noise alone gives ~0.03)."""
    from causalrec.propensity import diagnostics as D
    from causalrec.propensity.job import exposure_propensities, treatment_propensities

    events, uf, itf, truth = _simulated(spark)
    ctx.cfg.propensity.treatment_method = "logistic"
    ctx.cfg.propensity.calibration_bins = 5
    res = exposure_propensities(events, uf, itf, ctx.cfg, methods=["logistic"])
    vt = D.versus_truth(res.scored["logistic"], truth, "exposure_propensity", "exposure_propensity")
    assert vt["n"] > 1000 and vt["corr"] >= 0.9, vt
    t, rows = treatment_propensities(events, uf, itf, ctx.cfg)
    vt = D.versus_truth(t, truth.withColumnRenamed("treatment_propensity", "tp"), "treatment_propensity", "tp")
    assert vt["corr"] >= 0.9, vt
    ece = [r["value"] for r in rows if r["metric"] == "ece"][0]
    assert ece <= 0.08
    assert t.where("treatment_propensity < 0.01 or treatment_propensity > 0.99").count() == 0
    assert {r["metric"] for r in rows} >= {"overlap_coefficient", "ess", "share_at_clip"}


def test_treatment_model_learns_one_example_per_decision(spark, ctx):
    """A recommended decision's click row carries its flag (as the simulator writes it); fitted on
    every row, P(recommended) would count recommended decisions twice. Every row is still scored; the
    weight diagnostics count decisions, as the fit does."""
    from causalrec.propensity.job import treatment_propensities

    events, uf, itf, truth = _simulated(spark, n_users=300, seed=4)
    clicks = (events.where("recommended").withColumn("event_id", F.concat("event_id", F.lit(":click")))
              .withColumn("event_type", F.lit("click")).withColumn("value", F.lit(1.0)))
    ctx.cfg.propensity.treatment_method = "logistic"
    t, rows = treatment_propensities(events.unionByName(clicks), uf, itf, ctx.cfg)
    assert t.count() == events.count() + clicks.count()
    imp = t.join(events.select("event_id"), "event_id")
    share, mean_p = imp.agg(F.avg("treated"), F.avg("treatment_propensity")).first()
    # counted twice, a share s of recommended decisions would be fitted as about 2s / (1 + s)
    assert mean_p == pytest.approx(share, abs=0.02), (mean_p, share)
    n = {r["metric"]: r["n"] for r in rows if r["metric"] in ("ess", "mean_propensity", "overlap_coefficient")}
    assert n == dict.fromkeys(n, events.count()) and len(n) == 3, n  # diagnosed over decisions, as fitted


@pytest.mark.timeout(900)
def test_obd_estimated_choice_propensities_are_calibrated(spark, ctx):
    """OBD "men" logs of both policies (20,000 rows, 34 items, 3 slots). The choice model reads
    position and time only; the logged propensities are used for the diagnostics, never fitted.
    Stated thresholds, on rows the model never saw: reliability over every (row, candidate item)
    pair within 15% of the mean choice probability; the uniform-policy weight mean 1/(K p) within
    10% of 1 for each policy (the logged propensities give 0.94 on BTS, 1.0 on random);
    log-correlation with BTS's logged propensities >= 0.8 (a position-only model gets about 0.80,
    a constant 0); random logging recovered within 20% of the logged 1/34 (median)."""
    from causalrec.loaders.obd import load_obd
    from causalrec.propensity.job import _hash_fraction, treatment_propensities

    events = load_obd(spark, data_dir("obd"), campaigns=["men"]).events.cache()
    ctx.cfg.propensity.treatment_method = "choice"
    t, rows = treatment_propensities(events, None, None, ctx.cfg)
    metric = {r["metric"]: r["value"] for r in rows if r["metric"] != "reliability"}
    assert t.count() == 20_000 and {r["source"] for r in t.select("source").distinct().collect()} == {"choice"}
    assert t.where("treatment_propensity < 0.001 or treatment_propensity > 0.999").count() == 0
    assert metric["ece_relative"] <= 0.15, metric
    for g in ("bts|men", "random|men"):
        assert metric[f"uniform_weight_mean:{g}"] == pytest.approx(1.0, abs=0.1), (g, metric)
    assert metric["vs_logged_corr_log"] >= 0.8, metric
    held = _hash_fraction([F.col("event_id")], "treatment-holdout") < ctx.cfg.propensity.holdout_fraction
    j = (t.join(events.select("event_id", "policy", "logged_propensity"), "event_id").where(held)
         .groupBy("policy").agg(F.corr(F.log("treatment_propensity"), F.log("logged_propensity")).alias("c"),
                                F.expr("percentile_approx(abs(treatment_propensity / logged_propensity - 1), 0.5)")
                                .alias("rel_err"), F.count(F.lit(1)).alias("n")))
    by = {r["policy"]: r for r in j.collect()}
    assert by["bts"]["n"] > 1500 and by["bts"]["c"] >= 0.8, by
    assert by["random"]["rel_err"] <= 0.2, by
    events.unpersist()  # the session is shared: cached blocks are shielded from eviction up to storageFraction


def test_slate_log_without_logged_propensities_falls_back_to_the_choice_model(spark, ctx):
    """Every row recommended, no logged propensity: 'logged' cannot pass anything through and
    P(recommended) has one class, so the slot choice model estimates the propensities."""
    from test_features import make_events

    from causalrec.propensity.job import treatment_propensities

    rows = [(f"e{k}", f"u{k % 7}", f"i{k % 4}", f"2024-01-0{1 + k % 5} 0{k % 10}:00", "impression", k % 2, True)
            for k in range(120)]
    events = make_events(spark, rows).withColumn("position", F.lit(1))
    ctx.cfg.propensity.treatment_method = "logged"
    ctx.cfg.propensity.choice_reg_grid = [1.0]  # strong shrinkage: 4 items chosen ~equally -> about 1/4 each
    t, diag = treatment_propensities(events, None, None, ctx.cfg)
    got = t.agg(F.min("treatment_propensity"), F.max("treatment_propensity"), F.count(F.lit(1))).first()
    assert got[2] == 120 and 0.2 < got[0] <= got[1] < 0.3, got
    assert {r["source"] for r in t.select("source").distinct().collect()} == {"choice"}


def test_self_normalised_exposure_weights_sum_to_the_number_of_pairs(spark):
    """Sparse data: raw propensities sit below clip_min, so the rescaled ones were clipped straight back
    and sum 1/p stayed 10,000 (the unnormalised value) instead of 100 x 1000."""
    from causalrec.propensity.exposure import PopularityExposure, Universe

    pairs = spark.createDataFrame([(f"u{k % 100}", f"i{(k * 7) % 50}", 1) for k in range(200)],
                                  "user_id string, item_id string, observed int").distinct()
    uni = Universe(100, 1000, pairs.count())
    est = PopularityExposure(clip_min=0.01, self_normalize=True, power=0.5).fit(pairs, uni)
    p = est.fix_scale(pairs, uni).predict(pairs, uni)
    total, top = p.agg(F.sum(1 / F.col("exposure_propensity")), F.max("exposure_propensity")).first()
    assert top < 1 and total == pytest.approx(uni.n_pairs, rel=1e-9)
    assert est.scale_ < 1


def test_choice_model_learns_one_example_per_decision(spark, ctx):
    """A and B are each chosen for half the decisions; A's are all clicked, and its click rows carry the
    decision's flag and slot. Fitted on every row, P(A) came out 0.66 and P(B) 0.34."""
    from test_features import make_events

    from causalrec.propensity.job import treatment_propensities

    rows = []
    for k in range(200):
        it, t = ("A" if k % 2 == 0 else "B"), dt.datetime(2024, 1, 1) + dt.timedelta(minutes=10 * k)
        rows.append((f"e{k}", f"u{k % 5}", it, t.strftime("%Y-%m-%d %H:%M"), "impression", int(it == "A"), True))
        if it == "A":
            rows.append((f"c{k}", f"u{k % 5}", it, (t + dt.timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M"),
                         "click", 1, True))
    events = make_events(spark, rows).withColumn("position", F.lit(1))
    pc = ctx.cfg.propensity
    pc.treatment_method, pc.choice_reg_grid, pc.choice_time_buckets, pc.choice_groups = "choice", [1e-4], 1, []
    t, diag = treatment_propensities(events, None, None, ctx.cfg)
    p = {r["item_id"]: r["p"] for r in t.groupBy("item_id").agg(F.avg("treatment_propensity").alias("p")).collect()}
    assert p == pytest.approx({"A": 0.5, "B": 0.5}, abs=0.03)
    assert t.count() == 300  # every row is still scored
    uw = next(r for r in diag if r["metric"] == "uniform_weight_mean")
    assert uw["value"] == pytest.approx(1.0, abs=0.05) and uw["n"] < 200 * ctx.cfg.propensity.holdout_fraction * 2


def _time_log(spark, later: str):
    """200 ratings an hour apart, 20 users, treatment logged without propensities. The first 140 spread
    over items i0..i5; the last 60 (``later``) either continue that ("same") or pile onto items never
    seen before, all recommended, all rated 5 ("shifted")."""
    import datetime as dt

    from test_features import make_events, make_items, make_users

    t0 = dt.datetime(2024, 1, 1)
    rows = []
    for k in range(200):
        t = (t0 + dt.timedelta(hours=k)).strftime("%Y-%m-%d %H:%M")
        if k < 140 or later == "same":
            rows.append((f"e{k}", f"u{k % 20}", f"i{(k * 7 + k // 20) % 6}", t, "rating", 1 + k % 5, k % 3 != 0))
        else:
            rows.append((f"e{k}", f"u{k % 5}", f"i{6 + k % 4}", t, "rating", 5, True))
    users = make_users(spark, [(f"u{u}", [f"g:{u % 2}"], f"user {u}", "a") for u in range(20)])
    items = make_items(spark, [(f"i{i}", [f"c:{i % 3}"], "x", f"item {i}") for i in range(10)])
    return make_events(spark, rows), users, items


def test_time_split_train_propensities_do_not_see_the_valid_and_test_period(spark, tmp_path):
    """Under training_set.split=time the propensity models (and the features they read) learn only
    from the log before the training cutoff: rewriting every event after it leaves each train row's
    exposure and treatment propensity unchanged, and every labelled row still gets one."""
    from causalrec.config import Config
    from causalrec.context import Context
    from causalrec.features.job import run as features
    from causalrec.propensity.job import run as propensity
    from causalrec.schemas import EVENTS as EV
    from causalrec.training_set import assign_splits

    out = {}
    for later in ("same", "shifted"):
        c = Config()
        c.storage.root = str(tmp_path / later)
        c.training_set.split = "time"
        c.propensity.exposure_method = "logistic"
        c.propensity.treatment_method = "logistic"
        ctx = Context(cfg=c, _spark=spark)
        events, users, items = _time_log(spark, later)
        ctx.store.write(events, "events", spec=EV)
        ctx.store.write(users, "users", spec=USERS)
        ctx.store.write(items, "items", spec=ITEMS)
        features(ctx)
        propensity(ctx)
        cutoff = assign_splits(events, c, False)[1]
        ev = {r["event_id"]: r for r in events.collect()}
        before = {k for k, r in ev.items() if r["event_time"].timestamp() < cutoff.timestamp()}
        ep = ctx.store.read("exposure_propensity").collect()
        out[later] = dict(
            before=before, events=ev,
            exposure={(r["user_id"], r["item_id"], r["observed"]): r["exposure_propensity"] for r in ep},
            n_exposure=len(ep),
            treatment={r["event_id"]: r["treatment_propensity"] for r in ctx.store.read("treatment_propensity").collect()})
    same, shifted = out["same"], out["shifted"]
    assert same["before"] == shifted["before"] and 120 <= len(same["before"]) <= 140  # only later events differ
    assert all(same["events"][k] == shifted["events"][k] for k in same["before"])
    train_pairs = {(same["events"][k]["user_id"], same["events"][k]["item_id"], 1) for k in same["before"]}
    for key in train_pairs:
        assert same["exposure"][key] == pytest.approx(shifted["exposure"][key], abs=1e-6), key
    unobserved = {k for k in same["exposure"] if k[2] == 0} & {k for k in shifted["exposure"] if k[2] == 0}
    assert len(unobserved) >= 30
    for key in unobserved:  # the sampled unobserved pairs are train rows too
        assert same["exposure"][key] == pytest.approx(shifted["exposure"][key], abs=1e-6), key
    for k in same["before"]:
        assert same["treatment"][k] == pytest.approx(shifted["treatment"][k], abs=1e-6), k
    for o in (same, shifted):  # every labelled pair and event is scored, each pair once
        pairs = {(r["user_id"], r["item_id"], 1) for r in o["events"].values()}
        assert pairs <= set(o["exposure"]) and len(o["exposure"]) == o["n_exposure"]
        assert set(o["treatment"]) == set(o["events"])
        assert len({(u, i) for u, i, _ in o["exposure"]}) == o["n_exposure"]


def _held_out_log(spark, split: str, variant: str, ts):
    """200 ratings of 20 users, treatment logged without propensities, and which of them the training
    set holds out: under ``random_user`` every row of a hashed test/valid user, under ``given`` the rows
    whose ``context.split`` says test or valid (every 5th and every 7th). Train rows rate items i0..i7;
    a held-out row rates, in the ``same`` variant, an item of i0..i7 its user has no train row of (so
    no train row shares its pair), in the ``shifted`` variant one of i8..i11, recommended and rated 5."""
    import datetime as dt
    import json

    from test_features import make_events, make_items, make_users
    from causalrec.training_set import random_user_split

    users = make_users(spark, [(f"u{u}", [f"g:{u % 2}"], f"user {u}", "a") for u in range(20)])
    items = make_items(spark, [(f"i{i}", [f"c:{i % 3}"], "x", f"item {i}") for i in range(12)])
    held_users = {r[0] for r in users.select("user_id", random_user_split(ts).alias("s")).collect() if r[1] != "train"}
    given = {k: "test" if k % 5 == 0 else "valid" if k % 7 == 0 else "train" for k in range(200)}
    is_held = {k: (f"u{k % 20}" in held_users) if split == "random_user" else given[k] != "train" for k in range(200)}
    train_pairs = {(k % 20, (k * 7 + k // 20) % 8) for k in range(200) if not is_held[k]}
    t0, rows = dt.datetime(2024, 1, 1), []
    for k in range(200):
        u, t = k % 20, (t0 + dt.timedelta(hours=k)).strftime("%Y-%m-%d %H:%M")
        if not is_held[k]:
            rows.append((f"e{k}", f"u{u}", f"i{(k * 7 + k // 20) % 8}", t, "rating", 1 + k % 5, k % 3 != 0))
            continue
        free = [i for i in range(8) if (u, (i + k) % 8) not in train_pairs]
        item = (free[0] + k) % 8 if free and variant == "same" else 8 + k % 4
        rows.append((f"e{k}", f"u{u}", f"i{item}", t, "rating", 1 + k % 5 if variant == "same" else 5,
                     k % 3 != 0 if variant == "same" else True))
    events = make_events(spark, rows)
    ctx_df = spark.createDataFrame([(f"e{k}", json.dumps({"split": g})) for k, g in given.items()],
                                   "event_id string, _ctx string")
    events = events.join(ctx_df, "event_id").withColumn("context", F.col("_ctx")).drop("_ctx")
    return events, users, items, {f"e{k}" for k in range(200) if is_held[k]}


@pytest.mark.parametrize("split", ["random_user", "given"])
def test_held_out_pairs_never_reach_the_propensity_fit(spark, tmp_path, split):
    """Under ``given`` and ``random_user`` the propensity models (and the features they read) learn only
    from the events the training set lets a model see: rewriting every held-out (valid/test) row leaves
    each train row's exposure and treatment propensity unchanged, no held-out pair is an unobserved
    row of the written table, and every labelled pair and event still gets one propensity."""
    from causalrec.config import Config
    from causalrec.context import Context
    from causalrec.propensity.job import run as propensity
    from causalrec.schemas import EVENTS as EV

    out = {}
    for variant in ("same", "shifted"):
        c = Config()
        c.storage.root = str(tmp_path / variant)
        c.training_set.split = split
        c.training_set.test_fraction, c.training_set.valid_fraction = 0.25, 0.15
        c.propensity.exposure_method = "logistic"
        c.propensity.compare_methods = []  # one fitted model: the one the table holds
        c.propensity.treatment_method = "logistic"
        ctx = Context(cfg=c, _spark=spark)
        events, users, items, held = _held_out_log(spark, split, variant, c.training_set)
        ctx.store.write(events, "events", spec=EV)
        ctx.store.write(users, "users", spec=USERS)
        ctx.store.write(items, "items", spec=ITEMS)
        # no features stage: its tables count the held-out rows, so the propensity stage must not need them
        res = propensity(ctx)
        ep = ctx.store.read("exposure_propensity").collect()
        out[variant] = dict(
            held=held, events={r["event_id"]: r for r in events.collect()}, n_exposure=len(ep), fit_on=res["fit_on"],
            exposure={(r["user_id"], r["item_id"], r["observed"]): r["exposure_propensity"] for r in ep},
            treatment={r["event_id"]: r["treatment_propensity"] for r in ctx.store.read("treatment_propensity").collect()})
    same, shifted = out["same"], out["shifted"]
    assert same["held"] == shifted["held"] and 25 <= len(same["held"]) <= 120, len(same["held"])
    assert same["fit_on"].startswith("events of train pairs only")
    train = set(same["events"]) - same["held"]
    assert all(same["events"][k] == shifted["events"][k] for k in train)  # only held-out rows differ
    held_pairs = {(o["events"][k]["user_id"], o["events"][k]["item_id"]) for o in (same, shifted) for k in o["held"]}
    assert not {(same["events"][k]["user_id"], same["events"][k]["item_id"]) for k in train} & held_pairs
    for k in train:
        key = (same["events"][k]["user_id"], same["events"][k]["item_id"], 1)
        assert same["exposure"][key] == pytest.approx(shifted["exposure"][key], abs=1e-6), key
        assert same["treatment"][k] == pytest.approx(shifted["treatment"][k], abs=1e-6), k
    for o in (same, shifted):
        pairs = {(r["user_id"], r["item_id"]) for r in o["events"].values()}
        held_pairs = {(o["events"][k]["user_id"], o["events"][k]["item_id"]) for k in o["held"]}
        unobserved = {(u, i) for u, i, obs in o["exposure"] if obs == 0}
        assert len(unobserved) >= 30 and not unobserved & held_pairs
        assert {(u, i, 1) for u, i in pairs} <= set(o["exposure"]) and len(o["exposure"]) == o["n_exposure"]
        assert len({(u, i) for u, i, _ in o["exposure"]}) == o["n_exposure"]
        assert set(o["treatment"]) == set(o["events"])
    for key in {k for k in same["exposure"] if k[2] == 0} & {k for k in shifted["exposure"] if k[2] == 0}:
        assert same["exposure"][key] == pytest.approx(shifted["exposure"][key], abs=1e-6), key


def test_choice_model_survives_groups_too_small_for_its_holdout_and_validation_split(spark, ctx, caplog):
    """A choice group whose rows all fall in the diagnostic holdout has nothing to fit: it is left out
    with a warning (its rows get no propensity) instead of stopping the stage. A group too small for the
    hashed validation tenth that picks the L2 strength takes the first grid value, said in the log,
    instead of comparing losses of no rows."""
    import logging

    from test_features import make_events

    from causalrec.propensity.job import _hash_fraction, treatment_propensities

    hf = ctx.cfg.propensity.holdout_fraction
    cand = spark.createDataFrame([(f"s{k}",) for k in range(200)], "event_id string").select(
        "event_id", _hash_fraction([F.col("event_id")], "treatment-holdout").alias("h"),
        ((F.abs(F.xxhash64(F.lit("choice-valid"), "event_id")) % 10) == 0).alias("v")).collect()
    gone = [r["event_id"] for r in cand if r["h"] < hf][:1]  # its only row is in the diagnostic holdout
    tiny = [r["event_id"] for r in cand if r["h"] >= hf and not r["v"]][:3]  # fitted, nothing to validate on
    big = [(f"e{k}", f"u{k % 7}", f"i{k % 4}", f"2024-01-0{1 + k % 5} 0{k % 10}:00", "impression", k % 2, True)
           for k in range(60)]
    events = make_events(spark, big).withColumn("policy", F.lit("big")).unionByName(
        make_events(spark, [(e, "u1", f"i{k % 2}", "2024-01-02 00:00", "impression", 0, True)
                            for k, e in enumerate(tiny)]).withColumn("policy", F.lit("tiny"))).unionByName(
        make_events(spark, [(e, "u2", "i0", "2024-01-03 00:00", "impression", 0, True)
                            for e in gone]).withColumn("policy", F.lit("gone"))).withColumn("position", F.lit(1))
    ctx.cfg.propensity.treatment_method = "choice"
    ctx.cfg.propensity.choice_groups = ["policy"]
    ctx.cfg.propensity.choice_reg_grid = [1e-4, 1e-3, 1e-2]
    with caplog.at_level(logging.INFO, logger="causalrec.propensity"):
        t, diag = treatment_propensities(events, None, None, ctx.cfg)
    got = {r["event_id"]: r["treatment_propensity"] for r in t.collect()}
    assert set(got) == {r[0] for r in big} | set(tiny)  # the 'gone' group's row gets no propensity
    assert all(0 < p < 1 for p in got.values())
    reg = {r["metric"]: r["value"] for r in diag if r["metric"].startswith("reg_param:")}
    assert reg["reg_param:tiny"] == 1e-4 and "reg_param:gone" not in reg
    text = caplog.text
    assert "'gone'" in text and "holdout" in text
    assert "tiny" in text and "no validation rows" in text


def test_logged_treatment_diagnostics_count_each_decision_once(spark, ctx):
    """A clicked decision's click row carries its flag and propensity (as the simulator writes it): the
    written table scores it, but the weight diagnostics are over decisions, as the fit is."""
    from test_features import make_events

    from causalrec.propensity.job import treatment_propensities

    dec = [(f"d{k}", f"u{k}", "i1", "2024-01-01 00:00", "impression", int(k < 2), k < 2, 0.2 if k < 2 else 0.8)
           for k in range(10)]
    clicks = [(f"d{k}:click", f"u{k}", "i1", "2024-01-01 00:01", "click", 1, True, 0.2) for k in range(2)]
    ctx.cfg.propensity.treatment_method = "logged"
    t, rows = treatment_propensities(make_events(spark, dec + clicks), None, None, ctx.cfg)
    assert t.count() == 12  # every row keeps its propensity
    got = {r["metric"]: (r["value"], r["n"]) for r in rows}
    w = [1 / 0.2] * 2 + [1 / 0.8] * 8  # the logged action's probability: 0.2 for 2 treated, 0.8 for 8 controls
    assert got["mean_propensity"] == (pytest.approx(0.68), 10)
    assert got["ess_ratio"] == (pytest.approx(sum(w) ** 2 / sum(x * x for x in w) / 10), 10)
    assert got["max_weight"] == (pytest.approx(5.0), 10)
    assert got["overlap_coefficient"][1] == 10


@pytest.mark.parametrize("method", ["exposure", "logistic", "choice"])
def test_time_split_with_no_event_before_the_cutoff_says_so_before_fitting(spark, ctx, method):
    """Coat has one synthetic timestamp: under training_set.split=time the cutoff equals every event's
    time and nothing is before it. Each fit stops with a message naming the setting, the cutoff, how many
    events are at or after it and what to use instead, not with MLlib's empty-summarizer error."""
    from test_features import make_events, make_items, make_users

    from causalrec.features.job import build_features
    from causalrec.propensity.job import exposure_propensities, fit_scope, treatment_propensities

    rows = [(f"e{k}", f"u{k % 6}", f"i{(k * 5) % 8}", "2016-01-01 00:00", "rating", 1 + k % 5,
             method == "choice" or k % 3 == 0) for k in range(40)]
    events = make_events(spark, rows).withColumn("position", F.lit(1))
    users = make_users(spark, [(f"u{u}", [], "", "a") for u in range(6)])
    items = make_items(spark, [(f"i{i}", [], "x", "t") for i in range(8)])
    ctx.cfg.training_set.split = "time"
    ctx.cfg.propensity.treatment_method = method if method != "exposure" else "logistic"
    ctx.cfg.propensity.choice_groups = []
    scope = fit_scope(events, ctx.cfg)
    assert scope.cutoff is not None and scope.fit_events(events).count() == 0
    ft = build_features(scope.fit_events(events), users, items, ctx.cfg, cutoff=scope.cutoff)
    with pytest.raises(ValueError) as err:
        if method == "exposure":
            exposure_propensities(events, ft.users, ft.items, ctx.cfg, scope=scope)
        else:
            treatment_propensities(events, ft.users, ft.items, ctx.cfg, scope=scope)
    msg = str(err.value)
    assert "training_set.split=time" in msg and scope.cutoff.isoformat() in msg, msg
    assert "40 events at or after it" in msg and "split=given" in msg and "random_user" in msg, msg


def test_exposure_universe_counts_the_users_the_fit_observes_for_every_method(spark):
    """Users in the feature tables without a label event (5 of 10 here) got no sampled unobserved
    pairs, so the logistic model fitted the density of the observed users (0.1) while the universe,
    and with it popularity and naive Bayes, counted all 10 (density 0.05): the methods disagreed by 2x."""
    import datetime as dt
    import random

    from pyspark.sql import functions as F

    from causalrec.config import Config
    from causalrec.propensity.job import exposure_propensities

    cfg = Config()
    cfg.propensity.clip_min, cfg.propensity.reg_param, cfg.propensity.holdout_fraction = 1e-4, 0.0, 0.0
    rng = random.Random(0)
    rows = [(f"e{u}_{j}", f"u{u}", f"i{j}", dt.datetime(2024, 1, 1), "rating", 3.0)
            for u in range(5) for j in rng.sample(range(50), 5)]
    ev = spark.createDataFrame(rows, "event_id string, user_id string, item_id string, event_time timestamp, "
                                     "event_type string, value double")
    uf = spark.createDataFrame([(f"u{u}", [1.0]) for u in range(10)], "user_id string, feature_vector array<float>")
    itf = spark.createDataFrame([(f"i{j}", [1.0]) for j in range(50)], "item_id string, feature_vector array<float>")
    er = exposure_propensities(ev, uf, itf, cfg, methods=["logistic", "popularity"])
    assert (er.universe.n_users, er.universe.density) == (5, pytest.approx(0.1))
    # constant features: the weighted likelihood's P(O=1) is the observed users' density
    p = er.scored["logistic"].agg(F.avg("raw_propensity")).first()[0]
    assert p == pytest.approx(er.universe.density, rel=0.03)


def test_treatment_versus_truth_counts_one_row_per_decision(spark):
    """The treatment table scores every event; a decision's click and purchase rows carry its
    propensity too, and counted the clicked decision three times against the true propensity."""
    import datetime as dt

    from causalrec.config import Config
    from causalrec.propensity.job import treatment_propensities, treatment_versus_truth

    cfg = Config()
    cfg.propensity.treatment_method = "logged"
    t0 = dt.datetime(2024, 1, 1)
    rows = [("a1", "uA", "iA", t0, "impression", 1.0, True, 0.9), ("a2", "uA", "iA", t0, "click", 1.0, True, 0.9),
            ("a3", "uA", "iA", t0, "purchase", 1.0, True, 0.9), ("b1", "uB", "iB", t0, "impression", 0.0, True, 0.5)]
    ev = spark.createDataFrame(rows, "event_id string, user_id string, item_id string, event_time timestamp, "
                                     "event_type string, value double, recommended boolean, logged_propensity double")
    uf = spark.createDataFrame([("uA", [0.0]), ("uB", [0.0])], "user_id string, feature_vector array<float>")
    itf = spark.createDataFrame([("iA", [0.0]), ("iB", [0.0])], "item_id string, feature_vector array<float>")
    tdf, _ = treatment_propensities(ev, uf, itf, cfg)
    truth = spark.createDataFrame([("uA", "iA", 0.5), ("uB", "iB", 0.3)],
                                  "user_id string, item_id string, treatment_propensity double")
    vt = treatment_versus_truth(tdf, ev, truth)
    assert (vt["n"], vt["mae"]) == (2, pytest.approx((0.4 + 0.2) / 2))


def test_choice_catalogue_is_bounded_before_items_reach_the_driver(spark):
    """One class per item: a group with more items than the model takes is refused with the methods that
    scale, and the check runs in Spark (no per-item collect first)."""
    from causalrec.propensity.choice import catalogues_of

    rows = spark.createDataFrame([("g1", f"i{k % 5}") for k in range(20)] + [("g2", "a"), ("g2", "b"), ("g2", "a")],
                                 "choice_group string, item_id string")
    assert catalogues_of(rows, max_items=5) == {"g1": ["i0", "i1", "i2", "i3", "i4"], "g2": ["a", "b"]}
    with pytest.raises(ValueError, match=r"choice group 'g1' logs 5 distinct items; .* at most 4\. .*treatment_method=logistic"):
        catalogues_of(rows, max_items=4)
