"""Offline Delta writes from Spark: a Python data source backed by delta-rs.

Why: delta-spark's JVM jars come from Maven, which a laptop or CI may not reach.
This data source keeps Spark's parallel write path and Delta's atomicity:

* ``write()`` runs in every Spark task: it writes the task's Arrow batches as
  parquet files (Hive-style partition folders) into the table folder and returns
  Delta ``add`` actions with file statistics (numRecords, minValues, maxValues,
  nullCount). Nothing is visible yet: the files are not in the log.
* ``commit()`` runs once, on the driver side, in its own Python worker: it adds
  every task's files to the Delta log in ONE transaction with ``deltalake``,
  against the table version the write was planned on, so concurrent overwrites
  from the same snapshot conflict instead of silently losing data.
* ``abort()`` deletes every file of the write, including one a straggling task
  publishes after the job failed (see ``DeltaRsWriter.abort``), except files the
  write's own commit put in the log (a job can fail after ``commit()`` landed); the
  log is untouched, so a failed job leaves the table as it was, or as committed.

Options (all strings): ``path``, ``partition_by`` (JSON list), ``replace_where``
(JSON list of [column, op, value] conjunctions), ``read_version`` (int or -1 for
a new table), ``commit_metadata`` (JSON object stored in commitInfo),
``target_rows_per_file``, ``write_id`` (names this write's files and commit; the store
passes one so it can tell afterwards whether a failed job had committed).

The class must be importable by Spark's Python workers, so it lives in the
installed ``causalrec`` package and imports deltalake lazily (the Rust runtime
must not be initialised in a process that later forks).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    WriterCommitMessage,
)

FORMAT_NAME = "causalrec_delta"

# Characters Hive escapes in partition folder names (Spark's partition discovery unescapes them).
_ESCAPE = set('"#%\'*/:=?\\\x7f{}[]^')
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def escape_path_name(value: str) -> str:
    out = []
    for ch in value:
        if ch in _ESCAPE or ord(ch) < 0x20:
            out.append("%{:02X}".format(ord(ch)))
        else:
            out.append(ch)
    return "".join(out)


def partition_value_string(value) -> str | None:
    """Delta's string form of a partition value (protocol: 'Partition Value Serialization'); an empty
    string is null, as Spark writes and reads it (a folder ``c=`` is unreadable)."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, _dt.date):
        return value.isoformat()
    return str(value)


def _stat_value(v):
    if isinstance(v, _dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return v.strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
    if isinstance(v, _dt.date):
        return v.isoformat()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if hasattr(v, "as_tuple"):  # Decimal
        return float(v)
    return v


def file_stats(table) -> str:
    """Delta per-file statistics JSON for a pyarrow Table (data columns only)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mins, maxs, nulls = {}, {}, {}
    for name, col in zip(table.column_names, table.columns):
        nulls[name] = int(col.null_count)
        t = col.type
        if (pa.types.is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_boolean(t)
                or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)):
            continue
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            # Truncated string bounds must stay valid bounds: keep them only when short.
            if len(col) == 0 or col.null_count == len(col):
                continue
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo is not None and len(lo) <= 32:
                mins[name] = lo
            if hi is not None and len(hi) <= 32:
                maxs[name] = hi
            continue
        if len(col) == 0 or col.null_count == len(col):
            continue
        if pa.types.is_floating(t):
            col = pc.drop_null(col)
            col = pc.filter(col, pc.invert(pc.is_nan(col)))
            if len(col) == 0:
                continue
        mm = pc.min_max(col)
        lo, hi = _stat_value(mm["min"].as_py()), _stat_value(mm["max"].as_py())
        if lo is not None:
            mins[name] = lo
        if hi is not None:
            maxs[name] = hi
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
        separators=(",", ":"),
    )


@dataclass
class DeltaFilesMessage(WriterCommitMessage):
    """What a task wrote: Delta add actions as plain dicts (picklable)."""

    files: list = field(default_factory=list)


def _to_target_schema(batch_table, schema):
    """Spark hands timestamps with the session zone; Delta stores UTC microseconds."""
    import pyarrow as pa

    cols = []
    for f in schema:
        col = batch_table.column(f.name)
        if pa.types.is_timestamp(f.type) and col.type != f.type:
            col = col.cast(f.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


class DeltaRsWriter(DataSourceArrowWriter):
    def __init__(self, options: dict, spark_schema, overwrite: bool):
        self.path = options["path"]
        self.partition_by = json.loads(options.get("partition_by", "[]"))
        self.replace_where = json.loads(options.get("replace_where", "null"))
        self.read_version = int(options.get("read_version", "-1"))
        self.commit_metadata = json.loads(options.get("commit_metadata", "{}"))
        self.target_rows = int(options.get("target_rows_per_file", "5000000"))
        self.overwrite = overwrite
        self.schema_json = spark_schema.json()
        self.write_id = options.get("write_id") or uuid.uuid4().hex[:12]
        self.fail_after_files = int(options.get("_test_fail_commit", "0"))

    # -- schema ---------------------------------------------------------------
    def arrow_schema(self):
        from pyspark.sql.pandas.types import to_arrow_schema
        from pyspark.sql.types import StructType
        import pyarrow as pa

        s = to_arrow_schema(StructType.fromJson(json.loads(self.schema_json)), timezone="UTC")
        fields = []
        for f in s:
            if pa.types.is_timestamp(f.type):  # TIMESTAMP in UTC; TIMESTAMP_NTZ stays without a zone
                f = f.with_type(pa.timestamp("us", tz="UTC" if f.type.tz else None))
            fields.append(f)
        return pa.schema(fields)

    # -- task side ------------------------------------------------------------
    def write(self, iterator):
        import pyarrow as pa

        schema = self.arrow_schema()
        data_cols = [f.name for f in schema if f.name not in self.partition_by]
        data_schema = pa.schema([schema.field(n) for n in data_cols])
        buffers: dict = {}
        files = []

        def flush(key):
            tables = buffers.pop(key, [])
            if not tables:
                return
            table = pa.concat_tables(tables)
            pvals = dict(zip(self.partition_by, key))
            folder = "/".join(
                f"{c}={escape_path_name(v) if v is not None else HIVE_NULL}" for c, v in pvals.items()
            )
            name = f"part-{self.write_id}-{uuid.uuid4().hex}.c000.snappy.parquet"
            rel = f"{folder}/{name}" if folder else name
            full = os.path.join(self.path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if not self._publish(table, full):
                return
            files.append(
                {
                    "path": rel,
                    "size": os.path.getsize(full),
                    "partition_values": pvals,
                    "modification_time": int(time.time() * 1000),
                    "stats": file_stats(table),
                }
            )

        for batch in iterator:
            table = _to_target_schema(pa.Table.from_batches([batch]), schema)
            if not self.partition_by:
                groups = {(): table}
            else:
                groups = _split_by_partition(table, self.partition_by)
            for key, part in groups.items():
                part = part.select(data_cols).cast(data_schema)
                buffers.setdefault(key, []).append(part)
                if sum(t.num_rows for t in buffers[key]) >= self.target_rows:
                    flush(key)
        for key in list(buffers):
            flush(key)
        return DeltaFilesMessage(files=files)

    # -- driver side ----------------------------------------------------------
    def commit(self, messages):
        from causalrec.storage.delta_rs_commit import commit_files

        files = [f for m in messages if m is not None for f in m.files]
        commit_files(
            path=self.path,
            files=files,
            arrow_schema=self.arrow_schema(),
            partition_by=self.partition_by,
            overwrite=self.overwrite,
            replace_where=self.replace_where,
            read_version=self.read_version,
            commit_metadata=self.commit_metadata,
            write_id=self.write_id,
        )

    # -- abort: no file of a failed write may stay behind ----------------------
    # Spark calls abort() once the job has failed, while a task of that job can still be
    # finishing its write() (its Python worker completes the file it started). So abort()
    # first leaves a marker, then deletes every file carrying this write's id; a task
    # publishes a file (temporary name -> final name) and only then looks for the marker,
    # deleting its own file when it finds one. Either the sweep sees the published file
    # or the task sees the marker: nothing is left. Markers are empty files under
    # ``_causalrec_aborted/`` (ignored by readers, like ``_delta_log``); abort() removes
    # those older than a day. Spark also calls abort() when commit() raised after its commit
    # had landed (or the job failed after it): the files that commit added are then kept.
    ABORT_DIR = "_causalrec_aborted"
    ABORT_MARKER_TTL_S = 86400

    def _marker(self) -> str:
        return os.path.join(self.path, self.ABORT_DIR, self.write_id)

    def _publish(self, table, full: str) -> bool:
        """Write ``full`` under a temporary hidden name, rename it, then honour an abort."""
        import pyarrow.parquet as pq

        folder, name = os.path.split(full)
        tmp = os.path.join(folder, f".{name}.tmp")
        pq.write_table(table, tmp, compression="snappy")
        try:
            os.replace(tmp, full)
        except FileNotFoundError:
            if os.path.exists(self._marker()):  # swept by abort() while being written
                return False
            raise  # anything else (a path pyarrow wrote but os cannot rename) must not lose the rows
        if os.path.exists(self._marker()):
            _remove(full)
            return False
        return True

    def abort(self, messages):
        from causalrec.storage.delta_rs_commit import landed_commit

        _, committed = landed_commit(self.path, self.write_id, self.read_version)  # raises: delete nothing
        os.makedirs(os.path.dirname(self._marker()), exist_ok=True)
        open(self._marker(), "w").close()
        mine = (f"part-{self.write_id}-", f".part-{self.write_id}-")
        for root, dirs, names in os.walk(self.path):
            dirs[:] = [d for d in dirs if d not in ("_delta_log", self.ABORT_DIR)]
            for n in names:
                if n.startswith(mine) and n not in committed:
                    _remove(os.path.join(root, n))
        old = time.time() - self.ABORT_MARKER_TTL_S
        with os.scandir(os.path.dirname(self._marker())) as it:
            for e in it:
                if e.is_file() and e.stat().st_mtime < old:
                    _remove(e.path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _split_by_partition(table, partition_by):
    """Group an Arrow table's rows by their partition values (vectorised: one mask per key)."""
    import pyarrow.compute as pc

    keys = table.select(partition_by).group_by(partition_by).aggregate([]).to_pylist()
    if len(keys) == 1:
        k = keys[0]
        return {tuple(partition_value_string(k[c]) for c in partition_by): table}
    groups = {}
    for k in keys:
        mask = None
        for c in partition_by:
            col = table.column(c)
            if k[c] is None:
                m = pc.is_null(col)
            elif isinstance(k[c], float) and k[c] != k[c]:  # NaN equals nothing, not even NaN
                m = pc.fill_null(pc.is_nan(col), False)
            else:
                m = pc.fill_null(pc.equal(col, k[c]), False)
            mask = m if mask is None else pc.and_(mask, m)
        groups[tuple(partition_value_string(k[c]) for c in partition_by)] = table.filter(mask)
    return groups


class DeltaRsDataSource(DataSource):
    """``df.write.format("causalrec_delta")``: see the module docstring."""

    @classmethod
    def name(cls):
        return FORMAT_NAME

    def writer(self, schema, overwrite):
        return DeltaRsWriter(self.options, schema, overwrite)
