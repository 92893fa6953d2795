"""Names and values written into Spark SQL text, escaped so that the text means what was given.

Why one place: a column name from a user's file (``no`te``) or a value with a backslash before a
quote (``\\' OR 1=1 --``) must not end its identifier or literal early. Unescaped, the first failed
a whole ingest on one odd header, and the second turned a partition overwrite's condition into
one that matches every row.
"""
from __future__ import annotations


def quote_name(name: str) -> str:
    """A column name as a backquoted identifier (a backquote inside is doubled)."""
    return "`" + str(name).replace("`", "``") + "`"


def sql_literal(value) -> str:
    """A Python value as a Spark SQL literal: booleans and numbers as they are, anything else as a
    string literal with backslashes and single quotes escaped (Spark's default string-literal
    parsing, ``spark.sql.parser.escapedStringLiterals=false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
