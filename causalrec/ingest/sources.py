"""Read an events batch from parquet, CSV, JSON lines or an existing Delta table.

Why a module: the error a user sees when a path is wrong or a file is unreadable
must name the file and the format that was expected, whatever Spark says underneath.
CSV is read as text (every column a string) and parsed per row by
:mod:`causalrec.ingest.validate`, so one unparseable cell quarantines one row instead
of nulling it silently; every file's header must name the first file's columns in the
same order (else :class:`SourceError`), and quoted fields may span lines. JSON lines keep
Spark's inferred types; a malformed line arrives as a row of nulls (plus ``_corrupt_record``)
and is quarantined as ``NULL_ID`` with the raw line in its payload.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from causalrec.ingest.validate import CSV_RECORD, FILE_ROW, SOURCE_FILE, SOURCE_ROW

FORMATS = ("parquet", "csv", "jsonl", "delta")

# Line of data row r (0-based, FILE_ROW) in a file with no blank lines and (CSV) no record
# spanning lines: r + offset. Parquet and Delta have no lines.
LINE_OFFSET = {"csv": 2, "jsonl": 1}

# Spark's message when a CSV file's header differs from the schema (enforceSchema=false)
_HEADER_MISMATCH = re.compile(r"(CSV header does not conform to the schema\.|Number of column in CSV header is not "
                              r"equal to number of fields in the schema:)(.*?)\n\s*CSV file: (\S+)", re.S)
_BLANK = "^[\\x00-\\x20]*$"  # a blank or whitespace-only line (Spark regex)


class SourceError(ValueError):
    """The input file or table cannot be read; the message names it and the expected format."""


def _exists(path: str) -> bool:
    if "://" in path:
        return True  # object stores: let the reader report it
    return bool(glob.glob(path)) if any(ch in path for ch in "*?[") else os.path.exists(path)


def read_events(spark, path: str, fmt: str, *, store=None):
    """Return the raw input DataFrame (columns as found in the source)."""
    if fmt not in FORMATS:
        raise SourceError(f"data.format {fmt!r} is not supported; expected one of {list(FORMATS)}")
    if not path:
        raise SourceError("data.path is empty; expected the input file, folder or Delta table to ingest")
    if not _exists(path):
        raise SourceError(f"input {path} does not exist (expected a {fmt} file or folder)")
    try:
        if fmt == "parquet":
            df = spark.read.parquet(path)
        elif fmt == "csv":
            df = _read_csv(spark, path)
        elif fmt == "jsonl":
            df = spark.read.option("mode", "PERMISSIVE").json(path)
        else:
            from deltalake import DeltaTable

            if not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", path):  # a local path: relative to the working
                path = os.path.abspath(path)  # directory, not to the store's root (store.path)
            if not DeltaTable.is_deltatable(path):
                raise SourceError(f"input {path} is not a Delta table (no _delta_log); check data.format")
            if store is None:
                from causalrec.storage import DeltaStore

                store = DeltaStore(spark, str(Path(path).parent))
            df = store.read(path)
        # touch the schema now so that a broken file fails here, with its name
        _ = df.schema
    except SourceError:
        raise
    except Exception as exc:  # Spark's AnalysisException etc.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot read {path} as {fmt}: {first[:500]}") from None
    if not df.columns or df.columns == ["_corrupt_record"]:
        raise SourceError(f"{path}: no columns could be read as {fmt} (empty or not {fmt})")
    return df


def _read_csv(spark, path: str):
    """CSV with every column a string, matched to the header by name and quoted line breaks kept.

    Why: ``enforceSchema=false`` makes Spark check each file's header against the first file's
    (with it on, a file with the columns in another order gets its values put in the wrong
    columns); the mismatch surfaces at the first action as :func:`csv_header_error`.
    ``multiLine`` keeps a quoted field with a line break in one record (line by line, the
    record is cut in two); it reads each file in one task. A quote inside a quoted field may
    be doubled (RFC 4180: pandas, Excel, Python's csv) or escaped as ``\\"`` (Spark's writer);
    Spark's default escape alone misreads the doubled form. A row whose field count differs
    from the header keeps its raw text in ``CSV_RECORD`` (:mod:`~causalrec.ingest.validate`
    quarantines extra fields). Blank and whitespace-only lines are skipped, as line by line.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    def reader(multiline: str):
        return (spark.read.option("header", "true").option("inferSchema", "false").option("mode", "PERMISSIVE")
                .option("multiLine", multiline).option("enforceSchema", "false")
                .option("escape", '"').option("charToEscapeQuoteEscaping", "\\"))

    # the header (the first file's first line, every column a string), found line by line: Spark's
    # multiLine inference reads a file named e.g. ``events[1].csv`` as a glob and fails
    plain = reader("false").csv(path)
    if not plain.columns:
        return plain
    header = plain.schema
    df = (reader("true").schema(StructType(header.fields + [StructField(CSV_RECORD, StringType())]))
          .option("columnNameOfCorruptRecord", CSV_RECORD).csv(path))
    # a whitespace-only line is a one-field record under multiLine; naming the first column also
    # keeps Spark from refusing a count that would otherwise read only the corrupt-record column
    first, rec = F.col(f"`{header.fields[0].name}`"), F.col(CSV_RECORD)
    return df.where(~F.coalesce(rec.rlike(_BLANK) & first.rlike(_BLANK), F.lit(False)))


def csv_header_error(exc):
    """A :class:`SourceError` naming the file and its header for Spark's header mismatch, else None."""
    m = _HEADER_MISMATCH.search(str(exc))
    if m is None:
        return None
    found = " ".join(m.group(2).split())
    return SourceError(f"CSV file {_display_path(m.group(3))}: its header does not match the expected columns "
                       f"(those of the first file, in the same order): {found}")


def number_rows(df):
    """Add ``SOURCE_ROW``: the 0-based position of each row in the source (partition order);
    for file inputs also ``SOURCE_FILE`` (the file) and ``FILE_ROW`` (0-based row within it).

    Why per file: a quarantined row of a folder of files must be traceable to its file and
    row, not to a position across the folder (rows of a CSV with a header and no blank lines:
    line = row + 2). Runs one small job (row counts per partition and per file chunk, i.e.
    ``input_file_name``/``input_file_block_start``) and turns each row's
    ``monotonically_increasing_id`` into dense indexes from those offsets, so no row travels
    to the driver and nothing is shuffled (the chunk table is broadcast).
    """
    from pyspark.sql import functions as F

    x = (df.withColumn("__cr_pid", F.spark_partition_id())
         .withColumn("__cr_mid", F.monotonically_increasing_id())
         .withColumn("__cr_file", F.input_file_name())
         .withColumn("__cr_block", F.input_file_block_start()))
    try:  # the first action on a freshly read input: a CSV header mismatch shows here
        chunks = (x.groupBy("__cr_pid", "__cr_file", "__cr_block")
                  .agg(F.count(F.lit(1)).alias("n"), F.min("__cr_mid").alias("first")).collect())
    except Exception as exc:
        err = csv_header_error(exc)
        if err is None:
            raise
        raise err from None
    helpers = ("__cr_pid", "__cr_mid", "__cr_file", "__cr_block")
    if not chunks:
        return x.withColumn(SOURCE_ROW, F.lit(None).cast("long")).drop(*helpers)
    per_pid: dict = {}
    for c in chunks:
        per_pid[int(c["__cr_pid"])] = per_pid.get(int(c["__cr_pid"]), 0) + int(c["n"])
    x = x.withColumn(SOURCE_ROW, row_index(per_pid, "__cr_pid", "__cr_mid"))
    files = [c for c in chunks if c["__cr_file"]]
    if not files:  # not read from files (a loader's or the simulator's DataFrame)
        return x.drop(*helpers)
    # a file's chunks (splits) in byte order; within a partition a chunk's rows are consecutive ids
    rows, seen = [], {}
    for c in sorted(files, key=lambda c: (c["__cr_file"], c["__cr_block"])):
        done = seen.get(c["__cr_file"], 0)
        seen[c["__cr_file"]] = done + int(c["n"])
        rows.append((int(c["__cr_pid"]), c["__cr_file"], int(c["__cr_block"]), _display_path(c["__cr_file"]),
                     done - int(c["first"])))
    base = df.sparkSession.createDataFrame(
        rows, "__cr_pid int, __cr_file string, __cr_block long, __cr_show string, __cr_base long")
    x = x.join(F.broadcast(base), ["__cr_pid", "__cr_file", "__cr_block"], "left")
    x = x.withColumn(SOURCE_FILE, F.col("__cr_show")).withColumn(FILE_ROW, F.col("__cr_mid") + F.col("__cr_base"))
    return x.drop(*helpers, "__cr_show", "__cr_base")


def row_index(partition_rows: dict, pid: str, mid: str):
    """The 0-based position of a row in its DataFrame (partition order), as a column.

    ``partition_rows``: partition id -> its row count; ``pid`` / ``mid``: the columns holding
    each row's ``spark_partition_id`` and ``monotonically_increasing_id`` (taken before any
    shuffle). The id is (partition << 33) + position in the partition, so the position is the
    partition's offset plus the id's low bits: no row travels and nothing is shuffled.
    """
    from pyspark.sql import functions as F

    pairs, total = [], 0
    for p in sorted(partition_rows):
        pairs += [F.lit(p), F.lit(total)]
        total += partition_rows[p]
    if not pairs:
        return F.lit(None).cast("long")
    offset = F.element_at(F.create_map(*pairs), F.col(pid))
    return (offset + F.col(mid) - F.shiftleft(F.col(pid).cast("long"), 33)).cast("long")


def _display_path(uri: str) -> str:
    """``file:///a%20b/c.csv`` -> ``/a b/c.csv`` (what the user typed); other URIs as they are."""
    from urllib.parse import unquote, urlparse

    u = urlparse(uri)
    return unquote(u.path) if u.scheme == "file" else uri


def first_blank_lines(spark, files: list) -> dict:
    """``{file: 1-based number of its first blank line}`` for those of ``files`` that have one.

    Why: Spark's CSV and JSON readers skip blank and whitespace-only lines (also before a CSV
    header), so below the first such line ``row + LINE_OFFSET`` is no longer the line. Reads the
    files as text (the same line splitting as those readers); one row per file comes back. The
    paths are escaped: Spark reads ``[ ] { } * ?`` in a path as a glob pattern.
    """
    from pyspark.sql import functions as F

    if not files:
        return {}
    lines = number_rows(spark.read.text([re.sub(r"([\\\[\]{}*?])", r"\\\1", f) for f in files]))
    blank = lines.where(F.col("value").rlike(_BLANK))
    rows = blank.groupBy(SOURCE_FILE).agg(F.min(FILE_ROW).alias("first")).collect()
    return {r[SOURCE_FILE]: int(r["first"]) + 1 for r in rows}
