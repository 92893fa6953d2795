"""training_examples: declared schema through ray.data.read_delta, files per split, splits, no test pair in train."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from causalrec.schemas import EVENTS, ITEMS, TRAINING_EXAMPLES, USERS
from test_features import make_events, make_items, make_users
from test_propensity import load_coat_tables

pytestmark = pytest.mark.usefixtures("few_partitions")


def files_per_split(store, name="training_examples"):
    from deltalake import DeltaTable

    out = {}
    for f in DeltaTable(store.path(name)).file_uris():
        split = [p.split("=", 1)[1] for p in f.split("/") if p.startswith("split=")][0]
        out[split] = out.get(split, 0) + 1
    return out


def _norm(t):
    """Arrow type modulo list field names and large_ variants (both mean the same column type)."""
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("list", _norm(t.value_type))
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def check_ray_schema(request, store):
    """Ray is started only now (after the Spark work): its startup is what times out on a loaded box."""
    request.getfixturevalue("ray_local")
    import ray

    ds = ray.data.read_delta(store.path("training_examples"))
    schema = ds.schema()
    got = dict(zip(schema.names, schema.types))
    want = TRAINING_EXAMPLES.arrow_schema()
    for f in want:
        if f.name == "split":  # Hive partition column: recovered from the folder names
            continue
        assert f.name in got, f"{f.name} missing from the Ray schema"
        assert _norm(got[f.name]) == _norm(f.type), (f.name, got[f.name], f.type)
    return ds


def run_stages(ctx):
    from causalrec.features.job import run as features
    from causalrec.propensity.job import run as propensity
    from causalrec.training_set import run as training_set

    features(ctx)
    propensity(ctx)
    return training_set(ctx)


@pytest.mark.timeout(2400)  # Coat ingest + features + propensity + training set on a shared 2-core box
def test_coat_training_examples(ctx, request):
    load_coat_tables(ctx)
    ctx.cfg.propensity.exposure_method = "popularity"
    ctx.cfg.training_set.files_per_split = 2
    out = run_stages(ctx)
    counts = out["training_examples"]
    assert set(counts) == {"train", "valid", "test"}
    te = ctx.store.read("training_examples")
    obs = te.where("observed = 1")
    # Coat: 6,960 MNAR ratings -> train/valid (minus pairs also in the MCAR test), 4,640 MCAR -> test
    n_test = obs.where("split = 'test'").count()
    assert n_test == 4640
    assert obs.where("split = 'test' and not is_mcar").count() == 0
    n_mnar = obs.where("split != 'test'").count()
    assert 6000 < n_mnar <= 6960
    assert 0.05 < obs.where("split = 'valid'").count() / n_mnar < 0.15
    # unobserved pairs: train only, with propensities, no label
    un = te.where("observed = 0")
    assert un.count() > 0 and un.where("split != 'train' or label is not null").count() == 0
    # no test pair in train or valid
    test_pairs = te.where("split = 'test'").select("user_id", "item_id")
    assert te.where("split != 'test'").join(test_pairs, ["user_id", "item_id"]).count() == 0
    row = obs.where("split = 'train'").first()
    assert row["outcome"] == (1.0 if row["label"] >= 4 else 0.0)
    assert len(row["features"]) > 10 and row["item_text"] and row["user_text"]
    assert te.where("exposure_propensity < 0.01 or exposure_propensity > 1").count() == 0
    assert files_per_split(ctx.store) == {"train": 2, "valid": 2, "test": 2}
    ds = check_ray_schema(request, ctx.store)
    assert ds.count() == te.count()
    # idempotent: a rerun overwrites
    from causalrec.training_set import run as training_set

    training_set(ctx)
    assert ctx.store.read("training_examples").count() == te.count()
    # a hashed tenth of the MCAR pairs becomes an unbiased validation slice, never trained on
    ctx.cfg.training_set.mcar_valid_fraction = 0.1
    from causalrec.propensity.job import run as propensity

    propensity(ctx)  # the propensities must be learned under the same split (check_propensity_split)
    training_set(ctx)
    te2 = ctx.store.read("training_examples").where("observed = 1")
    mcar_valid = te2.where("split = 'valid' and is_mcar").count()
    assert 0.07 * 4640 < mcar_valid < 0.13 * 4640
    assert te2.where("split = 'test'").count() == 4640 - mcar_valid
    assert te2.where("is_mcar").count() == 4640
    mv_pairs = te2.where("split = 'valid' and is_mcar").select("user_id", "item_id")
    assert te2.where("split = 'train'").join(mv_pairs, ["user_id", "item_id"]).count() == 0
    assert te2.where("split = 'valid' and not is_mcar").count() > 0


def _timed_world(spark):
    base = dt.datetime(2024, 1, 1)
    rows = []
    k = 0
    items = [f"i{j}" for j in range(12)]
    for u in range(16):
        for d in range(6):
            j = (u * 3 + d * 5) % 12
            k += 1
            t = (base + dt.timedelta(days=d, hours=u)).strftime("%Y-%m-%d %H:%M")
            rows.append((f"e{k}", f"u{u}", items[j], t, "impression", float((u + d) % 3 == 0), (u + d) % 2 == 0, 0.5))
    events = make_events(spark, rows)
    its = make_items(spark, [(i, [f"color:{j % 3}"], f"cat{j % 2}", f"item {i}") for j, i in enumerate(items)])
    us = make_users(spark, [(f"u{u}", [f"g:{u % 2}"], f"user {u}", None) for u in range(16)])
    return events, us, its


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("split", ["time", "random_user"])
def test_hand_made_impressions_time_and_user_splits(ctx, request, spark, split):
    events, users, items = _timed_world(spark)
    ctx.store.write(events, "events", spec=EVENTS)
    ctx.store.write(users, "users", spec=USERS)
    ctx.store.write(items, "items", spec=ITEMS)
    ctx.cfg.training_set.split = split
    ctx.cfg.training_set.test_fraction = 0.25
    ctx.cfg.training_set.valid_fraction = 0.25
    ctx.cfg.training_set.files_per_split = 2
    ctx.cfg.propensity.exposure_method = "popularity"
    run_stages(ctx)
    te = ctx.store.read("training_examples")
    obs = te.where("observed = 1")
    assert obs.count() <= 96 and obs.where("split = 'test'").count() > 0
    # logged treatment propensities pass through to the examples
    assert obs.where("treatment_propensity != 0.5 or treatment_propensity is null").count() == 0
    assert obs.where("outcome is null or treated is null").count() == 0
    if split == "time":
        span = {r["split"]: (r["lo"], r["hi"]) for r in obs.groupBy("split").agg(
            F.min("event_time").alias("lo"), F.max("event_time").alias("hi")).collect()}
        assert span["train"][1] < span["valid"][0] and span["valid"][1] < span["test"][0], span
    else:
        # every row of a user, sampled unobserved ones too, is in the user's split
        by_user = te.groupBy("user_id").agg(F.countDistinct("split").alias("k"))
        assert by_user.where("k > 1").count() == 0
    test_pairs = te.where("split = 'test'").select("user_id", "item_id")
    assert te.where("split != 'test'").join(test_pairs, ["user_id", "item_id"]).count() == 0
    fps = files_per_split(ctx.store)
    assert all(v == 2 for v in fps.values()) and "train" in fps and "test" in fps
    check_ray_schema(request, ctx.store)


@pytest.mark.timeout(1800)
def test_simulated_training_examples_read_by_ray(ctx, request):
    """The simulator's world through simulate -> features -> propensity -> training_set, as
    conf/simulated.yaml runs it (time split, logged treatment propensities): the table Ray Train
    reads has the declared schema, every observed row carries both propensities, and the time
    split keeps train before test."""
    from causalrec.config import SimulatorConfig
    from causalrec.simulator import run as simulate

    ctx.cfg.simulator = SimulatorConfig(n_users=80, n_items=30, n_events=3000, n_days=5, partitions=2)
    ctx.cfg.data.source = "simulator"
    ctx.cfg.propensity.exposure_method = "logistic"
    ctx.cfg.propensity.treatment_method = "logged"
    ctx.cfg.training_set.split = "time"
    ctx.cfg.training_set.files_per_split = 2
    simulate(ctx)
    out = run_stages(ctx)
    assert set(out["training_examples"]) == {"train", "valid", "test"}
    te = ctx.store.read("training_examples")
    obs = te.where("observed = 1")
    assert obs.where("exposure_propensity is null").count() == 0
    # MCAR rows were never logged by the recommending policy; every other row has P(recommended)
    assert obs.where("not is_mcar and treatment_propensity is null").count() == 0
    # MCAR rows: the random design's exposure probability, mcar_items_per_user / n_items
    mcar = obs.where("is_mcar")
    assert mcar.count() > 0 and mcar.where(F.abs(F.col("exposure_propensity") - 16 / 30) > 1e-9).count() == 0
    # the logged propensities are the simulator's true P(recommended) for treated and control rows
    # alike (a control row logs P(not recommended), which the table turns back into P(recommended))
    d = {r["metric"]: r["value"] for r in ctx.store.read("propensity_diagnostics")
         .where("propensity = 'treatment' and metric like 'truth_%'").collect()}
    assert d["truth_corr"] > 0.999 and d["truth_mae"] < 1e-6, d
    # time split of the logged rows: nothing in train happens after the earliest test event
    t = obs.where("not is_mcar").groupBy("split").agg(F.min("event_time").alias("lo"), F.max("event_time").alias("hi"))
    span = {r["split"]: (r["lo"], r["hi"]) for r in t.collect()}
    assert span["train"][1] <= span["valid"][0] and span["valid"][1] <= span["test"][0], span
    assert files_per_split(ctx.store) == {"train": 2, "valid": 2, "test": 2}
    ds = check_ray_schema(request, ctx.store)
    assert ds.count() == te.count()


def _examples(spark, events, users, items, cfg, unobserved=()):
    """build_training_examples with a hand-made exposure table: logged pairs at 0.5, ``unobserved``
    (user, item) pairs at 0.1 standing for two pairs each."""
    from causalrec.schemas import EXPOSURE_PROPENSITY
    from causalrec.training_set import build_id_index, build_training_examples

    seen = [(r["user_id"], r["item_id"]) for r in events.select("user_id", "item_id").distinct().collect()]
    rows = [(u, i, 1, None, 0.5, 0.5, "hand", 1.0) for u, i in seen]
    rows += [(u, i, 0, None, 0.1, 0.1, "hand", 2.0) for u, i in unobserved]
    exposure = spark.createDataFrame(rows, EXPOSURE_PROPENSITY.spark_schema())
    idx = build_id_index(spark, users, items, events)
    return build_training_examples(events, users, items, exposure, None, idx, cfg).localCheckpoint()


def _slot(cfg, kind, name, user_vocab=(), item_vocab=()):
    """Position of a named feature in ``features`` (user vector ++ item vector ++ pair vector)."""
    from causalrec.features.item import item_feature_names
    from causalrec.features.user import user_feature_names

    un = user_feature_names(list(cfg.data.event_types), cfg.features.windows_days, list(user_vocab))
    if kind == "user":
        return un.index(name)
    return len(un) + item_feature_names(cfg.features.windows_days, list(item_vocab)).index(name)


def test_random_user_holds_out_whole_users_and_their_exposures(spark):
    """Simulator/OBD-style log (a clicked impression has a click row 5 s later), random_user split: a
    held-out user's clicks reach neither their history nor the item counts, they have no train rows
    (observed or sampled unobserved), and train rows' item click count and rate leave their own click out."""
    import math

    from causalrec.config import Config

    rows, k, clicks = [], 0, {}
    for u in range(12):
        for j in range(4):
            item, clicked = f"i{(u + j) % 8}", (u * 7 + j * 3) % 3 == 0
            k += 1
            rows.append((f"e{k}", f"u{u}", item, f"2024-01-0{1 + j} {u:02d}:00", "impression", float(clicked), True, 0.5))
            clicks[(f"u{u}", item)] = float(clicked)
            if clicked:
                k += 1
                rows.append((f"e{k}", f"u{u}", item, f"2024-01-0{1 + j} {u:02d}:05", "click", 1.0, True, 0.5))
    events = make_events(spark, rows)
    items = make_items(spark, [(f"i{j}", [f"c:{j % 2}"], "cat", f"item {j}") for j in range(8)])
    users = make_users(spark, [(f"u{u}", [], f"user {u}", None) for u in range(12)])
    cfg = Config()
    cfg.training_set.split = "random_user"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.4, 0.2
    cfg.training_set.label_event_type = "impression"
    cfg.training_set.unobserved_per_observed = 1.0
    cfg.features.smoothing_prior_strength = 2.0
    unobserved = [(f"u{u}", f"i{(u + 4 + j) % 8}") for u in range(12) for j in range(2)]
    te = _examples(spark, events, users, items, cfg, unobserved)

    split_of = {r["user_id"]: r["split"] for r in te.where("observed = 1").select("user_id", "split").distinct().collect()}
    assert len(split_of) == 12 and {"train", "test", "valid"} <= set(split_of.values())
    # every row of a user, observed or sampled, is in the user's split (held-out users: no train rows)
    assert te.groupBy("user_id").agg(F.countDistinct("split").alias("k")).where("k > 1").count() == 0
    assert te.where("observed = 0").count() > 0 and te.where("observed = 0 and split != 'train'").count() == 0
    # a held-out row's outcome is not readable off the history (its click row used to put the item there)
    held = te.where("split != 'train' and observed = 1")
    assert held.where(F.array_contains("history_item_idx", F.col("item_idx"))).count() == 0
    assert held.where(F.size("history_item_idx") > 0).count() == 0  # all their events are held-out pairs

    # item counts and click rates come from train users' exposures only
    train = {p: c for p, c in clicks.items() if split_of[p[0]] == "train"}
    n_imp = {i: sum(1 for (_, it) in train if it == i) for i in {p[1] for p in clicks}}
    n_clk = {i: sum(c for (_, it), c in train.items() if it == i) for i in n_imp}
    g, kk = sum(train.values()) / len(train), 2.0
    vocab = ["c:0", "c:1"]
    s_clicks, s_rate = _slot(cfg, "item", "log1p_n_clicks", item_vocab=vocab), _slot(cfg, "item", "click_rate", item_vocab=vocab)
    for r in te.collect():
        i = r["item_id"]
        own = r["outcome"] if r["split"] == "train" and r["observed"] == 1 else None
        assert r["features"][s_clicks] == pytest.approx(math.log1p(n_clk[i] - (own or 0.0)), abs=1e-5), r
        want = ((n_clk[i] + kk * g) / (n_imp[i] + kk) if own is None
                else (n_clk[i] - own + kk * g) / (n_imp[i] - 1 + kk))
        assert r["features"][s_rate] == pytest.approx(want, abs=1e-5), (r["split"], r["observed"], i, own)


def test_train_rows_leave_their_own_rating_out_of_user_and_item_statistics(spark):
    """Time split on ratings: a train row's user rating mean/variance and its item's smoothed rating
    mean are those of the other train ratings (its own label is among the feature events); valid and
    test rows see the full train statistics. Names and width of ``features`` are unchanged."""
    import random
    import statistics

    from causalrec.config import Config

    rnd = random.Random(0)
    rows = [(f"e{u}_{d}", f"u{u}", f"i{(u * 5 + d) % 7}", f"2024-01-0{d + 1} {u:02d}:00", "rating", rnd.randint(1, 5))
            for u in range(10) for d in range(5)]
    events = make_events(spark, rows)
    items = make_items(spark, [(f"i{j}", [], "c", "") for j in range(7)])
    users = make_users(spark, [(f"u{u}", [], "", None) for u in range(10)])
    cfg = Config()
    cfg.training_set.split = "time"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.2, 0.2
    cfg.training_set.unobserved_per_observed = 0.0
    cfg.features.smoothing_prior_strength = 2.0
    te = _examples(spark, events, users, items, cfg).where("observed = 1").collect()
    train = [r for r in te if r["split"] == "train"]
    assert len(train) > 20 and len(te) - len(train) > 10
    by_user, by_item = {}, {}
    for r in train:
        by_user.setdefault(r["user_id"], []).append(r["label"])
        by_item.setdefault(r["item_id"], []).append(r["label"])
    g, k = sum(r["label"] for r in train) / len(train), 2.0
    s_um, s_uv = _slot(cfg, "user", "rating_mean"), _slot(cfg, "user", "rating_var")
    s_im = _slot(cfg, "item", "rating_mean")
    for r in te:
        ru, ri = list(by_user.get(r["user_id"], [])), list(by_item.get(r["item_id"], []))
        if r["split"] == "train":
            ru.remove(r["label"])
            ri.remove(r["label"])
        assert r["features"][s_um] == pytest.approx(statistics.fmean(ru) if ru else 0.0, abs=1e-5)
        assert r["features"][s_uv] == pytest.approx(statistics.pvariance(ru) if ru else 0.0, abs=1e-5)
        assert r["features"][s_im] == pytest.approx((sum(ri) + k * g) / (len(ri) + k), abs=1e-5)
    assert len({len(r["features"]) for r in te}) == 1


def test_train_rows_do_not_carry_their_own_item_in_the_users_history(spark):
    """A train row's own rated item is taken out of its user's history (indices and "Recently" text):
    kept, the history would hold the label item exactly for the rows being trained on. Valid and
    test rows keep the user's whole train history; the other train items stay in order."""
    from causalrec.config import Config

    rows = [(f"e{u}_{d}", f"u{u}", f"i{(u * 5 + d) % 7}", f"2024-01-0{d + 1} {u:02d}:00", "rating", 1 + (u + d) % 5)
            for u in range(10) for d in range(5)]
    events = make_events(spark, rows)
    items = make_items(spark, [(f"i{j}", [], "c", f"item text {j}") for j in range(7)])
    users = make_users(spark, [(f"u{u}", [], "", None) for u in range(10)])
    cfg = Config()
    cfg.training_set.split = "time"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.2, 0.2
    cfg.training_set.unobserved_per_observed = 0.0
    te = _examples(spark, events, users, items, cfg).where("observed = 1").collect()
    idx = {r["item_id"]: r["item_idx"] for r in te}
    train_items = {}
    for r in sorted((r for r in te if r["split"] == "train"), key=lambda r: r["event_time"], reverse=True):
        train_items.setdefault(r["user_id"], []).append(r["item_id"])
    n_train = 0
    for r in te:
        expected = list(train_items.get(r["user_id"], []))
        if r["split"] == "train":
            expected.remove(r["item_id"])
            n_train += 1
        assert sorted(r["history_item_idx"]) == sorted(idx[i] for i in expected)
        assert (f"item text {r['item_id'][1:]}" in (r["user_text"] or "")) == (r["split"] != "train"
                                                                               and r["item_id"] in expected)
    assert n_train > 20


def _impression_log():
    """A mixed impression log over 8 days: a clicked impression has a click row a minute later on some
    pairs (simulator style) and none on others (OBD style: the click is the impression's value), a
    purchase row after some clicks, and some pairs are shown twice. Item ``solo`` is shown once, clicked."""
    rows, k = [], 0
    for u in range(6):
        for d in range(8):
            item = f"i{(u + d * 3) % 4}"
            if (u, d) == (1, 0):
                item = "solo"
            clicked = (u * 5 + d * 3) % 3 != 1 or item == "solo"
            t = dt.datetime(2024, 1, 1 + d, u)
            k += 1
            rows.append((f"e{k:03d}", f"u{u}", item, t.strftime("%Y-%m-%d %H:%M"), "impression", float(clicked)))
            if clicked and (u + d) % 2 == 0:
                k += 1
                rows.append((f"e{k:03d}", f"u{u}", item, (t + dt.timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M"),
                             "click", 1.0))
            if clicked and (u + 2 * d) % 3 == 0:
                k += 1
                rows.append((f"e{k:03d}", f"u{u}", item, (t + dt.timedelta(minutes=2)).strftime("%Y-%m-%d %H:%M"),
                             "purchase", 1.0))
    return rows


def _without_exposure(log, eid):
    """The time-ordered ``log`` less the impression ``eid`` and its pair's rows up to the pair's next impression."""
    pos = next(n for n, r in enumerate(log) if r[0] == eid)
    u, i = log[pos][1], log[pos][2]
    gone = {eid}
    for r in log[pos + 1:]:
        if (r[1], r[2]) == (u, i):
            if r[4] == "impression":
                break
            gone.add(r[0])
    return [r for r in log if r[0] not in gone]


def _counts_from_log(rows, cutoff, windows):
    """The user and item count features (raw counts) and global rates, recomputed from ``rows`` by hand."""
    def in_w(t, w):
        return t >= cutoff - dt.timedelta(days=w)

    user, pairs = {}, {}
    for eid, u, i, t, et, v in rows:
        cu = user.setdefault(u, {"n_events": 0, "n_interactions": 0, "n_click": 0, "n_purchase": 0, "n_impression": 0,
                                 "items": set(), **{f"n_{x}_{w}d": 0 for x in ("click", "impression") for w in windows}})
        inter = et != "impression" or v > 0
        cu["n_events"] += 1
        cu["n_interactions"] += inter
        cu["items"].add(i)
        if f"n_{et}" in cu:
            cu[f"n_{et}"] += 1
        for w in windows:
            if in_w(t, w) and f"n_{et}_{w}d" in cu:
                cu[f"n_{et}_{w}d"] += 1
        p = pairs.setdefault((i, u), {"rows": 0, "imps": 0, "ci": 0, "cr": 0, "pur": 0, "inter": 0,
                                      **{f"{x}_{w}": 0 for x in ("rows", "imps", "inter") for w in windows}})
        p["rows"] += 1
        p["imps"] += et == "impression"
        p["ci"] += et == "impression" and v > 0
        p["cr"] += et == "click"
        p["pur"] += et == "purchase"
        p["inter"] += inter
        for w in windows:
            if in_w(t, w):
                p[f"rows_{w}"] += 1
                p[f"imps_{w}"] += et == "impression"
                p[f"inter_{w}"] += inter
    item = {}
    for (i, _), p in pairs.items():
        ci = item.setdefault(i, {"n_exposures": 0, "n_clicks": 0, "n_purchases": 0, "n_users": 0, "n_interactions": 0,
                                 **{f"n_{x}_{w}d": 0 for x in ("exposures", "interactions") for w in windows}})
        ci["n_exposures"] += p["imps"] if p["imps"] else p["rows"]
        ci["n_clicks"] += max(p["ci"], p["cr"])
        ci["n_purchases"] += p["pur"]
        ci["n_users"] += 1
        ci["n_interactions"] += p["inter"]
        for w in windows:
            ci[f"n_exposures_{w}d"] += p[f"imps_{w}"] if p["imps"] else p[f"rows_{w}"]
            ci[f"n_interactions_{w}d"] += p[f"inter_{w}"]
    for cu in user.values():
        cu["n_distinct_items"] = len(cu.pop("items"))
    exp = sum(c["n_exposures"] for c in item.values())
    rates = (sum(c["n_clicks"] for c in item.values()) / exp, sum(c["n_purchases"] for c in item.values()) / exp)
    return user, item, rates


def test_train_rows_leave_their_own_exposure_out_of_the_count_features(spark):
    """Impression labels, time split: a train row's user and item count slots (clicks, interactions,
    exposures, users, windowed counts) and its item's click and purchase rates are those of the log
    without the row's own exposure (its impression, its click row and purchase row); valid and test
    rows see the whole train log. Before, the own click stayed in the user's click count and the
    item's n_clicks: item ``solo``, shown once and clicked, had n_clicks = 1 exactly as its label."""
    import math

    from causalrec.config import Config

    rows = _impression_log()
    events = make_events(spark, rows)
    items = make_items(spark, [(i, [], "c", "") for i in ("i0", "i1", "i2", "i3", "solo")])
    users = make_users(spark, [(f"u{u}", [], "", None) for u in range(6)])
    cfg = Config()
    cfg.training_set.split = "time"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.2, 0.1
    cfg.training_set.label_event_type = "impression"
    cfg.training_set.unobserved_per_observed = 0.0
    cfg.features.windows_days = [2, 30]
    cfg.features.smoothing_prior_strength = 2.0
    te = _examples(spark, events, users, items, cfg).where("observed = 1").collect()
    cutoff = min(r["event_time"] for r in te if r["split"] != "train").replace(tzinfo=None)
    held = {r["example_id"] for r in te if r["split"] != "train"}
    log = [(e, u, i, dt.datetime.fromisoformat(t), et, v) for e, u, i, t, et, v in rows]
    log = sorted((r for r in log if r[3] < cutoff and r[0] not in held), key=lambda r: (r[3], r[4] != "impression", r[0]))
    _, _, (g_ctr, g_cvr) = _counts_from_log(log, cutoff, cfg.features.windows_days)

    def without_exposure(eid):
        return _without_exposure(log, eid)

    user_slots = ["n_events", "n_interactions", "n_distinct_items", "n_impression", "n_click", "n_purchase",
                  "n_click_2d", "n_impression_2d", "n_click_30d"]
    item_slots = ["n_exposures", "n_interactions", "n_clicks", "n_purchases", "n_users", "n_exposures_2d",
                  "n_interactions_2d", "n_exposures_30d"]
    k, n_train, solo = 2.0, 0, None
    for r in te:
        own = r["split"] == "train"
        n_train += own
        uc, ic, _ = _counts_from_log(without_exposure(r["example_id"]) if own else log, cutoff, cfg.features.windows_days)
        cu, ci = uc.get(r["user_id"], {}), ic.get(r["item_id"], {})
        for name in user_slots:
            got = r["features"][_slot(cfg, "user", f"log1p_{name}")]
            assert got == pytest.approx(math.log1p(cu.get(name, 0)), abs=1e-5), (r["example_id"], r["split"], name)
        for name in item_slots:
            got = r["features"][_slot(cfg, "item", f"log1p_{name}")]
            assert got == pytest.approx(math.log1p(ci.get(name, 0)), abs=1e-5), (r["example_id"], r["split"], name)
        e = ci.get("n_exposures", 0)
        want_ctr = (ci.get("n_clicks", 0) + k * g_ctr) / (e + k)
        want_cvr = (ci.get("n_purchases", 0) + k * g_cvr) / (e + k)
        assert r["features"][_slot(cfg, "item", "click_rate")] == pytest.approx(want_ctr, abs=1e-5), r["example_id"]
        assert r["features"][_slot(cfg, "item", "purchase_rate")] == pytest.approx(want_cvr, abs=1e-5), r["example_id"]
        if r["item_id"] == "solo":
            solo = r
    assert n_train > 20 and len(te) - n_train > 5
    # the item shown once: nothing of it is left for its own (clicked, train) row to read
    assert solo["split"] == "train" and solo["outcome"] == 1.0
    assert solo["features"][_slot(cfg, "item", "log1p_n_clicks")] == 0.0
    assert solo["features"][_slot(cfg, "item", "log1p_n_users")] == 0.0
    assert len({len(r["features"]) for r in te}) == 1


def test_training_examples_record_the_id_index_version_they_were_indexed_with(ctx, spark, monkeypatch):
    """The stage writes id_index, then training_examples, in two commits. The training_examples commit
    records the id_index version its rows were indexed with, so a rerun that fails between the two
    (here: with a new user u2, who shifts u3 from index 1 to 2) leaves the pair readable as it was:
    train takes the recorded version (table_stats -> every checkpoint's meta.json), not the current one,
    which is one commit ahead of the rows. A run that completes records its own version."""
    import causalrec.training_set as T
    from causalrec.schemas import EXPOSURE_PROPENSITY, conform
    from causalrec.train.job import table_stats

    store = ctx.store
    items = make_items(spark, [("i1", [], "c", "item 1")])
    store.write(make_events(spark, [("e1", "u1", "i1", "2024-01-01 10:00", "rating", 4)]), "events", spec=EVENTS)
    store.write(items, "items", spec=ITEMS)
    store.write(spark.createDataFrame([("u1", "i1", 1, None, 0.5, 0.5, "hand", 1.0)],
                                      EXPOSURE_PROPENSITY.spark_schema()), "exposure_propensity")

    def users(ids):
        store.write(make_users(spark, [(u, [], u, None) for u in ids]), "users", "overwrite", spec=USERS)

    def one_row_per_user(events, users_, items_, exposure, treatment, id_index, cfg, mcar=None, return_layout=False):
        # a stand-in for the real build: one test row per user, indexed with the id_index it is given
        u = id_index.where("kind = 'user'").select(F.col("id").alias("user_id"), F.col("idx").alias("user_idx"))
        rows = conform(u.select(F.concat(F.lit("e_"), "user_id").alias("example_id"), F.lit("test").alias("split"),
                                "user_id", F.lit("i1").alias("item_id"), "user_idx", F.lit(0).alias("item_idx"),
                                F.lit(1).alias("observed"), F.lit(4.0).alias("label"),
                                F.lit(1.0).alias("exposure_propensity"), F.lit(False).alias("is_mcar")),
                       TRAINING_EXAMPLES)
        return (rows, ["user:a", "item:b"]) if return_layout else rows

    def recorded():
        return T.recorded_id_index_version(store.commit_metadata("training_examples"))

    monkeypatch.setattr(T, "build_training_examples", one_row_per_user)
    ctx.cfg.training_set.files_per_split = 1
    users(["u1", "u3"])
    assert T.run(ctx)["id_index_version"] == 0
    assert recorded() == 0 and store.version("id_index") == 0
    # and the names of the features slots, which train copies into the checkpoints for scoring
    assert T.recorded_feature_names(store.commit_metadata("training_examples")) == ["user:a", "item:b"]

    def fail(*a, **k):
        raise RuntimeError("killed between id_index and training_examples")

    users(["u1", "u2", "u3"])
    monkeypatch.setattr(T, "build_training_examples", fail)
    with pytest.raises(RuntimeError, match="killed between"):
        T.run(ctx)
    assert store.version("id_index") == 1  # the new index committed; the rows did not
    rows = {r["user_id"]: r["user_idx"] for r in store.read("training_examples").collect()}
    assert rows == {"u1": 0, "u3": 1}  # still id_index version 0's numbering
    assert recorded() == 0
    assert table_stats(ctx.cfg)["id_index_version"] == 0  # what the checkpoints will record
    assert table_stats(ctx.cfg)["shape"]["n_users"] == 2

    monkeypatch.setattr(T, "build_training_examples", one_row_per_user)  # the rerun completes
    assert T.run(ctx)["id_index_version"] == 2
    assert recorded() == 2 and table_stats(ctx.cfg)["id_index_version"] == 2
    assert {r["user_id"]: r["user_idx"] for r in store.read("training_examples").collect()} == {
        "u1": 0, "u2": 1, "u3": 2}


def test_training_set_refuses_propensities_fitted_under_another_split(ctx, spark):
    """The propensity stage records the split settings its models learned under; a training set
    built with other ones (a stage run on its own with another --set) stops with a message naming
    each setting, before writing anything, while the same settings pass."""
    from causalrec.training_set import check_propensity_split, split_settings
    from causalrec.training_set import run as training_set

    table = spark.createDataFrame([("u1", "i1", 1, 0.5)], "user_id string, item_id string, observed int, p double")
    ctx.store.write(table, "exposure_propensity", "overwrite", metadata={"split_settings": split_settings(ctx.cfg)})
    check_propensity_split(ctx.store, ctx.cfg)  # the same settings: no error
    ctx.cfg.training_set.split, ctx.cfg.training_set.test_fraction = "time", 0.3
    with pytest.raises(ValueError) as err:
        training_set(ctx)
    msg = str(err.value)
    assert "training_set.split: fitted 'given', now 'time'" in msg and "training_set.test_fraction: fitted 0.2, now 0.3" in msg
    assert "valid_fraction" not in msg and "Rerun the propensity stage" in msg
    assert not ctx.store.exists("training_examples") and not ctx.store.exists("id_index")


def test_propensity_split_check_reads_both_tables_and_the_newest_commit_with_settings(ctx, spark):
    """The propensity stage writes exposure_propensity, then treatment_propensity, in separate commits: a
    run that fails between them leaves a new exposure table beside a treatment table fitted under another
    split, which the guard refuses. A later commit without causalrec metadata (compaction, a plain append)
    does not hide the settings the table's rows were fitted under."""
    from causalrec.training_set import check_propensity_split, split_settings

    table = spark.createDataFrame([("u1", "i1", 1, 0.5)], "user_id string, item_id string, observed int, p double")
    given = {"split_settings": split_settings(ctx.cfg)}
    ctx.cfg.training_set.split = "time"
    time_ = {"split_settings": split_settings(ctx.cfg)}
    for name in ("exposure_propensity", "treatment_propensity"):
        ctx.store.write(table, name, "overwrite", metadata=given)
    # `causalrec propensity --set training_set.split=time` writes exposure_propensity, then fails
    ctx.store.write(table, "exposure_propensity", "overwrite", metadata=time_)
    with pytest.raises(ValueError, match=r"treatment_propensity .*training_set.split: fitted 'given', now 'time'"):
        check_propensity_split(ctx.store, ctx.cfg)
    ctx.store.write(table, "treatment_propensity", "overwrite", metadata=time_)
    check_propensity_split(ctx.store, ctx.cfg)  # both fitted under this split
    # the exposure table refitted under split=given, then a commit that records no settings on top
    ctx.store.write(table, "exposure_propensity", "overwrite", metadata=given)
    ctx.store.write(table, "exposure_propensity", "append")
    assert ctx.store.commit_metadata("exposure_propensity", 1) == []
    with pytest.raises(ValueError, match=r"exposure_propensity .*training_set.split: fitted 'given', now 'time'"):
        check_propensity_split(ctx.store, ctx.cfg)


def test_propensity_check_refuses_tables_of_different_runs_under_the_same_split(ctx, spark):
    """Same split settings, but a propensity run (on new events) that failed after its exposure_propensity
    commit: its treatment_propensity is the last run's, keyed by event_ids the new events do not have, and
    the training set would get a null treatment propensity on every row. The two tables' run ids differ,
    so the training set refuses them; tables without run ids (written before they were recorded) pass."""
    from causalrec.storage.stage_runs import RUN_KEY, TablesOutOfStep
    from causalrec.training_set import check_propensity_split, split_settings

    table = spark.createDataFrame([("u1", "i1", 1, 0.5)], "user_id string, item_id string, observed int, p double")
    settings = {"split_settings": split_settings(ctx.cfg)}
    for name in ("exposure_propensity", "treatment_propensity"):
        ctx.store.write(table, name, "overwrite", metadata=settings)
    check_propensity_split(ctx.store, ctx.cfg)  # no run ids recorded: passes
    for name in ("exposure_propensity", "treatment_propensity"):
        ctx.store.write(table, name, "overwrite", metadata={**settings, RUN_KEY: "run1"})
    check_propensity_split(ctx.store, ctx.cfg)
    ctx.store.write(table, "exposure_propensity", "overwrite", metadata={**settings, RUN_KEY: "run2"})
    ctx.store.write(table, "exposure_propensity", "append")  # a commit without metadata does not hide it
    with pytest.raises(TablesOutOfStep, match=r"exposure_propensity \(.*\) is from propensity run run2; "
                                              r"treatment_propensity \(.*\) is from propensity run run1"):
        check_propensity_split(ctx.store, ctx.cfg)


def _top_share_and_pct(log, tokens, all_items):
    """(user -> top_attribute_share, item -> popularity_pct) recomputed from ``log`` by hand: the largest count of
    the user's interactions with items carrying one token over all their interactions (0 without tokens), and
    the item's rank by (interactions desc, exposures desc, item_id) over the number of items."""
    n_u, n_ut = {}, {}
    for _, u, i, _, et, v in log:
        if et != "impression" or v > 0:
            n_u[u] = n_u.get(u, 0) + 1
            for t in tokens.get(i, ()):
                n_ut[(u, t)] = n_ut.get((u, t), 0) + 1
    share = {u: max((c for (uu, _), c in n_ut.items() if uu == u), default=0) / n for u, n in n_u.items()}
    _, ic, _ = _counts_from_log(log, dt.datetime.max, [])
    order = sorted(all_items, key=lambda i: (-ic.get(i, {}).get("n_interactions", 0),
                                             -ic.get(i, {}).get("n_exposures", 0), i))
    return share, {i: (n + 1) / len(order) for n, i in enumerate(order)}


def test_train_rows_leave_their_own_exposure_out_of_top_attribute_share_and_popularity_pct(spark):
    """Impression labels, time split: a train row's user ``top_attribute_share`` and item ``popularity_pct``
    are those of the log without its own exposure; valid and test rows see the whole train log. Before, the
    own click stayed in both: u9 clicked ``red`` three times (the last one its train row) and ``blue`` twice,
    so its share read 3/5 where the other four clicks give 2/4 (``red`` and ``blue`` tied on top); ``hot``
    (4 clicked impressions) ranked 5th of 10 items, where without its last one (a train row) it has 3
    interactions and 3 exposures: behind ``warm`` (3 interactions, 5 exposures), still ahead of ``red``
    (3, 3: tie broken by item id), so 6th: pct 6/10, not 5/10."""
    from causalrec.config import Config

    rows = _impression_log()
    rows += [(f"r{n}", "u9", "red" if n in (0, 2, 4) else "blue", f"2024-01-0{1 + n} 09:00", "impression", 1.0)
             for n in range(5)]
    # hot: 4 clicked impressions (the last by u8, in train); warm: 3 clicked and 2 unclicked
    rows += [(f"h{n}", f"u{6 + n % 2}", "hot", f"2024-01-0{1 + n} 10:00", "impression", 1.0) for n in range(3)]
    rows += [("h3", "u8", "hot", "2024-01-05 11:00", "impression", 1.0)]
    rows += [(f"w{n}", "u7", "warm", f"2024-01-0{1 + n} 12:00", "impression", float(n < 3)) for n in range(5)]
    rows += [(f"x{n}", "u6", "i0", f"2024-01-0{6 + n} 08:00", "impression", float(n % 2)) for n in range(3)]
    tokens = {"i0": ["color:red", "size:s", "category:a"], "i1": ["color:red", "category:b"],
              "i2": ["color:blue", "size:s"], "i3": ["color:blue", "category:b"], "solo": [],
              "red": ["color:red"], "blue": ["color:blue"], "hot": ["size:l"], "warm": ["size:l"]}
    item_rows = [(i, [t for t in ts if not t.startswith("category:")],
                  next((t[len("category:"):] for t in ts if t.startswith("category:")), None), "") for i, ts in tokens.items()]
    events = make_events(spark, rows)
    items = make_items(spark, item_rows + [("unseen", ["size:l"], None, "")])
    users = make_users(spark, [(f"u{u}", [], "", None) for u in range(10)])
    cfg = Config()
    cfg.training_set.split = "time"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.2, 0.1
    cfg.training_set.label_event_type = "impression"
    cfg.training_set.unobserved_per_observed = 0.0
    cfg.features.windows_days = [30]
    te = _examples(spark, events, users, items, cfg).where("observed = 1").collect()
    cutoff = min(r["event_time"] for r in te if r["split"] != "train").replace(tzinfo=None)
    held = {r["example_id"] for r in te if r["split"] != "train"}
    log = [(e, u, i, dt.datetime.fromisoformat(t), et, v) for e, u, i, t, et, v in rows]
    log = sorted((r for r in log if r[3] < cutoff and r[0] not in held), key=lambda r: (r[3], r[4] != "impression", r[0]))
    all_items = set(tokens) | {"unseen"}
    full_share, full_pct = _top_share_and_pct(log, tokens, all_items)

    def without_exposure(eid):
        return _without_exposure(log, eid)

    s_share, s_pct = _slot(cfg, "user", "top_attribute_share"), _slot(cfg, "item", "popularity_pct")
    changed, by_id = {"share": 0, "pct": 0}, {}
    for r in te:
        by_id[r["example_id"]] = r
        own = r["split"] == "train"
        share, pct = _top_share_and_pct(without_exposure(r["example_id"]), tokens, all_items) if own else (full_share, full_pct)
        want_share, want_pct = share.get(r["user_id"], 0.0), pct[r["item_id"]]
        assert r["features"][s_share] == pytest.approx(want_share, abs=1e-6), (r["example_id"], r["split"])
        assert r["features"][s_pct] == pytest.approx(want_pct, abs=1e-6), (r["example_id"], r["split"])
        changed["share"] += own and want_share != pytest.approx(full_share.get(r["user_id"], 0.0), abs=1e-6)
        changed["pct"] += own and want_pct != pytest.approx(full_pct[r["item_id"]], abs=1e-6)
    assert changed["share"] > 3 and changed["pct"] > 3, changed
    # the two rows the docstring walks through
    assert by_id["r4"]["split"] == "train" and full_share["u9"] == pytest.approx(3 / 5)
    assert by_id["r4"]["features"][s_share] == pytest.approx(2 / 4, abs=1e-6)
    assert by_id["h3"]["split"] == "train" and full_pct["hot"] == pytest.approx(5 / 10)
    assert by_id["h3"]["features"][s_pct] == pytest.approx(6 / 10, abs=1e-6)


def test_own_exposure_counts_top_share_and_rank_without_the_exposure(spark):
    """The values :func:`own_exposure_counts` hands the training set for its two non-count slots. u1 clicked
    A (tokens x, y) three times, B (z) three times and C (w) once: its share is 3/7 (x, y and z tied). Without
    A's last click x and y fall to 2, z keeps 3: 3/6, which only a look past the user's top M = 2 tokens
    (x, y by name) finds. A and B (3 interactions, 4 exposures with u2's unclicked ones) rank 1 and 2 by id of
    4 items; without that click A falls behind B (pct 2/4), and so it does without u2's unclicked exposure
    (an exposure breaks ties); C without its one exposure ties unseen D at (0, 0) and stays 3rd by id."""
    from causalrec.config import Config
    from causalrec.features.job import build_features
    from causalrec.training_set import own_exposure_counts

    rows = [(f"{i.lower()}{d}", "u1", i, f"2024-01-0{d} 10:00", "impression", 1.0) for i in "AB" for d in (1, 2, 3)]
    rows += [("c1", "u1", "C", "2024-01-04 10:00", "impression", 1.0), ("d0", "u2", "A", "2024-01-04 11:00", "impression", 0.0),
             ("e0", "u2", "B", "2024-01-04 11:00", "impression", 0.0)]
    events = make_events(spark, rows)
    items = make_items(spark, [("A", ["x", "y"], None, ""), ("B", ["z"], None, ""), ("C", ["w"], None, ""),
                               ("D", ["w"], None, "")])
    users = make_users(spark, [("u1", [], "", None), ("u2", [], "", None)])
    cfg = Config()
    cut = "2024-01-10T00:00:00"
    ft = build_features(events, users, items, cfg, cutoff=cut)
    full = {r["item_id"]: r["popularity_pct"] for r in ft.items.collect()}
    assert full == {"A": 0.25, "B": 0.5, "C": 0.75, "D": 1.0}
    assert {r["user_id"]: r["top_attribute_share"] for r in ft.users.collect()}["u1"] == pytest.approx(3 / 7)
    own = {r["example_id"]: r["_own_counts"] for r in own_exposure_counts(
        events, cut, ["impression"], [7], items=items, item_features=ft.items).collect()}
    assert own["a3"]["u_loo_top_attribute_share"] == pytest.approx(3 / 6)
    assert own["b3"]["u_loo_top_attribute_share"] == pytest.approx(3 / 6)  # z and x, y all at 3 of 6
    assert own["c1"]["u_loo_top_attribute_share"] == pytest.approx(3 / 6)
    assert own["d0"]["u_loo_top_attribute_share"] == 0.0  # u2 never clicked: no tokens, as in the vector
    assert own["a3"]["i_loo_popularity_pct"] == pytest.approx(2 / 4)
    assert own["b3"]["i_loo_popularity_pct"] == pytest.approx(2 / 4)
    assert own["c1"]["i_loo_popularity_pct"] == pytest.approx(3 / 4)
    assert own["d0"]["i_loo_popularity_pct"] == pytest.approx(2 / 4)  # A at (3, 3) behind B at (3, 4)
    assert own["e0"]["i_loo_popularity_pct"] == pytest.approx(2 / 4)  # B at (3, 3): still behind A


def test_training_histories_are_distinct_items_cut_after_the_own_item_leaves(spark):
    """A train row's history follows the serving rule: the user's distinct recent items (one entry per item,
    at its latest interaction; here u's last item is rated twice), its own item left out, *then* cut to
    ``features.history_length``, so it holds as many items as a served candidate's; valid/test rows keep
    the user's first ``history_length`` distinct train items."""
    from causalrec.config import Config

    rows = [(f"e{u}_{d}", f"u{u}", f"i{(u * 5 + d) % 7}", f"2024-01-0{d + 1} {u:02d}:00", "rating", 1 + (u + d) % 5)
            for u in range(10) for d in range(5)]
    rows += [(f"r{u}", f"u{u}", f"i{(u * 5 + 2) % 7}", f"2024-01-03 {u:02d}:30", "rating", 4) for u in range(10)]
    events = make_events(spark, rows)
    items = make_items(spark, [(f"i{j}", [], "c", f"item text {j}") for j in range(7)])
    users = make_users(spark, [(f"u{u}", [], "", None) for u in range(10)])
    cfg = Config()
    cfg.features.history_length = 2
    cfg.training_set.split = "time"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.2, 0.2
    cfg.training_set.unobserved_per_observed = 0.0
    te = _examples(spark, events, users, items, cfg).where("observed = 1").collect()
    idx = {r["item_id"]: r["item_idx"] for r in te}
    last = {}  # (user, item) -> latest train event time: the feature events
    for r in te:
        if r["split"] == "train":
            last[(r["user_id"], r["item_id"])] = max(r["event_time"], last.get((r["user_id"], r["item_id"]), r["event_time"]))
    recent = {}
    for (u, i), t in sorted(last.items(), key=lambda kv: kv[1], reverse=True):
        recent.setdefault(u, []).append(i)
    n_cut = 0
    for r in te:
        distinct = recent.get(r["user_id"], [])
        others = [i for i in distinct if i != r["item_id"]] if r["split"] == "train" else distinct
        assert list(r["history_item_idx"]) == [idx[i] for i in others[:2]], (r["example_id"], distinct)
        n_cut += r["split"] == "train" and len(distinct) > 2 and r["item_id"] in distinct[:2]
        text = r["user_text"] or ""
        assert text.endswith("Recently: " + "; ".join(f"item text {i[1:]}" for i in others[:2])) or not others
    assert n_cut > 5  # rows whose own item was among the first two: the third item fills its place


def test_feature_layout_names_every_slot_of_the_features_vector(spark):
    """build_training_examples' layout (what the training_examples commit records) has one unique name per
    ``features`` slot, in order: user vector, item vector, pair vector."""
    from causalrec.config import Config
    from causalrec.training_set import build_id_index, build_training_examples

    events = make_events(spark, [("e1", "u1", "i1", "2024-01-01 10:00", "rating", 4),
                                 ("e2", "u2", "i2", "2024-01-02 10:00", "rating", 2)])
    items = make_items(spark, [("i1", ["color:red"], "c", "a"), ("i2", ["color:blue"], "c", "b")])
    users = make_users(spark, [("u1", ["gender:women"], "", None), ("u2", [], "", None)])
    from causalrec.schemas import EXPOSURE_PROPENSITY

    exposure = spark.createDataFrame([("u1", "i1", 1, None, 0.5, 0.5, "hand", 1.0),
                                      ("u2", "i2", 1, None, 0.5, 0.5, "hand", 1.0)], EXPOSURE_PROPENSITY.spark_schema())
    cfg = Config()
    cfg.training_set.split = "random_user"
    cfg.training_set.unobserved_per_observed = 0.0
    ex, layout = build_training_examples(events, users, items, exposure, None, build_id_index(spark, users, items, events),
                                         cfg, return_layout=True)
    assert len(set(layout)) == len(layout) == len(ex.first()["features"])
    assert "user:attr=gender:women" in layout and "item:attr=color:red" in layout and layout[-1].startswith("pair:")


def test_ids_without_a_feature_row_get_the_tables_no_activity_vector(spark):
    """A user or item with no feature row (not in its dimension table, no visible event: an unknown or
    held-out id, or a new one at serving) got an all-zero vector, while a listed one without activity
    gets the tables' own encoding: recency at the 10-year cap, the global smoothed rates, the tail's
    popularity share. Zeros read as "active at the cutoff" and "more popular than the top item"."""
    from causalrec.config import Config
    from causalrec.features.job import build_features
    from causalrec.propensity.job import with_vectors
    from causalrec.training_set import with_feature_vectors

    cfg = Config()
    cfg.features.windows_days = [7]
    cfg.features.smoothing_prior_strength = 2.0
    events = make_events(spark, [
        ("e1", "u1", "i1", "2024-01-01 10:00", "impression", 1), ("e2", "u1", "i1", "2024-01-01 10:01", "click", 1),
        ("e3", "u1", "i2", "2024-01-02 10:00", "impression", 0), ("e4", "u2", "i1", "2024-01-03 10:00", "impression", 0),
        ("e5", "u2", "i2", "2024-01-03 11:00", "rating", 4), ("e6", "u1", "i1", "2024-01-04 11:00", "rating", 1),
    ])
    items = make_items(spark, [("i1", [], "c", "x"), ("i2", [], "c", "y"), ("i3", [], "c", "z")])  # i3: no events
    users = make_users(spark, [("u1", [], "", None), ("u2", [], "", None), ("u3", [], "", None)])  # u3: no events
    ft = build_features(events, users, items, cfg, cutoff="2024-01-10T00:00:00")
    # listed without activity (u3, i3) against unknown to both the tables and the events (u9, i9)
    pairs = spark.createDataFrame([("u3", "i3"), ("u9", "i9")], "user_id string, item_id string")
    got = {r["user_id"]: list(r["features"]) for r in with_feature_vectors(pairs, ft, events, items, cfg).collect()}
    nu, ni = len(ft.user_names), len(ft.item_names)
    assert got["u9"][:nu + ni] == pytest.approx(got["u3"][:nu + ni], abs=1e-6)
    user, item = dict(zip(ft.user_names, got["u9"][:nu])), dict(zip(ft.item_names, got["u9"][nu:nu + ni]))
    assert user["recency_years"] == 10.0
    # at zero trials the global rates: 1 click in 4 exposures (3 impressions and u2's rating of i2, which
    # had no impression row), rating mean (4 + 1) / 2; the tail's popularity share
    assert (item["click_rate"], item["rating_mean"], item["popularity_pct"]) == pytest.approx((1 / 4, 2.5, 1.0), abs=1e-6)
    # the propensity stage's vectors: the same defaults, given by the same tables
    cold = ft.cold_vectors(cfg.features.smoothing_prior_strength)
    vec = {r["user_id"]: (list(r["uvec"]), list(r["ivec"])) for r in with_vectors(pairs, ft.users, ft.items, cold).collect()}
    assert vec["u9"][0] == pytest.approx(vec["u3"][0], abs=1e-6) and vec["u9"][1] == pytest.approx(vec["u3"][1], abs=1e-6)
    assert vec["u9"][0] == pytest.approx(got["u9"][:nu], abs=1e-6)


def test_training_files_hold_their_rows_in_an_order_set_by_the_rows_not_the_plan(spark):
    """The same examples arriving through differently partitioned plans (another join strategy, AQE, a
    cluster) are laid out identically, file for file and row for row: training then reads the same
    batches, so a model does not change because Spark planned a join another way."""
    from causalrec.training_set import files_layout

    rows = [(f"e{k:03d}", ("train", "valid", "test")[k % 3], k) for k in range(300)]
    df = spark.createDataFrame(rows, "example_id string, split string, v int")

    def layout(frame):
        parts = files_layout(frame, 2).rdd.glom().collect()
        return sorted([r["example_id"] for r in p] for p in parts if p)

    a = layout(df.repartition(7, "v"))
    b = layout(df.orderBy(F.desc("v")).coalesce(1))
    assert a == b and len(a) == 6 and sum(map(len, a)) == 300
    assert all(p != sorted(p) for p in a)  # a hash order, not the ids' (which may follow time)
