"""DeltaStore: the one API every stage reads and writes tables through.

Two backends behind the same calls:

* ``delta-spark`` - when Delta's JVM classes are on Spark's classpath (a cluster
  started with ``--packages io.delta:delta-spark_2.13:<v>`` or a platform that ships
  Delta): native ``format("delta")`` and ``DeltaTable``.
* ``delta-rs`` - offline (laptop, CI): writes through the ``causalrec_delta``
  Python data source (parallel parquet writes in tasks, one delta-rs commit on the
  driver), reads the snapshot's file list with Spark's parquet reader.

The backend is detected once per store and logged; ``storage.backend`` forces one.
Ray reads the same tables with ``ray.data.read_delta`` and writes with
``Dataset.write_delta`` on ``store.path(name)`` (both commit through delta-rs).
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid
from typing import Optional, Sequence
from urllib.parse import unquote, urlparse

from causalrec.schemas import TableSpec, conform, validate_columns
from causalrec.sql_text import quote_name, sql_literal
from causalrec.storage.delta_rs_commit import (
    ConcurrentWriteError,
    DeltaWriteError,
    WriteAlreadyApplied,
    WriteCommittedError,
    landed_commit,
    moved_message,
)

log = logging.getLogger(__name__)

ReplaceWhere = Sequence[tuple]  # conjunction of (partition column, op, value)

# Delta txn app id that serialises a table's expected-version writes on delta-spark (DeltaStore.write)
CAS_APP_ID = "causalrec-expected-version"


def detect_backend(spark, forced: str = "auto") -> str:
    if forced in ("delta-spark", "delta-rs"):
        return forced
    try:
        from py4j.java_gateway import JavaClass

        cls = spark._jvm.io.delta.tables.DeltaTable
        if isinstance(cls, JavaClass):
            return "delta-spark"
    except Exception:  # Spark Connect has no JVM handle; py4j errors mean "not there"
        pass
    return "delta-rs"


def replace_where_sql(replace_where: ReplaceWhere) -> str:
    parts = []
    for col, op, value in replace_where:
        op = op.lower()
        if op in ("in", "not in"):
            vals = ", ".join(sql_literal(v) for v in value)
            parts.append(f"{quote_name(col)} {op.upper()} ({vals})")
        else:
            parts.append(f"{quote_name(col)} {op} {sql_literal(value)}")
    return " AND ".join(parts)


class DeltaStore:
    """Read and write named Delta tables under one root folder or object-store URI."""

    def __init__(self, spark, root: str, backend: str = "auto", storage_options: Optional[dict] = None):
        self.spark = spark
        self.storage_options = storage_options or {}
        self.backend = detect_backend(spark, backend)
        # delta-rs's writer renames files with os calls: a file:// root is its local path (delta-spark keeps
        # the URI, which on a cluster means the local disk rather than the default file system)
        self.root = (_local_path(root) if self.backend == "delta-rs" else root).rstrip("/")
        log.info("delta backend: %s (root %s)", self.backend, self.root)
        if self.backend == "delta-rs":
            from causalrec.storage.delta_rs_source import DeltaRsDataSource

            spark.dataSource.register(DeltaRsDataSource)

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> str:
        if "://" in name or name.startswith("/"):
            return _local_path(name) if self.backend == "delta-rs" else name
        return f"{self.root}/{name}"

    def _dt(self, name: str, version: Optional[int] = None):
        from deltalake import DeltaTable

        return DeltaTable(self.path(name), version=version, storage_options=self.storage_options or None)

    def exists(self, name: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.path(name), storage_options=self.storage_options or None)

    def version(self, name: str) -> Optional[int]:
        if not self.exists(name):
            return None
        return self._dt(name).version()

    # ------------------------------------------------------------------ write
    def write(
        self,
        df,
        name: str,
        mode: str = "append",
        *,
        partition_by: Optional[Sequence[str]] = None,
        replace_where: Optional[ReplaceWhere] = None,
        spec: Optional[TableSpec] = None,
        merge_schema: bool = False,
        overwrite_schema: bool = False,
        idempotency_key: Optional[str] = None,
        metadata: Optional[dict] = None,
        rows_per_file: Optional[int] = None,
        expected_version: Optional[int] = None,
    ) -> Optional[int]:
        """Write ``df`` atomically; return the new table version (None when skipped as a rerun).

        ``mode``: ``append`` or ``overwrite``; with ``replace_where`` only the matching
        partitions are replaced. ``spec`` conforms and validates the DataFrame against a
        declared table first. ``idempotency_key``: a write whose key is already applied
        (:meth:`has_commit_key`) is skipped, so a rerun never duplicates; the key is committed with
        the data (a Delta ``txn`` action), so of two concurrent writes with one key only one lands.
        ``expected_version``: the table version ``df`` was checked against (-1: the table did not
        exist), for a write whose content depends on what the table held, like an ingest that skips
        rows already present. It commits only if no other such write came between: delta-rs commits
        at exactly ``expected_version + 1`` or not at all; delta-spark serialises every
        expected-version write of a table through one Delta ``txn`` app id (:data:`CAS_APP_ID`).
        Otherwise :class:`ConcurrentWriteError`, nothing written: re-check against the new version.
        Raises :class:`WriteCommittedError` when the job failed after its commit landed.
        """
        if mode not in ("append", "overwrite"):
            raise ValueError(f"write mode must be 'append' or 'overwrite', got {mode!r}")
        path = self.path(name)
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", path)  # two letters or more: not a drive letter
        if self.backend == "delta-rs" and scheme:
            raise DeltaWriteError(
                f"Delta table {path}: the offline delta-rs writer writes and renames files with local file "
                f"operations, so it needs a local (or mounted) path, not a {scheme.group(1)}: URI; "
                f"object stores are written by delta-spark (storage.backend: delta-spark, on a cluster with "
                f"Delta's jars). Nothing was written"
            )
        if spec is not None:
            df = conform(df, spec)
            validate_columns(df, spec, source=f"write to {path}")
            if partition_by is None:
                partition_by = list(spec.partition_by)
        partition_by = list(partition_by or [])
        meta = dict(metadata or {})
        key_version = 1
        if idempotency_key:
            if self.has_commit_key(name, idempotency_key):
                log.info("delta: %s already holds write %s; skipping rerun", path, idempotency_key)
                return None
            meta["write_key"] = idempotency_key
            key_version = self._next_key_version(name, idempotency_key)
        if expected_version is not None:
            self._check_version(name, expected_version)
        try:
            if self.backend == "delta-spark":
                return self._write_native(df, path, mode, partition_by, replace_where, merge_schema,
                                          overwrite_schema, meta, key_version, expected_version)
            return self._write_rs(df, name, mode, partition_by, replace_where, merge_schema,
                                  overwrite_schema, meta, rows_per_file, key_version, expected_version)
        except WriteAlreadyApplied:
            log.info("delta: a concurrent writer committed %s to %s first; skipping", idempotency_key, path)
            return None

    def _check_version(self, name: str, expected_version: int) -> None:
        """Fail fast, before any task writes a file, when the table moved past ``expected_version``."""
        current = self.version(name)
        current = -1 if current is None else current
        if current != expected_version:
            raise ConcurrentWriteError(moved_message(self.path(name), expected_version, current))

    def _write_native(self, df, path, mode, partition_by, replace_where, merge_schema, overwrite_schema, meta,
                      key_version=1, expected_version=None):
        cas = expected_version is not None and expected_version >= 0
        if cas:  # names this commit, to tell afterwards whether Delta skipped it (see below)
            meta = {**meta, "cas_write_id": uuid.uuid4().hex[:12]}
        w = df.write.format("delta").mode(mode)
        if partition_by:
            w = w.partitionBy(*partition_by)
        if replace_where:
            w = w.option("replaceWhere", replace_where_sql(replace_where))
        if merge_schema:
            w = w.option("mergeSchema", "true")
        if overwrite_schema:
            w = w.option("overwriteSchema", "true")
        if meta:
            w = w.option("userMetadata", json.dumps(meta))
        if cas:
            # One app id for every expected-version write of this table: Delta refuses a commit whose txn
            # app id another commit set after this one's snapshot (ConcurrentTransactionException) and
            # skips one whose txnVersion is not above the recorded one. Versions only grow, so the
            # recorded value is below every up-to-date writer's. The write key stays in userMetadata,
            # which has_commit_key reads (Delta takes one txn app id per write).
            w = w.option("txnAppId", CAS_APP_ID).option("txnVersion", str(expected_version + 1))
        elif meta.get("write_key"):  # Delta's idempotent writes: a second commit of this key is skipped
            w = w.option("txnAppId", meta["write_key"]).option("txnVersion", str(key_version))
        try:
            w.save(path)
        except Exception as exc:
            lost = ("ConcurrentTransactionException", "MetadataChangedException", "ProtocolChangedException")
            if expected_version is not None and any(name in str(exc) for name in lost):
                raise ConcurrentWriteError(moved_message(path, expected_version, None)) from exc
            raise
        from delta.tables import DeltaTable as SparkDeltaTable

        if cas:
            since = SparkDeltaTable.forPath(self.spark, path).history().where(f"version > {expected_version}")
            mine = [r["version"] for r in since.select("version", "userMetadata").collect()
                    if (_commit_meta({"userMetadata": r["userMetadata"]}) or {}).get("cas_write_id")
                    == meta["cas_write_id"]]
            if not mine:  # Delta skipped it: another expected-version write recorded this txnVersion first
                raise ConcurrentWriteError(moved_message(path, expected_version, None))
            return int(mine[0])
        return int(SparkDeltaTable.forPath(self.spark, path).history(1).collect()[0]["version"])

    def _write_rs(self, df, name, mode, partition_by, replace_where, merge_schema, overwrite_schema, meta,
                  rows_per_file, key_version=1, expected_version=None):
        path = self.path(name)
        if "://" not in path:
            os.makedirs(path, exist_ok=True)
        exists = self.exists(name)
        read_version = self._dt(name).version() if exists else -1
        if expected_version is not None:  # planned on that version, committed at the next or not at all
            read_version = expected_version
        if exists and not (mode == "overwrite" and overwrite_schema and not replace_where):
            table_parts = self.partition_columns(name)
            if partition_by and partition_by != table_parts:
                raise DeltaWriteError(
                    f"Delta table {path} is partitioned by {table_parts}, not {partition_by}; "
                    f"rewrite it with mode='overwrite', overwrite_schema=True to change that"
                )
            partition_by = table_parts
        if exists:
            # Fail fast on the driver, before any task writes a file.
            from causalrec.storage.delta_rs_commit import check_schema, table_arrow_schema
            from pyspark.sql.pandas.types import to_arrow_schema

            if not (mode == "overwrite" and overwrite_schema and not replace_where):
                new = check_schema(table_arrow_schema(self._dt(name)), to_arrow_schema(df.schema, timezone="UTC"), path)
                if new and not merge_schema:
                    raise DeltaWriteError(
                        f"Delta table {path}: the data being written has new column(s) "
                        f"{[f.name for f in new]}; pass merge_schema=True to add them"
                    )
        missing = [c for c in partition_by if c not in df.columns]
        if missing:  # fail fast, before any task writes a file (commit_files checks it again)
            raise DeltaWriteError(
                f"Delta table {path}: partition column(s) {missing} are not in the data being written "
                f"(columns {df.columns})"
            )
        # Python data sources are looked up through the JVM thread's *active* session, which a
        # new Python thread (pinned to a new JVM thread) does not have: set it.
        jvm = getattr(self.spark, "_jvm", None)
        if jvm is not None:
            jvm.org.apache.spark.sql.SparkSession.setActiveSession(self.spark._jsparkSession)
        commit_meta = dict(meta)
        if merge_schema:
            commit_meta["_merge_schema"] = True
        if overwrite_schema:
            commit_meta["_overwrite_schema"] = True
        if meta.get("write_key"):
            commit_meta["_key_version"] = key_version
        if expected_version is not None:
            commit_meta["_exact_version"] = True
        write_id = uuid.uuid4().hex[:12]
        w = (
            df.write.format("causalrec_delta")
            .mode(mode)
            .option("path", path)
            .option("partition_by", json.dumps(partition_by))
            .option("read_version", str(read_version))
            .option("commit_metadata", json.dumps(commit_meta))
            .option("write_id", write_id)
        )
        if replace_where:
            w = w.option("replace_where", json.dumps([list(c) for c in replace_where], default=str))
        if rows_per_file:
            w = w.option("target_rows_per_file", str(rows_per_file))
        try:
            w.save()
        except Exception as exc:
            landed, _ = landed_commit(path, write_id, read_version)  # the job may fail after the commit
            if landed is not None:
                raise WriteCommittedError(
                    f"write to Delta table {path} was committed as version {landed} (its rows are in the "
                    f"table), but the job failed after the commit; do not retry it without an idempotency "
                    f"key. Cause: {str(exc)[:2000]}") from None
            raise _unwrap_write_error(exc, path) from None
        return self._dt(name).version()

    def write_arrow(self, table, name: str, mode: str = "append", *, partition_by=None,
                    idempotency_key: Optional[str] = None, metadata: Optional[dict] = None) -> Optional[int]:
        """Driver-side write of a small Arrow table (reports, logs), same semantics as :meth:`write`."""
        df = self.spark.createDataFrame(table.to_pandas(), schema=_spark_schema_from_arrow(table.schema))
        return self.write(df, name, mode, partition_by=partition_by, idempotency_key=idempotency_key,
                          metadata=metadata)

    # ------------------------------------------------------------------ read
    def read(self, name: str, version: Optional[int] = None):
        """Latest snapshot, or ``version=`` for time travel."""
        path = self.path(name)
        if not self.exists(name):
            raise FileNotFoundError(f"Delta table {path} does not exist: {_run_first(name)}")
        if self.backend == "delta-spark":
            r = self.spark.read.format("delta")
            if version is not None:
                r = r.option("versionAsOf", version)
            return r.load(path)
        dt = self._dt(name, version)
        schema = _spark_schema_from_arrow(_arrow_schema_of(dt))
        files = dt.file_uris()
        if not files:
            return self.spark.createDataFrame([], schema)
        # partition values are parsed from folder names, written in UTC (not the session's time zone)
        df = self.spark.read.schema(schema).option("basePath", path).option("timeZone", "UTC").parquet(*files)
        return df.select(*[quote_name(f.name) for f in schema.fields])

    def read_arrow(self, name: str, version: Optional[int] = None, columns: Optional[list] = None):
        """Small tables only (dimension tables, results): read on the driver with delta-rs."""
        return self._dt(name, version).to_pyarrow_table(columns=columns)

    def schema(self, name: str):
        return _arrow_schema_of(self._dt(name))

    def partition_columns(self, name: str) -> list:
        return list(self._dt(name).metadata().partition_columns)

    # ------------------------------------------------------------------ maintenance
    def history(self, name: str, limit: Optional[int] = None) -> list[dict]:
        if self.backend == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            rows = SparkDeltaTable.forPath(self.spark, self.path(name)).history(limit or 1000).collect()
            return [r.asDict(recursive=True) for r in rows]
        return self._dt(name).history(limit)

    def commit_metadata(self, name: str, limit: Optional[int] = None) -> list[dict]:
        """The causalrec metadata dicts (``write(..., metadata=...)``) of the table's commits, newest first."""
        return commit_metadata_of(self.history(name, limit))

    def has_commit_key(self, name: str, key: str) -> bool:
        """Whether the write keyed ``key`` is applied: committed, and its rows not replaced since.

        Why the second half: after an overwrite / delete / restore the keyed commit's rows may be
        gone, and skipping its rerun would report rows the table no longer holds. After a
        replacement of part of the table (a partition overwrite, a conditional delete) the key
        stays applied while any file that may hold the keyed commit's rows is still in the table
        (one it added, or one that compaction or a row-level rewrite put its rows in, see
        :meth:`_key_rows_may_remain`): re-applying it would write its surviving rows twice.
        Walks the history newest first.
        """
        return self._key_applied(name, key)

    def _key_applied(self, name: str, key: str) -> bool:
        if not self.exists(name):
            return False
        partly_replaced = False
        restored = False  # a later RESTORE may have put back files that an older overwrite removed
        since = []  # the history entries after the keyed commit, newest first
        for h in self.history(name):
            if (_commit_meta(h) or {}).get("write_key") == key:
                return not partly_replaced or self._key_rows_may_remain(name, int(h["version"]), since[::-1])
            replaced = _replaced_rows(h)
            if replaced == "all" and not restored:
                return False
            partly_replaced = partly_replaced or replaced is not None
            restored = restored or _is_restore(h)
            since.append(h)
        # the keyed commit is older than the retained history (log cleanup), and nothing since replaced it
        return not partly_replaced and self._dt(name).transaction_version(key) is not None

    def _key_rows_may_remain(self, name: str, version: int, later: list) -> bool:
        """Whether the latest snapshot holds a data file that may hold rows commit ``version`` added.

        Follows that commit's files through ``later`` (the history entries after it, oldest first):
        a file a commit removes is gone, but a commit that carries the rows of the files it removes
        into files it adds (compaction; a conditional delete, update or merge, which rewrite a file's
        other rows; see :func:`_carries_rows_over`) passes the lineage on to every file it adds in a
        partition where it removed one of them (rows never change partition). A file removed and
        added again by one commit (a deletion vector, new statistics) stays. Reads the log from
        ``version`` on: the commits' JSON files on a local table, else the snapshots around each
        commit that may remove files (delta-rs, which both backends read the log with here).
        """
        table = self.path(name)
        log_dir = os.path.join(table, "_delta_log")
        if "://" not in table and os.path.isdir(log_dir):
            try:
                return _lineage_remains(version, later, lambda v: _commit_file_actions(log_dir, v),
                                        lambda: self.partition_columns(name))
            except FileNotFoundError:  # a commit file is gone (log cleanup): read the snapshots instead
                pass
        snapshots: dict = {}

        def files(v):
            if v not in snapshots:
                snapshots[v] = _snapshot_files(self._dt(name, v)) if v >= 0 else {}
            return snapshots[v]

        def actions(v):
            before, after = files(v - 1), files(v)
            return ({p: (pv, True) for p, pv in after.items() if p not in before},
                    {p: (pv, True) for p, pv in before.items() if p not in after})

        return _lineage_remains(version, later, actions, lambda: self.partition_columns(name))

    def _next_key_version(self, name: str, key: str) -> int:
        """The Delta txn version a new commit of ``key`` carries (commits are refused at or below the recorded one).

        One above the recorded version when the key's rows were replaced, so the re-applied write
        lands (and of two racing re-applies only one); else the recorded one, which a writer that
        raced a commit of the key (its history check saw none) is then refused with.
        """
        txn = self._dt(name).transaction_version(key) if self.exists(name) else None
        if txn is None:
            return 1
        return txn if self._key_applied(name, key) else txn + 1

    def optimize(self, name: str) -> dict:
        """Compact small files (bin-packing) where the backend supports it."""
        if self.backend == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            SparkDeltaTable.forPath(self.spark, self.path(name)).optimize().executeCompaction()
            return {"backend": "delta-spark"}
        return dict(self._dt(name).optimize.compact())

    def restore(self, name: str, version: int) -> Optional[int]:
        """Put the table's content back to ``version`` as a new commit (history is kept): the way out
        when a check after a committed write finds it wrong. Returns the new version."""
        if self.backend == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            SparkDeltaTable.forPath(self.spark, self.path(name)).restoreToVersion(int(version))
        else:
            self._dt(name).restore(int(version))
        return self.version(name)

    def vacuum(self, name: str, retention_hours: int = 168, dry_run: bool = False) -> list:
        """Delete files no longer referenced (and orphans of failed writes) older than the retention."""
        if self.backend == "delta-spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            SparkDeltaTable.forPath(self.spark, self.path(name)).vacuum(retention_hours)
            return []
        return self._dt(name).vacuum(
            retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False
        )

    def has_rows(self, name: str) -> bool:
        """Whether the table exists and holds a row (an ingest empties a table its source no longer
        produces, e.g. ``mcar_events``: its readers take it as absent)."""
        return self.exists(name) and self.row_count(name) > 0

    def row_count(self, name: str, version: Optional[int] = None) -> int:
        """From the log's file statistics when every file has them (no data scan); else an exact count
        (a file committed without statistics has a null numRecords, which a sum would take as 0)."""
        if self.backend == "delta-rs":
            import pyarrow as pa
            import pyarrow.compute as pc

            actions = pa.table(self._dt(name, version).get_add_actions(flatten=True))
            if "num_records" in actions.column_names and actions.column("num_records").null_count == 0:
                return int(pc.sum(actions.column("num_records")).as_py() or 0)
        return self.read(name, version).count()


def _local_path(uri: str) -> str:
    """A ``file:`` URI as the local path it names; any other path or URI unchanged."""
    if not uri.lower().startswith("file:"):
        return uri
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"Delta root {uri}: a file:// URI must name a local path (file:///path), not host "
                         f"{parsed.netloc!r}")
    return unquote(parsed.path)


def _run_first(table: str) -> str:
    from causalrec.stages import writers_of

    stages = writers_of(table)
    if not stages:
        return "no causalrec stage writes it"
    return "run " + " or ".join(f"the {s} stage (causalrec {s} <config>)" for s in stages) + " first"


def commit_metadata_of(history) -> list[dict]:
    """The causalrec metadata dicts in history entries (either engine's, e.g. a delta-rs
    ``DeltaTable.history()`` read without a Spark session), in their order."""
    return [m for m in map(_commit_meta, history) if m is not None]


def _commit_meta(h: dict) -> Optional[dict]:
    """The causalrec metadata dict of one history entry (delta-rs: ``causalrec``; delta-spark: ``userMetadata``)."""
    raw = h.get("causalrec") or h.get("userMetadata")
    try:
        meta = json.loads(raw) if raw else None
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _replaced_rows(h: dict) -> Optional[str]:
    """Which earlier rows a history entry may have removed: ``"all"`` (an overwrite, truncate, replace,
    unconditional delete), ``"some"`` (a partition overwrite, a conditional delete, a merge, an update,
    a restore) or None.

    A RESTORE counts as ``"some"``: it removes and adds back whole files, and the version it restores may
    still hold the keyed commit's files, so the file lineage (:meth:`DeltaStore._key_rows_may_remain`)
    decides from its add and remove actions.

    Operation names as delta-rs and delta-spark write them (WRITE with mode Overwrite, with a
    ``predicate`` for a partition overwrite; DELETE; TRUNCATE; RESTORE; CREATE OR REPLACE TABLE /
    REPLACE TABLE AS SELECT; STREAMING UPDATE in complete mode). Our own commits record the
    caller's mode (``causalrecWriteMode``, because delta-rs logs a schema-evolving append as an
    overwrite) and a partition overwrite's condition (``causalrecReplaceWhere``).
    """
    if h.get("causalrecWriteMode"):
        if h["causalrecWriteMode"] != "overwrite":
            return None
        return "some" if h.get("causalrecReplaceWhere") else "all"
    op = str(h.get("operation") or "").upper()
    params = h.get("operationParameters") or {}
    conditional = str(params.get("predicate") or "").strip() not in ("", "[]")
    if op in ("RESTORE", "UPDATE") or "MERGE" in op:  # MERGE: delta-rs and delta-spark; both rewrite files
        return "some"
    if op == "TRUNCATE" or "REPLACE" in op:
        return "all"
    if op == "DELETE":
        return "some" if conditional else "all"
    if op == "STREAMING UPDATE":
        return "all" if str(params.get("outputMode", "")).lower() == "complete" else None
    if str(params.get("mode", "")).lower() == "overwrite":
        return "some" if conditional else "all"
    return None


def _partition_key(values) -> tuple:
    return tuple(sorted((str(k), None if v is None else str(v)) for k, v in (values or {}).items()))


def _commit_file_actions(log_dir: str, version: int) -> tuple[dict, dict]:
    """The files one commit adds and removes: ``{path: (partition key, dataChange)}`` each, from its JSON."""
    added, removed = {}, {}
    with open(os.path.join(log_dir, f"{version:020d}.json")) as fh:
        for line in fh:
            if not line.strip():
                continue
            action = json.loads(line)
            for kind, into in (("add", added), ("remove", removed)):
                f = action.get(kind)
                if f:
                    into[unquote(f["path"])] = (_partition_key(f.get("partitionValues")),
                                                f.get("dataChange", True) is not False)
    return added, removed


def _snapshot_files(dt) -> dict:
    """``{path: partition key}`` of one snapshot's data files."""
    import pyarrow as pa

    t = pa.table(dt.get_add_actions(flatten=False))
    parts = t.column("partition").to_pylist() if "partition" in t.column_names else [None] * t.num_rows
    return dict(zip(t.column("path").to_pylist(), map(_partition_key, parts)))


def _lineage_remains(version: int, later: list, actions, partition_columns) -> bool:
    """See ``DeltaStore._key_rows_may_remain``: ``actions(v)`` gives commit ``v``'s (added, removed) files.

    A data file never changes, so one of the lineage that a later commit adds back (a RESTORE) holds
    its rows again: removed files are kept as ``dead`` until no RESTORE follows.
    """
    live = {p: pv for p, (pv, _) in actions(version)[0].items()}
    dead: dict = {}
    last_restore = max((i for i, h in enumerate(later) if _is_restore(h)), default=-1)
    parts = None
    for i, h in enumerate(later):
        if not _may_remove_files(h):
            continue
        added, removed = actions(int(h["version"]))
        live.update({p: dead.pop(p) for p in added if p in dead})
        gone = {p: live.pop(p) for p in removed if p in live}
        if not gone:
            continue
        if i < last_restore:
            dead.update(gone)
        rearranged = not any(removed[p][1] for p in gone)  # dataChange false: the rows are all still there
        carried = rearranged
        if not carried:
            if parts is None and _needs_partition_columns(h):
                parts = set(c.lower() for c in partition_columns())
            carried = _carries_rows_over(h, parts or set())
        if carried:
            where = set(gone.values())
            live.update({p: pv for p, (pv, _) in added.items() if pv in where})
        else:
            live.update({p: pv for p, pv in gone.items() if p in added})  # re-added as it was
        if not live and i >= last_restore:
            return False
    return bool(live)


def _is_restore(h: dict) -> bool:
    return str(h.get("operation") or "").upper() == "RESTORE"


def _may_remove_files(h: dict) -> bool:
    """False for a history entry that certainly removes no file (an append)."""
    if h.get("causalrecWriteMode") == "append":  # ours, also a schema-evolving append logged as an overwrite
        return False
    op = str(h.get("operation") or "").upper()
    params = h.get("operationParameters") or {}
    mode = str(params.get("mode") or params.get("outputMode") or "").lower()
    return not (op in ("WRITE", "STREAMING UPDATE") and mode == "append")


def _needs_partition_columns(h: dict) -> bool:
    return not h.get("causalrecWriteMode") and str(h.get("operation") or "").upper() == "WRITE"


def _carries_rows_over(h: dict, partition_columns: set) -> bool:
    """Whether a commit may put rows of the files it removes into files it adds.

    Compaction (OPTIMIZE, REORG) moves them all; a DELETE, UPDATE or MERGE rewrites a file it hits
    into a new one with the rows it keeps (delta-rs always; delta-spark unless it writes a deletion
    vector); so does an overwrite whose condition reads a data column (delta-spark ``replaceWhere``,
    delta-rs ``predicate``). An overwrite of whole partitions (its condition names partition columns
    only; ours on delta-rs, recorded as ``causalrecReplaceWhere``) adds new rows only.
    """
    if h.get("causalrecWriteMode"):  # ours on delta-rs: appends, whole-table and whole-partition overwrites
        return False
    op = str(h.get("operation") or "").upper()
    if "OPTIMIZE" in op or "MERGE" in op or op in ("DELETE", "UPDATE", "REORG"):
        return True
    if op == "WRITE":
        predicate = str((h.get("operationParameters") or {}).get("predicate") or "").strip()
        if predicate in ("", "[]"):
            return False
        return not _predicate_columns(predicate) <= partition_columns
    return False


_SQL_WORDS = {"and", "or", "not", "in", "is", "null", "true", "false", "like", "between", "date", "timestamp",
              "timestamp_ntz", "interval", "cast", "as", "escape"}


def _predicate_columns(predicate: str) -> set:
    """The (lower-cased) column names an overwrite's SQL condition reads, as delta-spark
    (a JSON list of SQL strings) or delta-rs (a SQL string) log it. Any word that is not a SQL
    keyword, a function name or inside a string literal counts as a column: an unknown word
    makes the condition read a data column, which keeps a key applied (never duplicates it)."""
    text = predicate
    try:
        parsed = json.loads(predicate)
        if isinstance(parsed, list):
            text = " AND ".join(map(str, parsed))
    except ValueError:
        pass
    text = re.sub(r"'(?:[^'\\]|''|\\.)*'", " ", text)  # string literals
    cols = set()
    for quoted in re.findall(r'`((?:[^`]|``)+)`|"((?:[^"]|"")+)"', text):  # quoted identifiers
        cols.add((quoted[0].replace("``", "`") or quoted[1].replace('""', '"')).lower())
    text = re.sub(r'`(?:[^`]|``)+`|"(?:[^"]|"")+"', " ", text)
    for word, call in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*(\()?", text):
        if not call and word.lower() not in _SQL_WORDS:
            cols.add(word.lower())
    return cols


def _arrow_schema_of(dt):
    import pyarrow as pa

    from causalrec.storage.delta_rs_commit import _normalise

    s = pa.schema(dt.schema().to_arrow())
    return pa.schema([pa.field(f.name, _normalise(f.type), f.nullable) for f in s])


def _spark_schema_from_arrow(schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def _unwrap_write_error(exc: Exception, path: str) -> Exception:
    """Spark wraps Python errors from commit(); surface ours with their own message."""
    text = str(exc)
    for cls in (WriteAlreadyApplied, ConcurrentWriteError, DeltaWriteError):
        marker = cls.__name__ + ": "
        if marker in text:
            msg = text.split(marker, 1)[1].split("\n", 1)[0]
            return cls(msg)
    if "No module named 'causalrec'" in text:  # the data source's Python workers lack the library
        return DeltaWriteError(
            f"write to Delta table {path} failed; the table is unchanged: Spark's Python workers cannot import "
            "causalrec, and the offline delta-rs writer runs in them (a Python data source, whose workers "
            "--py-files did not reach in our runs). Install causalrec in the executors' Python (the image, or a packed venv "
            "through --archives), or give the job Delta's jars (--packages io.delta:delta-spark_2.13:<version> "
            f"with Delta's SQL extension and catalog) to write through delta-spark. Cause: {text[:2000]}")
    return DeltaWriteError(f"write to Delta table {path} failed; the table is unchanged. Cause: {text[:2000]}")
