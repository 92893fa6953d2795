"""The Delta layer: round trips, write modes, time travel, atomicity and concurrency (offline backend)."""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
from decimal import Decimal

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql import types as T

from causalrec.schemas import EVENTS, SchemaMismatch
from causalrec.storage import ConcurrentWriteError, DeltaStore, DeltaWriteError

ALL_TYPES = T.StructType(
    [
        T.StructField("id", T.LongType(), False),
        T.StructField("i", T.IntegerType()),
        T.StructField("x", T.DoubleType()),
        T.StructField("s", T.StringType()),
        T.StructField("b", T.BooleanType()),
        T.StructField("ts", T.TimestampType()),
        T.StructField("d", T.DateType()),
        T.StructField("dec", T.DecimalType(12, 4)),
        T.StructField("emb", T.ArrayType(T.FloatType())),
        T.StructField("part", T.StringType()),
    ]
)

PARTS = ["plain", "with space", "ünïcødé ✓", "slash/eq=pct%", None]


def _rows(n=10, offset=0):
    out = []
    for k in range(n):
        j = k + offset
        out.append(
            (
                j,
                j * 2,
                j / 3.0,
                f"s{j}",
                j % 2 == 0,
                dt.datetime(2024, 1, 1, 12, 0, 0) + dt.timedelta(hours=j),
                dt.date(2024, 1, 1) + dt.timedelta(days=j),
                Decimal(f"{j}.1234"),
                [float(j), 0.5, -1.25],
                PARTS[j % len(PARTS)],
            )
        )
    return out


def _df(spark, n=10, offset=0):
    return spark.createDataFrame(_rows(n, offset), ALL_TYPES)


def _sorted(rows):
    return sorted((r.asDict() for r in rows), key=lambda r: r["id"])


def test_backend_is_delta_rs_offline(store):
    assert store.backend == "delta-rs"


def test_reading_a_missing_table_names_the_stage_that_writes_it(store):
    with pytest.raises(FileNotFoundError, match=r"events does not exist: run the ingest stage \(causalrec ingest "
                                                r"<config>\) or the simulate stage \(causalrec simulate <config>\) first"):
        store.read("events")
    with pytest.raises(FileNotFoundError, match=r"training_examples does not exist: run the training_set stage"):
        store.read("training_examples")


def test_a_data_source_worker_without_causalrec_gets_an_error_that_says_what_to_install():
    """spark-submit --py-files does not reach the Python data source's workers (the delta-rs writer)."""
    from causalrec.storage.store import _unwrap_write_error

    exc = RuntimeError("[PYTHON_DATA_SOURCE_ERROR] Failed to initialize Python data source writer: Traceback "
                       "(most recent call last):\n ...\nModuleNotFoundError: No module named 'causalrec'")
    err = _unwrap_write_error(exc, "/t/events")
    assert isinstance(err, DeltaWriteError) and "the table is unchanged" in str(err)
    assert "Install causalrec in the executors' Python" in str(err) and "--packages io.delta" in str(err)
    assert "Install causalrec" not in str(_unwrap_write_error(RuntimeError("disk full"), "/t/events"))


def test_round_trip_every_type_and_partition_values(spark, store):
    df = _df(spark, 10)
    version = store.write(df, "t", partition_by=["part"])
    assert version == 0
    back = store.read("t")
    assert [f.name for f in back.schema.fields] == [f.name for f in ALL_TYPES.fields]
    for f in ALL_TYPES.fields:
        assert back.schema[f.name].dataType == f.dataType, f.name
    got = _sorted(back.collect())
    want = _sorted(df.collect())
    for g, w in zip(got, want):
        emb_g, emb_w = g.pop("emb"), w.pop("emb")
        assert emb_g == pytest.approx(emb_w)
        assert g == w
    # delta-rs sees the same rows and the partition values, including the odd ones and null
    table = DeltaTable(store.path("t"))
    assert table.metadata().partition_columns == ["part"]
    arrow = table.to_pyarrow_table()
    assert sorted(v for v in arrow.column("part").to_pylist() if v is not None) == sorted(
        p for p in [PARTS[j % len(PARTS)] for j in range(10)] if p is not None
    )
    assert arrow.column("part").null_count == 2


def test_valid_delta_protocol_and_file_stats(spark, store):
    store.write(_df(spark, 6), "t", partition_by=["part"])
    log_dir = os.path.join(store.path("t"), "_delta_log")
    entries = [json.loads(line) for line in open(os.path.join(log_dir, "00000000000000000000.json"))]
    protocol = next(e["protocol"] for e in entries if "protocol" in e)
    assert protocol["minReaderVersion"] == 1 and protocol["minWriterVersion"] == 2
    adds = [e["add"] for e in entries if "add" in e]
    assert adds and sum(json.loads(a["stats"])["numRecords"] for a in adds) == 6
    stats = json.loads(adds[0]["stats"])
    assert {"numRecords", "minValues", "maxValues", "nullCount"} <= set(stats)
    assert "id" in stats["minValues"] and stats["minValues"]["id"] <= stats["maxValues"]["id"]
    assert store.row_count("t") == 6


def test_ray_reads_what_spark_wrote(spark, store, ray_local):
    import ray

    store.write(_df(spark, 10), "t", partition_by=["part"])
    rows = ray.data.read_delta(store.path("t")).take_all()
    assert sorted(r["id"] for r in rows) == list(range(10))
    assert {r["part"] for r in rows} == set(PARTS)


def test_spark_reads_what_ray_wrote(spark, store, ray_local):
    import pandas as pd
    import ray

    ds = ray.data.from_pandas(pd.DataFrame({"k": [1, 2, 3], "v": ["a", "b", "c"]}))
    ds.write_delta(store.path("from_ray"))
    got = store.read("from_ray").orderBy("k").collect()
    assert [(r.k, r.v) for r in got] == [(1, "a"), (2, "b"), (3, "c")]


def test_append_overwrite_and_time_travel(spark, store):
    assert store.write(_df(spark, 5), "t") == 0
    assert store.write(_df(spark, 5, offset=5), "t", "append") == 1
    assert store.read("t").count() == 10
    assert store.write(_df(spark, 3, offset=100), "t", "overwrite") == 2
    assert sorted(r.id for r in store.read("t").collect()) == [100, 101, 102]
    assert store.read("t", version=0).count() == 5
    assert store.read("t", version=1).count() == 10
    ops = [h["operation"] for h in store.history("t")]
    assert len(ops) == 3
    # restore: version 1's rows back as a new commit; the history keeps the overwrite
    assert store.restore("t", 1) == 3
    assert sorted(r.id for r in store.read("t").collect()) == list(range(10))
    assert store.read("t", version=2).count() == 3


def test_partition_overwrite_replaces_only_matching_partitions(spark, store):
    base = spark.createDataFrame(
        [(1, "2024-01-01"), (2, "2024-01-02"), (3, "2024-01-03")], "v long, day string"
    )
    store.write(base, "p", partition_by=["day"])
    new = spark.createDataFrame([(20, "2024-01-02"), (21, "2024-01-02")], "v long, day string")
    store.write(new, "p", "overwrite", replace_where=[("day", "=", "2024-01-02")])
    got = sorted((r.day, r.v) for r in store.read("p").collect())
    assert got == [("2024-01-01", 1), ("2024-01-02", 20), ("2024-01-02", 21), ("2024-01-03", 3)]
    # range predicates work too
    store.write(spark.createDataFrame([(9, "2024-01-03")], "v long, day string"), "p", "overwrite",
                replace_where=[("day", ">=", "2024-01-02")])
    got = sorted((r.day, r.v) for r in store.read("p").collect())
    assert got == [("2024-01-01", 1), ("2024-01-03", 9)]


def test_replace_where_on_a_data_column_is_refused(spark, store):
    store.write(spark.createDataFrame([(1, "a")], "v long, day string"), "p", partition_by=["day"])
    with pytest.raises(DeltaWriteError, match="not a partition column"):
        store.write(spark.createDataFrame([(1, "a")], "v long, day string"), "p", "overwrite",
                    replace_where=[("v", "=", 1)])
    assert store.version("p") == 0


def test_append_inherits_table_partitioning(spark, store):
    store.write(spark.createDataFrame([(1, "a")], "v long, day string"), "p", partition_by=["day"])
    store.write(spark.createDataFrame([(2, "b")], "v long, day string"), "p")  # no partition_by given
    assert DeltaTable(store.path("p")).metadata().partition_columns == ["day"]
    assert sorted((r.day, r.v) for r in store.read("p").collect()) == [("a", 1), ("b", 2)]


def test_schema_mismatch_is_refused_with_column_named(spark, store):
    store.write(spark.createDataFrame([(1, "a")], "v long, s string"), "t")
    with pytest.raises(DeltaWriteError, match="'v'.*int64.*string|column 'v'"):
        store.write(spark.createDataFrame([("x", "a")], "v string, s string"), "t")
    with pytest.raises(DeltaWriteError, match="lacks column"):
        store.write(spark.createDataFrame([(1,)], "v long"), "t")
    with pytest.raises(DeltaWriteError, match="new column"):
        store.write(spark.createDataFrame([(1, "a", 2.0)], "v long, s string, extra double"), "t")
    assert store.version("t") == 0


def test_schema_evolution_only_when_asked(spark, store):
    store.write(spark.createDataFrame([(1, "a")], "v long, s string"), "t")
    store.write(spark.createDataFrame([(2, "b", 2.5)], "v long, s string, extra double"), "t", merge_schema=True)
    got = sorted((r.v, r.extra) for r in store.read("t").collect())
    assert got == [(1, None), (2, 2.5)]


def test_overwrite_schema_replaces_table_schema(spark, store):
    store.write(spark.createDataFrame([(1, "a")], "v long, s string"), "t")
    store.write(spark.createDataFrame([("z",)], "w string"), "t", "overwrite", overwrite_schema=True)
    assert store.read("t").columns == ["w"]


def test_declared_spec_is_enforced(spark, store):
    bad = spark.createDataFrame([("e1", "u1")], "event_id string, user_id string")
    with pytest.raises(SchemaMismatch, match="item_id"):
        store.write(bad, "events", spec=EVENTS)
    assert not store.exists("events")


def test_failing_task_leaves_table_unchanged_and_no_files_visible(spark, store):
    store.write(spark.range(100).withColumn("x", F.col("id") * 2), "t")
    before_files = set(DeltaTable(store.path("t")).file_uris())

    @F.udf("long")
    def explode_on_77(v):
        if v == 77:
            raise ValueError("boom on row 77")
        return v

    bad = spark.range(200).repartition(4).withColumn("x", explode_on_77(F.col("id")))
    with pytest.raises(DeltaWriteError, match="table is unchanged"):
        store.write(bad, "t", "append")
    assert store.version("t") == 0
    assert set(DeltaTable(store.path("t")).file_uris()) == before_files
    assert store.read("t").count() == 100
    # files of tasks that did succeed were removed by abort(): only committed parquet files remain
    on_disk = {
        os.path.join(root, f)
        for root, _, files in os.walk(store.path("t"))
        for f in files
        if f.endswith(".parquet")
    }
    assert on_disk == {os.path.normpath(p) for p in before_files}


def test_abort_removes_files_a_straggling_task_publishes_after_the_job_failed(tmp_path):
    """Spark calls abort() while a task of the failed job may still be finishing its file:
    a file published before the abort is swept, one published after it removes itself, and
    another write's files are left alone."""
    from causalrec.storage.delta_rs_source import DeltaRsWriter

    writer = DeltaRsWriter({"path": str(tmp_path)}, T.StructType([T.StructField("x", T.LongType())]), False)
    table = pa.table({"x": [1, 2, 3]})
    early = tmp_path / f"part-{writer.write_id}-a.c000.snappy.parquet"
    assert writer._publish(table, str(early)) and early.exists()
    (tmp_path / "p=1").mkdir()
    early_partitioned = tmp_path / "p=1" / f"part-{writer.write_id}-b.c000.snappy.parquet"
    assert writer._publish(table, str(early_partitioned))
    other_write = tmp_path / "part-0123456789ab-c.c000.snappy.parquet"
    other_write.write_bytes(early.read_bytes())
    writer.abort([])  # the driver's messages may not list a task that had not reported yet
    assert not early.exists() and not early_partitioned.exists() and other_write.exists()
    late = tmp_path / f"part-{writer.write_id}-d.c000.snappy.parquet"
    assert not writer._publish(table, str(late))
    left = sorted(str(q.relative_to(tmp_path)) for q in tmp_path.rglob("*") if q.is_file())
    assert left == [f"_causalrec_aborted/{writer.write_id}", other_write.name]


def test_idempotency_key_skips_a_rerun(spark, store):
    df = spark.range(5)
    assert store.write(df, "t", idempotency_key="batch-1") == 0
    assert store.write(df, "t", idempotency_key="batch-1") is None
    assert store.read("t").count() == 5
    assert store.write(df, "t", idempotency_key="batch-2") == 1
    assert store.read("t").count() == 10


def test_two_concurrent_appends_both_land(spark, store):
    store.write(spark.range(1), "t")
    errors = []

    def append(offset):
        try:
            store.write(spark.range(offset, offset + 50), "t", "append")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(o,)) for o in (1000, 2000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.read("t").count() == 101
    assert store.version("t") == 2


def _staged_file(path, schema, name, values) -> dict:
    """A parquet file written into the table folder, described as commit_files expects (not yet committed)."""
    import pyarrow.parquet as pq

    from causalrec.storage.delta_rs_source import file_stats

    tbl = pa.table({"id": pa.array(values, pa.int64())}, schema=schema)
    pq.write_table(tbl, os.path.join(path, name))
    return {"path": name, "size": os.path.getsize(os.path.join(path, name)),
            "partition_values": {}, "modification_time": 0, "stats": file_stats(tbl)}


def test_two_overwrites_from_the_same_snapshot_one_fails_cleanly(spark, store, tmp_path):
    """Simulate the race deterministically: both writes plan on version 0; the second commit must conflict."""
    from causalrec.storage.delta_rs_commit import commit_files
    store.write(spark.range(3), "t")
    path = store.path("t")
    schema = pa.schema([pa.field("id", pa.int64(), False)])

    def staged(name, values):
        return _staged_file(path, schema, name, values)

    first = staged("part-a.parquet", [10, 11])
    second = staged("part-b.parquet", [20, 21])
    commit_files(path=path, files=[first], arrow_schema=schema, partition_by=[], overwrite=True,
                 replace_where=None, read_version=0, commit_metadata={})
    with pytest.raises(ConcurrentWriteError, match="concurrent"):
        commit_files(path=path, files=[second], arrow_schema=schema, partition_by=[], overwrite=True,
                     replace_where=None, read_version=0, commit_metadata={})
    assert sorted(r.id for r in store.read("t").collect()) == [10, 11]
    assert store.version("t") == 1


def test_a_write_checked_against_an_older_version_is_refused(spark, store):
    store.write(spark.range(3), "t")
    assert store.write(spark.range(3, 5), "t", expected_version=0) == 1
    with pytest.raises(ConcurrentWriteError, match="after version 0, which this write was checked against"):
        store.write(spark.range(10, 12), "t", expected_version=0)
    with pytest.raises(ConcurrentWriteError, match="not existing yet"):
        store.write(spark.range(10, 12), "t", expected_version=-1)
    assert store.version("t") == 1 and store.read("t").count() == 5
    assert store.write(spark.range(2), "fresh", expected_version=-1) == 0


def test_an_expected_version_commit_lands_on_that_version_or_not_at_all(spark, store, monkeypatch):
    """The race the driver's check cannot see: another append lands between the check and the commit."""
    from causalrec.storage.delta_rs_commit import commit_files
    store.write(spark.range(3), "t")
    path = store.path("t")
    schema = pa.schema([pa.field("id", pa.int64(), False)])
    mine = _staged_file(path, schema, "part-a.parquet", [10, 11])
    theirs = _staged_file(path, schema, "part-b.parquet", [20])
    common = dict(path=path, arrow_schema=schema, partition_by=[], overwrite=False, replace_where=None, read_version=0)
    commit_files(files=[theirs], commit_metadata={}, **common)  # a plain append lands first: version 1
    with pytest.raises(ConcurrentWriteError, match="after version 0"):
        commit_files(files=[mine], commit_metadata={"_exact_version": True}, **common)
    assert store.version("t") == 1 and sorted(r.id for r in store.read("t").collect()) == [0, 1, 2, 20]
    # a blind append planned on the same version is rebased onto the new one and lands
    commit_files(files=[mine], commit_metadata={}, **common)
    assert store.version("t") == 2 and store.read("t").count() == 6
    # through Spark, with the driver's early check out of the way: refused at commit, its files removed
    monkeypatch.setattr(DeltaStore, "_check_version", lambda self, name, v: None)
    before = set(os.listdir(path))
    with pytest.raises(ConcurrentWriteError, match="after version 1"):
        store.write(spark.range(100, 104), "t", expected_version=1)
    assert store.version("t") == 2 and store.read("t").count() == 6
    assert {f for f in set(os.listdir(path)) - before if f.endswith(".parquet")} == set()


def test_optimize_and_vacuum_hooks(spark, store):
    for k in range(3):
        store.write(spark.range(k * 10, k * 10 + 10).coalesce(1), "t")
    before = len(DeltaTable(store.path("t")).file_uris())
    metrics = store.optimize("t")
    assert metrics.get("numFilesRemoved", 0) >= 2
    assert len(DeltaTable(store.path("t")).file_uris()) < before
    assert store.read("t").count() == 30
    removed = store.vacuum("t", retention_hours=0)
    assert len(removed) >= 2
    assert store.read("t").count() == 30


def test_read_missing_table_names_the_path(store):
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read("nope")


def test_forced_backend_config(spark, tmp_path):
    s = DeltaStore(spark, str(tmp_path), backend="delta-rs")
    assert s.backend == "delta-rs"


def test_merge_schema_is_one_commit_and_a_failed_write_adds_no_column(spark, store):
    store.write(spark.createDataFrame([(1, "a")], "v long, day string"), "t", partition_by=["day"])
    with pytest.raises(DeltaWriteError, match="replace_where column 'v'"):
        store.write(spark.createDataFrame([(2, "a", 9.0)], "v long, day string, extra double"), "t", "overwrite",
                    merge_schema=True, replace_where=[("v", "=", 2)])
    assert store.version("t") == 0 and store.read("t").columns == ["v", "day"]
    # a successful append with a new column: data and column in one commit, nothing removed
    assert store.write(spark.createDataFrame([(3, "b", 1.5)], "v long, day string, extra double"), "t",
                       merge_schema=True) == 1
    assert sorted((r.v, r.day, r.extra) for r in store.read("t").collect()) == [(1, "a", None), (3, "b", 1.5)]


def test_two_writers_with_one_idempotency_key_only_one_lands(spark, store, tmp_path):
    """Both passed the history check before either committed: the key is re-checked at commit time."""
    from causalrec.storage.delta_rs_commit import WriteAlreadyApplied, commit_files
    store.write(spark.range(3), "t")
    path = store.path("t")
    schema = pa.schema([pa.field("id", pa.int64(), False)])

    def staged(name, values):
        return _staged_file(path, schema, name, values)

    commit = dict(arrow_schema=schema, partition_by=[], overwrite=False, replace_where=None)
    commit_files(path=path, files=[staged("a.parquet", [10])], read_version=0,
                 commit_metadata={"write_key": "batch-7"}, **commit)
    for read_version in (0, 1):  # planned before the first commit landed, or after it
        with pytest.raises(WriteAlreadyApplied, match="batch-7"):
            commit_files(path=path, files=[staged(f"b{read_version}.parquet", [20])], read_version=read_version,
                         commit_metadata={"write_key": "batch-7"}, **commit)
    assert store.version("t") == 1 and store.read("t").count() == 4

    # through the store: a writer whose history check raced (saw no key) is skipped, not applied
    store.has_commit_key = lambda name, key: False
    assert store.write(spark.range(100, 105), "t", idempotency_key="batch-7") is None
    assert store.read("t").count() == 4 and store.version("t") == 1
    assert store.write(spark.range(100, 105), "t", idempotency_key="batch-8") == 2


def test_a_failure_after_the_commit_keeps_the_committed_files(tmp_path, monkeypatch):
    """Spark calls abort() when commit() raises, also after its delta-rs commit landed (here: the step after
    commit_files fails); abort() must then keep the files the log references. A failure before the commit
    still removes every file. Driven in-process in Spark's order: write() in a task, commit(), abort()."""
    from causalrec.storage import delta_rs_commit
    from causalrec.storage.delta_rs_source import DeltaRsWriter

    schema = T.StructType([T.StructField("x", T.LongType())])
    real = delta_rs_commit.commit_files

    def parquet_files():
        return sorted(q.name for q in tmp_path.rglob("*.parquet"))

    def fail_before(**kw):
        raise OSError("injected before the commit")

    def fail_after(**kw):
        real(**kw)
        raise OSError("injected after the commit")

    for inject in (fail_before, fail_after):
        writer = DeltaRsWriter({"path": str(tmp_path)}, schema, False)
        message = writer.write(iter([pa.record_batch({"x": pa.array([1, 2, 3], pa.int64())})]))
        monkeypatch.setattr(delta_rs_commit, "commit_files", inject)
        with pytest.raises(OSError, match="injected"):
            writer.commit([message])
        writer.abort([message])
        if inject is fail_before:  # unchanged: no table, no file left
            assert not DeltaTable.is_deltatable(str(tmp_path)) and parquet_files() == []
    table = DeltaTable(str(tmp_path))
    assert table.version() == 0 and sorted(table.to_pyarrow_table().column("x").to_pylist()) == [1, 2, 3]
    assert parquet_files() == sorted(os.path.basename(u) for u in table.file_uris())
    assert delta_rs_commit.landed_commit(str(tmp_path), writer.write_id, -1) == (0, set(parquet_files()))


def test_a_job_failing_after_its_commit_says_the_commit_landed(spark, store, monkeypatch):
    """Spark reports a failure after the commit landed: the store must not claim the table is unchanged."""
    from pyspark.sql.readwriter import DataFrameWriter

    from causalrec.storage import WriteCommittedError

    store.write(spark.range(2), "t")
    real_save = DataFrameWriter.save

    def save_then_fail(self, *a, **k):
        real_save(self, *a, **k)
        raise RuntimeError("injected: the job failed after the commit")

    monkeypatch.setattr(DataFrameWriter, "save", save_then_fail)
    with pytest.raises(WriteCommittedError, match="committed as version 1.*injected"):
        store.write(spark.range(10, 13), "t")
    monkeypatch.setattr(DataFrameWriter, "save", real_save)
    assert store.version("t") == 1 and sorted(r.id for r in store.read("t").collect()) == [0, 1, 10, 11, 12]


def test_idempotency_key_is_applied_again_once_its_rows_were_replaced(spark, store):
    """A key counts as applied only while no later overwrite / delete replaced the table's content."""
    df = spark.range(5)
    assert store.write(df, "t", idempotency_key="k") == 0
    assert store.write(df, "t", idempotency_key="k") is None  # a retried append is skipped
    # a schema-evolving append (delta-rs logs it as an overwrite that removes nothing) replaces nothing
    assert store.write(spark.createDataFrame([(100, 1.5)], "id long, extra double"), "t", merge_schema=True) == 1
    assert store.write(df.withColumn("extra", F.lit(None).cast("double")), "t", idempotency_key="k") is None
    store.write(spark.range(0), "t", "overwrite", overwrite_schema=True)  # a reset: the keyed rows are gone
    assert not store.has_commit_key("t", "k")
    assert store.write(df, "t", idempotency_key="k") == 3
    assert store.read("t").count() == 5 and store.has_commit_key("t", "k")
    assert store.write(df, "t", idempotency_key="k") is None  # and a retry of that is skipped again
    DeltaTable(store.path("t")).delete()  # a delete replaces content too
    assert store.write(df, "t", idempotency_key="k") == 5
    assert sorted(r.id for r in store.read("t").collect()) == [0, 1, 2, 3, 4]
    assert DeltaTable(store.path("t")).transaction_version("k") == 3  # one txn version per application


def test_a_keyed_append_whose_rows_survive_a_partition_overwrite_stays_applied(spark, store):
    """Re-applying a key after a partition overwrite would write its rows outside that partition twice."""
    df = spark.createDataFrame([("a", 1), ("b", 2)], "p string, x long")

    def rows():
        return sorted((r.p, r.x) for r in store.read("t").collect())

    assert store.write(df, "t", partition_by=["p"], idempotency_key="k") == 0
    store.write(spark.createDataFrame([("a", 3)], "p string, x long"), "t", "overwrite", replace_where=[("p", "=", "a")])
    assert store.has_commit_key("t", "k")  # its row in p=b is still there
    assert store.write(df, "t", idempotency_key="k") is None
    assert rows() == [("a", 3), ("b", 2)]
    # once the other partition is overwritten too, none of its rows is left: it is applied again
    store.write(spark.createDataFrame([("b", 4)], "p string, x long"), "t", "overwrite", replace_where=[("p", "=", "b")])
    assert not store.has_commit_key("t", "k")
    assert store.write(df, "t", idempotency_key="k") == 3
    assert rows() == [("a", 1), ("a", 3), ("b", 2), ("b", 4)]
    DeltaTable(store.path("t")).delete("x = 4")  # a conditional delete that leaves the keyed rows
    assert store.has_commit_key("t", "k") and store.write(df, "t", idempotency_key="k") is None


def test_history_entries_of_either_engine_say_which_rows_they_replaced():
    from causalrec.storage.store import _replaced_rows

    spark_style = [  # delta-spark's operation parameters
        ({"operation": "WRITE", "operationParameters": {"mode": "Overwrite", "partitionBy": "[]"}}, "all"),
        ({"operation": "WRITE", "operationParameters": {"mode": "Overwrite", "predicate": "[\"(p = 'a')\"]"}}, "some"),
        ({"operation": "WRITE", "operationParameters": {"mode": "Append"}}, None),
        ({"operation": "DELETE", "operationParameters": {"predicate": "[]"}}, "all"),
        ({"operation": "DELETE", "operationParameters": {"predicate": "[\"(x = 1)\"]"}}, "some"),
        ({"operation": "RESTORE", "operationParameters": {"version": 3}}, "some"),  # its file actions decide
        ({"operation": "OPTIMIZE", "operationParameters": {"predicate": "[]"}}, None),
        ({"operation": "STREAMING UPDATE", "operationParameters": {"outputMode": "Append"}}, None),
        # ours: the caller's mode wins over delta-rs's (a schema-evolving append is logged as an overwrite)
        ({"operation": "WRITE", "operationParameters": {"mode": "Overwrite"}, "causalrecWriteMode": "append"}, None),
        ({"operation": "WRITE", "causalrecWriteMode": "overwrite", "causalrecReplaceWhere": "[[\"p\", \"=\", \"a\"]]"},
         "some"),
    ]
    assert [_replaced_rows(h) for h, _ in spark_style] == [want for _, want in spark_style]


@pytest.fixture(params=["log", "snapshots"])
def log_reader(request, monkeypatch):
    """Key lineage read from the commits' JSON files (a local table) or from snapshots (object stores)."""
    if request.param == "snapshots":
        import causalrec.storage.store as store_module

        def gone(*_):
            raise FileNotFoundError("forced")

        monkeypatch.setattr(store_module, "_commit_file_actions", gone)
    return request.param


def test_a_keyed_append_stays_applied_while_compacted_or_rewritten_files_hold_its_rows(spark, store, log_reader):
    """Compaction and a conditional delete move the keyed commit's rows into files they add: the key
    follows its rows there, so a rerun never writes its surviving rows twice (README: known gaps)."""
    schema = "p string, x long"
    keyed = spark.createDataFrame([("a", 1), ("b", 2), ("b", 5)], schema).coalesce(1)

    def rows():
        return sorted((r.p, r.x) for r in store.read("t").collect())

    assert store.write(keyed, "t", partition_by=["p"], idempotency_key="k") == 0
    store.write(spark.createDataFrame([("a", 10), ("b", 20)], schema).coalesce(1), "t")
    assert store.optimize("t")["numFilesRemoved"] == 4  # every file of the keyed commit is compacted away
    store.write(spark.createDataFrame([("a", 3)], schema), "t", "overwrite", replace_where=[("p", "=", "a")])
    assert store.has_commit_key("t", "k")  # its rows in p=b are in the compacted file
    assert store.write(keyed, "t", idempotency_key="k") is None
    assert rows() == [("a", 3), ("b", 2), ("b", 5), ("b", 20)]
    # a conditional delete rewrites the compacted file: its survivors (b, 5) land in a file it adds
    DeltaTable(store.path("t")).delete("x = 2")
    assert store.has_commit_key("t", "k") and store.write(keyed, "t", idempotency_key="k") is None
    assert rows() == [("a", 3), ("b", 5), ("b", 20)]
    # once no file that may hold its rows is left, it is applied again (once)
    store.write(spark.createDataFrame([("b", 4)], schema), "t", "overwrite", replace_where=[("p", "=", "b")])
    assert not store.has_commit_key("t", "k")
    assert store.write(keyed, "t", idempotency_key="k") == 6
    assert rows() == [("a", 1), ("a", 3), ("b", 2), ("b", 4), ("b", 5)]
    assert store.write(keyed, "t", idempotency_key="k") is None


def test_a_conditional_delete_that_rewrites_a_keyed_file_keeps_the_key_applied(spark, store):
    """Delta rewrites a file a conditional delete hits into a new file with its other rows: those are
    still the keyed commit's rows, so a rerun must not write them again."""
    keyed = spark.createDataFrame([(1,), (2,), (3,)], "id long").coalesce(1)
    assert store.write(keyed, "t", idempotency_key="k") == 0
    store.write(spark.createDataFrame([(7,)], "id long"), "t")
    DeltaTable(store.path("t")).delete("id = 1")  # the keyed file is removed, (2, 3) re-added in a new one
    assert store.has_commit_key("t", "k")
    assert store.write(keyed, "t", idempotency_key="k") is None
    assert sorted(r.id for r in store.read("t").collect()) == [2, 3, 7]
    DeltaTable(store.path("t")).delete("id < 4")  # now none of its rows is left
    assert not store.has_commit_key("t", "k")
    assert store.write(keyed, "t", idempotency_key="k") == 4
    assert sorted(r.id for r in store.read("t").collect()) == [1, 2, 3, 7]


def test_key_lineage_follows_rewrites_of_either_engine():
    """delta-spark's log: OPTIMIZE removes with dataChange=false, a DELETE may re-add the same file with
    a deletion vector, a replaceWhere on a data column rewrites the rows it keeps, one on partition
    columns only adds new rows."""
    from causalrec.storage.store import _lineage_remains, _partition_key

    a, b = _partition_key({"p": "a"}), _partition_key({"p": "b"})

    def remains(*commits):  # each: (history entry, added {path: pv}, removed {path: (pv, dataChange)})
        log = {0: ({"k1": (a, True), "k2": (b, True)}, {})}
        later = []
        for v, (h, added, removed) in enumerate(commits, start=1):
            log[v] = ({f: (pv, True) for f, pv in added.items()}, removed)
            later.append({**h, "version": v})
        return _lineage_remains(0, later, log.__getitem__, lambda: ["p"])

    def write(predicate):
        return {"operation": "WRITE", "operationParameters": {"mode": "Overwrite", "predicate": predicate}}

    optimize = {"operation": "OPTIMIZE", "operationParameters": {"predicate": "[]"}}
    compact = (optimize, {"c1": a, "c2": b}, {"k1": (a, False), "k2": (b, False), "o1": (a, False)})
    drop_a = (write('["(p = \'a\')"]'), {"n1": a}, {"c1": (a, True)})
    drop_b = (write('["(`p` = \'b\')"]'), {"n2": b}, {"c2": (b, True)})
    assert remains(compact, drop_a)
    assert not remains(compact, drop_a, drop_b)
    # a replaceWhere on a data column keeps the partition's other rows in the file it adds
    assert remains(compact, drop_a, (write('["((p = \'b\') AND (x > 1))"]'), {"n2": b}, {"c2": (b, True)}))
    # a DELETE writing a deletion vector: the same file, removed and added again
    dv_delete = ({"operation": "DELETE", "operationParameters": {"predicate": '["(x = 1)"]'}},
                 {"c2": b}, {"c2": (b, True)})
    assert remains(compact, drop_a, dv_delete)
    assert remains(compact, drop_a, ({"operation": "SOME NEW OPERATION"}, {"c2": b}, {"c2": (b, True)}))
    # an unrecognised rewrite with dataChange=false only rearranges rows (e.g. REORG ... APPLY (PURGE))
    purge = ({"operation": "SOME NEW REWRITE"}, {"c3": b}, {"c2": (b, False)})
    assert remains(compact, drop_a, purge) and not remains(compact, drop_a, purge,
                                                          (write("p = 'b'"), {"n2": b}, {"c3": (b, True)}))
    # rows never change partition: a rewrite's file in another partition does not hold them
    delete_mixed = ({"operation": "DELETE", "operationParameters": {"predicate": '["(x < 3)"]'}},
                    {"d1": a}, {"c2": (b, True), "o2": (a, True)})
    assert not remains(compact, drop_a, delete_mixed)
