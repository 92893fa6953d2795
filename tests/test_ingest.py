"""Validated, idempotent ingest: every bad-row kind is quarantined with its reason, valid rows land in events."""
from __future__ import annotations

import json

import pytest

HEADER = "event_id,user_id,item_id,event_time,event_type,value,position,recommended,logged_propensity,policy"

# (csv line, expected reason or None for accepted)
ROWS = [
    ("e1,u1,i1,2024-01-01T10:00:00Z,rating,4,,,,", None),
    ("e2,u1,i2,2024-01-02 11:00:00,click,1,2,true,0.25,random", None),
    ("e3,u2,i1,2024-01-03T00:00:00+00:00,impression,0,1,false,1.0,random", None),
    ("e4,u2,i2,2024-01-04,purchase,19.99,,,,", None),
    ("e40,u1,i1,not a time,click,1,,,,", "BAD_TIMESTAMP"),  # an invalid first copy ...
    ("e40,u1,i1,2024-01-05T00:00:00Z,click,1,,,,", None),  # ... does not block a valid later one
    (",u1,i1,2024-01-01T00:00:00Z,click,1,,,,", "NULL_ID"),
    ("e10,,i1,2024-01-01T00:00:00Z,click,1,,,,", "NULL_ID"),
    ("e11,u1,  ,2024-01-01T00:00:00Z,click,1,,,,", "NULL_ID"),
    ("e12,u1,i1,2024-02-30 25:00:00,click,1,,,,", "BAD_TIMESTAMP"),
    ("e13,u1,i1,1990-01-01T00:00:00Z,click,1,,,,", "TIMESTAMP_OUT_OF_RANGE"),
    ("e14,u1,i1,2024-01-01T00:00:00Z,like,1,,,,", "UNKNOWN_EVENT_TYPE"),
    ("e15,u1,i1,2024-01-01T00:00:00Z,rating,7,,,,", "RATING_OUT_OF_RANGE"),
    ("e16,u1,i1,2024-01-01T00:00:00Z,rating,0,,,,", "RATING_OUT_OF_RANGE"),
    ("e17,u1,i1,2024-01-01T00:00:00Z,rating,NaN,,,,", "RATING_NAN"),
    ("e18,u1,i1,2024-01-01T00:00:00Z,click,1,1,true,0,random", "BAD_PROPENSITY"),
    ("e19,u1,i1,2024-01-01T00:00:00Z,click,1,1,true,-0.1,random", "BAD_PROPENSITY"),
    ("e20,u1,i1,2024-01-01T00:00:00Z,click,1,1,true,1.5,random", "BAD_PROPENSITY"),
    ("e21,u1,i1,2024-01-01T00:00:00Z,click,1,1,true,NaN,random", "BAD_PROPENSITY"),
    ("e1,u1,i1,2024-01-01T10:00:00Z,rating,4,,,,", "DUPLICATE_IN_BATCH"),
    ("e22,u999,i1,2024-01-01T00:00:00Z,click,1,,,,", "UNKNOWN_USER"),
    ("e23,u1,i999,2024-01-01T00:00:00Z,click,1,,,,", "UNKNOWN_ITEM"),
    ("e24,u1,i1,2024-01-01T00:00:00Z,click,abc,,,,", "BAD_VALUE"),
    ("e25,u1,i1,2024-01-01T00:00:00Z,click,1,0,true,0.5,random", "BAD_POSITION"),
    ("e26,u1,i1,2024-01-01T00:00:00Z,purchase,1.5d,,,,", "BAD_VALUE"),  # Java's parser takes 1.5d for 1.5
    ("e27,u1,i1,2024-01-01T00:00:00Z,click,1,2f,true,0.5f,random", "BAD_VALUE"),
]


def _write_csv(path, rows):
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def known_ctx(ctx):
    from causalrec.schemas import ITEMS, USERS

    ctx.cfg.data.require_known_users = True
    ctx.cfg.data.require_known_items = True
    sp = ctx.spark
    ctx.store.write(sp.createDataFrame([("u1",), ("u2",)], "user_id string"), "users", "overwrite", spec=USERS)
    ctx.store.write(sp.createDataFrame([("i1",), ("i2",)], "item_id string"), "items", "overwrite", spec=ITEMS)
    return ctx


def test_every_bad_row_is_quarantined_and_every_valid_row_accepted(known_ctx, tmp_path):
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    ctx = known_ctx
    path = _write_csv(tmp_path / "batch.csv", [r for r, _ in ROWS])
    raw = read_events(ctx.spark, path, "csv")
    s = ingest_events(ctx, raw, source=path)

    expected = {}
    for _, reason in ROWS:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    n_ok = sum(1 for _, r in ROWS if r is None)
    assert s["rows_read"] == len(ROWS)
    assert s["rows_accepted"] == n_ok
    assert s["reasons"] == expected
    assert s["rows_quarantined"] == len(ROWS) - n_ok

    ev = ctx.store.read("events").toPandas()
    assert sorted(ev["event_id"]) == ["e1", "e2", "e3", "e4", "e40"]
    assert ev["ingest_batch"].nunique() == 1 and ev["ingest_batch"].iloc[0] == s["ingest_batch"]
    e2 = ev.set_index("event_id").loc["e2"]
    assert e2["position"] == 2 and bool(e2["recommended"]) and e2["logged_propensity"] == 0.25
    assert str(ev.set_index("event_id").loc["e40", "event_time"]).startswith("2024-01-05")
    assert set(ev["event_date"].astype(str)) == {"2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"}

    q = ctx.store.read("events_quarantine").toPandas().sort_values("source_row")
    # each bad row: its own reason, its source row number, and the original row as JSON
    want = [(i, r) for i, (_, r) in enumerate(ROWS) if r]
    assert list(zip(q["source_row"], q["reason"])) == want
    for (_, row), (line, _) in zip(q.iterrows(), [ROWS[i] for i, _ in want]):
        payload = json.loads(row["payload"])
        assert payload["event_id"] == (line.split(",")[0] or None)
        assert payload["event_time"] == line.split(",")[3]
        assert row["source"] == path
        assert row["detail"]
    detail = q.set_index("source_row")["detail"]
    assert "event_time" in detail[9] and "logged_propensity" in detail[17] and "user_id" in detail[20]

    log = ctx.store.read("ingest_log").toPandas()
    assert len(log) == 1
    assert json.loads(log["reasons"][0]) == expected
    assert int(log["rows_read"][0]) == len(ROWS) and int(log["rows_accepted"][0]) == n_ok


def test_reingest_after_a_delete_appends_the_deleted_rows_again(ctx, tmp_path, monkeypatch):
    """Keys are tracked per file: after a delete rewrote a file the batch's rows may have been in, its key
    can still read as applied (the store's lineage check, emulated below), and re-ingesting the same file
    skipped the append while counting the rows as accepted."""
    from deltalake import DeltaTable

    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    day = "2024-01-01T1{}:00:00Z"  # one event_date partition, so the delete rewrites the second batch's file
    path = _write_csv(tmp_path / "b1.csv", [f"a{k},u1,i1,{day.format(k)},click,1,,,," for k in (1, 2)])
    other = _write_csv(tmp_path / "b2.csv", [f"b{k},u2,i1,{day.format(k)},click,1,,,," for k in (1, 2)])
    keys, applied = [], set()  # the keys the events appends were committed with; those read as applied
    real = type(ctx.store).write

    def lineage(store, df, table, *args, idempotency_key=None, **kw):
        if table == "events":
            if idempotency_key in applied:
                return None  # what DeltaStore.write returns for a key it finds applied
            keys.append(idempotency_key)
        return real(store, df, table, *args, idempotency_key=idempotency_key, **kw)

    monkeypatch.setattr(type(ctx.store), "write", lineage)
    assert ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)["rows_accepted"] == 2
    assert ingest_events(ctx, read_events(ctx.spark, other, "csv"), source=other)["rows_accepted"] == 2
    DeltaTable(ctx.store.path("events")).delete("event_id in ('a1', 'a2', 'b1')")
    applied.update(keys)  # the delete rewrote b2's file: lineage may keep every earlier key applied
    again = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)
    assert again["rows_accepted"] == 2 and again["rows_already_present"] == 0
    assert sorted(r.event_id for r in ctx.store.read("events").collect()) == ["a1", "a2", "b2"]


def test_reingest_is_noop_and_conflicting_duplicate_is_quarantined(ctx, tmp_path):
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    good = [r for r, reason in ROWS[:4]] + [ROWS[12][0]]  # four valid rows + one out-of-range rating
    path = _write_csv(tmp_path / "b1.csv", good)
    first = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)
    v_events, v_q = ctx.store.version("events"), ctx.store.version("events_quarantine")
    again = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)
    assert first["rows_accepted"] == 4 and first["rows_quarantined"] == 1
    assert again["ingest_batch"] == first["ingest_batch"]
    assert again["rows_accepted"] == 0 and again["rows_already_present"] == 4
    # nothing new was committed: the tables are exactly as before
    assert ctx.store.version("events") == v_events
    assert ctx.store.version("events_quarantine") == v_q
    assert ctx.store.read("events").count() == 4
    assert ctx.store.read("events_quarantine").count() == 1

    # same id, different content -> DUPLICATE_EXISTING; identical row -> already present; new row -> accepted
    path2 = _write_csv(tmp_path / "b2.csv", [
        "e2,u1,i2,2024-01-02 11:00:00,click,0,3,true,0.25,random",
        ROWS[0][0],
        "e30,u3,i3,2024-01-09T00:00:00Z,view,1,,,,",
    ])
    third = ingest_events(ctx, read_events(ctx.spark, path2, "csv"), source=path2)
    assert third["reasons"] == {"DUPLICATE_EXISTING": 1}
    assert third["rows_already_present"] == 1 and third["rows_accepted"] == 1
    ev = ctx.store.read("events").toPandas()
    assert sorted(ev["event_id"]) == ["e1", "e2", "e3", "e30", "e4"]
    assert ev.set_index("event_id").loc["e2", "value"] == 1.0  # the original is kept

    log = ctx.store.read("ingest_log").toPandas().sort_values("started_at")
    assert list(log["rows_already_present"]) == [0, 4, 1]
    assert list(log["rows_accepted"]) == [4, 0, 1]


def test_concurrent_ingests_never_both_append_one_event_id(ctx, tmp_path, monkeypatch):
    """Ingest B commits between ingest A's duplicate check and A's append: A must check again, not append blind."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events
    from causalrec.storage import DeltaStore

    a = _write_csv(tmp_path / "a.csv", ["e1,u1,i1,2024-01-01T10:00:00Z,click,1,,,,",
                                        "e2,u1,i2,2024-01-01T11:00:00Z,click,1,,,,",
                                        "e3,u2,i1,2024-01-01T12:00:00Z,click,1,,,,"])
    b = _write_csv(tmp_path / "b.csv", ["e1,u1,i1,2024-01-01T10:00:00Z,click,1,,,,",  # the same as A's e1
                                        "e2,u2,i2,2024-01-01T11:00:00Z,click,1,,,,"])  # e2 with other content
    real_write, raced = DeltaStore.write, []

    def write(self, df, name, *args, **kwargs):
        if name == "events" and not raced:  # A's append: B lands first
            raced.append(True)
            ingest_events(ctx, read_events(ctx.spark, b, "csv"), source=b)
        return real_write(self, df, name, *args, **kwargs)

    monkeypatch.setattr(DeltaStore, "write", write)
    s = ingest_events(ctx, read_events(ctx.spark, a, "csv"), source=a)
    ev = ctx.store.read("events").toPandas()
    assert sorted(ev["event_id"]) == ["e1", "e2", "e3"]
    assert ev.set_index("event_id").loc["e2", "user_id"] == "u2"  # B's e2 stays; A's differing one is quarantined
    assert (s["rows_accepted"], s["rows_already_present"], s["reasons"]) == (1, 1, {"DUPLICATE_EXISTING": 1})
    log = ctx.store.read("ingest_log").where("source = '%s'" % a).toPandas()
    assert len(log) == 1 and log.iloc[0]["rows_read"] == 3 and log.iloc[0]["rows_accepted"] == 1


@pytest.mark.parametrize("content, column", [
    ('{"event_id": "a", "user_id": "u", "item_id": "i", "event_time": true, "event_type": "click"}', "event_time"),
    ('{"event_id": "a", "user_id": "u", "event_time": "2024-01-01", "event_type": "click"}', "item_id"),
    ('{"event_id": "a", "user_id": "u", "item_id": "i", "event_time": "2024-01-01", "event_type": "click",'
     ' "value": [1, 2]}', "value"),
])
def test_schema_mismatch_fails_the_batch_before_writing(ctx, tmp_path, content, column):
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events
    from causalrec.schemas import SchemaMismatch

    p = tmp_path / "bad.jsonl"
    p.write_text(content + "\n")
    raw = read_events(ctx.spark, str(p), "jsonl")
    with pytest.raises(SchemaMismatch, match=repr(column)):
        ingest_events(ctx, raw, source=str(p))
    for t in ("events", "events_quarantine", "ingest_log"):
        assert not ctx.store.exists(t)


def test_sources_name_the_file(spark, tmp_path):
    from causalrec.ingest.sources import SourceError, read_events

    with pytest.raises(SourceError, match="nope.parquet"):
        read_events(spark, str(tmp_path / "nope.parquet"), "parquet")
    bad = tmp_path / "broken.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(SourceError, match="broken.parquet"):
        read_events(spark, str(bad), "parquet")


def test_files_job_reads_parquet_and_delta(ctx, tmp_path):
    """The `files` source: parquet in, then the same events as an existing Delta table (no-op)."""
    import pandas as pd

    from causalrec.ingest import job

    pdf = pd.DataFrame({
        "event_id": ["p1", "p2"], "user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
        "event_time": pd.to_datetime(["2024-03-01", "2024-03-02"], utc=True),
        "event_type": ["view", "purchase"], "value": [1.0, 12.5],
    })
    f = tmp_path / "in.parquet"
    pdf.to_parquet(f, coerce_timestamps="us", allow_truncated_timestamps=True)
    ctx.cfg.data.source, ctx.cfg.data.path, ctx.cfg.data.format = "files", str(f), "parquet"
    out = job.run(ctx)
    assert out["tables"]["events"]["rows_accepted"] == 2
    ctx.cfg.data.path, ctx.cfg.data.format = ctx.store.path("events"), "delta"
    out = job.run(ctx)
    assert out["tables"]["events"]["rows_already_present"] == 2
    assert ctx.store.read("events").count() == 2


def test_rerun_with_changed_rules_writes_the_newly_valid_rows_once(ctx, tmp_path):
    """A row quarantined under old rules ('like' unknown) is written when the rules accept it."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events
    from causalrec.ingest.validate import Rules

    path = _write_csv(tmp_path / "b.csv", ["e1,u1,i1,2024-01-01T00:00:00Z,click,1,,,,",
                                          "e2,u1,i2,2024-01-01T00:00:00Z,like,1,,,,"])
    first = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path, rules=Rules())
    assert first["rows_accepted"] == 1 and first["reasons"] == {"UNKNOWN_EVENT_TYPE": 1}
    rules = Rules(event_types=Rules().event_types + ("like",))
    second = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path, rules=rules)
    assert second["rows_accepted"] == 1 and second["rows_already_present"] == 1
    assert second["ingest_batch"] != first["ingest_batch"]
    assert sorted(r.event_id for r in ctx.store.read("events").collect()) == ["e1", "e2"]
    v = ctx.store.version("events")
    third = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path, rules=rules)
    assert third["ingest_batch"] == second["ingest_batch"] and third["rows_already_present"] == 2
    assert ctx.store.version("events") == v and ctx.store.read("events").count() == 2
    log = ctx.store.read("ingest_log").toPandas().sort_values("started_at")
    assert list(log["rows_accepted"]) == [1, 1, 0]


def test_non_finite_values_and_times_without_a_date_are_quarantined(ctx, tmp_path):
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    path = _write_csv(tmp_path / "b.csv", [
        "e1,u1,i1,12:00:00,click,1,,,,",  # Spark would read this as today at noon
        "e2,u1,i1,2024-01-01T00:00:00Z,purchase,1e400,,,,",  # overflows to infinity
        "e3,u1,i1,2024-01-01T00:00:00Z,click,NaN,,,,",
        "e4,u1,i1,2024-01-01T00:00:00Z,rating,1e400,,,,",
        "e5,u1,i1,2024-01-01T00:00:00Z,purchase,19.5,,,,",
    ])
    s = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)
    assert s["rows_accepted"] == 1
    assert s["reasons"] == {"BAD_TIMESTAMP": 1, "BAD_VALUE": 2, "RATING_OUT_OF_RANGE": 1}
    q = ctx.store.read("events_quarantine").toPandas().set_index("source_row")
    assert "has no date" in q.loc[0, "detail"]
    assert "not a finite number" in q.loc[1, "detail"] and "not a finite number" in q.loc[2, "detail"]
    assert [r.event_id for r in ctx.store.read("events").collect()] == ["e5"]


def test_partial_dates_blank_ids_and_numeric_flags_other_than_0_1_are_quarantined(ctx, tmp_path):
    """Spark reads "2024" as 2024-01-01 and "2024-3" as 2024-03-01 (an invented day); its trim strips
    only spaces, so a tab-only id was "not empty" and "u1<TAB>" another user; a JSON recommended of 2
    became true (the string "2" was already a BAD_VALUE)."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    path = _write_csv(tmp_path / "b.csv", [
        "e1,u1,i1,2024,click,1,,,,",
        "e2,u1,i1,2024-3,click,1,,,,",
        "e3,u1,\t,2024-01-01T00:00:00Z,click,1,,,,",
        "e4,u1\t,i1\u00a0,2024-01-01T00:00:00Z,click,1,,,,",
        "e5,u1,i1, 2024-01-02 ,click,1,,,,",
    ])
    s = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)
    assert s["reasons"] == {"NULL_ID": 1, "BAD_TIMESTAMP": 2} and s["rows_accepted"] == 2
    q = _quarantine_by_id(ctx)
    assert "'2024' is not a full date (expected year-month-day" in q["e1"].detail
    assert "'2024-3' is not a full date" in q["e2"].detail and "item_id is null or empty" in q["e3"].detail
    ev = {r.event_id: r for r in ctx.store.read("events").collect()}
    assert (ev["e4"].user_id, ev["e4"].item_id) == ("u1", "i1")
    j = tmp_path / "b.jsonl"
    j.write_text("\n".join(json.dumps({"event_id": f"j{k}", "user_id": "u1", "item_id": "i1",
                                       "event_time": "2024-01-01T00:00:00Z", "event_type": "click", "recommended": v})
                           for k, v in enumerate([2, -1, 1, 0])) + "\n")
    s = ingest_events(ctx, read_events(ctx.spark, str(j), "jsonl"), source=str(j), fmt="jsonl")
    assert s["reasons"] == {"BAD_VALUE": 2} and s["rows_accepted"] == 2
    assert "recommended '2' cannot be parsed" in _quarantine_by_id(ctx)["j0"].detail
    ev = {r.event_id: r.recommended for r in ctx.store.read("events").collect()}
    assert (ev["j2"], ev["j3"]) == (True, False)


def test_a_rewritten_file_whose_rejected_rows_differ_only_in_unparseable_text_is_quarantined_again(ctx, tmp_path):
    """The batch id and the quarantine key came from parsed values: 'abc' and 'xyz' both parse to null,
    so the second file's rejected row read as already quarantined and was lost."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    batches = []
    for bad in ("abc", "xyz", "xyz"):  # the third run repeats the second: nothing new
        path = _write_csv(tmp_path / "daily.csv", ["e1,u1,i1,2024-01-01T00:00:00Z,click,1,,,,",
                                                   f"e2,u1,i1,2024-01-01T00:00:00Z,click,{bad},,,,"])
        batches.append(ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path)["ingest_batch"])
    assert batches[0] != batches[1] == batches[2]
    values = sorted(json.loads(r.payload)["value"] for r in ctx.store.read("events_quarantine").collect())
    assert values == ["abc", "xyz"]
    assert ctx.store.read("events").count() == 1


def test_json_lines_with_two_values_on_a_line_fail_before_any_write(ctx, tmp_path):
    """Spark's JSON reader keeps a line's first value and drops the rest without a word (``cat`` of a
    file with no final line break joins two events on one line), and splits an array into rows."""
    from causalrec.ingest.sources import SourceError, read_events

    def ev(k, item="i1"):
        return json.dumps({"event_id": f"e{k}", "user_id": "u1", "item_id": item, "event_time": "2024-01-01T00:00:00Z",
                           "event_type": "click"})

    ok = tmp_path / "ok.jsonl"  # braces and brackets inside strings are not structure
    ok.write_text(ev(1, item="} {") + "\n\n" + ev(2, item="[x] {y}") + "\n")
    assert read_events(ctx.spark, str(ok), "jsonl").count() == 2
    # a malformed object (a missing comma) is no second value: the reader keeps it whole as a corrupt record
    bad = tmp_path / "malformed.jsonl"
    bad.write_text(ev(1) + "\n" + '{"event_id": "e2", "context": {"a": 1} "x": 1}' + "\n")
    rows = read_events(ctx.spark, str(bad), "jsonl").select("event_id", "_corrupt_record").collect()
    assert [r.event_id for r in rows if r._corrupt_record is None] == ["e1"] and len(rows) == 2
    for name, lines, line in (("joined", [ev(1), ev(2) + " " + ev(3)], 2), ("array", ["[" + ev(1) + "," + ev(2) + "]"], 1),
                              ("tab_array", [ev(1), "\t[" + ev(2) + "]"], 2), ("trailing", ["", ev(1) + " 5"], 2)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(SourceError, match=rf"more than one JSON value on a line \({path} line {line}\)"):
            read_events(ctx.spark, str(path), "jsonl")
    assert not ctx.store.exists("events")


def test_quarantine_of_a_folder_names_the_file_and_its_row(ctx, tmp_path):
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    folder = tmp_path / "in dir"
    folder.mkdir()
    _write_csv(folder / "a.csv", ["a0,u,i,2024-01-01,click,1,,,,", "a1,u,i,BAD,click,1,,,,"])
    _write_csv(folder / "b.csv", [f"b{k},u,i,2024-01-01,click,1,,,," for k in range(5)] + ["b5,u,i,BAD,click,1,,,,"])
    s = ingest_events(ctx, read_events(ctx.spark, str(folder), "csv"), source=str(folder))
    assert s["rows_accepted"] == 6 and s["rows_quarantined"] == 2
    q = ctx.store.read("events_quarantine").toPandas()
    got = sorted((r.source, r.source_row, json.loads(r.payload)["event_id"]) for r in q.itertuples())
    assert got == [(str(folder / "a.csv"), 1, "a1"), (str(folder / "b.csv"), 5, "b5")]
    log = ctx.store.read("ingest_log").toPandas()
    assert list(log["source"]) == [str(folder)]


def test_loader_counts_are_checked_before_any_table_is_written(ctx):
    from causalrec.ingest.job import write_loaded
    from causalrec.loaders import LoadedData

    sp = ctx.spark
    ev = sp.createDataFrame([("e1", "u1", "i1", "2024-01-01", "click")],
                            "event_id string, user_id string, item_id string, event_time string, event_type string")
    data = LoadedData(name="t", events=ev, users=sp.createDataFrame([("u1",)], "user_id string"),
                      items=sp.createDataFrame([("i1",)], "item_id string"),
                      sources={"events": "ev.csv"}, expected={"users": 1, "items": 1, "events": 2})
    with pytest.raises(ValueError, match=r"events has 1 rows from ev.csv, expected 2"):
        write_loaded(ctx, data, source="t")
    for t in ("users", "items", "events", "ingest_log"):
        assert not ctx.store.exists(t)


def test_loader_events_schema_is_checked_before_the_dimensions_are_written(ctx):
    """Events that cannot be ingested (no event_type column) failed after users and items had been
    replaced: the next data set's dimensions stood beside the old events."""
    from causalrec.ingest.job import write_loaded
    from causalrec.ingest.validate import SchemaMismatch
    from causalrec.loaders import LoadedData

    sp = ctx.spark
    cols = "event_id string, user_id string, item_id string, event_time string"
    ok = LoadedData(name="t", events=sp.createDataFrame([("e1", "u1", "i1", "2024-01-01", "click")],
                                                        cols + ", event_type string"),
                    users=sp.createDataFrame([("u1",)], "user_id string"), items=sp.createDataFrame([("i1",)], "item_id string"))
    write_loaded(ctx, ok, source="t")
    versions = {t: ctx.store.version(t) for t in ("users", "items", "events")}
    bad = LoadedData(name="t", events=sp.createDataFrame([("e9", "u9", "i9", "2024-01-01")], cols),
                     users=sp.createDataFrame([("u9",)], "user_id string"), items=sp.createDataFrame([("i9",)], "item_id string"))
    with pytest.raises(SchemaMismatch, match="event_type"):
        write_loaded(ctx, bad, source="t")
    assert {t: ctx.store.version(t) for t in versions} == versions
    assert [r.user_id for r in ctx.store.read("users").collect()] == ["u1"]


def test_dimension_rows_are_checked_quarantined_and_collapsed_once(ctx):
    """A null/empty or conflicting key never reaches users/ground_truth; exact copies collapse; reruns add nothing."""
    from causalrec.ingest.job import write_loaded
    from causalrec.loaders import LoadedData

    sp = ctx.spark
    users = sp.createDataFrame(
        [("u1", "a"), (None, "b"), ("  ", "c"), ("u2", "d"), ("u2 ", "d"), ("u3", "x"), ("u3", "y"), ("u3", "x")],
        "user_id string, segment string")
    truth = sp.createDataFrame([("u1", "i1", 0.5), ("u1", None, 0.1), ("u2", "i1", 0.2), ("u2", "i1", 0.3)],
                               "user_id string, item_id string, true_preference double")
    data = LoadedData(name="t", events=None, users=users, items=sp.createDataFrame([("i1",)], "item_id string"),
                      ground_truth=truth, sources={"users": "users.csv", "ground_truth": "truth.csv"},
                      expected={"users": 8})
    out = write_loaded(ctx, data, source="t")
    written = sorted(((r.user_id, r.segment) for r in ctx.store.read("users").collect()), key=str)
    assert written == [("u1", "a"), ("u2", "d")]
    assert [(r.user_id, r.item_id) for r in ctx.store.read("ground_truth").collect()] == [("u1", "i1")]

    u, gt = out["tables"]["users"], out["tables"]["ground_truth"]
    assert (u["rows"], u["duplicates_collapsed"], u["rows_quarantined"]) == (2, 1, 5)
    assert u["reasons"] == {"NULL_ID": 2, "DUPLICATE_ID": 3}
    assert (gt["rows"], gt["duplicates_collapsed"], gt["rows_quarantined"]) == (1, 0, 3)
    assert out["tables"]["items"]["rows_quarantined"] == 0

    q = ctx.store.read("dimension_quarantine").toPandas()
    qu = q[q.table_name == "users"].sort_values("source_row")
    assert list(zip(qu.source_row, qu.reason)) == [(1, "NULL_ID"), (2, "NULL_ID"), (5, "DUPLICATE_ID"),
                                                   (6, "DUPLICATE_ID"), (7, "DUPLICATE_ID")]
    assert set(qu.source) == {"users.csv"}
    assert "user_id is null or empty" in qu.detail.iloc[0]
    assert "user_id 'u3' is shared by 3 rows" in qu.detail.iloc[2]
    assert json.loads(qu.payload.iloc[1])["user_id"] == "  "  # the key as it came
    qt = q[q.table_name == "ground_truth"].set_index("source_row")
    assert qt.loc[1, "reason"] == "NULL_ID" and "item_id" in qt.loc[1, "detail"]
    assert list(qt.loc[[2, 3], "reason"]) == ["DUPLICATE_ID"] * 2

    # every dimension table written gets its ingest_log row; each row read is accounted for once
    log = ctx.store.read("ingest_log").toPandas().set_index("table_name")
    assert sorted(log.index) == ["ground_truth", "items", "users"]
    assert tuple(log.loc["users", ["rows_read", "rows_accepted", "rows_quarantined", "rows_already_present"]]) == (
        8, 2, 5, 1)
    assert json.loads(log.loc["users", "reasons"]) == {"NULL_ID": 2, "DUPLICATE_ID": 3}
    assert log.loc["users", "source"] == "users.csv" and log.loc["users", "ingest_batch"] == u["ingest_batch"]
    assert tuple(log.loc["ground_truth", ["rows_read", "rows_accepted", "rows_quarantined"]]) == (4, 1, 3)
    assert (log.rows_read == log.rows_accepted + log.rows_quarantined + log.rows_already_present).all()
    assert (log.finished_at >= log.started_at).all()

    v = ctx.store.version("dimension_quarantine")
    again = write_loaded(ctx, data, source="t")
    assert again["tables"]["users"] == u
    assert ctx.store.version("dimension_quarantine") == v
    assert ctx.store.read("users").count() == 2
    # the rerun is logged as a run of its own, under the same content-derived batch id
    relog = ctx.store.read("ingest_log").toPandas()
    assert len(relog) == 6 and set(relog[relog.table_name == "users"].ingest_batch) == {u["ingest_batch"]}


def test_quarantine_detail_names_the_line_of_a_text_file(ctx, tmp_path):
    """source_row stays the 0-based row; the detail gives the line to open (or says why it cannot)."""
    from causalrec.ingest import job

    folder = tmp_path / "in"
    folder.mkdir()
    ok = "e{},u,i,2024-01-01,click,1,,,,"
    # a.csv: header on line 1, the bad row on line 4; b.csv: a blank line 3 the reader skips
    (folder / "a.csv").write_text("\n".join([HEADER, ok.format(1), ok.format(2), "e3,u,i,BAD,click,1,,,,", ok.format(4)]) + "\n")
    (folder / "b.csv").write_text("\n".join([HEADER, "b1,u,i,BAD,click,1,,,,", "  ", ok.format(5),
                                             "b3,u,i,BAD,click,1,,,,"]) + "\n")
    ctx.cfg.data.source, ctx.cfg.data.path, ctx.cfg.data.format = "files", str(folder), "csv"
    assert job.run(ctx)["tables"]["events"]["rows_quarantined"] == 3
    q = {json.loads(r.payload)["event_id"]: r for r in ctx.store.read("events_quarantine").collect()}
    assert q["e3"].source_row == 2 and q["e3"].detail.endswith("(line 4)")
    assert q["b1"].detail.endswith("(line 2)")
    assert q["b3"].source_row == 2 and "line 5" not in q["b3"].detail
    assert "(data row 3 after the header; its line is not known" in q["b3"].detail

    p = tmp_path / "ev.jsonl"
    p.write_text('{"event_id": "j1", "user_id": "u", "item_id": "i", "event_time": "2024-01-01", "event_type": "click"}\n'
                 '{"event_id": "j2", "user_id": "u", "item_id": "i", "event_time": "BAD", "event_type": "click"}\n')
    ctx.cfg.data.path, ctx.cfg.data.format = str(p), "jsonl"
    job.run(ctx)
    j2 = [r for r in ctx.store.read("events_quarantine").collect() if json.loads(r.payload)["event_id"] == "j2"]
    assert j2[0].source_row == 1 and j2[0].detail.endswith("(line 2)")


def _quarantine_by_id(ctx):
    return {json.loads(r.payload)["event_id"]: r for r in ctx.store.read("events_quarantine").collect()}


def test_csv_files_are_matched_to_their_header_by_name(ctx, tmp_path):
    """A file of a folder whose header lists the columns in another order fails the batch, naming it,
    before anything is written (Spark's default matches by position and swaps the values)."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import SourceError, read_events

    folder = tmp_path / "in"
    folder.mkdir()
    _write_csv(folder / "a.csv", ["e1,u1,i1,2024-01-01T00:00:00Z,click,1,,,,"])
    cols = HEADER.split(",")
    (folder / "b.csv").write_text(",".join([cols[1], cols[0]] + cols[2:]) + "\nuB,eB,i1,2024-01-02,click,1,,,,\n")
    with pytest.raises(SourceError, match=r"CSV file .*/in/[ab]\.csv: its header does not match") as err:
        ingest_events(ctx, read_events(ctx.spark, str(folder), "csv"), source=str(folder), fmt="csv")
    assert "Header: user_id, event_id" in str(err.value) or "Header: event_id, user_id" in str(err.value)
    for t in ("events", "events_quarantine", "ingest_log"):
        assert not ctx.store.exists(t)


def test_csv_row_with_more_fields_than_the_header_is_quarantined(ctx, tmp_path):
    """Spark keeps a long row's first fields and drops the rest silently; such a row is quarantined."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    path = _write_csv(tmp_path / "b.csv", [
        "e1,u1,i1,2024-01-01T00:00:00Z,click,1,3,true,0.5,random,EXTRA,MORE",
        'e2,u1,i1,2024-01-01T00:00:00Z,click,1,3,true,0.5,"p, q"',  # a quoted comma is no extra field
        'e3,u1,i1,2024-01-01T00:00:00Z,click,1,3,true,0.5,"p, q",X',
        "e4,u1,i1,2024-01-01T00:00:00Z,click",  # fewer fields: the missing optional columns are null
    ])
    s = ingest_events(ctx, read_events(ctx.spark, path, "csv"), source=path, fmt="csv")
    assert s["reasons"] == {"EXTRA_FIELDS": 2} and s["rows_accepted"] == 2
    q = _quarantine_by_id(ctx)
    assert "the row has 12 fields but the header has 10" in q["e1"].detail and q["e1"].detail.endswith("(line 2)")
    assert "the row has 11 fields" in q["e3"].detail and q["e3"].source_row == 2
    ev = {r.event_id: r for r in ctx.store.read("events").collect()}
    assert ev["e2"].policy == "p, q" and ev["e4"].value is None
    # nothing is lost: the payload keeps the raw row, extra fields included (the parsed columns drop them)
    assert json.loads(q["e1"].payload)["raw_record"].endswith(",random,EXTRA,MORE")
    assert "raw_record" not in json.loads(q["e3"].payload) or json.loads(q["e3"].payload)["raw_record"].endswith(",X")


def test_csv_quoted_line_break_stays_in_its_field_and_no_wrong_line_is_named(ctx, tmp_path):
    """A quoted field may span lines (RFC 4180, doubled quotes); below such a record the line is not known."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    p = tmp_path / "b.csv"
    p.write_text(HEADER + ",context\n" + "\n".join([
        "e0,u1,i1,BAD,click,1,,,,random,",  # line 2
        'e1,u1,i1,2024-01-01T00:00:00Z,click,1,,,,random,"{""a"":\n1}"',  # lines 3-4
        "e2,u1,i1,2024-01-01T00:00:00Z,click,1,,,,random,",  # line 5
        "e3,u1,i1,BAD,click,1,,,,random,",  # line 6, though row 3 + 2 = 5
    ]) + "\n")
    s = ingest_events(ctx, read_events(ctx.spark, str(p), "csv"), source=str(p), fmt="csv")
    assert (s["rows_read"], s["rows_accepted"], s["reasons"]) == (4, 2, {"BAD_TIMESTAMP": 2})
    ev = {r.event_id: r for r in ctx.store.read("events").collect()}
    assert ev["e1"].context == '{"a":\n1}' and ev["e2"].policy == "random"
    q = _quarantine_by_id(ctx)
    assert q["e0"].detail.endswith("(line 2)")
    assert q["e3"].source_row == 3 and "(line" not in q["e3"].detail
    assert "(data row 4 after the header; its line is not known" in q["e3"].detail


def test_file_names_with_glob_characters_and_line_lookup_before_any_write(ctx, tmp_path, monkeypatch):
    """``events[1].csv``: Spark reads ``[ ]`` in a path as a glob; and should finding the lines fail,
    no table has been written yet (a rerun starts from the same state)."""
    from causalrec.ingest import sources
    from causalrec.ingest.job import ingest_events

    folder = tmp_path / "in"
    folder.mkdir()
    name = str(folder / "events[1]{a}.csv")
    _write_csv(folder / "events[1]{a}.csv", ["e1,u1,i1,2024-01-01T00:00:00Z,click,1,,,,", "e2,u1,i1,BAD,click,1,,,,"])

    def broken(spark, files):
        raise OSError("injected")

    with monkeypatch.context() as m:
        m.setattr(sources, "first_blank_lines", broken)
        with pytest.raises(OSError, match="injected"):
            ingest_events(ctx, sources.read_events(ctx.spark, str(folder), "csv"), source=str(folder), fmt="csv")
    for t in ("events", "events_quarantine", "ingest_log"):
        assert not ctx.store.exists(t)

    s = ingest_events(ctx, sources.read_events(ctx.spark, str(folder), "csv"), source=str(folder), fmt="csv")
    assert s["rows_accepted"] == 1 and s["rows_quarantined"] == 1
    q = _quarantine_by_id(ctx)["e2"]
    assert q.source == name and q.detail.endswith("(line 3)")


def test_relative_delta_path_is_relative_to_the_working_directory(ctx, tmp_path, monkeypatch):
    from causalrec.ingest.sources import read_events

    sp = ctx.spark
    ctx.store.write(sp.createDataFrame([("e1",), ("e2",)], "event_id string"), str(tmp_path / "input_events"))
    monkeypatch.chdir(tmp_path)  # the store's root is tmp_path/tables: not where the path points
    assert read_events(sp, "input_events", "delta", store=ctx.store).count() == 2


def test_times_are_read_as_utc_whatever_the_session_time_zone(ctx, tmp_path):
    """A time without a zone is UTC and event_date is the UTC date, even if spark.sql.session.timeZone is not UTC."""
    import datetime as dt

    from pyspark.sql import functions as F

    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    path = _write_csv(tmp_path / "b.csv", [
        "e1,u1,i1,2024-01-02T02:00:00Z,click,1,,,,",
        "e2,u1,i1,2024-01-02 02:00:00,click,1,,,,",
        "e3,u1,i1,2024-01-02T01:00:00+05:00,click,1,,,,",
        "e4,u1,i1,2024-01-02,click,1,,,,",
    ])
    sp = ctx.spark
    old = sp.conf.get("spark.sql.session.timeZone")
    sp.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        s = ingest_events(ctx, read_events(sp, path, "csv"), source=path, fmt="csv")
        got = {r.event_id: (r.t, r.event_date) for r in ctx.store.read("events").select(
            "event_id", F.unix_seconds("event_time").alias("t"), "event_date").collect()}
    finally:
        sp.conf.set("spark.sql.session.timeZone", old)
    assert s["rows_accepted"] == 4

    def utc(*a):
        return int(dt.datetime(*a, tzinfo=dt.timezone.utc).timestamp())

    assert got == {"e1": (utc(2024, 1, 2, 2), dt.date(2024, 1, 2)), "e2": (utc(2024, 1, 2, 2), dt.date(2024, 1, 2)),
                   "e3": (utc(2024, 1, 1, 20), dt.date(2024, 1, 1)), "e4": (utc(2024, 1, 2), dt.date(2024, 1, 2))}


def test_csv_blank_lines_above_the_header_are_skipped_and_counted_in_the_lines(ctx, tmp_path):
    """Blank and whitespace-only lines (tabs too) above a header are skipped, in a folder where only
    some files have them; the quarantine detail names the file's own line, counting them."""
    from causalrec.ingest import job

    folder = tmp_path / "in"
    folder.mkdir()
    ok = "{},u1,i1,2024-01-01T00:00:00Z,click,1,,,,"
    # a.csv: three blank lines, the header on line 4, a bad row on line 6; a blank line 8 below it
    (folder / "a.csv").write_text("\n".join(["", "  ", "\t", HEADER, ok.format("a1"), "a2,u1,i1,BAD,click,1,,,,",
                                             ok.format("a3"), "", "a4,u1,i1,BAD,click,1,,,,"]) + "\n")
    (folder / "b.csv").write_text("\n".join([HEADER, "b1,u1,i1,BAD,click,1,,,,", ok.format("b2")]) + "\n")
    ctx.cfg.data.source, ctx.cfg.data.path, ctx.cfg.data.format = "files", str(folder), "csv"
    s = job.run(ctx)["tables"]["events"]
    assert (s["rows_read"], s["rows_accepted"], s["rows_quarantined"]) == (6, 3, 3)
    assert sorted(r.event_id for r in ctx.store.read("events").collect()) == ["a1", "a3", "b2"]
    q = _quarantine_by_id(ctx)
    assert (q["a2"].source, q["a2"].source_row) == (str(folder / "a.csv"), 1)
    assert q["a2"].detail.endswith("(line 6)")
    assert q["a4"].source_row == 3 and "(data row 4 after the header; its line is not known" in q["a4"].detail
    assert q["b1"].source_row == 0 and q["b1"].detail.endswith("(line 2)")


def test_csv_quoted_field_left_open_fails_before_any_write(ctx, tmp_path):
    """An opening quote never closed would take in the lines below it as one field, to the end of the file
    or, for the reader, to the next quote that is not doubled: the batch fails, naming the file and the
    line the quote opens on, and no table changes. A file whose last record has a quoted line break (and
    doubled quotes) that does close is read as before."""
    from causalrec.ingest import job
    from causalrec.ingest.sources import SourceError

    first = tmp_path / "first.csv"
    _write_csv(first, ["e0,u1,i1,2024-01-01T00:00:00Z,click,1,,,,"])
    ctx.cfg.data.source, ctx.cfg.data.path, ctx.cfg.data.format = "files", str(first), "csv"
    job.run(ctx)
    versions = {t: ctx.store.version(t) for t in ("events", "events_quarantine", "ingest_log")}

    folder = tmp_path / "in"
    folder.mkdir()
    row = "{},u1,i1,2024-01-01T00:00:00Z,click,1,,,,random,{}"
    (folder / "good.csv").write_text(HEADER + ",context\n" + "\n".join([
        row.format("g1", ""), row.format("g2", '"{""a"":\n1}"')]) + "\n")
    ctx.cfg.data.path = str(folder)
    for last, message in [("", r"before the end of the file, and every quote inside a quoted field doubled "
                                r'\(""\); as it is, the field would take in everything from that quote to the end '
                                r"of the file"),
                          ('"x"', r"followed by a delimiter or the line end, .* up to the quote on line 5")]:
        (folder / "bad.csv").write_text(HEADER + ",context\n" + "\n".join([
            row.format("e1", ""),  # line 2
            row.format("e2", '"{""a"": 1'),  # line 3: the quote opens and is never closed
            row.format("e3", ""),
            row.format("e4", last)]) + "\n")
        with pytest.raises(SourceError, match=r"CSV file .*/in/bad\.csv: the quoted field that opens on line 3 is "
                                              r'never closed: expected a closing quote \("\) ' + message):
            job.run(ctx)
        assert {t: ctx.store.version(t) for t in versions} == versions
    assert sorted(r.event_id for r in ctx.store.read("events").collect()) == ["e0"]

    (folder / "bad.csv").unlink()
    s = job.run(ctx)["tables"]["events"]
    assert (s["rows_read"], s["rows_accepted"]) == (2, 2)
    assert {r.event_id: r.context for r in ctx.store.read("events").collect()}["g2"] == '{"a":\n1}'


def test_csv_quote_left_open_on_the_last_line_fails_before_any_write_without_a_final_line_break(ctx, tmp_path):
    """A file need not end with a line break; a quote that opens on its last line then takes in no line
    break, so the record shows no sign of it, and the batch fails all the same, naming the file and the
    line, wherever Spark's reader ends the file inside the field: ``"a \\"`` too (a quote that ends the
    file cannot take the reader's fast path, and ``\\"`` is a literal quote; with a line break after
    it, that quote closes the field, backslash kept, and the file is read). So does a quote left open
    in a field past the header's on a last line that the file's line break ends (the raw text the
    reader keeps of a row with extra fields leaves that line break out). Files whose quotes close,
    doubled and backslash-escaped quotes inside, are read, with or without a final line break."""
    from causalrec.ingest import job
    from causalrec.ingest.sources import SourceError

    folder = tmp_path / "in"
    folder.mkdir()
    row = "{},u1,i1,2024-01-01T00:00:00Z,click,1,,,,{},{}"
    top = HEADER + ",context\n" + row.format("g0", "random", "") + "\n"
    (folder / "a.csv").write_text(top.replace("g0", "a0") + row.format("a1", "random", "x"))  # no quote, no break
    (folder / "b.csv").write_text(top.replace("g0", "b0") + row.format("b1", '"p, q"', r'"say ""hi"" \"there\""'))
    (folder / "c.csv").write_text(top.replace("g0", "c0") + row.format("c1", "random", r'"a \"') + "\n")
    ctx.cfg.data.source, ctx.cfg.data.path, ctx.cfg.data.format = "files", str(folder), "csv"
    for last, end in [(row.format("e2", "random", '"{""a"": 1'), ""),
                      (row.format("e2", "random", r'"a \"'), ""),
                      (row.format("e2", "random", "x") + ',"extra', "\n")]:
        (folder / "bad.csv").write_text(top.replace("g0", "e1") + last + end)  # line 3
        with pytest.raises(SourceError, match=r"CSV file .*/in/bad\.csv: the quoted field that opens on line 3 is "
                                              r'never closed: expected a closing quote \("\) before the end of '
                                              r"the file.*everything from that quote to the end of the file"):
            job.run(ctx)
        for t in ("events", "events_quarantine", "ingest_log"):
            assert not ctx.store.exists(t)

    (folder / "bad.csv").unlink()
    s = job.run(ctx)["tables"]["events"]
    assert (s["rows_read"], s["rows_accepted"]) == (6, 6)
    ev = {r.event_id: r for r in ctx.store.read("events").collect()}
    assert (ev["a1"].context, ev["b1"].policy, ev["b1"].context) == ("x", "p, q", 'say "hi" "there"')
    assert ev["c1"].context == "a \\"


def _loaded(sp, events, mcar=None):
    from causalrec.loaders import LoadedData

    schema = "event_id string, user_id string, item_id string, event_time string, event_type string"
    return LoadedData(name="t", events=sp.createDataFrame(events, schema),
                      mcar_events=sp.createDataFrame(mcar, schema) if mcar is not None else None,
                      users=sp.createDataFrame([("u1",), ("u2",)], "user_id string"),
                      items=sp.createDataFrame([("i1",), ("i2",)], "item_id string"))


def test_loader_rerun_replaces_events_and_same_data_is_a_noop(ctx):
    """A loader/simulator rebuilds the whole data set: a rerun with other output leaves exactly the new rows
    (one overwrite commit per table), a rerun with the same output commits nothing and quarantines nothing twice."""
    from causalrec.ingest.job import write_loaded

    sp, st = ctx.spark, ctx.store
    ev = lambda i, u="u1", t="click": (f"e{i}", u, "i1", f"2024-01-0{i}T00:00:00Z", t)  # noqa: E731
    first = _loaded(sp, [ev(1), ev(2), ev(3), ev(9, t="like")], mcar=[ev(5), ev(6)])
    out = write_loaded(ctx, first, source="t")
    assert out["tables"]["events"]["rows_accepted"] == 3 and out["tables"]["events"]["rows_quarantined"] == 1
    tables = ("events", "mcar_events", "users", "items", "events_quarantine", "dimension_quarantine")
    versions = {t: st.version(t) for t in tables}

    again = write_loaded(ctx, first, source="t")  # same config, same data: no new version anywhere
    assert {t: st.version(t) for t in tables} == versions
    e = again["tables"]["events"]
    assert (e["rows_read"], e["rows_accepted"], e["rows_already_present"], e["rows_quarantined"]) == (4, 0, 3, 1)
    assert again["tables"]["mcar_events"]["rows_already_present"] == 2
    assert st.read("events_quarantine").count() == 1

    # other config: fewer events, one changed; the old rows must not stay (they did with the old append)
    second = _loaded(sp, [ev(1), ev(4, u="u2")], mcar=[ev(6)])
    out = write_loaded(ctx, second, source="t")
    assert sorted(r.event_id for r in st.read("events").collect()) == ["e1", "e4"]
    assert sorted(r.event_id for r in st.read("mcar_events").collect()) == ["e6"]
    assert st.version("events") == versions["events"] + 1  # one atomic commit
    assert st.version("mcar_events") == versions["mcar_events"] + 1
    assert out["tables"]["events"]["rows_accepted"] == 2 and out["tables"]["events"]["rows_already_present"] == 0
    assert {r.ingest_batch for r in st.read("events").collect()} == {out["tables"]["events"]["ingest_batch"]}

    # every row of a new data set rejected: the table is emptied, not left with the previous data set
    write_loaded(ctx, _loaded(sp, [ev(7, t="like")]), source="t")
    assert st.read("events").count() == 0


def test_loader_rerun_empties_a_table_the_source_no_longer_produces(ctx):
    """Switching a root's source (Coat -> OBD) or turning the simulator's MCAR slice off: the earlier
    mcar_events are not part of the new data set, so they are emptied in one commit (not left for
    propensity / training_set to mix in), readers take the empty table as absent, and a rerun writes nothing."""
    from causalrec.ingest.job import write_loaded

    sp, st = ctx.spark, ctx.store
    ev = lambda i: (f"e{i}", "u1", "i1", f"2024-01-0{i}T00:00:00Z", "click")  # noqa: E731
    write_loaded(ctx, _loaded(sp, [ev(1)], mcar=[ev(5), ev(6)]), source="t")
    assert st.has_rows("mcar_events")
    v = st.version("mcar_events")

    out = write_loaded(ctx, _loaded(sp, [ev(1), ev(2)]), source="t")
    assert out["tables"]["mcar_events"]["emptied"] is True
    assert st.read("mcar_events").count() == 0 and st.version("mcar_events") == v + 1
    assert st.exists("mcar_events") and not st.has_rows("mcar_events")
    assert not st.has_rows("ground_truth")  # never written: absent, nothing created

    write_loaded(ctx, _loaded(sp, [ev(1), ev(2)]), source="t")
    assert st.version("mcar_events") == v + 1  # already empty: no new version, downstream stays up to date


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_column_name_with_a_backquote_is_read_like_any_other(ctx, tmp_path, fmt):
    """Names from the file were put between backquotes unescaped: an extra column ``no`te`` failed the
    whole batch (the CSV error blamed reading the file) instead of being carried like any extra column."""
    from causalrec.ingest.job import ingest_events
    from causalrec.ingest.sources import read_events

    if fmt == "csv":
        path = tmp_path / "b.csv"
        path.write_text(HEADER + ",no`te\ne1,u1,i1,2024-01-01T00:00:00Z,click,1,,,,,x\n"
                        "e2,u1,i1,BAD,click,1,,,,,y\n")
    else:
        path = tmp_path / "b.jsonl"
        path.write_text("\n".join(json.dumps({"event_id": e, "user_id": "u1", "item_id": "i1", "event_time": t,
                                              "event_type": "click", "value": 1, "no`te": n})
                                  for e, t, n in (("e1", "2024-01-01T00:00:00Z", "x"), ("e2", "BAD", "y"))) + "\n")
    s = ingest_events(ctx, read_events(ctx.spark, str(path), fmt), source=str(path), fmt=fmt)
    assert s["rows_accepted"] == 1 and s["reasons"] == {"BAD_TIMESTAMP": 1}
    q = _quarantine_by_id(ctx)
    assert json.loads(q["e2"].payload)["no`te"] == "y"  # nothing lost: the odd column is in the payload



def test_files_source_writes_users_and_items_so_the_features_stage_runs(ctx, tmp_path):
    """A files pipeline stopped at features ("users does not exist: run the ingest stage") right after
    ingest, which wrote only events. Now ingest writes users and items: from data.users_path /
    data.items_path when given (validated, bad rows quarantined), else the ids the events hold."""
    import json

    import pandas as pd

    from causalrec.features.job import run as features
    from causalrec.ingest import job

    pdf = pd.DataFrame({"event_id": ["p1", "p2", "p3"], "user_id": ["u1", "u2", "u2"], "item_id": ["i1", "i2", "i1"],
                        "event_time": pd.to_datetime(["2024-03-01", "2024-03-02", "2024-03-03"], utc=True),
                        "event_type": ["view", "purchase", "view"], "value": [1.0, 12.5, 1.0]})
    events = tmp_path / "events.parquet"
    pdf.to_parquet(events, coerce_timestamps="us", allow_truncated_timestamps=True)
    ctx.cfg.data.source, ctx.cfg.data.path, ctx.cfg.data.format = "files", str(events), "parquet"
    out = job.run(ctx)
    assert out["tables"]["users"]["rows"] == 2 and out["tables"]["items"]["rows"] == 2
    assert sorted(r[0] for r in ctx.store.read("items").select("item_id").collect()) == ["i1", "i2"]
    assert features(ctx)["item_features"] == 2
    versions = {t: ctx.store.version(t) for t in ("users", "items")}
    job.run(ctx)  # nothing new: no new versions downstream stages would see as changed
    assert {t: ctx.store.version(t) for t in ("users", "items")} == versions
    # an items file: its titles are the items table; a key with two different rows is quarantined
    items = tmp_path / "items.parquet"
    pd.DataFrame({"item_id": ["i1", "i2", "i2"], "text": ["red wool coat", "blue hat", "green hat"],
                  "price": [10.0, 5.0, 6.0]}).to_parquet(items)
    ctx.cfg.data.items_path = str(items)
    out = job.run(ctx)
    assert out["tables"]["items"]["rows"] == 1 and out["tables"]["items"]["rows_quarantined"] == 2
    assert ctx.store.read("items").collect()[0]["text"] == "red wool coat"
    q = ctx.store.read("dimension_quarantine").where("table_name = 'items'").collect()
    assert len(q) == 2 and all(str(items) in json.dumps(r.asDict(), default=str) for r in q)
