"""Commit a set of already-written parquet files to a Delta table in one delta-rs transaction.

Used by the Spark data source's ``commit()`` (in a driver-side Python worker) and by
small driver-side writes. Schema rules live here because delta-rs does not check
them on append: names and types must equal the table's, or the commit is refused
with the offending column named (evolution only when explicitly asked for).

Atomicity: the data files and any schema change land in ONE commit (delta-rs writes a
new schema only with an overwrite, so an append that adds columns is committed as an
overwrite whose filter matches no file: it removes nothing). An idempotency key
(``write_key`` in the commit metadata) is also committed as a Delta ``txn`` action, so two
writers racing with the same key cannot both commit: the loser finds the key and raises
:class:`WriteAlreadyApplied` (its files are then removed like any failed write's). The txn
version (``_key_version``, default 1) lets a key be applied again once its rows were replaced
(see ``DeltaStore.has_commit_key``): a commit is refused only when the table records the key at
that version or above. ``_exact_version`` (the store's ``expected_version``) commits with no retry
(``max_commit_retries=0``): at exactly ``read_version + 1``, or not at all.

Partitioning: a commit's files must carry values for exactly the table's partition columns, which the
schema must hold. An overwrite with ``_overwrite_schema`` (and no ``replace_where``) takes the write's
partition columns, like delta-spark's overwriteSchema (see :func:`_replace_table`). A partition overwrite
(``replace_where``) may only add files inside the partitions it replaces (:func:`check_files_inside`).

Every commit's commitInfo also records ``causalrecWriteMode`` (the caller's mode: delta-rs logs a
schema-evolving append as an overwrite), ``causalrecReplaceWhere`` for a partition overwrite and ``causalrecWriteId`` (so :func:`landed_commit` can
tell whether a write whose job failed had in fact committed).
"""
from __future__ import annotations

import json
import os

import pyarrow as pa


class DeltaWriteError(RuntimeError):
    """A write was refused; the table is unchanged."""


class ConcurrentWriteError(DeltaWriteError):
    """Another writer committed a conflicting change to the table after this write was planned."""


class WriteAlreadyApplied(DeltaWriteError):
    """The table already holds a commit with this write's idempotency key: nothing was committed."""


class WriteCommittedError(RuntimeError):
    """The write's commit landed, but a step after it failed: the table DOES hold the new rows.

    Not a :class:`DeltaWriteError` (that one means the table is unchanged): retrying an unkeyed
    write after this would add its rows twice.
    """


def moved_message(path: str, checked_version: int, current: int | None = None) -> str:
    """Why an expected-version write was refused (``DeltaStore.write(expected_version=...)``)."""
    now = f" (now version {current})" if current is not None else ""
    checked = f"version {checked_version}" if checked_version >= 0 else "the table not existing yet"
    return (f"Delta table {path}: another writer committed after {checked}, which this write was checked "
            f"against{now}; nothing was written. Check the data again against the new version and retry")


def _normalise(t: pa.DataType) -> pa.DataType:
    """Types as Delta stores them (delta-rs reads strings back as large/view types)."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(_normalise(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_normalise(t.value_type))
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    return t


def table_arrow_schema(dt) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def check_schema(table_schema: pa.Schema, write_schema: pa.Schema, path: str, partition_by=None) -> list:
    """Return the fields of ``write_schema`` that the table lacks; raise on a type clash or missing column."""
    have = {f.name: _normalise(f.type) for f in table_schema}
    new_fields = []
    for f in write_schema:
        if f.name not in have:
            new_fields.append(f)
            continue
        want = have[f.name]
        got = _normalise(f.type)
        if want != got:
            raise DeltaWriteError(
                f"Delta table {path}: column {f.name!r} has type {want} in the table but {got} "
                f"in the data being written; cast it or rewrite the table with mode='overwrite' "
                f"and overwrite_schema=True"
            )
    missing = [n for n in have if n not in write_schema.names]
    if missing:
        raise DeltaWriteError(
            f"Delta table {path}: the data being written lacks column(s) {missing} that the table has"
        )
    return new_fields


def check_not_null(path: str, schema: pa.Schema, partition_columns, files: list) -> None:
    """Refuse files with nulls in a column the table declares NOT NULL (delta-spark's
    DELTA_NOT_NULL_CONSTRAINT_VIOLATED), from the files' own null counts and partition values."""
    required = [f.name for f in schema if not f.nullable]
    for f in files:
        nulls = json.loads(f["stats"] or "{}").get("nullCount", {})
        for c in required:
            n = nulls.get(c, 0) if c not in partition_columns else int(f["partition_values"].get(c) is None)
            if n:
                raise DeltaWriteError(f"Delta table {path}: column {c!r} is NOT NULL in the table but the data "
                                      f"being written holds null in it ({n} row(s) of file {f['path']}); nothing "
                                      f"was written")


def commit_files(
    *,
    path: str,
    files: list,
    arrow_schema: pa.Schema,
    partition_by: list,
    overwrite: bool,
    replace_where,
    read_version: int,
    commit_metadata: dict,
    storage_options: dict | None = None,
    write_id: str | None = None,
) -> int | None:
    """Add ``files`` (dicts with path, size, partition_values, modification_time, stats) atomically.

    Returns the new table version (None when it could not be read back after the commit).
    """
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import CommitFailedError, TableNotFoundError
    from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

    actions = [
        AddAction(
            path=f["path"],
            size=int(f["size"]),
            partition_values=f["partition_values"],
            modification_time=int(f["modification_time"]),
            data_change=True,
            stats=f["stats"],
        )
        for f in files
    ]
    planned_metadata = dict(commit_metadata)  # as planned, for an append re-planned on another writer's create
    allow_evolution = bool(commit_metadata.pop("_merge_schema", False))
    overwrite_schema = bool(commit_metadata.pop("_overwrite_schema", False))
    key_version = int(commit_metadata.pop("_key_version", 1))
    # the caller checked its data against read_version: land at read_version + 1 or not at all
    exact = bool(commit_metadata.pop("_exact_version", False))
    key = commit_metadata.get("write_key")
    custom = {"causalrecWriteMode": "overwrite" if overwrite else "append"}
    if overwrite and replace_where:  # a partition overwrite: earlier rows outside it survive
        custom["causalrecReplaceWhere"] = json.dumps([list(c) for c in replace_where], default=str)
    if write_id:
        custom["causalrecWriteId"] = write_id
    if commit_metadata:
        custom["causalrec"] = json.dumps(commit_metadata)
    # an overwrite removes the files it saw at read_version: delta-rs would rebase it over a newer append
    # and keep that append's rows, so an overwrite lands on read_version + 1 or conflicts, as in delta-spark
    txns = [Transaction(key, key_version)] if key else None
    props = CommitProperties(custom_metadata=custom, max_commit_retries=0 if exact or overwrite else None,
                             app_transactions=txns)
    delta_schema = Schema.from_arrow(arrow_schema)

    def applied_by_another_writer():
        if key and _has_key(path, key, key_version, storage_options):
            return WriteAlreadyApplied(f"Delta table {path} already holds write {key} (a concurrent writer "
                                       f"committed it); this one was not applied")
        return None

    if read_version < 0:
        check_partitioning(path, partition_by or [], arrow_schema, files)
        try:
            # version 0 or nothing: retried, delta-rs lands the losing writer's create on version 1 as a
            # new table (its own id, protocol and schema) over the winner's, which hides the winner's
            # rows under another schema or applies a keyed write twice
            create_table_with_add_actions(
                path,
                delta_schema,
                actions,
                mode="error",
                partition_by=partition_by or None,
                storage_options=storage_options,
                commit_properties=CommitProperties(custom_metadata=custom, max_commit_retries=0,
                                                   app_transactions=txns),
            )
        except Exception as exc:  # table created concurrently: "already exists", or the lost version-0 commit
            if not isinstance(exc, CommitFailedError) and "already exists" not in str(exc).lower():
                raise
            done = applied_by_another_writer()
            if done:
                raise done from exc
            if overwrite or exact:
                raise ConcurrentWriteError(
                    f"Delta table {path} was created by another writer while this write ran; retry it"
                ) from exc
            # a plain append: added to the table the other writer created, checked against its schema
            return commit_files(path=path, files=files, arrow_schema=arrow_schema, partition_by=partition_by,
                                overwrite=False, replace_where=None, read_version=0,
                                commit_metadata=planned_metadata, storage_options=storage_options,
                                write_id=write_id)
        return 0

    try:
        dt = DeltaTable(path, version=read_version, storage_options=storage_options)
    except TableNotFoundError as exc:
        raise ConcurrentWriteError(f"Delta table {path} disappeared while this write ran") from exc

    if key and (dt.transaction_version(key) or 0) >= key_version:  # committed before this write was planned
        raise WriteAlreadyApplied(f"Delta table {path} already holds write {key}; this one was not applied")
    table_schema = table_arrow_schema(dt)
    table_parts = list(dt.metadata().partition_columns)
    new_fields = []
    if overwrite and overwrite_schema and replace_where is None:
        # a rewrite of the whole table takes the write's schema and partitioning (delta-spark's overwriteSchema)
        schema_for_commit = arrow_schema
        parts = list(partition_by or [])
    else:
        new_fields = check_schema(table_schema, arrow_schema, path)
        if new_fields and not allow_evolution:
            raise DeltaWriteError(
                f"Delta table {path}: the data being written has new column(s) "
                f"{[f.name for f in new_fields]}; pass merge_schema=True to add them"
            )
        # new columns go into this same commit (see the module docstring), never a commit of their own
        schema_for_commit = pa.schema(list(table_schema) + [f.with_nullable(True) for f in new_fields])
        if partition_by and list(partition_by) != table_parts:
            raise DeltaWriteError(
                f"Delta table {path} is partitioned by {table_parts}, not {list(partition_by)}"
            )
        parts = table_parts
    check_partitioning(path, parts, schema_for_commit, files)
    check_not_null(path, schema_for_commit, parts, files)
    mode = "overwrite" if overwrite else "append"
    filters = None
    if replace_where:
        if not overwrite:
            raise DeltaWriteError("replace_where needs mode='overwrite'")
        for col, _, _ in replace_where:
            if col not in table_parts:
                raise DeltaWriteError(
                    f"Delta table {path}: replace_where column {col!r} is not a partition column "
                    f"({table_parts}); the offline backend replaces whole partitions"
                )
        check_files_inside(path, files, replace_where, table_schema)
        # delta-rs takes partition values in Delta's string form only
        filters = [(col, op, [_partition_string(v) for v in value] if _is_list_op(op) else _partition_string(value))
                   for col, op, value in replace_where]
    if new_fields and not overwrite:
        # an append that adds columns: an overwrite whose filter ("<column> IN ()") matches no file
        mode, filters = "overwrite", [((table_parts or table_schema.names)[0], "in", [])]
    try:
        if parts != table_parts:
            _replace_table(dt, path, read_version, actions, delta_schema, parts, custom, key, key_version,
                           storage_options, exact)
        else:
            dt.create_write_transaction(
                actions,
                mode=mode,
                schema=schema_for_commit,
                partition_by=table_parts or None,
                partition_filters=filters,
                commit_properties=props,
            )
    except CommitFailedError as exc:
        done = applied_by_another_writer()
        if done:
            raise done from exc
        if exact:
            raise ConcurrentWriteError(moved_message(path, read_version)) from exc
        raise ConcurrentWriteError(
            f"Delta table {path}: a concurrent commit conflicts with this {mode} "
            f"(planned on version {read_version}): {exc}"
        ) from exc
    return _version_after_commit(path, storage_options)


def _replace_table(dt, path, read_version, actions, delta_schema, parts, custom, key, key_version,
                   storage_options, exact) -> None:
    """Commit a whole-table overwrite that changes the partition columns.

    Why not ``create_write_transaction``: it keeps the table's partition columns, so its add actions
    would not match them (a table delta-rs cannot open). A replace writes the new metaData action,
    removes every file and adds the new ones in one commit; the table's name, description and
    configuration (hence protocol) are kept. It commits on the latest version, so the table must
    still be at ``read_version`` (a commit since is refused like a conflicting one) and no retry
    may rebase it. It gets a new table id.
    """
    from deltalake import DeltaTable
    from deltalake.transaction import CommitProperties, Transaction, create_table_with_add_actions

    current = DeltaTable(path, storage_options=storage_options).version()
    if current != read_version:
        if exact:
            raise ConcurrentWriteError(moved_message(path, read_version, current))
        raise ConcurrentWriteError(
            f"Delta table {path}: a concurrent commit (now version {current}) conflicts with this overwrite "
            f"that re-partitions the table (planned on version {read_version}); nothing was written, retry it"
        )
    meta = dt.metadata()
    create_table_with_add_actions(
        path,
        delta_schema,
        actions,
        mode="overwrite",
        partition_by=parts or None,
        name=meta.name,
        description=meta.description,
        configuration=meta.configuration,
        storage_options=storage_options,
        commit_properties=CommitProperties(custom_metadata=custom, max_commit_retries=0,
                                           app_transactions=[Transaction(key, key_version)] if key else None),
    )


def check_partitioning(path: str, parts: list, schema: pa.Schema, files: list) -> None:
    """Refuse partition columns the schema lacks, and files whose partition values name other columns."""
    missing = [c for c in parts if c not in schema.names]
    if missing:
        raise DeltaWriteError(
            f"Delta table {path}: partition column(s) {missing} are not in the data being written "
            f"(columns {schema.names})"
        )
    for f in files:
        if set(f["partition_values"] or {}) != set(parts):
            raise DeltaWriteError(
                f"Delta table {path}: file {f['path']} has partition values for {sorted(f['partition_values'] or {})}, "
                f"but the table is partitioned by {parts}"
            )


def _is_list_op(op) -> bool:
    return str(op).lower() in ("in", "not in")


def _partition_string(value):
    from causalrec.storage.delta_rs_source import partition_value_string

    return partition_value_string(value)


def _typed(value, t: pa.DataType):
    """A partition value (Delta's string form or a caller's value) as a Python value of the column's type,
    so that ``10 >= 9`` on an int column holds (as strings it does not); the string when it does not parse."""
    import datetime as _dt
    from decimal import Decimal, InvalidOperation

    s = _partition_string(value)
    if s is None:
        return None
    try:
        if pa.types.is_boolean(t):
            return {"true": True, "false": False}.get(s.lower(), s)
        if pa.types.is_integer(t):
            return int(s)
        if pa.types.is_floating(t):
            return float(s)
        if pa.types.is_decimal(t):
            return Decimal(s)
        if pa.types.is_date(t):
            return _dt.date.fromisoformat(s)
        if pa.types.is_timestamp(t):
            v = _dt.datetime.fromisoformat(s)
            return v.astimezone(_dt.timezone.utc).replace(tzinfo=None) if v.tzinfo is not None else v
    except (ValueError, InvalidOperation):
        pass
    return s


_COMPARE = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _condition_holds(actual, op: str, wanted) -> bool:
    """SQL semantics: a null partition value satisfies no condition."""
    if actual is None:
        return False
    if _is_list_op(op):
        inside = any(w is not None and _equal(actual, w) for w in wanted)
        return inside if op.lower() == "in" else not inside
    if wanted is None:
        return False
    try:
        return _COMPARE[op](actual, wanted)
    except TypeError:  # a value that did not parse as the column's type: compare the string forms
        return _COMPARE[op](str(actual), str(wanted))


def _equal(a, b) -> bool:
    try:
        return a == b if type(a) is type(b) else str(a) == str(b)
    except TypeError:
        return False


def check_files_inside(path: str, files: list, replace_where, table_schema: pa.Schema) -> None:
    """Refuse a partition overwrite that writes rows outside the partitions it replaces.

    Why: those rows would land in partitions the overwrite leaves in place, beside their old rows
    (delta-spark refuses such data too). Runs before the commit: a refused write leaves the table unchanged.
    """
    types = {f.name: f.type for f in table_schema}
    for col, op, value in replace_where:
        if op not in _COMPARE and not _is_list_op(op):
            raise DeltaWriteError(
                f"Delta table {path}: replace_where operator {op!r} on {col!r} is not one of "
                f"{sorted(_COMPARE) + ['in', 'not in']}"
            )
    for f in files:
        pv = f["partition_values"] or {}
        for col, op, value in replace_where:
            t = types.get(col, pa.string())
            wanted = [_typed(v, t) for v in value] if _is_list_op(op) else _typed(value, t)
            if not _condition_holds(_typed(pv.get(col), t), op.lower() if _is_list_op(op) else op, wanted):
                raise DeltaWriteError(
                    f"Delta table {path}: the data being written has rows in partition {col}={pv.get(col)!r}, "
                    f"outside replace_where {[list(c) for c in replace_where]}; a partition overwrite may only "
                    f"write rows inside the partitions it replaces (nothing was written)"
                )


def _version_after_commit(path: str, storage_options=None) -> int | None:
    """The commit has landed: a failed read-back must not raise, or Spark would abort a committed write."""
    from deltalake import DeltaTable

    try:
        return DeltaTable(path, storage_options=storage_options).version()
    except Exception:
        return None


def _has_key(path: str, key: str, key_version: int = 1, storage_options=None) -> bool:
    from deltalake import DeltaTable

    try:
        return (DeltaTable(path, storage_options=storage_options).transaction_version(key) or 0) >= key_version
    except Exception:  # the table vanished: certainly not applied
        return False


def landed_commit(path: str, write_id: str, after_version: int) -> tuple[int | None, set]:
    """The version whose commitInfo carries ``write_id`` (None if no commit does) and the names of the files it added.

    Why: a Spark job can fail after its commit landed; its files are then in the log and must
    stay, and the error must say so. Reads the JSON commits after ``after_version`` (the version
    the write was planned on) in the local table folder, like the data source's file writes.
    """
    v = after_version + 1
    while True:
        try:
            with open(os.path.join(path, "_delta_log", f"{v:020d}.json")) as fh:
                actions = [json.loads(line) for line in fh if line.strip()]
        except FileNotFoundError:
            return None, set()
        if any(a.get("commitInfo", {}).get("causalrecWriteId") == write_id for a in actions):
            return v, {a["add"]["path"].rsplit("/", 1)[-1] for a in actions if "add" in a}
        v += 1
