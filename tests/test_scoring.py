"""Bulk scoring: Ray Data actor pool -> Delta, atomic under failure, idempotent on rerun,
and the two-tower cache path scores exactly what the plain forward pass scores."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from causalrec.schemas import CANDIDATES, ID_INDEX, ITEMS, USERS

N_USERS, N_ITEMS = 12, 15


def _tables(spark, store, n_cands=8):
    users = [(f"u{u}", None, f"user {u} likes coats", None) for u in range(N_USERS)]
    items = [(f"i{i}", None, "coat", f"wool coat number {i}", 10.0) for i in range(N_ITEMS)]
    # i14 is cold: candidates may contain it but the id index does not
    idx = [("user", f"u{u}", u) for u in range(N_USERS)] + [("item", f"i{i}", i) for i in range(N_ITEMS - 1)]
    cands = [(f"u{u}", f"i{(u + j) % N_ITEMS}", "popularity", ["popularity"], 1.0)
             for u in range(N_USERS) for j in range(n_cands)]
    store.write(spark.createDataFrame(users, "user_id string, attributes array<string>, text string, segment string"),
                "users", mode="overwrite", spec=USERS)
    store.write(spark.createDataFrame(items, "item_id string, attributes array<string>, category string, "
                                             "text string, price double"), "items", mode="overwrite", spec=ITEMS)
    store.write(spark.createDataFrame(idx, "kind string, id string, idx int"), "id_index", mode="overwrite",
                spec=ID_INDEX)
    store.write(spark.createDataFrame(cands, "user_id string, item_id string, source string, sources array<string>, "
                                             "source_score double"), "candidates", mode="overwrite", spec=CANDIDATES)
    return len(cands)


def _mf_checkpoint(tmp_path, uplift=True):
    import torch

    from causalrec.models import build_model
    from causalrec.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    mc = {"model": "mf", "task": "click", "n_users": N_USERS, "n_items": N_ITEMS - 1, "dim": 8, "uplift": uplift}
    model = build_model(mc)
    return save_checkpoint(tmp_path / "ckpt", model, mc, {"run_id": "r1"}), model


def _scores(store):
    t = store.read_arrow("scores").to_pandas()
    return t.sort_values(["user_id", "item_id"]).reset_index(drop=True)


def test_scoring_ray_atomic_and_idempotent(ctx, spark, tmp_path, ray_local):
    from causalrec.scoring import CheckpointLoader, run

    store = ctx.store
    n = _tables(spark, store)
    path, model = _mf_checkpoint(tmp_path)
    ctx.cfg.scoring.batch_size = 16
    ctx.cfg.scoring.num_actors = 2
    ctx.cfg.scoring.cpus_per_actor = 0.25

    out = run(ctx, loader=CheckpointLoader(path), model_version="v1")
    assert out["rows_out"]["scores"] == n
    first = _scores(store)
    assert len(first) == n and not first.duplicated(["user_id", "item_id"]).any()
    assert (first["model_version"] == "v1").all() and first["uplift"].notna().all()
    # relevance and uplift are the checkpoint's own predictions (cold item -> unknown row)
    import torch

    from causalrec.models.featurize import Featurizer

    probe = first.head(20).copy()
    probe["user_idx"] = probe["user_id"].str[1:].astype(int)
    probe["item_idx"] = [int(i[1:]) if int(i[1:]) < N_ITEMS - 1 else -1 for i in probe["item_id"]]
    with torch.no_grad():
        ref = model.eval()(Featurizer({"model": "mf", "n_users": N_USERS, "n_items": N_ITEMS - 1})(probe))
    np.testing.assert_allclose(probe["relevance"], ref["relevance"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(probe["uplift"], ref["uplift"].numpy(), rtol=1e-4, atol=1e-6)
    v1 = store.version("scores")

    # a job that dies midway (an actor raises on its second batch: 6 batches of 16 over 2 actors, so one
    # actor gets a second, after a batch it scored) leaves scores at v1
    scored = tmp_path / "scored_batches"
    scored.mkdir()

    def failing_loader():
        m, feat, mc = CheckpointLoader(path)()

        class Boom(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner, self.calls = m, 0

            def forward(self, batch):
                self.calls += 1
                if self.calls == 2:
                    raise RuntimeError("simulated crash on an actor's second batch")
                (scored / f"{os.getpid()}-{self.calls}").touch()
                return self.inner(batch)

        return Boom(), feat, mc

    with pytest.raises(Exception, match="simulated crash"):
        run(ctx, loader=failing_loader, model_version="v2")
    assert any(scored.iterdir())  # the crash came after a batch was scored, not before any
    assert store.version("scores") == v1
    after_crash = _scores(store)
    pd.testing.assert_frame_equal(after_crash, first)

    # a rerun produces the same rows, no duplicates
    run(ctx, loader=CheckpointLoader(path), model_version="v1")
    again = _scores(store)
    assert store.version("scores") == v1 + 1
    pd.testing.assert_frame_equal(again.drop(columns="scored_at"), first.drop(columns="scored_at"))


def test_two_tower_cache_matches_forward_and_prior_uplift(tmp_path):
    """In-process (no Ray): the cached item/user tower path equals model.forward; a model
    without uplift heads takes the per-item prior from uplift_effects."""
    import torch

    from causalrec.item_embeddings import default_encoder_path
    from causalrec.models import build_model
    from causalrec.models.featurize import Featurizer
    from causalrec.scoring import ScoreBatch

    torch.manual_seed(0)
    enc = default_encoder_path()
    tiny = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 128, "model_type": "bert"}
    mc = {"model": "two_tower", "task": "click", "n_users": 6, "n_items": 5, "dim": 8, "uplift": True,
          "encoder_path": enc, "random_init": True, "encoder_config": tiny, "max_seq_len": 16, "history_len": 3}
    model = build_model(mc).eval()
    rows = pd.DataFrame({
        "user_id": [f"u{u}" for u in (0, 0, 0, 1, 1, 2, 5, 5)],
        "item_id": [f"i{i}" for i in (0, 1, 2, 0, 3, 4, 1, 6)],
        "user_idx": [0, 0, 0, 1, 1, 2, -1, -1],
        "item_idx": [0, 1, 2, 0, 3, 4, 1, -1],
        "history_item_idx": [[1, 2], [1, 2], [1, 2], [0], [0], None, None, None],
        "user_text": ["likes red", "likes red", "likes red", "blue fan", "blue fan", "", "new user", "new user"],
        "item_text": ["red coat", "red hat", "green boot", "red coat", "blue scarf", "grey cap", "red hat", "cold"],
    })
    feat = Featurizer(mc)
    sb = ScoreBatch(lambda: (model, feat, mc), "tt1", pd.Timestamp("2024-01-01", tz="UTC"))
    got = sb(rows.iloc[:5]).to_pandas()
    got = pd.concat([got, sb(rows.iloc[5:]).to_pandas()])  # second batch reuses cached items i1
    with torch.no_grad():
        ref = model(feat(rows))
    np.testing.assert_allclose(got["relevance"], ref["relevance"].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["uplift"], ref["uplift"].numpy(), rtol=1e-4, atol=1e-6)
    assert sb.stats["items_encoded"] == 6  # i0-i3, then only i4 and i6: i1 comes from the cache
    assert sb.stats["users_encoded"] == 4  # once per user per batch: u0, u1 | u2, u5
    # a bounded cache (least recently used out) scores the same; a batch wider than it still scores
    small = ScoreBatch(lambda: (model, feat, mc), "tt1", pd.Timestamp("2024-01-01", tz="UTC"), item_cache_max=2)
    got2 = pd.concat([small(rows.iloc[:5]).to_pandas(), small(rows.iloc[5:]).to_pandas()])
    np.testing.assert_allclose(got2["relevance"], got["relevance"], rtol=1e-5, atol=1e-6)
    assert list(small.item_cache) == ["i1", "i6"] and small.stats["items_encoded"] == 7  # i1 evicted, re-encoded

    mf_cfg = {"model": "mf", "task": "click", "n_users": 6, "n_items": 5, "dim": 4, "uplift": False}
    mf = build_model(mf_cfg).eval()
    pri = rows.assign(prior_uplift=[0.1, None, 0.3, 0.1, 0.0, -0.2, None, 0.5],
                      prior_uplift_se=[0.01, None, 0.02, 0.01, 0.0, 0.05, None, 0.1])
    out = ScoreBatch(lambda: (mf, Featurizer(mf_cfg), mf_cfg), "mf1", pd.Timestamp("2024-01-01", tz="UTC"))(pri)
    o = out.to_pandas()
    assert o["uplift"].isna().tolist() == [False, True, False, False, False, False, True, False]
    np.testing.assert_allclose(o["uplift"].dropna(), [0.1, 0.3, 0.1, 0.0, -0.2, 0.5])
    np.testing.assert_allclose(o["uplift_se"].dropna(), [0.01, 0.02, 0.01, 0.0, 0.05, 0.1])


def test_scoring_input_carries_the_training_feature_layout(ctx, spark):
    """Candidates get user vector ++ item vector ++ pair vector as of the features stage's cutoff.

    Guards train/serve skew: a model trained with features must not be served nulls or a
    vector in another order. attr_match is checked by hand on the small world of test_features.
    """
    from causalrec.features.job import run as features_run
    from causalrec.features.pair import PAIR_FEATURE_NAMES
    from causalrec.scoring import prepare_input

    store = ctx.store
    events, users, items = _small_world_written(ctx, spark)
    ctx.cfg.features.history_length = 2
    features_run(ctx)
    cands = [("u1", "i4"), ("u1", "i1"), ("u9", "i2")]
    store.write(spark.createDataFrame([(u, i, "popularity", ["popularity"], 1.0) for u, i in cands],
                                      "user_id string, item_id string, source string, sources array<string>, "
                                      "source_score double"), "candidates", mode="overwrite", spec=CANDIDATES)
    assert prepare_input(ctx) == len(cands)

    got = {(r["user_id"], r["item_id"]): list(r["features"]) for r in store.read("scoring_input").collect()}
    uf = {r["user_id"]: list(r["feature_vector"]) for r in store.read("user_features").collect()}
    itf = {r["item_id"]: list(r["feature_vector"]) for r in store.read("item_features").collect()}
    nu, ni = len(uf["u1"]), len(itf["i4"])
    assert all(v is not None and len(v) == nu + ni + len(PAIR_FEATURE_NAMES) for v in got.values())
    np.testing.assert_allclose(got[("u1", "i4")][:nu], uf["u1"], rtol=1e-6)
    np.testing.assert_allclose(got[("u1", "i4")][nu:nu + ni], itf["i4"], rtol=1e-6)
    # u1 rated i1 (red shoes), i2 (blue shoes), i3 (red hat) before the cutoff; i4 = green hat:
    # tokens color:green (0 of 3) and category:hats (1 of 3) -> attr_match 1/6
    assert got[("u1", "i4")][nu + ni] == pytest.approx(1 / 6, rel=1e-5)
    # i1 = red shoes, left out of u1's own profile: red 1 of 2, shoes 1 of 2 -> 0.5
    assert got[("u1", "i1")][nu + ni] == pytest.approx(0.5, rel=1e-5)
    # an unknown user gets the no-activity user vector training gives a user without a feature row:
    # recency at its 10-year cap, every count and statistic 0
    from causalrec.features.job import feature_names

    names = feature_names(store, "user_features")
    assert got[("u9", "i2")][:nu] == [10.0 if n == "recency_years" else 0.0 for n in names]
    np.testing.assert_allclose(got[("u9", "i2")][nu:nu + ni], itf["i2"], rtol=1e-6)


def _uplift_effects(spark, items, ips=0.05, dr=0.03, outcome=None, binary=True):
    """uplift_effects as uplift.run writes it: overall, item and segment rows, once per method."""
    import datetime as dt

    from causalrec.schemas import UPLIFT_EFFECTS

    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for m, e in (("ips", ips), ("dr", dr)):
        rows.append(("r", "overall", None, None, m, 0.01, 0.005, 0.0, 0.02, 100, 50, "{}", now, 0.05))
        for j, it in enumerate(items):
            rows.append(("r", "item", it, None, m, e + j / 100, 0.01, e + j / 100 - 0.02, e + j / 100 + 0.02,
                         10, 5, None, now, 0.05))
        rows.append(("r", "segment", None, "s1", m, 0.02, 0.01, 0.0, 0.04, 50, 25, None, now, 0.05))
    rows = [r + (outcome, binary) for r in rows]
    return spark.createDataFrame(rows, UPLIFT_EFFECTS.spark_schema())


def test_scoring_input_one_row_per_candidate_with_real_uplift_effects(ctx, spark):
    """Overall/item/segment rows x two methods must not fan candidates out: the prior is the
    item-level DR effect, one row per (user, item)."""
    from causalrec.schemas import UPLIFT_EFFECTS
    from causalrec.scoring import prepare_input

    store = ctx.store
    n = _tables(spark, store, n_cands=3)
    store.write(_uplift_effects(spark, ["i0", "i1", "i2"]), "uplift_effects", mode="overwrite", spec=UPLIFT_EFFECTS)
    assert prepare_input(ctx) == n
    si = store.read_arrow("scoring_input").to_pandas()
    assert not si.duplicated(["user_id", "item_id"]).any()
    prior = si.drop_duplicates("item_id").set_index("item_id")["prior_uplift"]
    assert prior[["i0", "i1", "i2"]].tolist() == pytest.approx([0.03, 0.04, 0.05])  # dr, not ips (0.05 ...)
    assert prior.drop(["i0", "i1", "i2"]).isna().all()  # no item-level row: no prior


def test_prepare_input_rejects_duplicated_candidates(ctx, spark):
    from causalrec.scoring import prepare_input

    store = ctx.store
    _tables(spark, store, n_cands=2)
    cands = store.read("candidates").toPandas()
    store.write(spark.createDataFrame(pd.concat([cands, cands.iloc[:1]]), store.read("candidates").schema),
                "candidates", mode="overwrite", spec=CANDIDATES)
    with pytest.raises(RuntimeError, match="one row per candidate pair"):
        prepare_input(ctx)


def _small_world_written(ctx, spark):
    """test_features' small world written to the store, with its cutoff and windows set: (events, users, items)."""
    from test_features import small_world

    from causalrec.schemas import EVENTS

    events, users, items = small_world(spark)
    for df, name, spec in ((events, "events", EVENTS), (users, "users", USERS), (items, "items", ITEMS)):
        ctx.store.write(df, name, mode="overwrite", spec=spec)
    ctx.cfg.features.cutoff = "2024-01-10T00:00:00"
    ctx.cfg.features.windows_days = [3, 30]
    return events, users, items


def _history_world(ctx, spark, extra_rows=()):
    """Ten users rating five of seven items on five days (plus ``extra_rows``), written with their feature
    tables and id_index: (events, id_index as written, training_examples built on a random_user split)."""
    from test_features import make_events, make_items, make_users

    from causalrec.features.job import run as features_run
    from causalrec.schemas import EVENTS, EXPOSURE_PROPENSITY
    from causalrec.training_set import build_id_index, build_training_examples

    rows = [(f"e{u}_{d}", f"u{u}", f"i{(u * 5 + d) % 7}", f"2024-01-0{d + 1} {u:02d}:00", "rating", 1 + (u + d) % 5)
            for u in range(10) for d in range(5)] + list(extra_rows)
    events = make_events(spark, rows)
    items = make_items(spark, [(f"i{j}", [], "c", f"item text {j}") for j in range(7)])
    users = make_users(spark, [(f"u{u}", [], f"user {u}", None) for u in range(10)])
    cfg, store = ctx.cfg, ctx.store
    cfg.training_set.split = "random_user"
    cfg.training_set.test_fraction, cfg.training_set.valid_fraction = 0.2, 0.2
    cfg.training_set.unobserved_per_observed = 0.0
    for df, name, spec in ((events, "events", EVENTS), (users, "users", USERS), (items, "items", ITEMS)):
        store.write(df, name, mode="overwrite", spec=spec)
    features_run(ctx)
    seen = [(r["user_id"], r["item_id"]) for r in events.select("user_id", "item_id").distinct().collect()]
    exposure = spark.createDataFrame([(u, i, 1, None, 0.5, 0.5, "hand", 1.0) for u, i in seen],
                                     EXPOSURE_PROPENSITY.spark_schema())
    store.write(build_id_index(spark, users, items, events), "id_index", mode="overwrite", spec=ID_INDEX)
    idx = store.read("id_index")
    return events, idx, build_training_examples(events, users, items, exposure, None, idx, cfg)


def _popular_candidates(spark, store, users):
    """One popularity candidate (item i6) per user in ``users``."""
    store.write(spark.createDataFrame([(u, "i6", "popularity", ["popularity"], 1.0) for u in users],
                                      "user_id string, item_id string, source string, sources array<string>, "
                                      "source_score double"), "candidates", mode="overwrite", spec=CANDIDATES)


def test_scoring_serves_the_users_whole_history_not_a_training_rows(ctx, spark):
    """A train row's history leaves out its own item (a label proxy); served candidates must not inherit
    that: a user whose latest row is a train row is served every recent item, most recent first, and
    its "Recently" text, built by the training set's helper from user_features, not from one example row."""
    from causalrec.schemas import TRAINING_EXAMPLES
    from causalrec.scoring import prepare_input

    store = ctx.store
    events, idx, te = _history_world(ctx, spark)
    store.write(te, "training_examples", mode="overwrite", spec=TRAINING_EXAMPLES)
    te = store.read("training_examples").where("observed = 1").collect()
    item_idx = {r["id"]: r["idx"] for r in idx.where("kind = 'item'").collect()}
    train_users = sorted({r["user_id"] for r in te if r["split"] == "train"})
    assert train_users and all(r["split"] == "train" for r in te if r["user_id"] in train_users)
    _popular_candidates(spark, store, train_users)
    assert prepare_input(ctx) == len(train_users)

    served = {r["user_id"]: r for r in store.read("scoring_input").collect()}
    for u in train_users:
        recent_first = [r["item_id"] for r in sorted(events.where(f"user_id = '{u}'").collect(),
                                                      key=lambda r: r["event_time"], reverse=True)]
        assert list(served[u]["history_item_idx"]) == [item_idx[i] for i in recent_first]
        assert served[u]["user_text"] == (f"user {u[1:]}. Recently: "
                                          + "; ".join(f"item text {i[1:]}" for i in recent_first))
        # what the old path served: the latest train row's history, which lacks that row's own item
        latest = max((r for r in te if r["user_id"] == u), key=lambda r: (r["event_time"], r["example_id"]))
        assert item_idx[latest["item_id"]] not in latest["history_item_idx"]


def test_scoring_reads_the_id_index_version_the_checkpoint_was_trained_with(ctx, spark, tmp_path, caplog,
                                                                           monkeypatch):
    """build_id_index numbers ids densely in sorted order: after a training_set rerun with a new user, u3
    moves from row 1 to row 2. The checkpoint records the id_index version it was trained with, and scoring
    reads that version (time travel) instead of whatever id_index is current; a version that cannot be read
    fails naming both versions; a checkpoint without the record keeps the current index, with a warning."""
    import logging
    import os

    import torch
    from deltalake import DeltaTable

    import causalrec.scoring as scoring
    from causalrec.models import build_model
    from causalrec.train.checkpoint import trained_id_index_version
    from causalrec.training_set import build_id_index

    store = ctx.store
    items = spark.createDataFrame([("i1", None, "c", "t", None)], ITEMS.spark_schema())
    users = lambda ids: spark.createDataFrame([(u, None, "", None) for u in ids], USERS.spark_schema())  # noqa: E731
    v_old = store.write(build_id_index(spark, users(["u1", "u3"]), items), "id_index", mode="overwrite", spec=ID_INDEX)
    v_new = store.write(build_id_index(spark, users(["u1", "u2", "u3"]), items), "id_index", mode="overwrite",
                        spec=ID_INDEX)
    assert (v_old, v_new) == (0, 1)
    store.write(users(["u1", "u2", "u3"]), "users", mode="overwrite", spec=USERS)
    store.write(spark.createDataFrame([(u, "i1", "popularity", ["popularity"], 1.0) for u in ("u1", "u2", "u3")],
                                      "user_id string, item_id string, source string, sources array<string>, "
                                      "source_score double"), "candidates", mode="overwrite", spec=CANDIDATES)
    torch.manual_seed(0)
    mc = {"model": "mf", "task": "rating", "n_users": 2, "n_items": 1, "dim": 4}
    from causalrec.train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mc), mc, {"id_index_version": v_old})
    old_ckpt = save_checkpoint(tmp_path / "old", build_model(mc), mc, {})
    assert (trained_id_index_version(ckpt), trained_id_index_version(old_ckpt)) == (0, None)

    def user_idx():
        return {r["user_id"]: r["user_idx"] for r in store.read("scoring_input").collect()}

    # run() passes the checkpoint's recorded version on to prepare_input
    seen = {}

    def fake_prepare(ctx_, version, model, feature_names=None, history_length=None):
        seen.update(version=version, model=model, history_length=history_length)
        raise RuntimeError("stop after prepare_input")

    monkeypatch.setattr(scoring, "prepare_input", fake_prepare)
    with pytest.raises(RuntimeError, match="stop after prepare_input"):
        scoring.run(ctx, loader=scoring.CheckpointLoader(ckpt), model_version="v1")
    assert seen["version"] == 0 and ckpt in seen["model"] and seen["history_length"] is None  # MF: no history
    monkeypatch.undo()

    scoring.prepare_input(ctx, 0)
    assert user_idx() == {"u1": 0, "u2": -1, "u3": 1}  # the trained rows; u2 is new to the model: unknown
    # a checkpoint from before the record: today's behaviour (the current index), with a warning
    with caplog.at_level(logging.WARNING, logger="causalrec.scoring"):
        scoring.prepare_input(ctx, trained_id_index_version(old_ckpt))
    assert user_idx() == {"u1": 0, "u2": 1, "u3": 2}
    assert any("does not record the id_index version" in r.getMessage() for r in caplog.records)
    # the trained version is gone (vacuumed): fail, naming both versions, instead of scoring with version 1
    for uri in DeltaTable(store.path("id_index"), version=0).file_uris():
        os.remove(uri.removeprefix("file://"))
    with pytest.raises(RuntimeError, match=r"trained with id_index version 0, but .*id_index \(now at version 1\) "
                                           r"cannot be read at that version"):
        scoring.prepare_input(ctx, 0)
    with pytest.raises(RuntimeError, match=r"trained with id_index version 5, but .*now at version 1"):
        scoring.prepare_input(ctx, 5)


def test_train_and_serve_histories_follow_one_rule(ctx, spark):
    """Training rows and served candidates build histories the same way: the user's distinct recent items
    (one entry per item, at its latest interaction: each user rates their last item twice), a train row's
    own item left out before the cut to ``features.history_length``. Rows ranked instead of items served
    [last, last] and trained on one item fewer than served."""
    from causalrec.scoring import prepare_input

    store = ctx.store
    ctx.cfg.features.history_length = 2
    repeats = [(f"r{u}", f"u{u}", f"i{(u * 5 + 4) % 7}", f"2024-01-05 {u:02d}:30", "rating", 4) for u in range(10)]
    events, idx, te = _history_world(ctx, spark, repeats)
    te = [r for r in te.where("observed = 1 and split = 'train'").collect()]
    item_idx = {r["id"]: r["idx"] for r in idx.where("kind = 'item'").collect()}
    train_users = sorted({r["user_id"] for r in te})
    _popular_candidates(spark, store, train_users)
    assert prepare_input(ctx) == len(train_users)
    served = {r["user_id"]: r for r in store.read("scoring_input").collect()}
    for u in train_users:
        last = {}
        for r in events.where(f"user_id = '{u}'").collect():
            last[r["item_id"]] = max(r["event_time"], last.get(r["item_id"], r["event_time"]))
        distinct = sorted(last, key=last.get, reverse=True)
        assert list(served[u]["history_item_idx"]) == [item_idx[i] for i in distinct[:2]]
        assert served[u]["user_text"].endswith("Recently: " + "; ".join(f"item text {i[1:]}" for i in distinct[:2]))
        for r in (r for r in te if r["user_id"] == u):
            others = [i for i in distinct if i != r["item_id"]]
            assert list(r["history_item_idx"]) == [item_idx[i] for i in others[:2]]


def test_scoring_maps_served_features_onto_the_trained_layout_by_name(ctx, spark, tmp_path, caplog,
                                                                       monkeypatch):
    """The attribute one-hots follow the items table at each features run: one new item with a new token
    (color:amber) moves every later slot (attr=color:red from slot k to k+1). A checkpoint records the
    layout it was trained with and scoring maps the served vectors onto it by name: the model reads
    attr=color:red where it learnt it; the new token's slot is dropped; a trained slot the serving layout
    lacks is 0. Without the record the vectors are served as built, with a warning."""
    import logging

    from test_features import make_items

    import causalrec.scoring as scoring
    from causalrec.features.job import run as features_run
    from causalrec.features.job import stored_feature_tables
    from causalrec.models import build_model
    from causalrec.train.checkpoint import save_checkpoint, trained_feature_names
    from causalrec.training_set import align_features, feature_layout

    store = ctx.store
    events, users, items = _small_world_written(ctx, spark)
    features_run(ctx)
    trained = feature_layout(stored_feature_tables(store))
    cands = [("u1", "i1"), ("u1", "i4"), ("u2", "i2"), ("u3", "i3")]
    store.write(spark.createDataFrame([(u, i, "popularity", ["popularity"], 1.0) for u, i in cands],
                                      "user_id string, item_id string, source string, sources array<string>, "
                                      "source_score double"), "candidates", mode="overwrite", spec=CANDIDATES)

    def features():
        return {(r["user_id"], r["item_id"]): list(r["features"]) for r in store.read("scoring_input").collect()}

    scoring.prepare_input(ctx, None, "m", trained)
    at_training = features()  # the layouts agree: served as built
    assert all(len(v) == len(trained) for v in at_training.values())

    # the weekly model keeps serving while the daily features run sees a new item with a new token
    store.write(items.unionByName(make_items(spark, [("i6", ["color:amber"], "hats", "amber hat")])), "items",
                mode="overwrite", spec=ITEMS)
    features_run(ctx)
    served = feature_layout(stored_feature_tables(store))
    red = trained.index("item:attr=color:red")
    assert len(served) == len(trained) + 1 and served.index("item:attr=color:red") == red + 1
    scoring.prepare_input(ctx)  # today's behaviour without a recorded layout: slot `red` holds another token
    assert features()[("u1", "i1")][red] == 0.0 and at_training[("u1", "i1")][red] == 1.0

    mc = {"model": "mf", "task": "rating", "n_users": 3, "n_items": 5, "dim": 4, "n_features": len(trained)}
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mc), mc, {"id_index_version": None,
                                                                    "feature_names": trained})
    assert trained_feature_names(ckpt) == trained
    scoring.prepare_input(ctx, None, "m", trained_feature_names(ckpt))
    now = features()
    attr = [k for k, n in enumerate(trained) if ":attr=" in n]
    assert len(attr) >= 5
    for pair, v in now.items():
        assert len(v) == len(trained)
        assert [v[k] for k in attr] == [at_training[pair][k] for k in attr], pair
    assert now[("u1", "i1")][red] == 1.0

    # a trained slot the served layout lacks is 0; a served slot the model never saw is dropped
    gone = trained[:red] + ["item:attr=color:gone"] + trained[red:]
    df = spark.createDataFrame([([1.0, 2.0, 3.0],), (None,)], "features array<float>")
    out = [r["features"] for r in align_features(df, ["a", "b", "c"], ["c", "x", "a"]).collect()]
    assert out == [[3.0, 0.0, 1.0], None]
    scoring.prepare_input(ctx, None, "m", gone)
    assert [v[red] for v in features().values()] == [0.0] * len(cands)

    # a checkpoint from before the record: served as built, with a warning
    old = save_checkpoint(tmp_path / "old", build_model(mc), mc, {})
    assert trained_feature_names(old) is None
    seen = {}

    def fake_prepare(ctx_, version, model, feature_names=None, history_length=None):
        seen.update(names=feature_names)
        raise RuntimeError("stop after prepare_input")

    monkeypatch.setattr(scoring, "prepare_input", fake_prepare)
    for path in (ckpt, old):
        with caplog.at_level(logging.WARNING, logger="causalrec.scoring"), \
                pytest.raises(RuntimeError, match="stop after prepare_input"):
            scoring.run(ctx, loader=scoring.CheckpointLoader(path), model_version="v1")
        assert seen["names"] == (trained if path == ckpt else None)
    assert any("does not record the feature layout" in r.getMessage() for r in caplog.records)


def test_the_served_history_text_names_items_new_since_training(spark):
    """An item the model's id_index lacks (new since training) has no embedding row, so the id history
    leaves it out; its text is what a text model can read, and the "Recently" text dropped it too: a
    user's newest item vanished from their profile. Both lists are the history_length most recent."""
    from causalrec.training_set import indexed_history, with_history_columns

    uf = spark.createDataFrame([("u", ["i9", "i1", "i2", "i3"])], "user_id string, history_item_ids array<string>")
    iidx = spark.createDataFrame([("i1", 1), ("i2", 2), ("i3", 3)], "item_id string, item_idx int")
    texts = spark.createDataFrame([(f"i{k}", f"text {k}") for k in (1, 2, 3, 9)], "item_id string, text string")
    df = uf.select("user_id").join(indexed_history(uf, iidx, texts), "user_id", "left")
    r = with_history_columns(df, F.lit("user u"), history_length=2).first()
    assert list(r["history_item_idx"]) == [1, 2]
    assert r["user_text"] == "user u. Recently: text 9; text 1"


def test_scoring_cuts_histories_to_the_length_the_model_was_trained_with(ctx, tmp_path, monkeypatch):
    """A text model trained with features.history_length 3, served after it was raised to 5, read five
    items in its "Recently" text (the id history is cut back by the featurizer; the text was not)."""
    import json

    import causalrec.scoring as scoring
    from causalrec.train.checkpoint import META, MODEL_CONFIG

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MODEL_CONFIG).write_text(json.dumps({"model": "two_tower", "history_len": 3}))
    (ckpt / META).write_text("{}")
    ctx.cfg.features.history_length = 5
    seen = {}

    def fake_prepare(ctx_, version, model, feature_names=None, history_length=None):
        seen.update(history_length=history_length)
        raise RuntimeError("stop after prepare_input")

    monkeypatch.setattr(scoring, "prepare_input", fake_prepare)
    with pytest.raises(RuntimeError, match="stop after prepare_input"):
        scoring.run(ctx, loader=scoring.CheckpointLoader(str(ckpt)), model_version="v1")
    assert seen["history_length"] == 3
