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
    assert obs.count() + 0 <= 96 and obs.where("split = 'test'").count() > 0
    # logged treatment propensities pass through to the examples
    assert obs.where("treatment_propensity != 0.5 or treatment_propensity is null").count() == 0
    assert obs.where("outcome is null or treated is null").count() == 0
    if split == "time":
        last_train = obs.where("split = 'train'").agg(F.max("event_time")).first()[0]
        first_test = obs.where("split = 'test'").agg(F.min("event_time")).first()[0]
        assert last_train < first_test
    else:
        by_user = obs.groupBy("user_id").agg(F.countDistinct("split").alias("k"))
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
    # the logged propensities are the simulator's true P(recommended) for treated and control rows
    # alike (a control row logs P(not recommended), which the table turns back into P(recommended))
    d = {r["metric"]: r["value"] for r in ctx.store.read("propensity_diagnostics")
         .where("propensity = 'treatment' and metric like 'truth_%'").collect()}
    assert d["truth_corr"] > 0.999 and d["truth_mae"] < 1e-6, d
    # time split of the logged rows: nothing in train happens after the earliest test event
    t = obs.where("not is_mcar").groupBy("split").agg(F.min("event_time").alias("lo"), F.max("event_time").alias("hi"))
    span = {r["split"]: (r["lo"], r["hi"]) for r in t.collect()}
    assert span["train"][1] <= span["test"][0]
    assert files_per_split(ctx.store) == {"train": 2, "valid": 2, "test": 2}
    ds = check_ray_schema(request, ctx.store)
    assert ds.count() == te.count()
