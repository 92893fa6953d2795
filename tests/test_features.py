"""Feature transforms: point-in-time correctness, counts/rates on a hand-made log, popularity groups."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from causalrec.config import Config
from causalrec.features.common import cutoff_lit
from causalrec.schemas import EVENTS, ITEMS, USERS, conform

UTC = dt.timezone.utc


def make_events(spark, rows):
    """rows: (event_id, user, item, 'YYYY-MM-DD HH:MM', event_type, value[, recommended, logged_propensity])."""
    recs = []
    for r in rows:
        eid, u, i, t, et, v = r[:6]
        ts = dt.datetime.fromisoformat(t).replace(tzinfo=UTC)
        recs.append({
            "event_id": eid, "user_id": u, "item_id": i, "event_time": ts, "event_date": ts.date(),
            "event_type": et, "value": float(v) if v is not None else None,
            "recommended": r[6] if len(r) > 6 else None,
            "logged_propensity": r[7] if len(r) > 7 else None, "ingest_batch": "test",
        })
    from pyspark.sql import types as T

    schema = T.StructType([f for f in EVENTS.spark_schema().fields if f.name in recs[0]])
    df = spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in recs], schema)
    return conform(df, EVENTS)


def make_items(spark, rows):
    """rows: (item_id, [attributes], category, text)."""
    df = spark.createDataFrame([(i, a, c, t, None) for i, a, c, t in rows], ITEMS.spark_schema())
    return df


def make_users(spark, rows):
    return spark.createDataFrame([(u, a, t, s) for u, a, t, s in rows], USERS.spark_schema())


def small_world(spark):
    items = make_items(spark, [
        ("i1", ["color:red"], "shoes", "red shoes"),
        ("i2", ["color:blue"], "shoes", "blue shoes"),
        ("i3", ["color:red"], "hats", "red hat"),
        ("i4", ["color:green"], "hats", "green hat"),
        ("i5", [], "hats", "plain hat"),
    ])
    users = make_users(spark, [("u1", ["gender:women"], "a woman", "a"), ("u2", ["gender:men"], "a man", "b"),
                               ("u3", None, None, None)])
    events = make_events(spark, [
        ("e1", "u1", "i1", "2024-01-01 10:00", "rating", 5),
        ("e2", "u1", "i2", "2024-01-05 10:00", "rating", 3),
        ("e3", "u1", "i3", "2024-01-09 10:00", "rating", 4),
        ("e4", "u2", "i1", "2024-01-02 10:00", "impression", 1),
        ("e5", "u2", "i2", "2024-01-03 10:00", "impression", 0),
        ("e6", "u2", "i1", "2024-01-08 10:00", "purchase", 1),
        ("e7", "u3", "i1", "2024-01-09 12:00", "rating", 2),
        # after the cutoff (2024-01-10): must not leak anywhere
        ("e8", "u1", "i4", "2024-01-10 00:00", "rating", 1),
        ("e9", "u2", "i4", "2024-01-11 00:00", "purchase", 1),
        ("e10", "u3", "i5", "2024-02-01 00:00", "impression", 1),
    ])
    return events, users, items


def _cfg():
    c = Config()
    c.features.windows_days = [3, 30]
    c.features.history_length = 2
    c.features.smoothing_prior_strength = 2.0
    c.features.popularity_groups = [0.2, 0.6]
    return c


def test_counts_rates_and_history_on_hand_made_log(spark):
    from causalrec.features.job import build_features

    events, users, items = small_world(spark)
    ft = build_features(events, users, items, _cfg(), cutoff="2024-01-10T00:00:00")
    u = {r["user_id"]: r for r in ft.users.collect()}
    assert set(u) == {"u1", "u2", "u3"}
    assert u["u1"]["n_events"] == 3 and u["u1"]["n_rating"] == 3
    # window: ratings within 3 days of the cutoff -> only e3 (Jan 9)
    assert u["u1"]["n_rating_3d"] == 1 and u["u1"]["n_rating_30d"] == 3
    assert u["u1"]["rating_mean"] == pytest.approx(4.0)
    assert u["u1"]["rating_var"] == pytest.approx(2.0 / 3.0)
    assert u["u1"]["history_item_ids"] == ["i3", "i2"]  # most recent first, bounded to 2
    # unclicked impression is not an interaction: u2's history is the purchase and the clicked impression
    # e6 purchase (Jan 8) and e4 clicked impression are one item: one entry, at its latest interaction
    assert u["u2"]["history_item_ids"] == ["i1"]
    assert "i2" not in u["u2"]["history_item_ids"]
    assert u["u1"]["recency_days"] == pytest.approx((14 / 24), abs=1e-6)
    assert u["u1"]["top_category"] == "shoes"
    assert len(u["u1"]["feature_vector"]) == len(ft.user_names)

    it = {r["item_id"]: r for r in ft.items.collect()}
    # i1: e1 rating (u1), e4 clicked impression + e6 purchase (u2: the purchase follows that exposure),
    # e7 rating (u3) -> 3 exposures, 1 click
    assert it["i1"]["n_exposures"] == 3 and it["i1"]["n_clicks"] == 1.0 and it["i1"]["n_purchases"] == 1
    # global ctr = clicks / exposures over all items before cutoff = 1 / 6; smoothing k = 2
    g = 1.0 / 6.0
    assert it["i1"]["click_rate"] == pytest.approx((1 + 2 * g) / (3 + 2))
    assert it["i4"]["n_exposures"] == 0 and it["i4"]["click_rate"] == pytest.approx(g)  # prior for unseen items
    # rating mean smoothed toward the global mean (5+3+4+2)/4 = 3.5
    assert it["i1"]["rating_mean"] == pytest.approx((7 + 2 * 3.5) / (2 + 2))
    assert it["i1"]["text"] == "red shoes" and it["i1"]["attributes"] == ["color:red"]
    assert len(it["i1"]["feature_vector"]) == len(ft.item_names)


def test_n_distinct_items_is_exact(spark):
    """``n_distinct_items`` counts a user's distinct items exactly (repeat rows once): the HyperLogLog
    estimate it used to be read 19 for these 20 items, so the training set could not take a train row's
    own item out of it exactly (one less when the row's pair has no other event)."""
    from causalrec.features.user import user_activity

    rows = [(f"e{k}", "u1", f"i{k}", f"2024-01-0{1 + k % 9} 10:00", "impression", float(k % 2)) for k in range(20)]
    rows += [("r1", "u1", "i3", "2024-01-09 11:00", "click", 1.0), ("r2", "u2", "i3", "2024-01-09 11:00", "rating", 4)]
    got = {r["user_id"]: r["n_distinct_items"]
           for r in user_activity(make_events(spark, rows), "2024-01-10T00:00:00", ["impression"], [7]).collect()}
    assert got == {"u1": 20, "u2": 1}


def _item_counts(spark, rows):
    from causalrec.features.item import item_features

    items = make_items(spark, [("i1", [], "c", "x")])
    r = item_features(make_events(spark, rows), items, "2024-02-01T00:00:00", windows_days=[7, 30], prior_strength=0.0,
                      popularity_groups=[0.2, 0.5], attribute_vocab=[]).first()
    return r["n_exposures"], r["n_clicks"], r["click_rate"], r["n_exposures_7d"], r["n_users"]


def test_item_exposures_and_clicks_count_each_exposure_once(spark):
    """10 impressions of i1, one clicked, as the simulator, OBD and a ratings-only log write them."""
    imps = [(f"imp{k}", f"u{k}", "i1", f"2024-01-{26 + k % 5:02d} 0{k}:00", "impression", float(k == 0)) for k in range(10)]
    # simulator: the clicked impression (value 1) plus a click row 5 s later and a purchase row 60 s later
    sim = imps + [("clk0", "u0", "i1", "2024-01-26 00:00:05", "click", 1.0),
                  ("buy0", "u0", "i1", "2024-01-26 00:01", "purchase", 1.0)]
    assert _item_counts(spark, sim) == (10, 1.0, pytest.approx(0.1), 10, 10)
    # OBD: one impression row per exposure, value = click
    assert _item_counts(spark, imps) == (10, 1.0, pytest.approx(0.1), 10, 10)
    # impressions that do not carry the click, and a separate click row: still one click
    unannotated = [r[:5] + (0.0,) for r in imps] + [("clk0", "u0", "i1", "2024-01-26 00:00:05", "click", 1.0)]
    assert _item_counts(spark, unannotated)[:2] == (10, 1.0)
    # a user seeing i1 twice and clicking both times
    twice = imps + [("imp10", "u0", "i1", "2024-01-03 00:00", "impression", 1.0),
                    ("clk1", "u0", "i1", "2024-01-03 00:00:05", "click", 1.0)]
    assert _item_counts(spark, twice)[:2] == (11, 2.0)
    # Coat: ratings only, every row is an exposure (24-27 days before the cutoff: none in the 7-day window)
    ratings = [(f"r{k}", f"u{k}", "i1", f"2024-01-{5 + k:02d} 00:00", "rating", 3) for k in range(4)]
    assert _item_counts(spark, ratings) == (4, 0.0, pytest.approx(0.0), 0, 4)


def test_default_cutoff_ignores_the_driver_time_zone(spark):
    """resolve_cutoff(None) is just after the last event in UTC even when the driver's OS time zone
    is not UTC (PySpark turns collected timestamps into naive local datetimes)."""
    import os
    import time

    from causalrec.features.common import resolve_cutoff

    events = make_events(spark, [("e1", "u1", "i1", "2024-01-10 08:00", "rating", 5),
                                 ("e2", "u1", "i2", "2024-01-10 12:00", "rating", 3)])
    old = os.environ.get("TZ")
    try:
        for tz in ("America/New_York", "Asia/Tokyo"):
            os.environ["TZ"] = tz
            time.tzset()
            got = resolve_cutoff(events, None)
            assert got == dt.datetime(2024, 1, 10, 12, 0, 0, 1, tzinfo=UTC), (tz, got)
            assert events.where(F.col("event_time") < cutoff_lit(got)).count() == 2
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_future_events_do_not_leak(spark):
    """Features as of the cutoff are identical with and without every event at/after the cutoff."""
    from pyspark.sql import functions as F

    from causalrec.features.job import build_features

    events, users, items = small_world(spark)
    cut = "2024-01-10T00:00:00"
    past_only = events.where(F.col("event_time") < F.lit(cut).cast("timestamp"))
    assert past_only.count() == 7
    a = build_features(events, users, items, _cfg(), cutoff=cut)
    b = build_features(past_only, users, items, _cfg(), cutoff=cut)

    def rows(df, key):
        return sorted((r.asDict() for r in df.collect()), key=lambda r: r[key])

    assert rows(a.users, "user_id") == rows(b.users, "user_id")
    assert rows(a.items, "item_id") == rows(b.items, "item_id")
    # and the future events would have changed them: i4 has a future rating and purchase
    later = build_features(events, users, items, _cfg(), cutoff="2024-03-01T00:00:00")
    assert {r["item_id"]: r["n_exposures"] for r in later.items.collect()}["i4"] == 2


def test_popularity_groups(spark):
    from causalrec.features.job import build_features

    events, users, items = small_world(spark)
    ft = build_features(events, users, items, _cfg(), cutoff="2024-01-10T00:00:00")
    it = {r["item_id"]: (r["popularity_rank"], r["popularity_group"]) for r in ft.items.collect()}
    # interactions before cutoff: i1 = 4 (2 ratings, clicked impression, purchase), i2 = 1, i3 = 1, i4 = i5 = 0
    assert it["i1"] == (1, "head")  # 1/5 = 0.2 <= 0.2
    assert it["i2"] == (2, "mid") and it["i3"] == (3, "mid")  # 0.4, 0.6 <= 0.6
    assert it["i4"][1] == "tail" and it["i5"][1] == "tail"
    with pytest.raises(ValueError, match="popularity_groups"):
        c = _cfg()
        c.features.popularity_groups = [0.5, 0.2]
        build_features(events, users, items, c, cutoff="2024-01-10T00:00:00")


def test_pair_features_leave_the_item_out(spark):
    from causalrec.features.pair import item_cooccurrence, pair_features
    from causalrec.features.user import user_attribute_counts, user_history, user_item_counts

    events, users, items = small_world(spark)
    cut = "2024-01-10T00:00:00"
    hist = user_history(events, cut, 10)
    pairs = spark.createDataFrame([("u1", "i3"), ("u1", "i4"), ("u3", "i2"), ("u1", "i1")], "user_id string, item_id string")
    pf = pair_features(pairs, attr_counts=user_attribute_counts(events, items, cut), ui_counts=user_item_counts(events, cut),
                       items=items, history=hist, cooc=item_cooccurrence(hist))
    p = {(r["user_id"], r["item_id"]): r for r in pf.collect()}
    # u1 interacted with i1 (red), i2 (blue), i3 (red). For pair (u1, i3), leave i3 out: the other two
    # are i1 (color:red, category:shoes) and i2; i3's tokens are color:red, category:hats ->
    # shares red 1/2, hats 0/2 -> mean 0.25
    assert p[("u1", "i3")]["attr_match"] == pytest.approx(0.25)
    # i4 (green hat) never seen: green 0, hats 1/3 -> 1/6
    assert p[("u1", "i4")]["attr_match"] == pytest.approx(1 / 6)
    # u3's history is i1; users with both i1 and i2 other than u3: u1 -> cooc 1
    assert p[("u3", "i2")]["cooc_score"] == pytest.approx(1.0)
    # (u1, i1): i1 is in u1's own history; others having i1 with i2/i3: none (u2 has only i1, u3 only i1)
    assert p[("u1", "i1")]["cooc_score"] == pytest.approx(0.0)
    assert len(p[("u1", "i1")]["pair_vector"]) == 2


def test_features_stage_writes_tables(ctx, spark):
    from causalrec.features.job import feature_names, run

    events, users, items = small_world(spark)
    ctx.store.write(events, "events", spec=EVENTS)
    ctx.store.write(users, "users", spec=USERS)
    ctx.store.write(items, "items", spec=ITEMS)
    ctx.cfg.features.cutoff = "2024-01-10T00:00:00"
    out = run(ctx)
    assert out["user_features"] == 3 and out["item_features"] == 5
    run(ctx)  # idempotent rerun
    assert ctx.store.row_count("item_features") == 5
    groups = {r["item_id"]: r["popularity_group"] for r in ctx.store.read("item_features").collect()}
    assert set(groups.values()) <= {"head", "mid", "tail"}
    assert len(feature_names(ctx.store, "user_features")) == len(ctx.store.read("user_features").first()["feature_vector"])


def test_stored_feature_tables_refuse_a_failed_runs_mix_at_the_same_cutoff(ctx, spark, monkeypatch):
    """A features run that fails between its two commits (here after a change of windows) leaves its
    user_features beside the last run's item_features at the same fixed cutoff: serving, candidates and
    propensity must refuse the pair (both tables carry their run's id), and a rerun must mend it."""
    from causalrec.features.job import run, stored_feature_tables
    from causalrec.storage.stage_runs import TablesOutOfStep, run_of

    events, users, items = small_world(spark)
    ctx.store.write(events, "events", spec=EVENTS)
    ctx.store.write(users, "users", spec=USERS)
    ctx.store.write(items, "items", spec=ITEMS)
    ctx.cfg.features.cutoff = "2024-01-10T00:00:00"
    run(ctx)
    assert run_of(ctx.store, "user_features") == run_of(ctx.store, "item_features") is not None
    assert stored_feature_tables(ctx.store) is not None
    ctx.cfg.features.windows_days = [3]
    write = ctx.store.write

    def failing(df, name, *a, **kw):
        if name == "item_features":
            raise OSError("disk full")
        return write(df, name, *a, **kw)

    monkeypatch.setattr(ctx.store, "write", failing)
    with pytest.raises(OSError):
        run(ctx)
    monkeypatch.setattr(ctx.store, "write", write)
    with pytest.raises(TablesOutOfStep, match=r"user_features \(.*\) is from features run \w+; item_features "
                                              r"\(.*\) is from features run \w+: .*causalrec features"):
        stored_feature_tables(ctx.store)
    run(ctx)  # the rerun writes both tables under the new windows
    ft = stored_feature_tables(ctx.store)
    assert "n_exposures_3d" in ft.items.columns and "n_exposures_7d" not in ft.items.columns


def test_string_cutoff_is_read_as_utc_whatever_the_session_time_zone(spark):
    """cutoff_lit/events_before parse an ISO string as UTC, not in spark.sql.session.timeZone
    (a cluster default under spark-submit may be another zone)."""
    from causalrec.features.common import events_before

    events = make_events(spark, [("e1", "u1", "i1", "2024-01-31 02:00", "click", 1.0)])  # 02:00 UTC
    old = spark.conf.get("spark.sql.session.timeZone")
    try:
        spark.conf.set("spark.sql.session.timeZone", "America/New_York")
        assert events_before(events, "2024-01-31T00:00:00").count() == 0
        assert events_before(events, "2024-01-31T02:00:00.000001").count() == 1
        same = spark.range(1).select(cutoff_lit("2024-01-31T00:00:00") == cutoff_lit(dt.datetime(2024, 1, 31, tzinfo=UTC)))
        assert same.first()[0] is True
    finally:
        spark.conf.set("spark.sql.session.timeZone", old)
    with pytest.raises(ValueError, match="cutoff: got .yesterday., expected an ISO date"):
        cutoff_lit("yesterday")


def test_item_features_without_ratings_honour_the_declared_nullability(spark):
    """OBD and the simulator log no ratings: rating_mean has no global mean to shrink toward and is
    null (declared nullable, as the user table's), 0 in the vector; every non-null column is filled."""
    from causalrec.features.item import item_feature_names, item_features
    from causalrec.features.job import conform_with_extras
    from causalrec.schemas import ITEM_FEATURES

    events = make_events(spark, [("e1", "u1", "i1", "2024-01-02 10:00", "impression", 1),
                                 ("e2", "u1", "i2", "2024-01-03 10:00", "impression", 0)])
    items = make_items(spark, [("i1", ["color:red"], "shoes", "red shoes"), ("i2", [], None, None),
                               ("i3", None, None, None)])
    cut = "2024-01-10T00:00:00"
    itf = item_features(events, items, cut, windows_days=[7], prior_strength=2.0, popularity_groups=[0.2, 0.6],
                        attribute_vocab=["color:red"]).withColumn("as_of", cutoff_lit(cut))
    rows = conform_with_extras(itf, ITEM_FEATURES).collect()
    assert len(rows) == 3
    required = [c.name for c in ITEM_FEATURES.columns if not c.nullable]
    assert [(r["item_id"], c) for r in rows for c in required if r[c] is None] == []
    slot = item_feature_names([7], ["color:red"]).index("rating_mean")
    assert {(r["rating_mean"], r["feature_vector"][slot]) for r in rows} == {(None, 0.0)}


def test_stored_feature_tables_refuse_tables_at_different_cutoffs():
    """The features stage writes user_features and item_features in two commits: serving must not pair
    user features of one cutoff with item features of another (a failed or concurrent second write)."""
    from causalrec.features.job import FeatureCutoffMismatch, stored_feature_tables

    class Store:
        def __init__(self, u_as_of, i_as_of):
            self.meta = {"user_features": [{"feature_names": ["a"], "as_of": u_as_of}],
                         "item_features": [{"feature_names": ["b"], "as_of": i_as_of}]}

        def exists(self, t):
            return True

        def commit_metadata(self, t, n=None):
            return self.meta[t]

        def read(self, t):
            return t

    with pytest.raises(FeatureCutoffMismatch, match=r"user_features is as of 2024-02-01T00:00:00\+00:00 but "
                                                    r"item_features is as of 2024-01-01T00:00:00\+00:00"):
        stored_feature_tables(Store("2024-02-01T00:00:00+00:00", "2024-01-01T00:00:00+00:00"))
    ft = stored_feature_tables(Store("2024-02-01T00:00:00+00:00", "2024-02-01T00:00:00Z"))  # same instant
    assert (ft.users, ft.items, ft.cutoff) == ("user_features", "item_features", dt.datetime(2024, 2, 1, tzinfo=UTC))


def test_user_history_holds_distinct_items_at_their_latest_interaction(spark):
    """One exposure logs up to three interaction rows (a clicked impression, its click 5 s later, a
    purchase 60 s later) and a repeat click repeats the item: the history ranks items, not rows, so
    ``history_length`` distinct items fit, each placed at its latest interaction."""
    from causalrec.features.user import user_history

    rows = []
    for k, it in enumerate(["A", "B", "C", "D", "E"]):
        rows += [(f"e{k}i", "u1", it, f"2024-01-1{k} 12:00:00", "impression", 1),
                 (f"e{k}c", "u1", it, f"2024-01-1{k} 12:00:05", "click", 1),
                 (f"e{k}p", "u1", it, f"2024-01-1{k} 12:01:00", "purchase", 1)]
    rows += [("r1", "u1", "B", "2024-01-16 09:00", "click", 1),  # a repeat click moves B to the front
             ("r2", "u1", "B", "2024-01-17 09:00", "click", 1),
             ("n1", "u1", "F", "2024-01-18 09:00", "impression", 0)]  # not an interaction
    hist = user_history(make_events(spark, rows), "2024-01-31T00:00:00", 4).collect()
    assert [r["history_item_ids"] for r in hist] == [["B", "E", "D", "C"]]
