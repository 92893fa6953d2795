"""Event validation: pure transforms from a raw events DataFrame to accepted and quarantined rows.

Why: every later stage trusts ``events``; a bad row must never reach it, and a valid
row must never be dropped. So every input row ends in exactly one of three places:

* ``accepted``    - typed, conformed to :data:`causalrec.schemas.EVENTS`, written to ``events``;
* ``quarantined`` - one row per rejected input row with its first reason code, a detail
  naming every failing field (and, for CSV / JSON lines, the row's line: :func:`line_note`),
  and the original row as JSON (``events_quarantine``);
* ``already present`` - the identical event (same ``event_id`` *and* same content) is
  already in the table: the idempotent rerun case. Counted as ``rows_already_present``
  in the ingest log, neither written nor quarantined, so re-ingesting a batch is a no-op.

Reason codes, checked in this order (a row's ``reason`` is the first that applies):

=========================  ====================================================================
EXTRA_FIELDS               a CSV row with more fields than its file's header (Spark would drop the extras)
NULL_ID                    event_id, user_id or item_id null or empty (after trimming)
BAD_TIMESTAMP              event_time null, not a parseable timestamp, or a time of day without a date
TIMESTAMP_OUT_OF_RANGE     event_time outside [data.earliest_time, data.latest_time)
UNKNOWN_EVENT_TYPE         event_type not in data.event_types
BAD_VALUE                  value / position / logged_propensity / recommended given but unparseable,
                           or a non-rating value that is NaN or infinite (e.g. ``1e400``)
RATING_NAN                 a rating event whose value is null or NaN
RATING_OUT_OF_RANGE        a rating event whose value is outside [data.rating_min, data.rating_max] (or infinite)
BAD_PROPENSITY             logged_propensity given and NaN, <= 0 or > 1 (null = unknown, allowed)
BAD_POSITION               position given and < 1 (positions are 1-based)
UNKNOWN_USER               user_id not in ``users`` (only when data.require_known_users)
UNKNOWN_ITEM               item_id not in ``items`` (only when data.require_known_items)
DUPLICATE_IN_BATCH         a later row with the event_id of an earlier *valid* row of the batch
                           (the first valid row, by source order, is kept)
DUPLICATE_EXISTING         event_id already in the table with *different* content (a conflict;
                           identical content is "already present", see above)
=========================  ====================================================================

A schema that cannot be read as events (a required column missing, a column of a type
that cannot hold its values) fails the whole batch in :func:`check_input_schema`
before anything is written, with a :class:`causalrec.schemas.SchemaMismatch` naming the
column. Text formats (CSV) deliver strings, so numeric and timestamp columns also
accept strings and are parsed per row (unparseable -> ``BAD_VALUE``/``BAD_TIMESTAMP``).

No function here runs a Spark action; the job decides what to cache, count and write.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Optional

from causalrec.config import iso_utc
from causalrec.schemas import EVENT_TYPES, EVENTS, EVENTS_QUARANTINE, SchemaMismatch, spark_type_name
from causalrec.sql_text import quote_name

REASONS = (
    "EXTRA_FIELDS",
    "NULL_ID",
    "BAD_TIMESTAMP",
    "TIMESTAMP_OUT_OF_RANGE",
    "UNKNOWN_EVENT_TYPE",
    "BAD_VALUE",
    "RATING_NAN",
    "RATING_OUT_OF_RANGE",
    "BAD_PROPENSITY",
    "BAD_POSITION",
    "UNKNOWN_USER",
    "UNKNOWN_ITEM",
    "DUPLICATE_IN_BATCH",
    "DUPLICATE_EXISTING",
)

REQUIRED_INPUT = ("event_id", "user_id", "item_id", "event_time", "event_type")

_INTEGRAL = ("byte", "short", "int", "long")
_NUMERIC = _INTEGRAL + ("float", "double")

# Input types each events column may arrive as (decimal(p,s) is accepted wherever numbers are).
INPUT_TYPES = {
    "event_id": ("string",) + _INTEGRAL,
    "user_id": ("string",) + _INTEGRAL,
    "item_id": ("string",) + _INTEGRAL,
    "event_time": ("timestamp", "timestamp_ntz", "date", "string"),
    "event_date": ("date", "timestamp", "timestamp_ntz", "string"),
    "event_type": ("string",),
    "value": _NUMERIC + ("string",),
    "position": _INTEGRAL + ("string",),
    "recommended": ("boolean", "string") + _INTEGRAL,
    "logged_propensity": _NUMERIC + ("string",),
    "policy": ("string",),
    "session_id": ("string",),
    "context": ("string",),
    "ingest_batch": ("string",),
}

# internal column names (prefixed so they never collide with input columns)
SOURCE_ROW = "__cr_source_row"
SOURCE_FILE = "__cr_source_file"  # the input file of the row (file inputs only), see sources.number_rows
FILE_ROW = "__cr_file_row"  # the row's 0-based position within SOURCE_FILE
CSV_RECORD = "__cr_csv_record"  # CSV only: the raw text of a row whose field count differs from the header
REASON = "__cr_reason"
DETAIL = "__cr_detail"
PRESENT = "__cr_present"
FINGERPRINT = "__cr_fp"


@dataclass(frozen=True)
class Rules:
    """What counts as valid; built from ``cfg.data`` by :func:`rules_from_config`."""

    event_types: tuple = EVENT_TYPES
    rating_min: float = 1.0
    rating_max: float = 5.0
    earliest_time: dt.datetime = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    latest_time: dt.datetime = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)
    require_known_users: bool = False
    require_known_items: bool = False


def rules_fingerprint(rules: Rules) -> str:
    """What decides a row's outcome, as text: part of the batch id, so changed rules make a new batch."""
    return json.dumps(dataclasses.asdict(rules), sort_keys=True, default=str)


def rules_from_config(data_cfg) -> Rules:
    return Rules(
        event_types=tuple(data_cfg.event_types),
        rating_min=float(data_cfg.rating_min),
        rating_max=float(data_cfg.rating_max),
        earliest_time=iso_utc(data_cfg.earliest_time, "data.earliest_time"),
        latest_time=iso_utc(data_cfg.latest_time, "data.latest_time"),
        require_known_users=bool(data_cfg.require_known_users),
        require_known_items=bool(data_cfg.require_known_items),
    )


# --------------------------------------------------------------------------- schema


def check_input_schema(df, source: str = "") -> None:
    """Fail the batch (nothing written yet) when a column is missing or of an unusable type."""
    where = f" in {source}" if source else ""
    have = {f.name: spark_type_name(f.dataType) for f in df.schema.fields}
    for name in REQUIRED_INPUT:
        if name not in have:
            raise SchemaMismatch(
                f"events input{where}: required column {name!r} is missing; "
                f"expected one of types {list(INPUT_TYPES[name])}"
            )
    for name, allowed in INPUT_TYPES.items():
        if name not in have:
            continue
        got = have[name]
        ok = got in allowed or (got.startswith("decimal(") and "double" in allowed)
        if not ok:
            raise SchemaMismatch(
                f"events input{where}: column {name!r} has type {got}; expected one of {list(allowed)}"
            )


# --------------------------------------------------------------------------- typing


def typed_columns(df) -> dict:
    """Canonical typed expressions (the EVENTS types) for each events column, from raw input.

    Parsing never raises (``try_cast``), so it behaves the same with ANSI mode on or off;
    a value that fails to parse becomes null and is flagged by :func:`flag_rows`.
    """
    from pyspark.sql import functions as F

    types = {f.name: spark_type_name(f.dataType) for f in df.schema.fields}
    out = {}

    def ident(name):
        return strip_blanks(F.col(name).cast("string"))

    for name in ("event_id", "user_id", "item_id"):
        out[name] = ident(name)
    t = types["event_time"]
    if t == "timestamp":
        out["event_time"] = F.col("event_time")
    else:  # timestamp_ntz / date / string without a zone: a UTC wall clock, whatever the session zone
        wall = F.col("event_time").try_cast("timestamp_ntz")  # ignores a zone in the string
        out["event_time"] = F.concat(wall.cast("string"), F.lit("Z")).try_cast("timestamp")
        if t == "string":  # a zone given is kept; a time of day alone (Spark: today then) is no event time
            zoned = F.coalesce(F.col("event_time").rlike(_ZONED), F.lit(False))
            out["event_time"] = (F.when(_time_only(F.col("event_time")) | _incomplete_date(F.col("event_time")),
                                        F.lit(None).cast("timestamp"))
                                 .when(zoned, F.col("event_time").try_cast("timestamp"))
                                 .otherwise(out["event_time"]))
    out["event_type"] = strip_blanks(F.col("event_type"))
    for name, typ in (("value", "double"), ("logged_propensity", "double"), ("position", "int")):
        out[name] = F.col(name).try_cast(typ) if name in types else F.lit(None).cast(typ)
        if types.get(name) == "string":  # Java's parser takes "1.5d" / "2f" for numbers: only plain numerals
            out[name] = F.when(strip_blanks(F.col(name)).rlike(_NUMERAL), out[name]).otherwise(F.lit(None).cast(typ))
    if "recommended" not in types:
        out["recommended"] = F.lit(None).cast("boolean")
    elif types["recommended"] == "boolean":
        out["recommended"] = F.col("recommended")
    elif types["recommended"] == "string":
        low = F.lower(F.trim(F.col("recommended")))
        out["recommended"] = (
            F.when(low.isin("true", "t", "1", "yes", "y"), F.lit(True))
            .when(low.isin("false", "f", "0", "no", "n"), F.lit(False))
            .otherwise(F.lit(None).cast("boolean"))
        )
    else:  # 1 / 0 only: any other number (2, -1) is no flag, and BAD_VALUE says so, as for the string "2"
        rec = F.col("recommended")
        out["recommended"] = F.when(rec == 1, F.lit(True)).when(rec == 0, F.lit(False)).otherwise(
            F.lit(None).cast("boolean"))
    for name in ("policy", "session_id", "context"):
        out[name] = F.col(name) if name in types else F.lit(None).cast("string")
    return out


# a number as text: digits with an optional fraction and exponent, or NaN / infinity (flagged later)
_NUMERAL = r"^[+-]?(?:(?:[0-9]+(?:[.][0-9]*)?|[.][0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:nan|inf|infinity))$"

# a date and time followed by a zone (``Z``, ``+05:00``, `` UTC``, ``America/New_York``...)
_ZONED = r"[0-9][Tt ][0-9]{1,2}(:[0-9]{1,2}){0,2}([.][0-9]*)?\s*[-+A-Za-z]"


def utc_date(ts):
    """The UTC calendar date of a timestamp column: ``to_date`` would use the session time zone."""
    from pyspark.sql import functions as F

    micros, day = F.unix_micros(ts), 86_400_000_000
    return F.date_from_unix_date(F.round((micros - F.pmod(micros, F.lit(day))) / day).cast("int"))


# white space of any kind: ASCII controls and space, NEL, no-break space and Unicode's space separators
BLANKS = "".join(map(chr, [*range(0x00, 0x21), 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                           0x202F, 0x205F, 0x3000, 0xFEFF]))


def strip_blanks(col):
    """``col`` without leading and trailing white space of any kind: Spark's ``trim`` strips only the
    space character, so a tab-only id was "not empty" and ``u1<TAB>`` another user than ``u1``."""
    from pyspark.sql import functions as F

    return F.btrim(col, F.lit(BLANKS))


def _incomplete_date(col):
    """A string that does not start with a full year-month-day: Spark reads ``2024`` as 2024-01-01
    and ``2024-3`` as 2024-03-01, inventing the day (a time of day alone: :func:`_time_only`)."""
    from pyspark.sql import functions as F

    return F.coalesce(~col.rlike(r"^[\s]*[+-]?[0-9]{4,}-[0-9]{1,2}-[0-9]{1,2}"), F.lit(False))


def _time_only(col):
    """A string Spark parses as a time of today (``12:00:00``, ``T12:00``): no date in it."""
    from pyspark.sql import functions as F

    return F.coalesce(F.trim(col).rlike(r"^[Tt]?[0-9]{1,2}:"), F.lit(False))


def raw_hash(df):
    """A fingerprint of a row as read (every input column as text, and a CSV row's raw record): two
    rejected rows whose unparseable values differ ('abc', 'xyz') parse to the same nulls."""
    from pyspark.sql import functions as F

    cols = [c for c in df.columns if not c.startswith("__cr_")] + [c for c in (CSV_RECORD,) if c in df.columns]
    return F.xxhash64(*[F.coalesce(F.col(quote_name(c)).cast("string"), F.lit("\u0000null")) for c in cols])


def row_hash(typed: dict):
    """A content fingerprint of an event (every contract column except event_date/ingest_batch)."""
    from pyspark.sql import functions as F

    cols = ["event_id", "user_id", "item_id", "event_time", "event_type", "value", "position",
            "recommended", "logged_propensity", "policy", "session_id", "context"]
    # nulls are encoded explicitly: Spark's hash skips nulls, which would let (null, 1) == (1, null)
    return F.xxhash64(*[F.coalesce(typed[c].cast("string"), F.lit("\u0000null")) for c in cols])


# --------------------------------------------------------------------------- checks


def _quoted(col):
    from pyspark.sql import functions as F

    return F.coalesce(F.concat(F.lit("'"), F.substring(F.col(col).cast("string"), 1, 80), F.lit("'")),
                      F.lit("null"))


def row_checks(df, rules: Rules, typed: dict) -> list:
    """(code, condition, detail) per row-level check, in reason-code order."""
    from pyspark.sql import functions as F

    types = set(df.columns)
    checks = []
    if CSV_RECORD in types:  # Spark keeps a row's first fields and drops the rest without a word
        n = len([c for c in df.columns if not c.startswith("__cr_")])
        unquoted = F.regexp_replace(F.col(CSV_RECORD), r'(?s)"([^"\\]|\\.)*"', "")
        fields = F.size(F.split(unquoted, ",", -1))
        checks.append(("EXTRA_FIELDS", F.coalesce(fields > n, F.lit(False)),
                       F.concat(F.lit("the row has "), fields.cast("string"),
                                F.lit(f" fields but the header has {n}; the extra fields would be dropped"))))
    for name in ("event_id", "user_id", "item_id"):
        checks.append(("NULL_ID", typed[name].isNull() | (typed[name] == ""), F.lit(f"{name} is null or empty")))
    ts = typed["event_time"]
    no_date = partial = F.lit(False)
    if spark_type_name(df.schema["event_time"].dataType) == "string":
        parsed = F.col("event_time").try_cast("timestamp").isNotNull()
        no_date = _time_only(F.col("event_time")) & parsed
        partial = _incomplete_date(F.col("event_time")) & parsed
    checks.append(("BAD_TIMESTAMP", ts.isNull(),
                   F.concat(F.lit("event_time "), _quoted("event_time"),
                            F.when(no_date, F.lit(" has no date (a time of day alone is not an event time)"))
                            .when(partial, F.lit(" is not a full date (expected year-month-day, e.g. 2024-03-01)"))
                            .otherwise(F.lit(" is not a parseable timestamp")))))
    lo, hi = rules.earliest_time, rules.latest_time
    checks.append(("TIMESTAMP_OUT_OF_RANGE", ts.isNotNull() & ((ts < F.lit(lo)) | (ts >= F.lit(hi))),
                   F.concat(F.lit("event_time "), ts.cast("string"),
                            F.lit(f" is outside [{lo.isoformat()}, {hi.isoformat()})"))))
    et = typed["event_type"]
    checks.append(("UNKNOWN_EVENT_TYPE", et.isNull() | ~et.isin(*rules.event_types),
                   F.concat(F.lit("event_type "), _quoted("event_type"),
                            F.lit(f" is not one of {list(rules.event_types)}"))))
    for name in ("value", "position", "logged_propensity", "recommended"):
        if name in types:
            checks.append(("BAD_VALUE", F.col(name).isNotNull() & typed[name].isNull(),
                           F.concat(F.lit(f"{name} "), _quoted(name), F.lit(" cannot be parsed"))))
    v = typed["value"]
    is_rating = et == F.lit("rating")
    # NaN / infinity (``1e400`` overflows to it) would poison every sum downstream; ratings have their own codes
    checks.append(("BAD_VALUE", v.isNotNull() & ~F.coalesce(is_rating, F.lit(False))
                   & (F.isnan(v) | (F.abs(v) == F.lit(float("inf")))),
                   F.concat(F.lit("value "), v.cast("string"), F.lit(" is not a finite number"))))
    checks.append(("RATING_NAN", is_rating & (v.isNull() | F.isnan(v)),
                   F.lit("value of a rating event is null or NaN")))
    checks.append(("RATING_OUT_OF_RANGE",
                   is_rating & v.isNotNull() & ~F.isnan(v) & ((v < rules.rating_min) | (v > rules.rating_max)),
                   F.concat(F.lit("rating value "), v.cast("string"),
                            F.lit(f" is outside [{rules.rating_min:g}, {rules.rating_max:g}]"))))
    p = typed["logged_propensity"]
    checks.append(("BAD_PROPENSITY", p.isNotNull() & (F.isnan(p) | (p <= 0) | (p > 1)),
                   F.concat(F.lit("logged_propensity "), p.cast("string"), F.lit(" is not in (0, 1]"))))
    pos = typed["position"]
    checks.append(("BAD_POSITION", pos.isNotNull() & (pos < 1),
                   F.concat(F.lit("position "), pos.cast("string"), F.lit(" is not >= 1"))))
    return checks


def _known_flags(df, typed: dict, rules: Rules, users, items):
    """Add boolean columns marking ids missing from the dimension tables (left joins on the distinct ids:
    Spark broadcasts them when small; 100M user ids are not, so no broadcast is forced)."""
    from pyspark.sql import functions as F

    out = df
    for flag, key, dim, on in (
        ("__cr_unknown_user", "user_id", users, rules.require_known_users),
        ("__cr_unknown_item", "item_id", items, rules.require_known_items),
    ):
        if not on:
            out = out.withColumn(flag, F.lit(False))
            continue
        if dim is None:
            raise ValueError(f"data.require_known_{key.split('_')[0]}s is set but no {key.split('_')[0]}s table was given")
        known = dim.select(F.col(key).cast("string").alias(f"__cr_known_{key}")).distinct().withColumn(
            f"__cr_hit_{key}", F.lit(True))
        out = out.withColumn(f"__cr_key_{key}", typed[key])
        out = out.join(known, out[f"__cr_key_{key}"] == known[f"__cr_known_{key}"], "left")
        out = out.withColumn(flag, F.col(f"__cr_hit_{key}").isNull()).drop(
            f"__cr_known_{key}", f"__cr_hit_{key}", f"__cr_key_{key}")
    return out


def flag_rows(df, rules: Rules, *, users=None, items=None, existing=None):
    """Return ``df`` (raw columns plus ``SOURCE_ROW``) with REASON, DETAIL and PRESENT added.

    ``existing``: the current ``events`` table (or None). Rows whose event_id is there
    with identical content get PRESENT = true and no reason.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if SOURCE_ROW not in df.columns:
        raise ValueError(f"flag_rows needs the {SOURCE_ROW} column (see causalrec.ingest.sources.number_rows)")
    raw_cols = [c for c in df.columns if c != SOURCE_ROW]
    typed = typed_columns(df)
    checks = row_checks(df, rules, typed)

    x = df.withColumn("__cr_eid", typed["event_id"]).withColumn("__cr_hash", row_hash(typed))
    x = _known_flags(x, typed, rules, users, items)
    checks.append(("UNKNOWN_USER", F.col("__cr_unknown_user"),
                   F.concat(F.lit("user_id "), _quoted("user_id"), F.lit(" is not in the users table"))))
    checks.append(("UNKNOWN_ITEM", F.col("__cr_unknown_item"),
                   F.concat(F.lit("item_id "), _quoted("item_id"), F.lit(" is not in the items table"))))
    failed = F.filter(
        F.array(*[F.when(cond, F.struct(F.lit(code).alias("code"), detail.alias("detail"))) for code, cond, detail in checks]),
        lambda r: r.isNotNull(),
    )
    x = x.withColumn("__cr_failed", failed)

    # duplicates within the batch: among rows that passed every row check, keep the first by source order
    row_ok = F.size("__cr_failed") == 0
    w = Window.partitionBy("__cr_eid", row_ok).orderBy(F.col(SOURCE_ROW))
    x = x.withColumn("__cr_rank", F.row_number().over(w))
    dup_in_batch = row_ok & (F.col("__cr_rank") > 1)

    if existing is not None:
        # only the table's rows whose event_id is in this batch are hashed and grouped, not its whole history
        ids = x.select(F.col("__cr_eid").alias("__cr_batch_id")).distinct()
        existing = existing.join(ids, typed_columns(existing)["event_id"] == ids["__cr_batch_id"], "left_semi")
        et = typed_columns(existing)
        ex = existing.select(et["event_id"].alias("__cr_ex_id"), row_hash(et).alias("__cr_ex_hash"))
        # an event_id present more than once in the table (should not happen) matches if any copy is identical
        ex = ex.groupBy("__cr_ex_id").agg(F.collect_set("__cr_ex_hash").alias("__cr_ex_hashes"))
        x = x.join(ex, x["__cr_eid"] == ex["__cr_ex_id"], "left")
        in_table = F.col("__cr_ex_id").isNotNull()
        same = F.array_contains(F.col("__cr_ex_hashes"), F.col("__cr_hash"))
    else:
        in_table = F.lit(False)
        same = F.lit(False)

    first_valid = row_ok & ~dup_in_batch
    present = first_valid & in_table & same
    conflict = first_valid & in_table & ~same
    dup_detail = F.concat(F.lit("event_id "), _quoted("event_id"), F.lit(" repeats an earlier row of this batch"))
    ex_detail = F.concat(F.lit("event_id "), _quoted("event_id"),
                         F.lit(" is already in the table with different content"))
    reason = (
        F.when(~row_ok, F.col("__cr_failed")[0]["code"])
        .when(dup_in_batch, F.lit("DUPLICATE_IN_BATCH"))
        .when(conflict, F.lit("DUPLICATE_EXISTING"))
    )
    detail = (
        F.when(~row_ok, F.array_join(F.transform("__cr_failed", lambda r: r["detail"]), "; "))
        .when(dup_in_batch, dup_detail)
        .when(conflict, ex_detail)
    )
    return x.select(*[F.col(quote_name(c)) for c in raw_cols], F.col(SOURCE_ROW),
                    reason.alias(REASON), detail.alias(DETAIL), present.alias(PRESENT))


# --------------------------------------------------------------------------- outputs


def accepted_rows(flagged, batch_id: str):
    """Rows with no reason that are not already present, conformed to the EVENTS contract."""
    from pyspark.sql import functions as F

    ok = flagged.where(F.col(REASON).isNull() & ~F.col(PRESENT))
    typed = typed_columns(ok)
    cols = []
    for c in EVENTS.columns:
        if c.name == "event_date":
            cols.append(utc_date(typed["event_time"]).alias("event_date"))
        elif c.name == "ingest_batch":
            cols.append(F.lit(batch_id).alias("ingest_batch"))
        else:
            cols.append(typed[c.name].alias(c.name))
    return ok.select(*cols)


def line_note(line_offset: int, first_blank: Optional[dict] = None, lead: Optional[dict] = None):
    """`` (line N)`` for the detail of a row read from a text file, so it can be opened in an editor.

    ``line_offset``: see :data:`causalrec.ingest.sources.LINE_OFFSET`; ``first_blank``: file ->
    the first line from which ``row + line_offset`` may be wrong: its first blank line below its
    first record (:func:`causalrec.ingest.sources.first_blank_lines`), which the reader skips, or
    the line after the first record that spans lines. At or below it only the row is certain and
    the note says so. Blank lines above a file's first record (a CSV header), which the reader
    skips too, are added to the line: ``lead`` (file -> their number).
    """
    from pyspark.sql import functions as F

    line = F.col(FILE_ROW) + F.lit(line_offset)
    pairs = [x for f, n in sorted((first_blank or {}).items()) for x in (F.lit(f), F.lit(n))]
    blank = F.element_at(F.create_map(*pairs), F.col(SOURCE_FILE)) if pairs else F.lit(None).cast("long")
    shift = [x for f, n in sorted((lead or {}).items()) for x in (F.lit(f), F.lit(n))]
    shown = line + F.coalesce(F.element_at(F.create_map(*shift), F.col(SOURCE_FILE)), F.lit(0)) if shift else line
    header = " after the header" if line_offset > 1 else ""
    return (
        F.when(F.col(FILE_ROW).isNull(), F.lit(""))
        .when(blank.isNull() | (line < blank), F.concat(F.lit(" (line "), shown.cast("string"), F.lit(")")))
        .otherwise(F.concat(F.lit(" (data row "), (F.col(FILE_ROW) + 1).cast("string"), F.lit(header),
                            F.lit("; its line is not known: a blank line or a quoted line break above it"
                                  " shifts the lines)")))
    )


def quarantined_rows(flagged, batch_id: str, source: str, quarantined_at: Optional[dt.datetime] = None,
                     line_offset: Optional[int] = None, first_blank: Optional[dict] = None,
                     lead: Optional[dict] = None):
    """Rejected rows in the EVENTS_QUARANTINE contract, with the original row as JSON.

    With ``line_offset`` (text inputs) the detail ends with the row's line in its file
    (:func:`line_note`); ``source_row`` stays the 0-based row within the file.
    """
    from pyspark.sql import functions as F

    raw_cols = [c for c in flagged.columns if not c.startswith("__cr_")]
    when = quarantined_at or dt.datetime.now(dt.timezone.utc)
    bad = flagged.where(F.col(REASON).isNotNull())
    fields = [F.col(quote_name(c)) for c in raw_cols]
    payload = F.to_json(F.struct(*fields), {"ignoreNullFields": "false"})
    if CSV_RECORD in flagged.columns:  # a row with extra fields: only its raw text holds them
        payload = F.when(F.col(CSV_RECORD).isNull(), payload).otherwise(
            F.to_json(F.struct(*fields, F.col(CSV_RECORD).alias("raw_record")), {"ignoreNullFields": "false"}))
    src, row, detail = F.lit(source), F.col(SOURCE_ROW), F.col(DETAIL)
    if SOURCE_FILE in flagged.columns:  # a folder of files: name the file and the row within it
        src = F.coalesce(F.col(SOURCE_FILE), src)
        row = F.coalesce(F.col(FILE_ROW), row)
        if line_offset is not None:
            detail = F.concat(detail, line_note(line_offset, first_blank, lead))
    out = bad.select(
        F.lit(batch_id).alias("ingest_batch"),
        src.alias("source"),
        row.cast("long").alias("source_row"),
        F.col(REASON).alias("reason"),
        detail.alias("detail"),
        payload.alias("payload"),
        F.lit(when).cast("timestamp").alias("quarantined_at"),
    )
    return out.select(*[F.col(c.name) for c in EVENTS_QUARANTINE.columns])


@dataclass
class Summary:
    rows_read: int = 0
    rows_accepted: int = 0
    rows_quarantined: int = 0
    rows_already_present: int = 0
    reasons: dict = field(default_factory=dict)
    fingerprint: str = ""  # rows read and the sum of per-row content hashes: equal batches, equal ids
    accepted_fingerprint: str = ""  # the same over the rows to be appended: what an events write holds
    quarantined_fingerprint: str = ""  # the same per reason over the rejected rows


def summarize(flagged) -> Summary:
    """Counts per outcome with one small groupBy (no event-scale collect).

    When ``flagged`` has a FINGERPRINT column (:func:`row_hash` per row) its sum is
    aggregated in the same pass, giving an order-independent content fingerprint.
    """
    from pyspark.sql import functions as F

    aggs = [F.count(F.lit(1)).alias("n")]
    if FINGERPRINT in flagged.columns:
        aggs.append(F.sum(F.col(FINGERPRINT).cast("decimal(38,0)")).alias("fp"))
    rows = flagged.groupBy(REASON, PRESENT).agg(*aggs).collect()
    s = Summary()
    fp = accepted_fp = 0
    quarantined = []
    for r in rows:
        n = int(r["n"])
        part = int(r["fp"] or 0) if FINGERPRINT in flagged.columns else 0
        fp += part
        s.rows_read += n
        if r[REASON] is not None:
            s.rows_quarantined += n
            s.reasons[r[REASON]] = s.reasons.get(r[REASON], 0) + n
            quarantined.append(f"{r[REASON]}:{n}:{part}")
        elif r[PRESENT]:
            s.rows_already_present += n
        else:
            s.rows_accepted += n
            accepted_fp += part
    s.fingerprint = f"{s.rows_read}:{fp}"
    s.accepted_fingerprint = f"{s.rows_accepted}:{accepted_fp}"
    s.quarantined_fingerprint = ",".join(sorted(quarantined))
    s.reasons = {k: s.reasons[k] for k in sorted(s.reasons, key=lambda k: REASONS.index(k) if k in REASONS else 99)}
    return s
