"""Read an events batch from parquet, CSV, JSON lines or an existing Delta table.

Why a module: the error a user sees when a path is wrong or a file is unreadable
must name the file and the format that was expected, whatever Spark says underneath.
CSV is read as text (every column a string) and parsed per row by
:mod:`causalrec.ingest.validate`, so one unparseable cell quarantines one row instead
of nulling it silently; every file's header must name the first file's columns in the
same order (else :class:`SourceError`), blank lines above a header are skipped, and quoted
fields may span lines, but one whose opening quote is never closed is a :class:`SourceError`
(naming the file and the line where it opens), not a field taking in the lines below. JSON lines keep
Spark's inferred types; a malformed line arrives as a row of nulls (plus ``_corrupt_record``)
and is quarantined as ``NULL_ID`` with the raw line in its payload.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import re
from functools import reduce
from pathlib import Path
from typing import Optional

from causalrec.ingest.validate import CSV_RECORD, FILE_ROW, SOURCE_FILE, SOURCE_ROW
from causalrec.sql_text import quote_name

FORMATS = ("parquet", "csv", "jsonl", "delta")

# Line of data row r (0-based, FILE_ROW) in a file with no blank lines and (CSV) no record
# spanning lines: r + offset. Parquet and Delta have no lines.
LINE_OFFSET = {"csv": 2, "jsonl": 1}

# Spark's message when a CSV file's header differs from the schema (enforceSchema=false)
_BLANK = "^[\\x00-\\x20]*$"  # a blank or whitespace-only line (Spark regex)

# Where a CSV line leaves the reader (Spark's multiLine CSV: univocity, delimiter ``,``, quote ``"``,
# escape ``"``, ``\`` escaping the escape, unescaped quotes read up to the delimiter), as Java regexes
# over one line. A quoted field that closes on the line where it opens, at its first quote, just
# before a delimiter or the line break, is read as it is (backslashes and all: the reader's fast path,
# which looks at the character after that quote, so a quote that ends the file takes the other path).
# Otherwise, on every line of the field: ``""`` and backslashes before a quote make a literal quote,
# another backslash is dropped, and any other quote ends the field (what follows it, up to the next
# delimiter, belongs to the same field). Checked against Spark's reader on random files by
# tests/test_csv_quotes.py. Not modelled: the fast path also gives up where the field reaches the end
# of the reader's input buffer (univocity's, up to 1M characters at a time), so in a larger file a
# field closed by a quote after a backslash (``"a\"``) may stay open for the reader there.
_Q_FAST = r'[^"]++"(?=,|\z)'
_Q_FAST_AT_EOF = r'[^"]++"(?=,)'  # on the last line of a file that has no line break after it
_Q_IN = r'(?:[^"\\]|""|\\++"|\\)*+'


def _opening_patterns(fast: str) -> tuple[str, str]:
    field = r'(?>"(?>' + fast + '|' + _Q_IN + r'"[^,]*+)|[^,"][^,]*+|)'
    opens = '(?:' + field + ',)*+"(?!' + fast + ')' + _Q_IN + r'\z'
    # starting outside quotes, the line ends inside a quoted field; starting inside one, it closes it
    # and opens another one left open
    return '^' + opens, '^' + _Q_IN + r'"[^,]*+,' + opens


_OPENS_OUTSIDE, _REOPENS_INSIDE = _opening_patterns(_Q_FAST)
_OPENS_OUTSIDE_AT_EOF, _REOPENS_INSIDE_AT_EOF = _opening_patterns(_Q_FAST_AT_EOF)
_STAYS_INSIDE = '^' + _Q_IN + r'\z'  # starting inside one, the line does not close it
# starting inside one, the quote that ends it is followed by neither a delimiter nor the line end
# (blanks aside): the reader reads on to the next delimiter as part of the field
_BAD_CLOSE_INSIDE = '^' + _Q_IN + r'"(?![\x01-\x20]*+(?:,|\z))'


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
            _one_json_value_per_line(spark, path)
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


# a JSON string (possessive: a long string must not recurse in Java's regex engine)
_JSON_STRING = r'"(?:[^"\\]++|\\.)*+"'
# with strings blanked: a closing bracket followed by anything but a comma, another closing bracket or
# the line end: a value that another value may follow on the same line (or a malformed one)
_SECOND_VALUE = r"[}\]][\x00-\x20]*+[^\x00-\x20,}\]]"


def holds_more_than_one_value(line: Optional[str]) -> bool:
    """True for a line Spark's JSON reader would read short or split: a JSON value followed by more
    text (only the first is read), or a JSON array (its elements become rows). A line that is no JSON
    (a missing comma inside an object) is not: the reader keeps it whole as a corrupt record."""
    import json

    text = (line or "").strip(" \t\r\n\f\v\x00")
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return False
    return isinstance(value, list) or bool(text[end:].strip())


def _one_json_value_per_line(spark, path: str, shown: int = 3) -> None:
    """Refuse JSON Lines input with more than one value on a line (:class:`SourceError` naming the files
    and lines), before anything is read into a table.

    Why: Spark's JSON reader parses the first value of a line and ignores the rest without a word
    (``cat`` of a file without a final line break puts two events on one line: the second is lost),
    and reads a line holding an array as several rows (every later line number shifts). One pass over
    the text, stopping at the first hit: a regular expression picks the candidate lines and Python's
    JSON decoder confirms them, so a malformed line stays a corrupt record, which is quarantined.
    The lines are numbered only when there is something to name.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType

    def suspects(df):
        bare = F.regexp_replace(F.regexp_replace(F.col("value"), _JSON_STRING, '""'), r"^[\x00-\x20]+", "")
        # a plain Python UDF (through a lambda: pyspark reads type hints as a pandas UDF's)
        confirmed = F.udf(lambda line: holds_more_than_one_value(line), BooleanType())
        return df.where(bare.startswith("[") | (bare.startswith("{") & bare.rlike(_SECOND_VALUE))).where(
            confirmed(F.col("value")))

    if not suspects(spark.read.text(path)).limit(1).collect():
        return
    found = (suspects(number_rows(spark.read.text(path)))
             .select(F.coalesce(F.col(SOURCE_FILE), F.lit(path)).alias("f"), (F.col(FILE_ROW) + 1).alias("line"))
             .orderBy("f", "line").limit(shown).collect())
    where = "; ".join(f"{_display_path(r['f'])} line {r['line']}" for r in found)
    raise SourceError(f"JSON Lines input {path}: more than one JSON value on a line ({where}"
                      f"{', ...' if len(found) == shown else ''}); expected one JSON object per line. Spark "
                      "would read only the first value of such a line, or an array's elements as separate "
                      "rows; put each event on its own line. Nothing was written")


def csv_reader(spark, multiline: str = "true", header: str = "false"):
    """The DataFrameReader with the CSV options that :func:`_read_csv` reads with (the quote model
    above and tests/test_csv_quotes.py assume these)."""
    return (spark.read.option("header", header).option("inferSchema", "false").option("mode", "PERMISSIVE")
            .option("multiLine", multiline).option("enforceSchema", "false")
            .option("escape", '"').option("charToEscapeQuoteEscaping", "\\"))


def _read_csv(spark, path: str):
    """CSV with every column a string, matched to the header by name and quoted line breaks kept.

    Why: ``multiLine`` keeps a quoted field with a line break in one record (line by line, the
    record is cut in two); it reads each file in one task. A quote inside a quoted field may
    be doubled (RFC 4180: pandas, Excel, Python's csv) or escaped as ``\\"`` (Spark's writer);
    Spark's default escape alone misreads the doubled form. A row whose field count differs
    from the header keeps its raw text in ``CSV_RECORD`` (:mod:`~causalrec.ingest.validate`
    quarantines extra fields). Blank and whitespace-only lines are skipped, as line by line.
    The files are read without Spark's header handling, which takes a blank line above the
    header for the header (a whitespace-only one) and fails the file: each file's first record
    left is its header, which :func:`number_rows` checks against the first file's (by name, in
    order, as Spark's ``enforceSchema=false`` would: else a file with the columns in another
    order gets its values put in the wrong columns) and drops, numbering the rows below it in
    the same pass. That pass also fails on a quoted field whose opening quote is never closed.
    Returns the numbered rows (``SOURCE_ROW`` / ``SOURCE_FILE`` / ``FILE_ROW``).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    # the header (the first file's first line that is not blank, every column a string), found line
    # by line: Spark's multiLine inference reads a file named e.g. ``events[1].csv`` as a glob and
    # fails, and its line-by-line inference takes a line of tabs for the header; Spark's CSV reader
    # names the columns (``_c3`` for an empty name, a repeated name numbered)
    top = spark.read.text(path).where(~F.col("value").rlike(_BLANK)).limit(1).collect()
    if not top:
        return spark.createDataFrame([], StructType([]))
    header = (csv_reader(spark, "false", "true").option("enforceSchema", "true")
              .csv(spark.sparkContext.parallelize([top[0]["value"]], 1)).schema)
    df = (csv_reader(spark, "true", "false").schema(StructType(header.fields + [StructField(CSV_RECORD, StringType())]))
          .option("columnNameOfCorruptRecord", CSV_RECORD).csv(path))
    # a whitespace-only line is a one-field record under multiLine; naming the first column also
    # keeps Spark from refusing a count that would otherwise read only the corrupt-record column
    first, rec = F.col(quote_name(header.fields[0].name)), F.col(CSV_RECORD)
    df = df.where(~F.coalesce(rec.rlike(_BLANK) & first.rlike(_BLANK), F.lit(False)))
    return number_rows(df, csv_header=header.fieldNames())


def number_rows(df, *, csv_header: Optional[list] = None, last_row: Optional[str] = None):
    """Add ``SOURCE_ROW``: the 0-based position of each row in the source (partition order);
    for file inputs also ``SOURCE_FILE`` (the file) and ``FILE_ROW`` (0-based row within it).

    Why per file: a quarantined row of a folder of files must be traceable to its file and
    row, not to a position across the folder (rows of a CSV with a header and no blank lines:
    line = row + 2). Runs one small job (row counts per partition and per file chunk, i.e.
    ``input_file_name``/``input_file_block_start``) and turns each row's
    ``monotonically_increasing_id`` into dense indexes from those offsets, so no row travels
    to the driver and nothing is shuffled (the chunk table is broadcast). A DataFrame that
    has ``SOURCE_ROW`` already (a CSV input: :func:`read_events` numbers it) is returned as it is.

    ``csv_header``: ``df`` is a CSV read without its headers (:func:`_read_csv`), these are the
    first file's column names. Each file's first record is then its header: the same job
    fetches it, and it must name these columns in this order (else :class:`SourceError`); it
    is dropped and the rows below it numbered from 0. The job also notes whether a file's last
    record has a line break in a field, or any record in a field that starts with a quote (or
    in its raw text, when its field count is off): only such files can hold a quoted field
    whose opening quote is never closed (the reader puts the lines below it into it, to the end
    of the file or to the next quote that is not doubled), and only they are read again, as
    lines, to check (:func:`unclosed_quotes`; a :class:`SourceError` naming the line if so). So are
    the files whose last byte is no line break (:func:`_without_final_line_break`): a quote left open
    on their last line takes in no line break, so their records show no sign of it.

    ``last_row`` (file inputs, not with ``csv_header``): the name of a boolean column to add, true on
    the last row of each file.
    """
    from pyspark.sql import functions as F

    if SOURCE_ROW in df.columns:
        return df
    x = (df.withColumn("__cr_pid", F.spark_partition_id())
         .withColumn("__cr_mid", F.monotonically_increasing_id())
         .withColumn("__cr_file", F.input_file_name())
         .withColumn("__cr_block", F.input_file_block_start()))
    aggs = [F.count(F.lit(1)).alias("n"), F.min("__cr_mid").alias("first")]
    if csv_header is not None:
        aggs += _csv_record_checks(df, csv_header)
    chunks = x.groupBy("__cr_pid", "__cr_file", "__cr_block").agg(*aggs).collect()
    helpers = ("__cr_pid", "__cr_mid", "__cr_file", "__cr_block")
    if not chunks:
        return x.withColumn(SOURCE_ROW, F.lit(None).cast("long")).drop(*helpers)
    if csv_header is not None:
        return _number_csv(x, chunks, csv_header, helpers)
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
    rows = [r + (seen[r[1]],) for r in rows]
    base = df.sparkSession.createDataFrame(
        rows, "__cr_pid int, __cr_file string, __cr_block long, __cr_show string, __cr_base long, __cr_n long")
    x = x.join(F.broadcast(base), ["__cr_pid", "__cr_file", "__cr_block"], "left")
    x = x.withColumn(SOURCE_FILE, F.col("__cr_show")).withColumn(FILE_ROW, F.col("__cr_mid") + F.col("__cr_base"))
    if last_row:
        x = x.withColumn(last_row, F.col(FILE_ROW) == F.col("__cr_n") - 1)
    return x.drop(*helpers, "__cr_show", "__cr_base", "__cr_n")


def _csv_record_checks(df, names: list) -> list:
    """Aggregates per file chunk of a header-less CSV read: its first record as a header
    (``head``: whether it names ``names`` in order, as Spark compares them, and its text for a
    message, cut short), whether its last record may end inside a quoted field (``tail_break``: a
    line break in a field, or a quote in its raw text, which leaves out the file's last line break)
    and whether a record holds a line break in a field that starts with a quote or in its raw text
    (``quote_break``)."""
    from pyspark.sql import functions as F

    case_sensitive = str(df.sparkSession.conf.get("spark.sql.caseSensitive", "false")).lower() == "true"
    cols = [F.col(quote_name(n)) for n in names]
    rec = F.col(CSV_RECORD)
    same = [(c if case_sensitive else F.lower(c)).eqNullSafe(F.lit(n if case_sensitive else n.lower()))
            for c, n in zip(cols, names)]
    head = F.struct(reduce(lambda a, b: a & b, same, rec.isNull()).alias("ok"),
                    F.array(*[F.substring(c, 1, 200) for c in cols]).alias("names"),
                    F.substring(rec, 1, 2000).alias("raw"))

    def spans(c):
        return F.coalesce(c.contains("\n") | c.contains("\r"), F.lit(False))

    # a field read on past a quote not doubled keeps its opening quote; the raw text of a record with
    # another number of fields (the field may be one too many) holds all of it
    quoted = reduce(lambda a, b: a | b, [F.coalesce(c.startswith('"'), F.lit(False)) & spans(c) for c in cols],
                    spans(rec))
    # a quote left open on the last line takes in the file's last line break only (if any): in a field
    # past the header's (a record with another number of fields), the raw text is all there is of it
    tail = reduce(lambda a, b: a | b, [spans(c) for c in cols + [rec]], F.coalesce(rec.contains('"'), F.lit(False)))
    return [F.min_by(head, "__cr_mid").alias("head"),
            F.max_by(tail, "__cr_mid").alias("tail_break"),
            F.max(quoted).alias("quote_break")]


def _number_csv(x, chunks: list, names: list, helpers: tuple):
    """:func:`number_rows` for a header-less CSV read: check each file (see there), drop its header."""
    from pyspark.sql import functions as F

    spark = x.sparkSession
    by_file: dict = {}
    for c in sorted(chunks, key=lambda c: (c["__cr_file"], c["__cr_block"])):
        by_file.setdefault(c["__cr_file"], []).append(c)
    # a quote left open takes in the lines below it: to the end of the file (the file's last record then
    # spans lines, unless the quote opens on a last line that no line break ends) or to a quote not
    # doubled (a field that spans lines then starts with a quote)
    read_on = sorted(_display_path(f) for f, cs in by_file.items() if any(c["quote_break"] for c in cs))
    ending, unknown = _without_final_line_break(spark, sorted(by_file))
    suspects = sorted({_display_path(f) for f, cs in by_file.items() if cs[-1]["tail_break"]} | set(read_on)
                      | {_display_path(f) for f in ending | unknown})
    # (a compressed file is read as if its text ended with a line break: only a field closed by a quote
    # after a backslash at its very end would read otherwise)
    opened = (unclosed_quotes(spark, suspects, read_on=read_on, no_final_break=[_display_path(f) for f in ending])
              if suspects else {})
    if opened:
        f = min(opened)
        line, end = opened[f]
        if end is None:
            where, what = "before the end of the file", "everything from that quote to the end of the file"
        else:
            where, what = "followed by a delimiter or the line end", f"the lines below it up to the quote on line {end}"
        raise SourceError(f'CSV file {f}: the quoted field that opens on line {line} is never closed: expected a '
                          f'closing quote (") {where}, and every quote inside a quoted field doubled (""); as it '
                          f'is, the field would take in {what}')
    for f, cs in sorted(by_file.items()):
        problem = _header_problem(cs[0]["head"], names)
        if problem:
            raise SourceError(f"CSV file {_display_path(f)}: its header does not match the expected columns "
                              f"(those of the first file, in the same order): {problem}")
    # a file's first chunk starts with its header; a row's place in the source counts data rows only
    heads = {id(cs[0]) for cs in by_file.values()}
    src, total = {}, 0
    for c in sorted(chunks, key=lambda c: (c["__cr_pid"], c["first"])):  # partition order
        skip = 1 if id(c) in heads else 0
        src[id(c)] = total - int(c["first"]) - skip
        total += int(c["n"]) - skip
    rows = []
    for f, cs in by_file.items():
        done = -1  # the header is row -1
        for c in cs:
            rows.append((int(c["__cr_pid"]), f, int(c["__cr_block"]), _display_path(f), done - int(c["first"]),
                         src[id(c)]))
            done += int(c["n"])
    base = spark.createDataFrame(
        rows, "__cr_pid int, __cr_file string, __cr_block long, __cr_show string, __cr_base long, __cr_src long")
    x = x.join(F.broadcast(base), ["__cr_pid", "__cr_file", "__cr_block"], "left")
    x = (x.withColumn(SOURCE_ROW, F.col("__cr_mid") + F.col("__cr_src"))
         .withColumn(SOURCE_FILE, F.col("__cr_show"))
         .withColumn(FILE_ROW, F.col("__cr_mid") + F.col("__cr_base")))
    return x.where(F.col(FILE_ROW) >= 0).drop(*helpers, "__cr_show", "__cr_base", "__cr_src")


def _header_problem(head, names: list) -> Optional[str]:
    """Why a file's first record (``head`` of :func:`_csv_record_checks`) is not the expected header, or None."""
    if head["ok"]:
        return None
    if head["raw"] is not None:  # another number of fields
        found = next(csv.reader(io.StringIO(head["raw"])), [])
        more = "" if len(head["raw"]) < 2000 else " or more"
        return (f"Header length: {len(found)}{more}, schema size: {len(names)}. "
                f"Header: {', '.join(found)[:500]}")
    found = ["" if v is None else v for v in head["names"]]
    i = next((k for k, (a, b) in enumerate(zip(found, names)) if a.lower() != b.lower()),
             next((k for k, (a, b) in enumerate(zip(found, names)) if a != b), 0))
    return f"Header: {', '.join(found)} Schema: {', '.join(names)} Expected: {names[i]} but found: {found[i]}"


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


def _literal_paths(files: list) -> list:
    """The paths escaped: Spark reads ``[ ] { } * ?`` in a path as a glob pattern."""
    return [re.sub(r"([\\\[\]{}*?])", r"\\\1", f) for f in files]


def first_blank_lines(spark, files: list) -> tuple[dict, dict]:
    """``({file: 1-based number of its first blank line below its first record}, {file: number of
    blank lines above its first record (a CSV header, a JSON line)})`` for those of ``files`` that
    have such lines.

    Why: Spark's CSV and JSON readers skip blank and whitespace-only lines, so below the first
    such line ``row + LINE_OFFSET`` is no longer the line. Those above the first record shift
    every line of the file by their number (the second dict); the lines in the first are counted
    without them (so that they compare with ``row + LINE_OFFSET``): add the second to get the
    line in the file. Reads the files as text (the same line splitting as those readers);
    one row per file comes back, and a second small job runs only for files with blank lines
    above their first record.
    """
    from pyspark.sql import functions as F

    if not files:
        return {}, {}
    lines = number_rows(spark.read.text(_literal_paths(files)))
    blank = F.col("value").rlike(_BLANK)
    rows = (lines.groupBy(SOURCE_FILE)
            .agg(F.min(F.when(~blank, F.col(FILE_ROW))).alias("top"),
                 F.min(F.when(blank, F.col(FILE_ROW))).alias("first"))
            .where("top IS NOT NULL AND first IS NOT NULL").collect())
    out = {r[SOURCE_FILE]: int(r["first"]) + 1 for r in rows if r["first"] > r["top"]}
    lead = {r[SOURCE_FILE]: int(r["top"]) for r in rows if r["first"] < r["top"]}
    if lead:  # their first blank line below the first record
        pairs = [F.lit(x) for f, n in sorted(lead.items()) for x in (f, n)]
        top = F.element_at(F.create_map(*pairs), F.col(SOURCE_FILE))
        below = (lines.where(F.col(SOURCE_FILE).isin(list(lead)) & blank & (F.col(FILE_ROW) > top))
                 .groupBy(SOURCE_FILE).agg(F.min(FILE_ROW).alias("first")).collect())
        out.update({r[SOURCE_FILE]: int(r["first"]) + 1 - lead[r[SOURCE_FILE]] for r in below})
    return out, lead


def _without_final_line_break(spark, files: list) -> tuple[set, set]:
    """``(ending, unknown)``: those of ``files`` (as ``input_file_name`` gives them, or local paths)
    whose last byte is not a line break, and those compressed (a codec's last byte says nothing of
    the text's: the caller reads them again as lines, to be safe).

    Why: a quoted field left open on the last line of a file with no line break after it takes in
    no line break, so its record shows no sign of it (the reader takes the value as it stands).
    Reads one byte per file on the driver: a local file directly, another through Hadoop's file
    system (what the reader uses); compressed: a name ending as one of Hadoop's codecs'.
    """
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    codecs = tuple(str(jvm.org.apache.hadoop.util.ReflectionUtils.newInstance(c, conf).getDefaultExtension())
                   for c in jvm.org.apache.hadoop.io.compress.CompressionCodecFactory.getCodecClasses(conf))
    ending, unknown = set(), set()
    for f in files:
        name = _display_path(f)
        if codecs and name.endswith(codecs):
            unknown.add(f)
            continue
        last = None
        if "://" not in name:  # a local file
            try:
                with open(name, "rb") as fh:
                    size = fh.seek(0, os.SEEK_END)
                    if size:
                        fh.seek(size - 1)
                        last = fh.read(1)[0]
            except OSError:  # not seen from the driver: the executors read it
                unknown.add(f)
                continue
        else:
            path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(f))
            fs = path.getFileSystem(conf)
            size = fs.getFileStatus(path).getLen()
            if size:
                stream = fs.open(path)
                try:
                    stream.seek(size - 1)
                    last = stream.read()
                finally:
                    stream.close()
        if last is not None and last not in (10, 13):  # \n, \r
            ending.add(f)
    return ending, unknown


def unclosed_quotes(spark, files: list, *, read_on: list = (), no_final_break: Optional[list] = None) -> dict:
    """``{file: (line, end)}`` for those of the CSV ``files`` with a quoted field that is never
    closed: ``line`` (1-based) is where it opens; ``end`` is None where the file ends inside it
    (the reader puts every line below it into it), else the line of the quote that the reader
    takes for its end though a delimiter or the line end does not follow it (it puts the lines
    in between into it, as it does with every quote inside a quoted field that is not doubled).
    The latter are looked for in the files of ``read_on`` only; a file's first such field is given.
    ``no_final_break``: those of ``files`` whose last line has no line break after it (None: find
    them, :func:`_without_final_line_break`), where the reader's fast path cannot close a quoted field
    at the end of that line.

    Spark work over the files' lines, no file content reaches the driver: each line with a quote
    is classed by what it does to the reader's state (regexes above ``_OPENS_OUTSIDE``): keeps it
    (no quote: left out), sets it (to inside or outside a quoted field, whatever it was) or flips
    it. The state after a line is the one the last setting line above left, flipped once per
    flipping line since: at the end of a file, two aggregates (the last setting line, then the
    flips below it); at every line of a ``read_on`` file, a window over its quoted lines (a sort
    of those). A field that stays open opens on the last line above that closes a quoted field
    when read from inside one: every line between keeps the field open. One job numbers the
    lines, one classes them, kept for the small jobs that follow.
    """
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if not files:
        return {}
    if no_final_break is None:
        no_final_break = sorted(_without_final_line_break(spark, files)[0])
    lines = number_rows(spark.read.text(_literal_paths(files)), last_row="__cr_last")
    v = F.col("value")
    at_eof = F.col("__cr_last") & F.col(SOURCE_FILE).isin(list(no_final_break))

    def matches(pattern: str, at_end: str):
        return F.when(at_eof, v.rlike(at_end)).otherwise(v.rlike(pattern)) if no_final_break else v.rlike(pattern)

    stays = v.rlike(_STAYS_INSIDE)
    classed = (lines.where(v.contains('"'))
               .select(F.col(SOURCE_FILE).alias("f"), F.col(FILE_ROW).alias("r"),
                       matches(_OPENS_OUTSIDE, _OPENS_OUTSIDE_AT_EOF).alias("out"),
                       (stays | matches(_REOPENS_INSIDE, _REOPENS_INSIDE_AT_EOF)).alias("inside"),
                       stays.alias("stays"),
                       (F.col(SOURCE_FILE).isin(list(read_on)) & v.rlike(_BAD_CLOSE_INSIDE)).alias("bad"))
               .persist(StorageLevel.MEMORY_AND_DISK))
    sets = F.col("out") == F.col("inside")
    flip = F.col("out") & ~F.col("inside")
    try:
        ends = (classed.groupBy("f")
                .agg(F.max(F.when(sets, F.col("r") * 2 + F.col("out").cast("long"))).alias("set"),
                     F.max(F.when(~F.col("stays"), F.col("r"))).alias("last_open"))
                .collect())
        set_at = {r["f"]: (-1 if r["set"] is None else int(r["set"]) // 2) for r in ends}
        state = {r["f"]: (0 if r["set"] is None else int(r["set"]) % 2) for r in ends}
        after = F.element_at(F.create_map(*[F.lit(x) for f, n in sorted(set_at.items()) for x in (f, n)]), F.col("f"))
        for r in classed.where(flip & (F.col("r") > after)).groupBy("f").count().collect():
            state[r["f"]] ^= int(r["count"]) % 2
        bad = []
        if read_on:
            w = Window.partitionBy("f").orderBy("r")
            upto = w.rowsBetween(Window.unboundedPreceding, Window.currentRow)
            x = classed.where(F.col("f").isin(list(read_on))).withColumn("k", F.sum(flip.cast("int")).over(upto))
            last_set = F.last(F.when(sets, F.struct(F.col("k"), F.col("out").cast("int").alias("v"))),
                              ignorenulls=True).over(upto)
            state_after = (F.when(F.col("s").isNull(), F.col("k") % 2)
                           .otherwise((F.col("s.v") + F.col("k") - F.col("s.k")) % 2))
            x = x.withColumn("s", last_set).withColumn("after", state_after)
            x = (x.withColumn("before", F.lag("after", 1, 0).over(w))
                 .withColumn("opened", F.last(F.when(~F.col("stays"), F.col("r")), ignorenulls=True)
                             .over(w.rowsBetween(Window.unboundedPreceding, -1))))
            bad = (x.where((F.col("before") == 1) & F.col("bad") & F.col("opened").isNotNull())
                   .groupBy("f").agg(F.min(F.struct(F.col("opened"), F.col("r"))).alias("at")).collect())
    finally:
        classed.unpersist()
    out = {r["f"]: (int(r["last_open"]) + 1, None) for r in ends if state[r["f"]] and r["last_open"] is not None}
    out.update({r["f"]: (int(r["at"]["opened"]) + 1, int(r["at"]["r"]) + 1) for r in bad})
    return out
