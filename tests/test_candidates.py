"""Candidate generation: bounded per user, sources recorded, consumed items excluded,
popularity de-biased by exposure propensity, text neighbours reach cold items."""
from __future__ import annotations

import datetime as dt

import pytest

from causalrec.schemas import EVENTS, ITEMS, USERS

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

# 4 categories x 8 items; items c*_7 are cold (never interacted with) and share wording with c*_0
CATS = ["coat", "boots", "hat", "scarf"]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "brown", "red"]


def _world(spark, store):
    items, events = [], []
    for c in CATS:
        for j in range(8):
            text = f"{COLOURS[j]} wool winter {c}" if j in (0, 7) else f"{COLOURS[j]} {c} model {j}"
            items.append((f"{c}_{j}", [f"category:{c}"], c, text, 10.0 + j))
    users = [(f"u{i}", [f"group:{i % 2}"], None, None) for i in range(24)]
    n = 0
    for i in range(24):
        fav = CATS[i % 4]
        liked = [f"{fav}_{j}" for j in range(1 + i % 3)] + ([f"{CATS[(i + 1) % 4]}_1"] if i % 2 else [])
        for k, it in enumerate(liked):
            events.append((f"e{n}", f"u{i}", it, T0 + dt.timedelta(hours=n), "rating", 5.0))
            n += 1
        events.append((f"e{n}", f"u{i}", f"{fav}_6", T0 + dt.timedelta(hours=n), "rating", 1.0))
        n += 1
    ev = spark.createDataFrame(
        [dict(event_id=e[0], user_id=e[1], item_id=e[2], event_time=e[3], event_date=e[3].date(),
              event_type=e[4], value=e[5], ingest_batch="b0") for e in events])
    store.write(ev, "events", mode="overwrite", spec=EVENTS)
    store.write(spark.createDataFrame(items, "item_id string, attributes array<string>, category string, "
                                              "text string, price double"), "items", mode="overwrite", spec=ITEMS)
    store.write(spark.createDataFrame(users, "user_id string, attributes array<string>, text string, "
                                             "segment string"), "users", mode="overwrite", spec=USERS)
    return events


def test_debiased_popularity_weights_by_inverse_propensity(spark):
    from causalrec.candidates import debiased_popularity

    pos = spark.createDataFrame(
        [("u1", "a"), ("u2", "a"), ("u3", "a"), ("u1", "b")], "user_id string, item_id string")
    prop = spark.createDataFrame(
        [("u1", "a", 0.9), ("u2", "a", 0.9), ("u3", "a", 0.9), ("u1", "b", 0.1)],
        "user_id string, item_id string, exposure_propensity double")
    pop = {r["item_id"]: r["pop"] for r in debiased_popularity(pos, prop, 0.01).collect()}
    # raw counts say a (3) > b (1); corrected: a = 3/0.9 = 3.33 < b = 1/0.1 = 10
    assert pop["a"] == pytest.approx(3 / 0.9)
    assert pop["b"] == pytest.approx(10.0)
    # without propensities it is the plain count
    raw = {r["item_id"]: r["pop"] for r in debiased_popularity(pos, None, 0.01).collect()}
    assert raw == {"a": 3.0, "b": 1.0}


def test_debiased_popularity_counts_a_pair_once_however_many_positive_events(spark):
    """The propensity is per (user, item) pair: a clicked and purchased impression (three positive
    events) or a re-rating counted 3/p or 2/p, and ranked 3 users' item above 4 users' one."""
    from causalrec.candidates import debiased_popularity

    rows = [(f"u{u}", "X") for u in range(3) for _ in range(3)] + [(f"u{u}", "Y") for u in range(4) for _ in range(2)]
    pos = spark.createDataFrame(rows, "user_id string, item_id string")
    prop = spark.createDataFrame([(u, i, 0.5) for u, i in set(rows)],
                                 "user_id string, item_id string, exposure_propensity double")
    got = {r["item_id"]: (r["pop"], r["n_pos"]) for r in debiased_popularity(pos, prop, 0.01).collect()}
    assert got == {"X": (pytest.approx(6.0), 3), "Y": (pytest.approx(8.0), 4)}


@pytest.mark.parametrize("order", [["u1", "u2", "u3"], ["u3", "u2", "u1"]])
def test_equal_debiased_popularities_tie_by_item_id_whatever_the_row_order(spark, order):
    """1/0.1 + 1/0.2 + 1/0.3 summed in another order differs in the last bit: the tie went to the
    item whose rows happened to sum higher instead of to the item id."""
    from causalrec.candidates import debiased_popularity, popularity_source

    props = {"u1": 0.1, "u2": 0.2, "u3": 0.3}
    prop = spark.createDataFrame([(u, i, p) for u, p in props.items() for i in ("a", "z")],
                                 "user_id string, item_id string, exposure_propensity double")
    pos = spark.createDataFrame([(u, "z") for u in order] + [(u, "a") for u in ("u1", "u2", "u3")],
                                "user_id string, item_id string").coalesce(1)
    pop = debiased_popularity(pos, prop, 0.01)
    users = spark.createDataFrame([("new",)], "user_id string")
    assert [r["item_id"] for r in popularity_source(users, pop, 1, None).collect()] == ["a"]


@pytest.mark.parametrize("cutoff_from", ["config", "stored feature tables"])
def test_candidates_see_only_events_before_the_serving_cutoff(ctx, spark, cutoff_from):
    """A backtest's later events (u2's B after the cutoff, u1's own C) made B a co-occurrence
    neighbour of u1's A and excluded C as consumed: candidates are generated as of the feature tables'
    cutoff (what scoring serves as the histories), else features.cutoff."""
    from causalrec.candidates import run

    t = lambda d: dt.datetime(2024, 1, d, tzinfo=dt.timezone.utc)  # noqa: E731
    ev = [("u1", "A", t(1)), ("u2", "A", t(2)), ("u2", "B", t(20)), ("u3", "C", t(1)), ("u4", "C", t(2)),
          ("u1", "C", t(25))]
    events = spark.createDataFrame([dict(event_id=f"e{n}", user_id=u, item_id=i, event_time=ts, event_date=ts.date(),
                                         event_type="rating", value=5.0, ingest_batch="b0")
                                    for n, (u, i, ts) in enumerate(ev)])
    store = ctx.store
    store.write(events, "events", mode="overwrite", spec=EVENTS)
    store.write(spark.createDataFrame([(i, [], "cat", f"item {i}", 1.0) for i in "ABC"], ITEMS.spark_schema()),
                "items", mode="overwrite", spec=ITEMS)
    store.write(spark.createDataFrame([(f"u{u}", [], None, None) for u in range(1, 5)], USERS.spark_schema()),
                "users", mode="overwrite", spec=USERS)
    cut = "2024-01-10T00:00:00+00:00"
    if cutoff_from == "config":
        ctx.cfg.features.cutoff = cut
    else:  # the features stage's tables, with their cutoff in the commit metadata
        for table in ("user_features", "item_features"):
            store.write(spark.createDataFrame([("x",)], "id string"), table, mode="overwrite",
                        metadata={"feature_names": ["f"], "as_of": cut})
    ctx.cfg.candidates.sources = ["popularity", "cooccurrence"]
    ctx.cfg.candidates.per_source = 3
    cached_before = spark.sparkContext._jsc.getPersistentRDDs().size()
    out = run(ctx)
    assert spark.sparkContext._jsc.getPersistentRDDs().size() == cached_before  # the stage's caches released
    assert out["as_of"] == cut
    got = [(r["item_id"], r["sources"]) for r in store.read("candidates").where("user_id = 'u1'").collect()]
    assert got == [("C", ["popularity"])]

def test_candidates_job_bounded_sources_and_exclusion(ctx, spark):
    from pyspark.sql import functions as F

    from causalrec.candidates import run

    store = ctx.store
    events = _world(spark, store)
    ctx.cfg.candidates.per_source = 5
    ctx.cfg.candidates.max_candidates = 8
    ctx.cfg.candidates.neighbours_per_item = 5
    ctx.cfg.candidates.cold_item_max_events = 0
    ctx.cfg.spark.shuffle_partitions = 2
    out = run(ctx)
    cands = store.read("candidates")
    n = out["rows_out"]["candidates"]
    assert n == cands.count() > 0
    rows = cands.collect()
    per_user: dict = {}
    for r in rows:
        per_user.setdefault(r["user_id"], []).append(r)
        assert r["source"] in r["sources"], r
    # every user gets candidates, never more than max_candidates, no duplicates
    assert len(per_user) == 24
    assert max(len(v) for v in per_user.values()) <= 8
    assert cands.select("user_id", "item_id").distinct().count() == n
    # nothing the user already rated (liked or disliked) comes back
    consumed = {(e[1], e[2]) for e in events}
    assert not [(r["user_id"], r["item_id"]) for r in rows if (r["user_id"], r["item_id"]) in consumed]
    # co-occurrence personalises: u0 liked coat_0 which co-occurs with coat_1/coat_2 in other users
    u0 = {r["item_id"]: r for r in per_user["u0"]}
    assert any("cooccurrence" in r["sources"] for r in u0.values())
    # the cold twin of an item the user liked is proposed by the text source
    cold_hits = [r for r in rows if r["item_id"].endswith("_7")]
    assert cold_hits and all("text" in r["sources"] for r in cold_hits)
    assert {r["item_id"] for r in per_user["u0"]} >= {"coat_7"}
    # category affinity proposes the favourite category's items
    assert any("affinity" in r["sources"] and r["item_id"].startswith("coat_") for r in per_user["u0"])
    # embeddings were computed once per item and are reused on rerun
    assert out["embeddings"]["encoded"] == 32
    emb = store.read("item_embeddings").select(F.size("embedding").alias("d")).distinct().collect()
    assert [r["d"] for r in emb] == [384]
    out2 = run(ctx)
    assert out2["embeddings"]["encoded"] == 0
    assert out2["rows_out"]["candidates"] == n  # idempotent: overwrite, no duplicates
    # an item gone from the catalogue leaves the embeddings table (else text neighbours could propose it)
    from causalrec.item_embeddings import ensure_item_embeddings

    left = store.read("items").where(F.col("item_id") != "coat_7")
    assert ensure_item_embeddings(ctx, left)["encoded"] == 0
    assert sorted(r[0] for r in store.read("item_embeddings").select("item_id").collect()) == sorted(
        r[0] for r in left.select("item_id").collect())


def test_merge_sources_records_best_source(spark):
    from causalrec.candidates import merge_sources

    a = spark.createDataFrame([("u", "x", 9.0), ("u", "y", 5.0)], "user_id string, item_id string, score double")
    b = spark.createDataFrame([("u", "y", 0.9), ("u", "z", 0.5)], "user_id string, item_id string, score double")
    got = {r["item_id"]: r for r in merge_sources({"popularity": a, "text": b}, 2).collect()}
    # y is rank 1 for text and rank 2 for popularity -> text ranked it highest; x and y beat z
    assert set(got) == {"x", "y"}
    assert got["y"]["source"] == "text" and got["y"]["sources"] == ["popularity", "text"]
    assert got["y"]["source_score"] == pytest.approx(0.9)
    assert got["x"]["source"] == "popularity"


@pytest.mark.parametrize("order,parts", [([0, 1, 2, 3, 4], 1), ([0, 4, 3, 2, 1], 3), ([0, 2, 4, 1, 3], 5)])
def test_text_neighbours_break_equal_similarities_by_item_id(spark, order, parts):
    """Items with the same text have the same embedding; which of them are a source's neighbours must
    not follow the embedding table's row order (it changes whenever the table is rewritten) nor how its
    rows are spread over partitions (each partition scores its sources alone)."""
    import numpy as np

    from causalrec.candidates import text_neighbours

    ids = np.array(["s", "c1", "c2", "c3", "c4"], dtype=object)
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    table = spark.createDataFrame([(str(ids[j]), [float(x) for x in emb[j]]) for j in order],
                                  "item_id string, embedding array<float>").repartition(parts)
    targets = spark.createDataFrame([(c,) for c in ("c1", "c2", "c3", "c4", "gone")], "item_id string")
    got = text_neighbours(table, targets, 2).toPandas()
    assert sorted(got.src) == ["c1", "c1", "c2", "c2", "c3", "c3", "c4", "c4", "s", "s"]  # every source, once each
    assert sorted(got.loc[got.src == "s", "dst"]) == ["c1", "c2"]
    assert sorted(got.loc[got.src == "c3", "dst"]) == ["c1", "c2"]  # never itself, ties by id
    assert sorted(got.loc[got.src == "c1", "dst"]) == ["c2", "c3"]
    assert got.sim.to_numpy() == pytest.approx(np.where(got.src == "s", 0.6, 1.0))
    every = text_neighbours(table, None, 4).toPandas()
    assert sorted(every.loc[every.src == "c1", "dst"]) == ["c2", "c3", "c4", "s"]  # no restriction: every other item


def test_popularity_and_affinity_give_n_unconsumed_items_to_heavy_users(spark):
    """A user who consumed the head of the list still gets ``n`` candidates from further down it."""
    from pyspark.sql import functions as F

    from causalrec.candidates import affinity_source, popularity_source

    pop = spark.createDataFrame([(f"i{j}", float(10 - j), 1) for j in range(6)], "item_id string, pop double, n_pos long")
    consumed = spark.createDataFrame([("u1", "i0"), ("u1", "i1"), ("u1", "i2"), ("u1", "i3"), ("u2", "i1")],
                                     "user_id string, item_id string")
    users = spark.createDataFrame([("u1",), ("u2",), ("u3",)], "user_id string")
    got = popularity_source(users, pop, 2, consumed).groupBy("user_id").agg(
        F.sort_array(F.collect_list("item_id")).alias("items")).collect()
    assert {r["user_id"]: r["items"] for r in got} == {"u1": ["i4", "i5"], "u2": ["i0", "i2"], "u3": ["i0", "i1"]}
    # the same within a category: u1 consumed the category's three best items
    items = spark.createDataFrame([(f"i{j}", "coats") for j in range(6)], "item_id string, category string")
    positives = spark.createDataFrame([("u1", "i0"), ("u2", "i1")], "user_id string, item_id string")
    aff = affinity_source(positives, items, pop, 2, consumed).collect()
    assert sorted(r["item_id"] for r in aff if r["user_id"] == "u1") == ["i4", "i5"]
    assert sorted(r["item_id"] for r in aff if r["user_id"] == "u2") == ["i0", "i2"]


def _tiny_encoder(folder, seed):
    """A 1-layer BERT with the bundled tokenizer, saved as a Hugging Face folder."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import BertConfig, BertModel

    from causalrec.item_embeddings import default_encoder_path

    folder.mkdir(parents=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(default_encoder_path()) / f, folder / f)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=64)).save_pretrained(str(folder))
    return str(folder)


def test_item_embeddings_are_keyed_on_encoder_content(ctx, spark, tmp_path):
    """Two encoders saved in same-named folders do not share cached embeddings; a table written
    with the old key (the bare folder name) is re-encoded once; the same files elsewhere key alike."""
    import shutil

    from pyspark.sql import functions as F

    from causalrec.item_embeddings import encoder_key, ensure_item_embeddings, item_text
    from causalrec.schemas import ITEM_EMBEDDINGS

    a = _tiny_encoder(tmp_path / "run-1" / "encoder", 0)
    b = _tiny_encoder(tmp_path / "run-2" / "encoder", 1)
    items = spark.createDataFrame([("A", ["x"], "cat", "a red shoe", 1.0), ("B", ["y"], "cat", "a blue hat", 1.0)],
                                  ITEMS.spark_schema())
    store = ctx.store
    old = (item_text(items).withColumn("text_hash", F.substring(F.sha1("text"), 1, 16))
           .select("item_id", F.array(F.lit(0.1).cast("float")).alias("embedding"), "text_hash",
                   F.lit("encoder").alias("encoder")))
    store.write(old, "item_embeddings", spec=ITEM_EMBEDDINGS)
    ctx.cfg.train.model_path = a
    assert ensure_item_embeddings(ctx, items)["encoded"] == 2  # old-format key: re-encoded once
    vec = lambda: {r["item_id"]: r["embedding"] for r in store.read("item_embeddings").collect()}  # noqa: E731
    va = vec()
    assert {len(v) for v in va.values()} == {8}
    assert ensure_item_embeddings(ctx, items)["encoded"] == 0
    ctx.cfg.train.model_path = b  # another encoder, same folder name
    assert ensure_item_embeddings(ctx, items)["encoded"] == 2
    assert vec()["A"] != va["A"]
    keys = {r["encoder"] for r in store.read("item_embeddings").collect()}
    assert keys == {encoder_key(b, ctx.cfg.train.max_seq_len)}
    shutil.copytree(b, tmp_path / "elsewhere" / "encoder")
    assert encoder_key(str(tmp_path / "elsewhere" / "encoder"), 64) == encoder_key(b, 64) != encoder_key(a, 64)


def test_items_without_any_text_get_no_embedding(ctx, spark, tmp_path):
    """Items with no text, category or attributes were encoded as "": all identical, so text neighbours
    and explanations put any two of them at similarity 1.00. They get no vector; an item gaining text
    later is encoded then, and one losing it leaves the table."""
    from causalrec.item_embeddings import ensure_item_embeddings

    ctx.cfg.train.model_path = _tiny_encoder(tmp_path / "enc", 0)
    schema = ITEMS.spark_schema()
    items = spark.createDataFrame([("A", None, None, "a red shoe", 1.0), ("B", None, None, None, 1.0),
                                   ("C", [], None, "   ", 1.0), ("D", None, "hats", None, 1.0)], schema)
    assert ensure_item_embeddings(ctx, items) == {"items": 2, "encoded": 2}
    ids = lambda: sorted(r[0] for r in ctx.store.read("item_embeddings").select("item_id").collect())  # noqa: E731
    assert ids() == ["A", "D"]
    assert ensure_item_embeddings(ctx, items)["encoded"] == 0  # unchanged: no rewrite
    items = spark.createDataFrame([("A", None, None, None, 1.0), ("B", None, None, "a blue hat", 1.0)], schema)
    assert ensure_item_embeddings(ctx, items) == {"items": 1, "encoded": 1}
    assert ids() == ["B"]
