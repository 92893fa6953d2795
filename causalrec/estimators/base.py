"""One engine under every estimator: per-row terms -> sufficient statistics -> estimate + intervals.

Why this shape: every off-policy estimator here is a smooth function of a few sample
means of per-row *terms* (``w*r``, ``w``, ``q_hat_pi``, ...), where ``w = pi_e / pscore``.
So one pass that accumulates, per term, the sum, the pairwise cross-products, the max,
and the Poisson-bootstrap replicate sums is enough for the point estimate, the CLT /
delta-method interval and the bootstrap interval of every estimator and every policy
at once. The same statistics are computed by two interchangeable backends:

* :func:`local_stats` - numpy arrays (tests, small data, the obp cross-check);
* :func:`spark_stats` - ONE pass over a DataFrame of per-row quantities, by either of two
  engines: one Spark SQL aggregation compiled and run inside the JVM
  (:mod:`causalrec.estimators.sql_pass`: analytic statistics and the bucketed bootstrap), or
  the vectorised kernel (:func:`partial_stats`) on every task's Arrow batches, whose partial
  vectors a Spark aggregation adds by position (the exact per-row bootstrap).

The estimators themselves only see :class:`Stats`, so every form gives the same numbers
up to floating-point summation order. (Why the per-row bootstrap is a kernel rather than
SQL: B=200 replicates x ~20 terms x several policies is thousands of aggregate expressions,
whose planning and code generation alone took minutes; the kernel does the same sums as
two matrix products. Why the rest is SQL: moving the rows through Arrow into Python costs
more than the arithmetic - 3-30x a plain Spark mean - while the compiled aggregation reads
the columns where they are.)

Poisson bootstrap (Chamandy et al. 2012, "Estimating uncertainty for massive data
streams"; Hanley & MacGibbon 2006): replicate ``b`` gives row ``i`` the weight
``m_ib ~ Poisson(1)``, generated from a counter-based hash of ``(row_id, seed, b // 4)``
(Spark's ``xxhash64``, re-implemented bit-exactly in numpy); each 64-bit hash yields
four 16-bit uniforms, turned into Poisson(1) counts by inverse-CDF thresholds
(quantised to 1/65536, truncated at 8: the truncated mass is < 1e-5). Nothing is
resampled and no per-row array ever reaches the driver: the replicate sums
``sum_i m_ib * t_i`` are accumulated where the rows are. :func:`poisson_weight_columns`
gives the same weights as Spark Column expressions (tested bit-for-bit).

Bucketed form (``boot_buckets = G > 0``, for event-scale data): each row is hashed into one
of G buckets and every row of a bucket shares the bucket's Poisson weight, so a pass only
adds each term per bucket (G x terms sums, one ``bincount`` per term) and the B x G weights
are drawn on the driver from the bucket ids. For i.i.d. rows this is the same Poisson
bootstrap with buckets as resampling units - the random-bucket scheme Chamandy et al.
describe for sharded data - and the replicate means are self-normalised by the replicate's
row count, so centring keeps the within-bucket cross terms out of the variance; with G in
the thousands it adds about ``1/sqrt(2G)`` relative noise to the bootstrap standard error
(1% at G = 4096) and cuts the per-row cost from B weights to one hash.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

# Column names of the per-row quantities (the estimator library's input contract).
ROW_ID = "row_id"  # long: stable id of the row; keys the bootstrap weights
REWARD = "reward"  # observed reward r_i (click, purchase, rating>=4, ...)
PSCORE = "pscore"  # logging policy's probability of the logged action, pi_b(a_i | x_i)
PI_E = "pi_e"  # evaluation policy's probability of the logged action, pi_e(a_i | x_i)
Q_HAT = "q_hat"  # reward model at the logged action, q_hat(x_i, a_i)
Q_HAT_PI = "q_hat_pi"  # reward model averaged over the evaluation policy, sum_a pi_e(a|x_i) q_hat(x_i, a)

# -------------------------------------------------------------------- backends for term expressions


class NumpyOps:
    """Vectorised ops over numpy arrays (the local form)."""

    name = "numpy"

    @staticmethod
    def where(cond, a, b):
        return np.where(cond, a, b)

    @staticmethod
    def minimum(a, b):
        return np.minimum(a, b)

    @staticmethod
    def lit(x):
        return x


# A term is a function (ops, q) -> per-row value, where q maps "w", "r", "qf", "qpi" to arrays/Columns.
TermFn = Callable[[object, dict], object]


@dataclass(frozen=True)
class Term:
    """A named per-row quantity whose sample mean some estimator needs."""

    name: str
    fn: TermFn
    bootstrap: bool = True  # whether its replicate sums are needed


# -------------------------------------------------------------------- what one pass computes


@dataclass
class Plan:
    """Which statistics one pass must produce.

    ``policies``: policy name -> (pi_e column, q_hat_pi column). ``terms`` are
    namespaced ``"<policy>|<term>"``. ``pairs``: cross-products needed for covariances.
    """

    terms: dict = field(default_factory=dict)  # full name -> (policy, Term)
    pairs: set = field(default_factory=set)  # frozenset-like sorted tuples of full names
    maxima: dict = field(default_factory=dict)  # full name -> (policy, Term)
    policies: dict = field(default_factory=dict)
    n_boot: int = 0
    seed: int = 0
    boot_buckets: int = 0  # 0: a Poisson weight per row; G > 0: per hashed bucket of rows

    @property
    def boot_units(self) -> int:
        """Length of each replicate block in the statistics vector: B (per row) or G (buckets)."""
        return self.boot_buckets or self.n_boot

    def add_term(self, policy: str, term: Term) -> str:
        full = f"{policy}|{term.name}"
        if full in self.terms:
            prev = self.terms[full][1]
            if prev.bootstrap or not term.bootstrap:
                return full
        self.terms[full] = (policy, term)
        return full

    def add_pairs(self, names: Iterable[str]) -> None:
        names = sorted(set(names))
        for i, a in enumerate(names):
            for b in names[i:]:
                self.pairs.add((a, b))

    def add_max(self, policy: str, term: Term) -> str:
        full = f"{policy}|{term.name}"
        self.maxima[full] = (policy, term)
        return full


@dataclass
class Stats:
    """Sufficient statistics of one pass (sums, not means, so partial results add)."""

    n: float
    sums: dict
    cross: dict
    maxima: dict
    boot_n: Optional[np.ndarray] = None  # (B,) sum of weights per replicate
    boot_sums: Optional[dict] = None  # name -> (B,) replicate sums

    def mean(self, name: str) -> float:
        return self.sums[name] / self.n

    def cov(self, a: str, b: str) -> float:
        """Sample covariance (1/n normalisation, like np.var) of two terms.

        From raw sums, so that partial results add: exact to about 1e-16 of the terms' squared
        mean, which loses the variance only where a term's spread is below ~1e-7 of its mean (not
        the case for weighted clicks or revenue; the A/B test's moments are centred, see abtest)."""
        key = (a, b) if (a, b) in self.cross else (b, a)
        return self.cross[key] / self.n - self.mean(a) * self.mean(b)

    def boot_mean(self, name: str) -> np.ndarray:
        return self.boot_sums[name] / self.boot_n


# -------------------------------------------------------------------- Poisson weights (hash-based)

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_M64 = (1 << 64) - 1
SPARK_HASH_SEED = 42  # the seed Spark's xxhash64() starts from


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def xxhash64_long(values: np.ndarray, seed) -> np.ndarray:
    """Bit-exact numpy port of Spark's ``XXH64.hashLong(value, seed)`` (uint64 wrap-around)."""
    with np.errstate(over="ignore"):
        v = np.asarray(values).astype(np.int64).view(np.uint64)
        s = np.asarray(seed).astype(np.int64).view(np.uint64) if not isinstance(seed, np.ndarray) else seed
        h = s + np.uint64((_P5 + 8) & _M64)
        h = h ^ (_rotl(v * np.uint64(_P2), 31) * np.uint64(_P1))
        h = _rotl(h, 27) * np.uint64(_P1) + np.uint64(_P4)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(_P2)
        h = h ^ (h >> np.uint64(29))
        h = h * np.uint64(_P3)
        h = h ^ (h >> np.uint64(32))
    return h


def spark_xxhash64(*columns: np.ndarray) -> np.ndarray:
    """numpy equivalent of ``F.xxhash64(c1, c2, ...)`` for long columns (seed chained from 42)."""
    h = np.full(np.shape(columns[0]), np.uint64(SPARK_HASH_SEED), dtype=np.uint64)
    for c in columns:
        h = xxhash64_long(np.broadcast_to(c, h.shape), h)
    return h


def _poisson_thresholds() -> list[int]:
    """16-bit inverse-CDF thresholds: m = #{k : u >= T_k} is Poisson(1) (quantised, truncated at 8)."""
    cdf, p, out = 0.0, math.exp(-1.0), []
    for k in range(8):
        cdf += p
        p /= k + 1
        out.append(int(round(cdf * 65536)))
    return out


POISSON_T = _poisson_thresholds()


_POISSON_TABLE = np.searchsorted(np.asarray(POISSON_T), np.arange(65536), side="right").astype(np.float64)


def row_hash(row_id: np.ndarray, seed: int) -> np.ndarray:
    """Per-row key ``xxhash64(row_id, seed)`` (the first two links of the replicate hash chain)."""
    return spark_xxhash64(np.asarray(row_id, dtype=np.int64), np.int64(seed))


def poisson_weights_local(row_id: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n, B) Poisson(1) replicate weights; replicate b = 4g + j uses bits 16j..16j+15 of
    ``xxhash64(row_id, seed, g)`` - identical to :func:`poisson_weight_columns` in Spark."""
    h0 = row_hash(row_id, seed)
    n_groups = (n_boot + 3) // 4
    H = xxhash64_long(np.broadcast_to(np.arange(n_groups, dtype=np.int64)[None, :], (h0.shape[0], n_groups)),
                      np.ascontiguousarray(np.broadcast_to(h0[:, None], (h0.shape[0], n_groups))))
    # little-endian uint16 view: column 4g + j holds bits 16j..16j+15 of group g's hash
    U = np.ascontiguousarray(H).astype("<u8", copy=False).view("<u2").reshape(h0.shape[0], 4 * n_groups)
    return _POISSON_TABLE[U[:, :n_boot]]


def poisson_weight_columns(row_id_col: str, n_boot: int, seed: int) -> list:
    """B Spark Column expressions of Poisson(1) weights keyed by ``(row_id, seed, b)``."""
    from pyspark.sql import functions as F

    cols = []
    for g in range((n_boot + 3) // 4):
        h = F.xxhash64(F.col(row_id_col).cast("long"), F.lit(seed).cast("long"), F.lit(g).cast("long"))
        for j in range(4):
            b = 4 * g + j
            if b >= n_boot:
                break
            u = F.shiftrightunsigned(h, 16 * j).bitwiseAND(F.lit(0xFFFF))
            m = None
            for t in POISSON_T:
                ind = (u >= F.lit(t)).cast("int")
                m = ind if m is None else m + ind
            cols.append(m.cast("double"))
    return cols


# -------------------------------------------------------------------- the two backends


def _quantities(ops, get, policy_cols) -> dict:
    pi_e_col, qpi_col = policy_cols
    r, p, qf = get(REWARD), get(PSCORE), get(Q_HAT)
    return {"w": get(pi_e_col) / p, "r": r, "qf": qf, "qpi": get(qpi_col), "pi_e": get(pi_e_col), "p": p}


def _layout(plan: "Plan"):
    names = list(plan.terms)
    boot = [k for k in names if plan.terms[k][1].bootstrap] if plan.n_boot else []
    pairs = sorted(plan.pairs)
    n_sum = 1 + len(names) + len(pairs) + ((plan.boot_units if plan.n_boot else 0) * (1 + len(boot)))
    return names, boot, pairs, n_sum


def bucket_of(row_id: np.ndarray, n_buckets: int, seed: int) -> np.ndarray:
    """Bootstrap bucket of each row: ``pmod(xxhash64(row_id, seed, -1), G)``, Spark's expression
    bit for bit (a hash link no replicate uses)."""
    h = spark_xxhash64(np.asarray(row_id, dtype=np.int64), np.int64(seed), np.int64(-1))
    return h.view(np.int64) % np.int64(n_buckets)  # numpy's % of a positive modulus is pmod


def partial_stats(arr: dict, plan: "Plan") -> tuple[np.ndarray, np.ndarray]:
    """The one-pass kernel: additive sums and maxima of a chunk of rows, as two flat vectors.

    Layout of the sums: [n, sum per term, sum per cross-product pair, sum of weights per
    replicate, replicate sums per bootstrapped term (term-major)]; in the bucketed form the
    last two blocks are rows per bucket and term sums per bucket. Used as is by the local
    form and per Arrow batch inside the Spark pass (partials add up exactly).
    """
    names, boot, pairs, n_sum = _layout(plan)
    n = len(arr[REWARD])
    ops = NumpyOps
    get = lambda c: np.asarray(arr[c], dtype=np.float64)  # noqa: E731
    qs = {pol: _quantities(ops, get, cols) for pol, cols in plan.policies.items()}
    T = np.empty((n, len(names)), dtype=np.float64)
    for j, full in enumerate(names):
        pol, term = plan.terms[full]
        T[:, j] = term.fn(ops, qs[pol])
    pos = {k: j for j, k in enumerate(names)}
    G = T.T @ T
    out = [np.array([float(n)]), T.sum(axis=0), np.array([G[pos[a], pos[b]] for a, b in pairs])]
    if plan.n_boot and plan.boot_buckets:
        g, G = bucket_of(arr[ROW_ID], plan.boot_buckets, plan.seed), plan.boot_buckets
        out.append(np.bincount(g, minlength=G).astype(np.float64))
        out += [np.bincount(g, weights=T[:, pos[k]], minlength=G) for k in boot]
    elif plan.n_boot:
        M = poisson_weights_local(arr[ROW_ID], plan.n_boot, plan.seed)
        out.append(M.sum(axis=0))
        if boot:
            out.append((M.T @ T[:, [pos[k] for k in boot]]).T.ravel())
    sums = np.concatenate(out)
    assert sums.shape == (n_sum,)
    mx = np.array([float(np.max(t.fn(ops, qs[pol]))) if n else -np.inf for pol, t in plan.maxima.values()])
    return sums, mx


def stats_from_vectors(sums: np.ndarray, maxima: np.ndarray, plan: "Plan") -> "Stats":
    names, boot, pairs, n_sum = _layout(plan)
    i = 0
    n = float(sums[i]); i += 1
    s = {k: float(v) for k, v in zip(names, sums[i:i + len(names)])}; i += len(names)
    cross = {p: float(v) for p, v in zip(pairs, sums[i:i + len(pairs)])}; i += len(pairs)
    boot_n = boot_sums = None
    if plan.n_boot:
        U = plan.boot_units
        blocks = [np.asarray(sums[i + j * U:i + (j + 1) * U], dtype=float) for j in range(1 + len(boot))]
        if plan.boot_buckets:
            # (G, B) bucket weights, keyed by bucket id exactly as per-row weights are keyed by row id
            W = poisson_weights_local(np.arange(U, dtype=np.int64), plan.n_boot, plan.seed)
            blocks = [W.T @ b for b in blocks]
        boot_n = blocks[0]
        boot_sums = dict(zip(boot, blocks[1:]))
    mx = {k: float(v) for k, v in zip(plan.maxima, maxima)}
    return Stats(n, s, cross, mx, boot_n, boot_sums)


def _needed_columns(plan: "Plan") -> list[str]:
    cols = [ROW_ID, REWARD, PSCORE, Q_HAT]
    for pi_e, qpi in plan.policies.values():
        cols += [pi_e, qpi]
    return list(dict.fromkeys(cols))


def local_stats(data: dict, plan: "Plan", chunk_rows: int = 65536) -> "Stats":
    """Local form: the kernel over numpy arrays (in chunks, so B x rows stays bounded). Its
    inputs pass the same check as the engines' (:func:`check_inputs`) before any arithmetic."""
    check_inputs(data, _needed_columns(plan))
    arr = {c: np.asarray(data[c]) for c in _needed_columns(plan)}
    n = len(arr[REWARD])
    _, _, _, n_sum = _layout(plan)
    sums, mx = np.zeros(n_sum), np.full(len(plan.maxima), -np.inf)
    for a in range(0, max(n, 1), chunk_rows):
        chunk = {c: v[a:a + chunk_rows] for c, v in arr.items()}
        if len(chunk[REWARD]) == 0:
            break
        s, m = partial_stats(chunk, plan)
        sums += s
        mx = np.maximum(mx, m)
    return stats_from_vectors(sums, mx, plan)


def spark_stats(df, plan: "Plan", engine: str = "auto") -> "Stats":
    """Distributed form: ONE pass over ``df``, by one of two engines with the same statistics.

    * ``"sql"`` (:mod:`causalrec.estimators.sql_pass`): one Spark aggregation, compiled by
      whole-stage code generation and run inside the JVM - analytic statistics and the
      bucketed bootstrap. Fastest for narrow plans (a policy or two, no baseline).
    * ``"arrow"``: each task runs :func:`partial_stats` on its Arrow batches (per-row Poisson
      weights, or bucket sums, are made there from the row id; rows are never resampled or
      moved), and a Spark aggregation adds the partial vectors by position. The only engine
      for the exact per-row bootstrap (B weights per row), and faster for wide plans (many
      policies with a baseline: their cross-products are one matrix product here).
    * ``"auto"``: "sql" when :func:`causalrec.estimators.sql_pass.preferred` says it is faster.

    Only the statistics reach the driver.
    """
    from causalrec.estimators import sql_pass

    if engine not in ("auto", "sql", "arrow"):
        raise ValueError(f"estimator engine is {engine!r}; expected 'auto', 'sql' or 'arrow'")
    if engine == "sql" and not sql_pass.supports(plan):
        raise ValueError("the sql engine has no per-row Poisson bootstrap; set bootstrap buckets > 0 "
                         "or use engine 'arrow'")
    if engine == "sql" or (engine == "auto" and sql_pass.preferred(plan)):
        return sql_pass.sql_stats(df, plan)
    return arrow_stats(df, plan)


def arrow_stats(df, plan: "Plan") -> "Stats":
    """The ``"arrow"`` engine of :func:`spark_stats`: the vectorised kernel on every task's batches."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    cols = _needed_columns(plan)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"estimator input DataFrame lacks column(s) {missing}; it has {df.columns}")
    casted = df.select(*[F.col(c).cast("long" if c == ROW_ID else "double").alias(c) for c in cols])
    _, _, _, n_sum = _layout(plan)
    n_max = len(plan.maxima)

    def kernel(batches):
        sums, mx, seen = np.zeros(n_sum), np.full(n_max, -np.inf), False
        for b in batches:
            if b.num_rows == 0:
                continue
            d = {c: b.column(c).to_numpy(zero_copy_only=False) for c in cols}
            bad = first_unusable(d, cols)
            if bad:
                c, i = bad
                rid = d[ROW_ID][i]
                where = f"row_id {int(rid)}: {d[c][i]!r}" if c != ROW_ID else "row_id null"
                raise ValueError(f"estimator input: column {c!r} has a null/NaN/inf or out-of-range value "
                                 f"({where}); expected {expected_value(c)}")
            s, m = partial_stats(d, plan)
            sums += s
            mx = np.maximum(mx, m)
            seen = True
        if seen:
            idx = np.arange(n_sum + n_max, dtype=np.int32)
            yield pa.RecordBatch.from_arrays([pa.array(idx), pa.array(np.concatenate([sums, mx]))], ["idx", "val"])

    parts = casted.mapInArrow(kernel, "idx int, val double")
    rows = parts.groupBy("idx").agg(F.sum("val").alias("s"), F.max("val").alias("m")).collect()
    sums, mx = np.zeros(n_sum), np.full(n_max, -np.inf)
    for r in rows:
        if r["idx"] < n_sum:
            sums[r["idx"]] = r["s"]
        else:
            mx[r["idx"] - n_sum] = r["m"]
    return stats_from_vectors(sums, mx, plan)


# -------------------------------------------------------------------- results


@dataclass
class EstimateResult:
    """What every estimator reports for one policy (and, when paired, its difference to a baseline)."""

    policy: str
    estimator: str
    estimate: float
    std_err: float
    ci_low: float
    ci_high: float
    interval_method: str
    n: int
    ess: float = float("nan")
    max_weight: float = float("nan")
    boot_std_err: float = float("nan")
    boot_ci_low: float = float("nan")
    boot_ci_high: float = float("nan")
    hyperparam: Optional[float] = None
    diff_to_baseline: Optional[float] = None
    diff_std_err: Optional[float] = None
    diff_ci_low: Optional[float] = None
    diff_ci_high: Optional[float] = None
    diff_boot_ci_low: Optional[float] = None
    diff_boot_ci_high: Optional[float] = None
    boot_dropped: Optional[int] = None  # replicates without a value (0/0), left out of boot_*; None: no bootstrap
    diff_boot_dropped: Optional[int] = None  # the same for diff_boot_*

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def z_value(alpha: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2))


def expected_value(col: str) -> str:
    """What an input column must hold, as the engines' errors say it."""
    return "a number in (0, 1]" if col == PSCORE else "a non-null integer" if col == ROW_ID else "a number"


def first_unusable(data: dict, columns: Sequence[str]) -> Optional[tuple]:
    """``(column, index)`` of the first value no estimator can use, or None: a non-finite
    number (a null arrives as NaN, also in the row id: it keys the bootstrap weights), or a
    propensity outside (0, 1]. The one rule of the local form and of the Arrow kernel (the sql
    engine's SQL form: ``sql_pass._bad``)."""
    for c in columns:
        x = np.asarray(data[c], dtype=float)
        bad = ~np.isfinite(x)
        if c == PSCORE:
            bad |= (x <= 0) | (x > 1)
        if bad.any():
            return c, int(np.flatnonzero(bad)[0])
    return None


def check_inputs(data: dict, columns: Sequence[str]) -> None:
    """Clear errors for bad local input: missing column, non-finite values, pscore outside (0, 1]."""
    n = None
    for c in columns:
        if c not in data:
            raise ValueError(f"estimator input: column {c!r} is missing; expected one array per column {list(columns)}")
        a = np.asarray(data[c])
        if n is None:
            n = a.shape[0]
        if a.shape != (n,):
            raise ValueError(f"estimator input: column {c!r} has shape {a.shape}; expected ({n},)")
    bad = first_unusable(data, columns)
    if bad:
        c, i = bad
        v = np.asarray(data[c])[i]
        expected = "(0, 1]" if c == PSCORE and np.isfinite(v) else "a finite number"
        raise ValueError(f"estimator input: column {c!r} row {i} is {v!r}; expected {expected}")
