"""Read an events batch from parquet, CSV, JSON lines or an existing Delta table.

Why a module: the error a user sees when a path is wrong or a file is unreadable
must name the file and the format that was expected, whatever Spark says underneath.
CSV is read as text (every column a string) and parsed per row by
:mod:`causalrec.ingest.validate`, so one unparseable cell quarantines one row instead
of nulling it silently. JSON lines keep Spark's inferred types; a malformed line
arrives as a row of nulls (plus ``_corrupt_record``) and is quarantined as ``NULL_ID``
with the raw line in its payload.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from causalrec.ingest.validate import SOURCE_ROW

FORMATS = ("parquet", "csv", "jsonl", "delta")


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
            df = (spark.read.option("header", "true").option("inferSchema", "false")
                  .option("mode", "PERMISSIVE").option("multiLine", "false").csv(path))
        elif fmt == "jsonl":
            df = spark.read.option("mode", "PERMISSIVE").json(path)
        else:
            from deltalake import DeltaTable

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


def number_rows(df):
    """Add ``SOURCE_ROW``: the 0-based position of each row in the source (partition order).

    Runs one small job (row counts per input partition) and turns each row's
    ``monotonically_increasing_id`` into a dense index from those offsets, so no
    row travels to the driver and nothing is shuffled.
    """
    from pyspark.sql import functions as F

    x = df.withColumn("__cr_pid", F.spark_partition_id()).withColumn("__cr_mid", F.monotonically_increasing_id())
    counts = sorted((int(r[0]), int(r[1])) for r in x.groupBy("__cr_pid").count().collect())
    offsets, total = {}, 0
    for pid, n in counts:
        offsets[pid] = total
        total += n
    if not offsets:
        return x.withColumn(SOURCE_ROW, F.lit(None).cast("long")).drop("__cr_pid", "__cr_mid")
    pairs = []
    for pid, off in offsets.items():
        pairs += [F.lit(pid), F.lit(off)]
    offset = F.element_at(F.create_map(*pairs), F.col("__cr_pid"))
    local = F.col("__cr_mid") - F.shiftleft(F.col("__cr_pid").cast("long"), 33)
    return x.withColumn(SOURCE_ROW, (offset + local).cast("long")).drop("__cr_pid", "__cr_mid")
