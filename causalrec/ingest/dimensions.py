"""Dimension/truth validation: ``users``, ``items`` and ``ground_truth`` rows before their overwrite.

Why: every join downstream assumes one row per key (``user_id``, ``item_id``, or the
``(user_id, item_id)`` pair of ``ground_truth``), and casting to the declared types does not
enforce that (a null or repeated key was written as it came). So each row ends in one place:

* written   - its key is set and no other row has that key with different content;
* collapsed - an exact copy (every column, after casting and trimming the key) of a written
  row: dropped silently and counted (``duplicates_collapsed``);
* quarantined (``dimension_quarantine``) with a reason code:

==============  ===========================================================================
NULL_ID         a key column null or empty after trimming (the detail names the column)
DUPLICATE_ID    the key is shared by rows of differing content: *every* row of that key is
                quarantined, since nothing says which one is right (the detail gives the count)
==============  ===========================================================================

Keys are trimmed, as events' ids are (:func:`causalrec.ingest.validate.typed_columns`),
so a dimension key matches the events that name it.

Why a table of its own rather than ``events_quarantine``: rejected dimension rows have other
reason codes and another shape (payload = a users/items/truth row), and ``table_name`` says
which table they were meant for without parsing ``source``.

No function here runs a Spark action; the job decides what to cache, count and write.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional

from causalrec.ingest.sources import row_index
from causalrec.ingest.validate import DETAIL, FINGERPRINT, REASON, strip_blanks
from causalrec.schemas import DIMENSION_QUARANTINE, GROUND_TRUTH, ITEMS, USERS, conform

SPECS = {"users": USERS, "items": ITEMS, "ground_truth": GROUND_TRUTH}
KEYS = {"users": ("user_id",), "items": ("item_id",), "ground_truth": ("user_id", "item_id")}
DIMENSION_REASONS = ("NULL_ID", "DUPLICATE_ID")

COLLAPSED = "__cr_collapsed"
PID = "__cr_pid"  # Spark partition of the input row, taken before any shuffle
MID = "__cr_mid"  # monotonically_increasing_id of the input row: (PID << 33) + position in the partition


def _content_hash(spec):
    """A 64-bit fingerprint of a row's content; nulls encoded explicitly (Spark's hash skips them)."""
    from pyspark.sql import functions as F

    def text(c):
        col = F.col(c.name)
        return F.to_json(col) if c.type.startswith("array<") else col.cast("string")

    return F.xxhash64(*[F.coalesce(text(c), F.lit("\u0000null")) for c in spec.columns])


def flag_dimension(df, name: str):
    """Return ``df`` conformed to its spec (keys trimmed) with REASON, DETAIL, COLLAPSED,
    FINGERPRINT and the input position (PID, MID).

    One window over the key counts the rows sharing it and tells whether their content
    differs (min and max of the content hash differ), so the whole check is one shuffle.
    Two different rows of one key pass as identical only on a 64-bit hash collision.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spec, keys = SPECS[name], KEYS[name]
    x = conform(df, spec)
    for k in keys:  # the key as read goes to the payload of a rejected row
        x = x.withColumn(f"__cr_raw_{k}", F.col(k)).withColumn(k, strip_blanks(F.col(k)))
    # a narrow projection of the input: partition and position are those of the input rows
    x = x.withColumn(PID, F.spark_partition_id()).withColumn(MID, F.monotonically_increasing_id())
    x = x.withColumn(FINGERPRINT, _content_hash(spec))

    w = Window.partitionBy(*keys).orderBy(FINGERPRINT, MID)
    whole = w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    n = F.count(F.lit(1)).over(whole)
    differs = F.min(FINGERPRINT).over(whole) != F.max(FINGERPRINT).over(whole)
    missing = [F.when(F.col(k).isNull() | (F.col(k) == ""), F.lit(k)) for k in keys]
    missing = F.filter(F.array(*missing), lambda c: c.isNotNull())
    key_text = F.concat_ws(", ", *[F.concat(F.lit(f"{k} '"), F.col(k), F.lit("'")) for k in keys])
    reason = F.when(F.size(missing) > 0, F.lit("NULL_ID")).when(differs, F.lit("DUPLICATE_ID"))
    detail = (
        F.when(F.size(missing) > 0, F.concat(F.array_join(missing, " and "), F.lit(" is null or empty")))
        .when(differs, F.concat(key_text, F.lit(" is shared by "), n.cast("string"),
                                F.lit(f" rows of {name} with differing content; all are quarantined"
                                      " since none can be chosen")))
    )
    x = x.withColumn(REASON, reason).withColumn(DETAIL, detail)
    # identical rows of a clean key: the first (by content hash, then input order) is written
    return x.withColumn(COLLAPSED, F.col(REASON).isNull() & (F.row_number().over(w) > 1))


@dataclass
class DimensionSummary:
    rows_read: int = 0
    rows_written: int = 0
    duplicates_collapsed: int = 0
    rows_quarantined: int = 0
    reasons: dict = field(default_factory=dict)
    fingerprint: str = ""  # rows read and the sum of their content hashes: equal inputs, equal ids
    quarantined_fingerprint: str = ""  # the same per reason over the rejected rows
    partition_rows: dict = field(default_factory=dict)  # input partition -> rows, for source_row


def summarize_dimension(flagged) -> DimensionSummary:
    """Counts per outcome and input partition with one small groupBy (no table-scale collect)."""
    from pyspark.sql import functions as F

    rows = (flagged.groupBy(REASON, COLLAPSED, PID)
            .agg(F.count(F.lit(1)).alias("n"), F.sum(F.col(FINGERPRINT).cast("decimal(38,0)")).alias("fp"))
            .collect())
    s = DimensionSummary()
    fp, quarantined = 0, {}
    for r in rows:
        n, part = int(r["n"]), int(r["fp"] or 0)
        s.rows_read += n
        fp += part
        s.partition_rows[int(r[PID])] = s.partition_rows.get(int(r[PID]), 0) + n
        if r[REASON] is not None:
            s.rows_quarantined += n
            s.reasons[r[REASON]] = s.reasons.get(r[REASON], 0) + n
            q = quarantined.setdefault(r[REASON], [0, 0])
            q[0], q[1] = q[0] + n, q[1] + part
        elif r[COLLAPSED]:
            s.duplicates_collapsed += n
        else:
            s.rows_written += n
    s.fingerprint = f"{s.rows_read}:{fp}"
    s.quarantined_fingerprint = ",".join(f"{k}:{n}:{h}" for k, (n, h) in sorted(quarantined.items()))
    s.reasons = {k: s.reasons[k] for k in DIMENSION_REASONS if k in s.reasons}
    return s


def kept_rows(flagged, name: str):
    """The rows to write: clean keys, one copy of each."""
    from pyspark.sql import functions as F

    return flagged.where(F.col(REASON).isNull() & ~F.col(COLLAPSED)).select(*SPECS[name].names)


def quarantined_dimension_rows(flagged, name: str, batch_id: str, source: str, partition_rows: dict,
                               quarantined_at: Optional[dt.datetime] = None):
    """Rejected rows in the DIMENSION_QUARANTINE contract, with the row (cast, key as read) as JSON."""
    from pyspark.sql import functions as F

    when = quarantined_at or dt.datetime.now(dt.timezone.utc)
    bad = flagged.where(F.col(REASON).isNotNull())
    keys = KEYS[name]
    cols = [F.col(f"__cr_raw_{c}").alias(c) if c in keys else F.col(c) for c in SPECS[name].names]
    payload = F.to_json(F.struct(*cols), {"ignoreNullFields": "false"})
    out = bad.select(
        F.lit(batch_id).alias("ingest_batch"),
        F.lit(name).alias("table_name"),
        F.lit(source).alias("source"),
        row_index(partition_rows, PID, MID).alias("source_row"),
        F.col(REASON).alias("reason"),
        F.col(DETAIL).alias("detail"),
        payload.alias("payload"),
        F.lit(when).cast("timestamp").alias("quarantined_at"),
    )
    return out.select(*DIMENSION_QUARANTINE.names)
