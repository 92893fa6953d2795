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
