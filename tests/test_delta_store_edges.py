"""The Delta layer's edge cases (offline backend): re-partitioning overwrites, partition overwrites,
URI roots, row counts without file statistics, keyed writes after a restore."""
from __future__ import annotations

import datetime as dt
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import types as T

from causalrec.storage import DeltaStore, DeltaWriteError


def _log(path, version) -> list:
    with open(os.path.join(path, "_delta_log", f"{version:020d}.json")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _parquet_files(path) -> set:
    return {os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs
            if f.endswith(".parquet")}


def _rows(store, name):
    return sorted(tuple(r) for r in store.read(name).collect())


# -- overwrite_schema re-partitions the table as the write asks --------------------------------------
@pytest.mark.parametrize("new_parts, schema, rows", [
    (["q"], "v long, p string, q string", [(2, "b", "y")]),  # a new partition column
    ([], "v long, p string, q string", [(2, "b", "y")]),  # no partition_by: unpartitioned
    ([], "v long", [(3,)]),  # the old partition column dropped from the schema
])
def test_overwrite_schema_repartitions_the_table(spark, store, new_parts, schema, rows):
    store.write(spark.createDataFrame([(1, "a", "x"), (4, "b", "x")], "v long, p string, q string"), "t",
                partition_by=["p"])
    v = store.write(spark.createDataFrame(rows, schema), "t", "overwrite", partition_by=new_parts,
                    overwrite_schema=True)
    assert v == 1
    actions = _log(store.path("t"), 1)
    meta = next(a["metaData"] for a in actions if "metaData" in a)
    assert meta["partitionColumns"] == new_parts
    adds = [a["add"] for a in actions if "add" in a]
    assert adds and all(set(a["partitionValues"]) == set(new_parts) for a in adds)
    table = DeltaTable(store.path("t"))  # delta-rs opens it and reads the same rows
    assert table.metadata().partition_columns == new_parts
    assert sorted(tuple(r.values()) for r in table.to_pyarrow_table().to_pylist()) == rows
    assert store.partition_columns("t") == new_parts and _rows(store, "t") == rows
    # and the table takes an append in its new layout
    store.write(spark.createDataFrame(rows, schema), "t")
    assert _rows(store, "t") == sorted(rows * 2)


def test_a_partition_column_missing_from_the_schema_is_refused_before_any_commit(spark, store):
    from causalrec.storage.delta_rs_commit import commit_files

    store.write(spark.createDataFrame([(1, "a")], "v long, p string"), "t", partition_by=["p"])
    with pytest.raises(DeltaWriteError, match="partition column.*'p'"):
        store.write(spark.createDataFrame([(2,)], "v long"), "t", "overwrite", partition_by=["p"],
                    overwrite_schema=True)
    with pytest.raises(DeltaWriteError, match="partition column.*'nope'"):
        store.write(spark.createDataFrame([(2,)], "v long"), "fresh", partition_by=["nope"])
    assert store.version("t") == 0 and not store.exists("fresh")
    # commit_files checks it too (its callers are not only the store)
    schema = pa.schema([pa.field("v", pa.int64())])
    with pytest.raises(DeltaWriteError, match="partition column.*'p'"):
        commit_files(path=store.path("t"), files=[], arrow_schema=schema, partition_by=["p"], overwrite=True,
                     replace_where=None, read_version=0, commit_metadata={"_overwrite_schema": True})
    assert store.version("t") == 0 and _rows(store, "t") == [(1, "a")]


def test_a_repartitioning_overwrite_planned_on_an_old_version_is_refused(spark, store):
    from causalrec.storage.delta_rs_commit import ConcurrentWriteError, commit_files

    store.write(spark.createDataFrame([(1, "a")], "v long, p string"), "t", partition_by=["p"])
    store.write(spark.createDataFrame([(2, "b")], "v long, p string"), "t")  # lands after the plan on v0
    schema = pa.schema([pa.field("v", pa.int64())])
    pq.write_table(pa.table({"v": pa.array([9], pa.int64())}, schema=schema),
                   os.path.join(store.path("t"), "n.parquet"))
    f = {"path": "n.parquet", "size": os.path.getsize(os.path.join(store.path("t"), "n.parquet")),
         "partition_values": {}, "modification_time": 0, "stats": None}
    with pytest.raises(ConcurrentWriteError, match="concurrent"):
        commit_files(path=store.path("t"), files=[f], arrow_schema=schema, partition_by=[], overwrite=True,
                     replace_where=None, read_version=0, commit_metadata={"_overwrite_schema": True})
    assert store.version("t") == 1 and store.partition_columns("t") == ["p"]


# -- two writers creating one table ---------------------------------------------------------------
def _staged(path, name, schema, values) -> dict:
    from causalrec.storage.delta_rs_source import file_stats

    os.makedirs(path, exist_ok=True)
    t = pa.table({c: pa.array(values, schema.field(c).type) for c in schema.names}, schema=schema)
    pq.write_table(t, os.path.join(path, name))
    return {"path": name, "size": os.path.getsize(os.path.join(path, name)), "partition_values": {},
            "modification_time": 0, "stats": file_stats(t)}


def _race(path, writers) -> list:
    """Run the writers' commits at once (a barrier releases them together); each one's outcome."""
    import threading

    barrier, out = threading.Barrier(len(writers)), [None] * len(writers)

    def go(j):
        barrier.wait()
        try:
            writers[j]()
            out[j] = "ok"
        except Exception as exc:  # the outcome is what the test looks at
            out[j] = type(exc).__name__
    threads = [threading.Thread(target=go, args=(j,)) for j in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("case", ["same key", "different schemas"])
def test_two_writers_creating_a_table_at_once_never_both_apply(tmp_path, case):
    """Both planned on a missing table: delta-rs retried the loser's create on version 1, a second table over
    the first (new id and schema). A keyed write was then applied twice, and the first writer's rows read
    back as null under the second schema. Now one creates version 0; the keyed loser is told its write is
    already applied, and a plain append is added to the winner's table (or refused if its schema differs)."""
    from causalrec.storage.delta_rs_commit import commit_files

    a_schema = pa.schema([pa.field("id", pa.int64())])
    b_schema = a_schema if case == "same key" else pa.schema([pa.field("name", pa.string())])
    for i in range(12):  # the window is narrow: a few races land the commits together
        path = str(tmp_path / f"t{i}")
        meta = {"write_key": "K"} if case == "same key" else {}
        files = [_staged(path, "a.parquet", a_schema, [1]),
                 _staged(path, "b.parquet", b_schema, [2] if case == "same key" else ["x"])]
        writers = [lambda f=f, sch=sch: commit_files(path=path, files=[f], arrow_schema=sch, partition_by=[],
                                                     overwrite=False, replace_where=None, read_version=-1,
                                                     commit_metadata=dict(meta))
                   for f, sch in zip(files, (a_schema, b_schema))]
        outcomes = sorted(_race(path, writers))
        table = DeltaTable(path)
        assert len(table.history()) == 1, (i, outcomes)  # one create, nothing committed over it
        rows = table.to_pyarrow_table().to_pylist()
        assert len(rows) == 1 and None not in rows[0].values(), (i, outcomes, rows)
        expected = "WriteAlreadyApplied" if case == "same key" else "DeltaWriteError"
        assert outcomes == sorted(["ok", expected]), (i, outcomes)


# -- partition overwrites ---------------------------------------------------------------------------
def test_a_partition_overwrite_condition_matches_only_the_values_given(spark):
    """The condition was built by doubling quotes only: Spark SQL also reads a backslash as an escape, so
    the value ``\\' OR 1=1 --`` ended the literal early and the condition matched every row (on delta-spark
    a partition overwrite would have replaced the whole table); ``x\\`` did not parse."""
    from causalrec.storage.store import replace_where_sql

    values = ["a", "b", "\\' OR 1=1 --", "x\\", "it's", "q\\'r"]
    df = spark.createDataFrame([(v, i) for i, v in enumerate(values)], "`p``q` string, i int")
    for v in values:
        assert [r.i for r in df.where(replace_where_sql([("p`q", "=", v)])).collect()] == [values.index(v)], v
    got = df.where(replace_where_sql([("p`q", "in", ["\\' OR 1=1 --", "b"])])).collect()
    assert sorted(r.i for r in got) == [1, 2]


def test_a_partition_overwrite_refuses_rows_outside_replace_where(spark, store):
    store.write(spark.createDataFrame([(1, "a"), (2, "b")], "v long, p string"), "t", partition_by=["p"])
    before = _parquet_files(store.path("t"))
    with pytest.raises(DeltaWriteError, match=r"tables/t: .*partition p='a'.*\[\['p', '=', 'b'\]\]"):
        store.write(spark.createDataFrame([(20, "b"), (99, "a")], "v long, p string"), "t", "overwrite",
                    replace_where=[("p", "=", "b")])
    assert store.version("t") == 0 and _rows(store, "t") == [(1, "a"), (2, "b")]
    assert _parquet_files(store.path("t")) == before  # the failed write's files were removed
    # typed comparisons: 10 >= 9 on an int partition column (as strings "10" < "9"), a null partition is outside
    store.write(spark.createDataFrame([(1, 2), (2, 9)], "v long, p int"), "n", partition_by=["p"])
    store.write(spark.createDataFrame([(3, 10)], "v long, p int"), "n", "overwrite", replace_where=[("p", ">=", 9)])
    with pytest.raises(DeltaWriteError, match="p=None"):
        store.write(spark.createDataFrame([(4, None)], "v long, p int"), "n", "overwrite",
                    replace_where=[("p", "in", [9, 10])])
    assert sorted((r.p, r.v) for r in store.read("n").collect()) == [(2, 1), (10, 3)]


def test_replace_where_takes_values_of_the_column_type(spark, store):
    store.write(spark.createDataFrame([(1, 2), (2, 9), (3, 10)], "v long, p int"), "t", partition_by=["p"])
    store.write(spark.createDataFrame([(90, 9)], "v long, p int"), "t", "overwrite", replace_where=[("p", ">=", 9)])
    assert sorted((r.p, r.v) for r in store.read("t").collect()) == [(2, 1), (9, 90)]
    store.write(spark.createDataFrame([(20, 2)], "v long, p int"), "t", "overwrite",
                replace_where=[("p", "in", [2, 3])])
    assert sorted((r.p, r.v) for r in store.read("t").collect()) == [(2, 20), (9, 90)]
    store.write(spark.createDataFrame([(1, dt.date(2024, 1, 1)), (2, dt.date(2024, 1, 2))], "v long, d date"), "d",
                partition_by=["d"])
    store.write(spark.createDataFrame([(20, dt.date(2024, 1, 2))], "v long, d date"), "d", "overwrite",
                replace_where=[("d", "not in", [dt.date(2024, 1, 1)])])
    assert sorted((str(r.d), r.v) for r in store.read("d").collect()) == [("2024-01-01", 1), ("2024-01-02", 20)]


# -- URI roots --------------------------------------------------------------------------------------
def test_a_file_uri_root_is_written_as_its_local_path(spark, tmp_path):
    root = tmp_path / "uri_root"
    (root / "t").mkdir(parents=True)  # an existing folder: the rows went missing without an error
    store = DeltaStore(spark, root.as_uri())  # file:///.../uri_root
    assert store.write(spark.createDataFrame([(1, "a"), (2, "b")], "v long, s string"), "t") == 0
    assert _rows(store, "t") == [(1, "a"), (2, "b")]
    assert DeltaTable(str(root / "t")).to_pyarrow_table().num_rows == 2
    assert store.root == str(root) and store.path("t") == str(root / "t")


@pytest.mark.parametrize("root", ["s3://bucket/tables", "abfss://c@acct.dfs.core.windows.net/t", "hdfs://nn/t",
                                  "dbfs:/tables"])
def test_an_object_store_root_is_refused_by_the_offline_writer(spark, root):
    store = DeltaStore(spark, root, backend="delta-rs")  # reading through delta-rs stays possible
    with pytest.raises(DeltaWriteError, match="local .*path.*delta-spark"):
        store.write(spark.createDataFrame([(1,)], "v long"), "t")


def test_a_failed_rename_is_not_taken_for_an_abort(tmp_path, monkeypatch):
    """Only an abort's sweep may make a published file vanish; any other failure must surface."""
    from causalrec.storage.delta_rs_source import DeltaRsWriter

    schema = T.StructType([T.StructField("x", T.LongType())])
    table = pa.table({"x": [1, 2, 3]})
    uri = "file://" + str(tmp_path)  # pyarrow writes there; a rename of the URI as a local path fails
    writer = DeltaRsWriter({"path": uri}, schema, False)
    with pytest.raises(FileNotFoundError):
        writer._publish(table, f"{uri}/part-{writer.write_id}-a.c000.snappy.parquet")
    # after abort() swept the temporary file, the task's rename failing is expected: not an error
    writer = DeltaRsWriter({"path": str(tmp_path)}, schema, False)
    writer.abort([])
    monkeypatch.setattr(pq, "write_table", lambda *a, **k: None)  # the sweep removed it before the rename
    assert not writer._publish(table, str(tmp_path / f"part-{writer.write_id}-b.c000.snappy.parquet"))


# -- row counts -------------------------------------------------------------------------------------
def test_row_count_counts_files_without_statistics(store):
    from causalrec.storage.delta_rs_commit import commit_files
    from causalrec.storage.delta_rs_source import file_stats

    path = store.path("t")
    os.makedirs(path)

    def staged(name, values, stats):
        t = pa.table({"v": pa.array(values, pa.int64())})
        pq.write_table(t, os.path.join(path, name))
        return {"path": name, "size": os.path.getsize(os.path.join(path, name)), "partition_values": {},
                "modification_time": int(time.time() * 1000), "stats": file_stats(t) if stats else None}

    schema = pa.schema([pa.field("v", pa.int64())])
    commit = dict(path=path, arrow_schema=schema, partition_by=[], overwrite=False, replace_where=None,
                  commit_metadata={})
    commit_files(files=[staged("a.parquet", [1, 2, 3], stats=False)], read_version=-1, **commit)
    assert store.row_count("t") == 3 and store.has_rows("t")
    commit_files(files=[staged("b.parquet", [4], stats=True)], read_version=0, **commit)
    assert store.row_count("t") == 4 and store.row_count("t", version=0) == 3


# -- keyed writes after a restore -------------------------------------------------------------------
def test_a_keyed_rerun_after_a_restore_follows_the_restored_files(spark, store):
    """RESTORE puts back the files of the version it restores: the key is applied exactly when they hold its rows."""
    def rows(ids):
        return spark.createDataFrame([(i,) for i in ids], "id string")

    def ids():
        return sorted(r.id for r in store.read("t").collect())

    assert store.write(rows(["q1", "q2"]), "t", idempotency_key="Q") == 0
    store.write(rows(["z"]), "t")
    store.restore("t", 0)  # still holds the keyed commit's files
    assert store.has_commit_key("t", "Q") and store.write(rows(["q1", "q2"]), "t", idempotency_key="Q") is None
    assert ids() == ["q1", "q2"]
    store.write(rows(["o"]), "t", "overwrite")  # v3: the keyed rows are gone
    assert not store.has_commit_key("t", "Q")
    store.restore("t", 0)  # v4: back again, in the keyed commit's own files
    assert store.has_commit_key("t", "Q") and store.write(rows(["q1", "q2"]), "t", idempotency_key="Q") is None
    assert ids() == ["q1", "q2"]
    # a restore to before the keyed commit removes its rows: it is applied again, once
    store.write(rows(["w"]), "w")
    assert store.write(rows(["k"]), "w", idempotency_key="K") == 1
    store.restore("w", 0)
    assert not store.has_commit_key("w", "K")
    assert store.write(rows(["k"]), "w", idempotency_key="K") == 3
    assert sorted(r.id for r in store.read("w").collect()) == ["k", "w"]
    assert store.write(rows(["k"]), "w", idempotency_key="K") is None


def test_key_lineage_revives_files_a_restore_puts_back():
    """A data file never changes: once a commit adds back a file that held the keyed rows, they are there again."""
    from causalrec.storage.store import _lineage_remains, _partition_key

    a = _partition_key({})
    restore = {"operation": "RESTORE", "operationParameters": {"version": 0}}
    optimize = {"operation": "OPTIMIZE", "operationParameters": {"predicate": "[]"}}
    overwrite = {"operation": "WRITE", "operationParameters": {"mode": "Overwrite"}}

    def remains(*commits):
        log = {0: ({"k1": (a, True)}, {})}
        later = []
        for v, (h, added, removed) in enumerate(commits, start=1):
            log[v] = ({f: (a, True) for f in added}, {f: (a, change) for f, change in removed.items()})
            later.append({**h, "version": v})
        return _lineage_remains(0, later, log.__getitem__, lambda: [])

    assert not remains((overwrite, ["o1"], {"k1": True}))
    assert remains((overwrite, ["o1"], {"k1": True}), (restore, ["k1"], {"o1": True}))
    # compacted, then restored to before the compaction: the original file is back, the compacted one gone
    assert remains((optimize, ["c1"], {"k1": False}), (restore, ["k1"], {"c1": True}))
    assert not remains((optimize, ["c1"], {"k1": False}), (restore, ["k1"], {"c1": True}),
                       (overwrite, ["o2"], {"k1": True}))


# -- reviewed edge cases of the offline writer ------------------------------------------------------------
def test_an_overwrite_does_not_keep_rows_a_concurrent_writer_appended(spark, store, tmp_path):
    """An overwrite planned on version 0 while another writer appends version 1: delta-rs rebased it
    over the append and removed only the files it had seen, so the append's row survived the
    overwrite. It now conflicts and leaves the table as the other writer left it."""
    from pyspark.sql import functions as F

    from causalrec.storage import ConcurrentWriteError

    store.write(spark.createDataFrame([(1, "old")], "id long, tag string"), "t")
    path, flag = store.path("t"), str(tmp_path / "appended")

    @F.udf(T.StringType())
    def append_meanwhile(tag):  # runs in the overwrite's task, after it fixed read_version = 0
        if not os.path.exists(flag):
            open(flag, "w").close()
            from deltalake import write_deltalake

            write_deltalake(path, pa.table({"id": pa.array([2], pa.int64()), "tag": ["concurrent"]}), mode="append")
        return tag

    new = spark.createDataFrame([(10, "new")], "id long, tag string").withColumn("tag", append_meanwhile("tag"))
    with pytest.raises(ConcurrentWriteError, match="concurrent commit conflicts with this overwrite"):
        store.write(new, "t", mode="overwrite")
    assert _rows(store, "t") == [(1, "old"), (2, "concurrent")]


def test_a_merge_that_deletes_a_keyed_writes_rows_lets_the_rerun_write_them(spark, store):
    """MERGE was not counted as removing rows, so the key stayed applied and the rerun was skipped:
    the rows stayed lost (a DELETE with the same effect was handled)."""
    store.write(spark.createDataFrame([(1, "other")], "id long, tag string"), "t", partition_by=["id"])
    store.write(spark.createDataFrame([(2, "keyed")], "id long, tag string"), "t", idempotency_key="K")
    src = pa.table({"id": pa.array([2], pa.int64())})
    DeltaTable(store.path("t")).merge(src, "t.id = s.id", source_alias="s", target_alias="t") \
        .when_matched_delete().execute()
    assert not store.has_commit_key("t", "K")
    store.write(spark.createDataFrame([(2, "keyed")], "id long, tag string"), "t", idempotency_key="K")
    assert _rows(store, "t") == [(1, "other"), (2, "keyed")]


def test_nulls_into_a_not_null_column_are_refused(spark, store):
    store.write(spark.range(3), "t")  # id: bigint NOT NULL
    with pytest.raises(DeltaWriteError, match=r"column 'id' is NOT NULL in the table but the data being written "
                                              r"holds null in it \(1 row"):
        store.write(spark.createDataFrame([(None,)], "id long"), "t")
    assert _rows(store, "t") == [(0,), (1,), (2,)]


def test_nan_and_empty_partition_values_keep_their_rows_readable(spark, store):
    """A NaN partition value matched no row (NaN equals nothing): the rows vanished and the folder
    'p=nan' failed Spark's read; an empty string made a folder 'p=' that Spark refuses (Spark writes
    and reads it as null)."""
    store.write(spark.createDataFrame([(1, float("nan")), (2, 1.0), (3, 1.0)], "id long, p double"), "f",
                partition_by=["p"])
    got = sorted((r.id, r.p) for r in store.read("f").collect())
    assert store.row_count("f") == 3 and got[1:] == [(2, 1.0), (3, 1.0)] and got[0][1] != got[0][1]
    store.write(spark.createDataFrame([(1, ""), (2, "a")], "id long, p string"), "s", partition_by=["p"])
    assert _rows(store, "s") == [(1, None), (2, "a")]


def test_a_binary_column_is_written(spark, store):
    """Binary min/max statistics are bytes, which the stats JSON cannot hold: no table could be written."""
    store.write(spark.createDataFrame([(1, bytearray(b"\x00\x01"))], "id long, b binary"), "t")
    assert [bytes(r.b) for r in store.read("t").collect()] == [b"\x00\x01"]


def test_timestamp_partition_values_read_in_utc_whatever_the_session_time_zone(spark, store):
    """Partition values are written in UTC; Spark parsed the folder names in the session's zone."""
    df = spark.sql("select 1 as id, timestamp'2024-01-01 10:00:00' as t")
    store.write(df, "t", partition_by=["t"])
    zone = spark.conf.get("spark.sql.session.timeZone")
    try:
        spark.conf.set("spark.sql.session.timeZone", "America/New_York")
        epoch = store.read("t").selectExpr("unix_timestamp(t) as e").first().e
    finally:
        spark.conf.set("spark.sql.session.timeZone", zone)
    assert epoch == int(dt.datetime(2024, 1, 1, 10, tzinfo=dt.timezone.utc).timestamp())


def test_a_timestamp_ntz_column_keeps_its_type_and_takes_appends(spark, store):
    """Every timestamp was stored with a UTC zone: a TIMESTAMP_NTZ column read back as TIMESTAMP and
    the next append of the same data was refused as a type clash."""
    df = spark.sql("select timestamp_ntz'2024-01-01 10:00:00' as t")
    store.write(df, "t")
    store.write(df, "t")
    back = store.read("t")
    assert back.schema.simpleString() == "struct<t:timestamp_ntz>"
    assert [r.t for r in back.collect()] == [dt.datetime(2024, 1, 1, 10, 0)] * 2
