"""The estimators' distributed pass as ONE Spark SQL aggregation, run entirely inside the JVM.

Why: moving the per-row quantities through Arrow into a Python kernel costs more than the
arithmetic (measured: the Arrow transfer alone is 3-30x a plain Spark mean, growing with the
row count), while Spark's whole-stage code generation compiles a wide aggregation of the
same terms into one tight loop over the scanned columns. The statistics are exactly those
of :func:`causalrec.estimators.base.partial_stats`: the row count, the sum of every term,
the sum of every needed cross-product, the maxima, and, for the bucketed Poisson bootstrap,
the same sums per hashed bucket (``GROUP BY pmod(xxhash64(row_id, seed, -1), G)``; the
totals are the sums over the buckets, so it is still one pass).

The exact per-row Poisson bootstrap (``boot_buckets = 0`` with replicates) needs B weights
per row, i.e. B x terms aggregate expressions; that one stays on the vectorised kernel.

Input checks ride along in the same pass: a ``min`` over rows of the first bad column per row
says which column holds a null, NaN or +-inf (or a propensity outside (0, 1]), the local and
Arrow forms' rule (:func:`causalrec.estimators.base.first_unusable`); only then does a second,
``limit 1`` query fetch an offending row to name it in the error.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from causalrec.estimators.base import (
    PSCORE,
    Q_HAT,
    REWARD,
    ROW_ID,
    Plan,
    Stats,
    _layout,
    _needed_columns,
    expected_value,
    stats_from_vectors,
)
from causalrec.sql_text import quote_name

# Spark turns whole-stage code generation off for plans wider than this many fields
# (spark.sql.codegen.maxFields, default 100); the pass raises it for its own query only.
CODEGEN_FIELDS_KEY = "spark.sql.codegen.maxFields"


def _literal(x) -> str:
    """A double literal in Spark SQL (a bare ``1.5`` would parse as a DECIMAL)."""
    x = float(x)
    if math.isinf(x) or math.isnan(x) or "e" in repr(x):
        return f"CAST('{x!r}' AS DOUBLE)"  # folded to a constant by the optimizer
    return f"{x!r}D"


class Sql:
    """A per-row SQL expression built by the term functions' own arithmetic (``w * r``, ``w <= 5``).

    Terms become SQL text rather than Column objects: one parse per statistic instead of one
    py4j round trip per operator, which for a few hundred statistics is the difference between
    milliseconds and seconds of driver time.
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    @staticmethod
    def of(x) -> str:
        return x.text if isinstance(x, Sql) else _literal(x)

    def _op(self, op: str, other, reverse: bool = False) -> "Sql":
        a, b = self.text, Sql.of(other)
        return Sql(f"({b} {op} {a})" if reverse else f"({a} {op} {b})")

    def __add__(self, o): return self._op("+", o)  # noqa: E704
    def __radd__(self, o): return self._op("+", o, True)  # noqa: E704
    def __sub__(self, o): return self._op("-", o)  # noqa: E704
    def __rsub__(self, o): return self._op("-", o, True)  # noqa: E704
    def __mul__(self, o): return self._op("*", o)  # noqa: E704
    def __rmul__(self, o): return self._op("*", o, True)  # noqa: E704
    def __truediv__(self, o): return self._op("/", o)  # noqa: E704
    def __rtruediv__(self, o): return self._op("/", o, True)  # noqa: E704
    def __le__(self, o): return self._op("<=", o)  # noqa: E704
    def __lt__(self, o): return self._op("<", o)  # noqa: E704
    def __ge__(self, o): return self._op(">=", o)  # noqa: E704
    def __gt__(self, o): return self._op(">", o)  # noqa: E704
    def __neg__(self): return Sql(f"(- {self.text})")  # noqa: E704


class SqlOps:
    """The term functions' ops (see :class:`causalrec.estimators.base.NumpyOps`) as SQL text."""

    name = "sql"

    @staticmethod
    def where(cond, a, b):
        return Sql(f"CASE WHEN {Sql.of(cond)} THEN {Sql.of(a)} ELSE {Sql.of(b)} END")

    @staticmethod
    def minimum(a, b):
        return Sql(f"least({Sql.of(a)}, {Sql.of(b)})")

    @staticmethod
    def lit(x):
        return Sql(_literal(x))


def supports(plan: Plan) -> bool:
    """Whether this pass computes the plan's statistics (all but the per-row bootstrap)."""
    return not (plan.n_boot and not plan.boot_buckets)


# Above this many aggregate updates per row (a grouped update counts twice), the generated
# code outgrows what the JVM compiles well and the Arrow kernel, whose cross-products are one
# BLAS product, is faster. Measured at 10M rows, all 8 estimators (sql vs arrow, seconds):
# 1 policy 43 statistics 1.2 vs 3.6 (bucketed bootstrap 2.6 vs 4.4); 2 policies 84: 2.6 vs
# 4.3 (5.3 vs 5.7); 2 policies + baseline 182: 5.0 vs 4.9 (10.0 vs 6.5); 3 + baseline 321:
# 32 vs 5.3. Stated in the README.
SQL_MAX_WORK = 170


def n_statistics(plan: Plan) -> int:
    """Aggregates the SQL pass computes per row (an upper bound: identical terms are shared)."""
    return 2 + len(plan.terms) + len(plan.pairs) + len(plan.maxima)


def preferred(plan: Plan) -> bool:
    """Whether ``engine="auto"`` takes this pass: it can, and the plan is narrow enough to be faster."""
    work = n_statistics(plan) * (2 if plan.n_boot and plan.boot_buckets else 1)
    return supports(plan) and work <= SQL_MAX_WORK


@contextlib.contextmanager
def _session_conf(spark, key: str, value: str):
    """Set a SQL conf for one query and put the session's own value back afterwards."""
    conf = spark.conf
    before = conf.get(key, None)
    conf.set(key, value)
    try:
        yield
    finally:
        if before is None:
            conf.unset(key)
        else:
            conf.set(key, before)


def _typed(col: str) -> str:
    """An input column as the pass reads it: the row id as BIGINT, every other one as DOUBLE."""
    return f"CAST({quote_name(col)} AS {'BIGINT' if col == ROW_ID else 'DOUBLE'})"


def _bad(x: str, col: str) -> str:
    """SQL condition: the value ``x`` of input column ``col`` is unusable (null, NaN, +-inf; a
    propensity also outside (0, 1]). The one definition the pass and its error message share."""
    if col == ROW_ID:
        return f"{x} IS NULL"
    bad = f"{x} IS NULL OR isnan({x}) OR abs({x}) = {_literal(math.inf)}"
    return f"({bad} OR {x} <= 0 OR {x} > 1)" if col == PSCORE else f"({bad})"


def _first_bad_column(cols) -> str:
    """Per-row SQL: the index of the first unusable column, null when the row is good
    (``least`` skips nulls)."""
    marks = [f"CASE WHEN {_bad('c' + str(k), c)} THEN {k} END" for k, c in enumerate(cols)]
    return f"least({', '.join(marks)})"


def _raise_bad_input(df, col: str):
    """Name the column, one offending row of it, and what was expected."""
    from pyspark.sql import functions as F

    expected = expected_value(col)
    row = df.where(F.expr(_bad(_typed(col), col))).select(F.col(ROW_ID), F.col(col)).limit(1).collect()
    where = "" if not row else " (row_id null)" if col == ROW_ID else f" (row_id {row[0][0]}: {row[0][1]!r})"
    raise ValueError(f"estimator input: column {col!r} has a null/NaN/inf or out-of-range value{where}; "
                     f"expected {expected}")


def build_query(df, plan: Plan):
    """The one aggregation (a DataFrame, not yet run) and the codegen field limit it needs.

    Stages that Spark compiles into one loop per task: the typed inputs, the per-policy quantities
    (``w = pi_e / pscore``, ...) as columns, then every term and maximum as a column over them,
    then the sums, cross-products and maxima. Staging keeps each term computed once per row:
    Spark will not inline a projected expression that several aggregates reference.
    """
    cols = _needed_columns(plan)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"estimator input DataFrame lacks column(s) {missing}; it has {df.columns}")
    names, _, pairs, _ = _layout(plan)
    # stage 0: the input columns, typed, under generated names (user column and policy names
    # never enter the SQL text except quoted here)
    c = {col: f"c{k}" for k, col in enumerate(cols)}
    stage0 = [f"{_typed(col)} AS {c[col]}" for col in cols]
    # stage 1: per-policy quantities, every one non-null: a null, NaN, inf or out-of-range input is
    # marked in "bad" (the pass then raises, naming a row) and is replaced here by a harmless
    # value - a propensity by 1, so nothing divides by zero under ANSI mode. Non-null columns
    # also let the generated code drop its null branches.
    def val(col: str) -> str:
        return f"coalesce({c[col]}, 0D)"

    p_ok = f"coalesce(CASE WHEN {c[PSCORE]} > 0 AND {c[PSCORE]} <= 1 THEN {c[PSCORE]} END, 1D)"
    stage1 = [f"{val(REWARD)} AS r", f"{val(Q_HAT)} AS qf", f"{p_ok} AS p", f"{_first_bad_column(cols)} AS bad"]
    qs = {}
    for i, (pol, (pi_e, qpi)) in enumerate(plan.policies.items()):
        stage1 += [f"{val(pi_e)} AS pie{i}", f"{val(pi_e)} / {p_ok} AS w{i}", f"{val(qpi)} AS qpi{i}"]
        qs[pol] = {"w": Sql(f"w{i}"), "r": Sql("r"), "qf": Sql("qf"), "qpi": Sql(f"qpi{i}"),
                   "pi_e": Sql(f"pie{i}"), "p": Sql("p")}
    bucketed = bool(plan.n_boot and plan.boot_buckets)
    if bucketed:
        stage1.append(f"pmod(xxhash64({c[ROW_ID]}, CAST({int(plan.seed)} AS BIGINT), CAST(-1 AS BIGINT)), "
                      f"{int(plan.boot_buckets)}) AS bucket")
    # stage 2: every distinct term (and maximised term) as a column; terms with the same
    # expression under different names (the summed and the maximised w) share one
    exprs: dict = {}

    def column(term, pol) -> str:
        return exprs.setdefault(Sql.of(term.fn(SqlOps, qs[pol])), f"t{len(exprs)}")

    col_of = {k: column(t, pol) for k, (pol, t) in plan.terms.items()}
    max_cols = [column(t, pol) for pol, t in plan.maxima.values()]
    # stage 3: the statistics, each distinct one once
    stats: dict = {}

    def stat(expr: str) -> str:
        return stats.setdefault(expr, f"a{len(stats)}")

    out = ["n"]
    out += [f"{stat(f'sum({col_of[k]})')} AS s{j}" for j, k in enumerate(names)]
    out += [f"{stat(f'sum({col_of[a]} * {col_of[b]})')} AS x{j}" for j, (a, b) in enumerate(pairs)]
    out += [f"{stat(f'max({c})')} AS m{j}" for j, c in enumerate(max_cols)]
    out.append("bad")
    key = ["bucket"] if bucketed else []
    inner = ", ".join([f"{e} AS {c}" for e, c in exprs.items()] + ["bad"] + key)
    aggs = ", ".join(f"{e} AS {a}" for e, a in stats.items())
    outer = ", ".join(key + out)
    group = " GROUP BY bucket" if bucketed else ""
    # one spark.sql call (pyspark registers {src} as a temporary view for this query only):
    # a few hundred statistics as Column objects would cost one py4j round trip per operator
    query = df.sparkSession.sql(
        f"SELECT {outer} FROM (SELECT {', '.join(key + ['count(1) AS n', aggs, 'min(bad) AS bad'])} "
        f"FROM (SELECT {inner} FROM (SELECT {', '.join(stage1)} FROM (SELECT {', '.join(stage0)} "
        f"FROM {{src}}))){group})", src=df)
    return query, max(100, 2 * (len(stats) + len(exprs) + len(stage1) + 4))


def sql_stats(df, plan: Plan) -> Stats:
    """The plan's statistics from one Spark aggregation over ``df`` (see the module docstring)."""
    query, fields = build_query(df, plan)
    with _session_conf(df.sparkSession, CODEGEN_FIELDS_KEY, str(fields)):
        rows = query.collect()
    names, boot, pairs, n_sum = _layout(plan)
    n_max = len(plan.maxima)
    bucketed = bool(plan.n_boot and plan.boot_buckets)
    width = 1 + len(names) + len(pairs)
    off = 1 if bucketed else 0  # the bucket id column
    # null -> NaN: a sum over no rows (or a max of nothing) is null in SQL. Only a null sum becomes
    # 0 below: an inf or NaN one (inputs are finite, yet w = pi_e / pscore can overflow) stays what
    # the local form gives (np.nan_to_num would turn inf into 1.8e308)
    table = np.array([[np.nan if v is None else float(v) for v in r] for r in rows],
                     dtype=np.float64).reshape(len(rows), off + width + n_max + 1)
    null = np.array([[v is None for v in r] for r in rows], dtype=bool).reshape(table.shape)
    summed = np.where(null, 0.0, table)
    bad = table[:, -1][~np.isnan(table[:, -1])]
    if bad.size:
        _raise_bad_input(df, _needed_columns(plan)[int(bad.min())])
    sums = np.zeros(n_sum)
    sums[:width] = summed[:, off:off + width].sum(axis=0)
    mx = np.array([np.max(c[~np.isnan(c)], initial=-np.inf) for c in table[:, off + width:-1].T])
    if bucketed:
        G = plan.boot_buckets
        ids = table[:, 0].astype(np.int64)
        pos = {k: j for j, k in enumerate(names)}
        blocks = [np.bincount(ids, weights=summed[:, off], minlength=G)]  # rows per bucket
        blocks += [np.bincount(ids, weights=summed[:, off + 1 + pos[k]], minlength=G) for k in boot]
        sums[width:] = np.concatenate(blocks)
    return stats_from_vectors(sums, mx, plan)
