"""Benchmark: every OPE estimator with analytic intervals and a B=200 Poisson bootstrap, in one
pass over N simulated logged rows, against a plain Spark mean of the reward over the same rows.

    .venv/bin/python scripts/bench_ope.py --rows 10000000 [--boot 200] [--buckets 4096] [--per-row-boot] [--arrow]

The rows are generated once with Spark (seeded), written to Parquet, and every timing reads
that same Parquet (warm: each job is run once untimed first, then the jobs are timed in turn,
--repeat rounds, and each one's median is reported). Timed: the plain mean of the reward (the
target's yardstick), a plain Spark sum of each of the 5 numeric input columns (the I/O floor
of any one-pass estimator over these columns), the estimators on the default "sql" engine,
and optionally the "arrow" kernel engine and the exact per-row bootstrap.
Writes bench_results/bench_ope.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def simulate_rows(spark, n: int, partitions: int, seed: int = 7, n_actions: int = 10, n_policies: int = 1):
    """A logged contextual bandit: row_id, reward, pscore, pi_e, q_hat, q_hat_pi, and for each extra
    evaluation policy k >= 1 its own pi_e_k and q_hat_pi_k."""
    from pyspark.sql import functions as F

    df = spark.range(0, n, numPartitions=partitions).withColumnRenamed("id", "row_id")
    u1, u2, u3, u4 = (F.rand(seed + k) for k in range(4))
    # logging propensity of the logged action in [0.02, 0.5]; evaluation probability in [0, 1]
    df = df.select("row_id", (0.02 + 0.48 * u1).alias("pscore"), u2.alias("pi_e"), (0.05 + 0.5 * u3).alias("q_true"), u4.alias("u"))
    extra = []
    for k in range(1, n_policies):
        extra += [F.rand(seed + 10 + k).alias(f"pi_e_{k}"), (F.col("q_true") * (0.4 + 0.05 * k) + 0.1).alias(f"q_hat_pi_{k}")]
    return df.select(
        "row_id", "pscore", "pi_e",
        (F.col("u") < F.col("q_true")).cast("double").alias("reward"),
        (F.col("q_true") * 0.9 + 0.02).alias("q_hat"),
        (F.col("q_true") * 0.5 + 0.1).alias("q_hat_pi"),
        *extra,
    )


def arrow_transfer_floor(df, cols: list[str]) -> float:
    """The estimator pass's floor: the same columns moved through Arrow into Python, nothing computed."""
    import numpy as np
    import pyarrow as pa
    from pyspark.sql import functions as F

    def touch(batches):
        s = 0.0
        for b in batches:
            s += float(np.sum(b.column(cols[0]).to_numpy(zero_copy_only=False)))
        yield pa.RecordBatch.from_arrays([pa.array([s])], ["s"])

    return df.select(*cols).mapInArrow(touch, "s double").agg(F.sum("s")).collect()[0][0]


def timed_rounds(jobs: dict, repeat: int) -> tuple[dict, dict]:
    """Median seconds per job; one untimed warm-up each (JIT, file listing, Python workers), then
    ``repeat`` rounds that run every job in turn, so drifting machine load hits all of them alike."""
    out = {k: fn() for k, fn in jobs.items()}
    ts = {k: [] for k in jobs}
    for _ in range(repeat):
        for k, fn in jobs.items():
            t0 = time.perf_counter()
            out[k] = fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=max(2, (os.cpu_count() or 2) * 2))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--buckets", type=int, default=4096, help="bootstrap buckets (ope.bootstrap_buckets)")
    ap.add_argument("--per-row-boot", action="store_true",
                    help="also time the exact per-row Poisson bootstrap (B weights per row; slow at 10M+)")
    ap.add_argument("--arrow", action="store_true", help="also time the Arrow-kernel engine (engine='arrow')")
    ap.add_argument("--policies", type=int, default=1,
                    help="> 1: also time both engines on this many policies with a baseline (strategy comparison)")
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--out", default=str(REPO / "bench_results" / "bench_ope.json"))
    args = ap.parse_args(argv)

    from pyspark.sql import functions as F

    from causalrec.config import Config
    from causalrec.estimators import ESTIMATORS, evaluate, make_estimators
    from causalrec.sessions import get_spark

    cfg = Config()
    cfg.spark.driver_memory = args.driver_memory
    cfg.spark.shuffle_partitions = args.partitions
    cfg.spark.conf = {"spark.ui.showConsoleProgress": "false"}
    spark = get_spark(cfg)
    spark.sparkContext.setLogLevel("ERROR")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ope_"))
    try:
        t0 = time.perf_counter()
        simulate_rows(spark, args.rows, args.partitions, n_policies=args.policies).write.parquet(str(tmp / "rows"))
        gen_s = time.perf_counter() - t0
        df = spark.read.parquet(str(tmp / "rows"))
        est = make_estimators(list(ESTIMATORS))
        cols = ["row_id", "reward", "pscore", "q_hat", "pi_e", "q_hat_pi"]
        jobs = {
            "mean": lambda: df.agg(F.avg("reward")).collect()[0][0],
            "input_sums": lambda: df.agg(*[F.sum(c) for c in cols[1:]]).collect(),
            "analytic": lambda: evaluate(df, est, n_boot=0),
            "full": lambda: evaluate(df, est, n_boot=args.boot, seed=1, boot_buckets=args.buckets),
        }
        if args.arrow:
            jobs["floor"] = lambda: arrow_transfer_floor(df, cols)
            jobs["arrow_analytic"] = lambda: evaluate(df, est, n_boot=0, engine="arrow")
            jobs["arrow_full"] = lambda: evaluate(df, est, n_boot=args.boot, seed=1, boot_buckets=args.buckets,
                                                  engine="arrow")
        if args.per_row_boot:
            jobs["per_row"] = lambda: evaluate(df, est, n_boot=args.boot, seed=1)
        pols = {"p0": ("pi_e", "q_hat_pi"), **{f"p{k}": (f"pi_e_{k}", f"q_hat_pi_{k}") for k in range(1, args.policies)}}
        if args.policies > 1:
            for eng in ("sql", "arrow", "auto"):
                jobs[f"wide_{eng}_analytic"] = partial(evaluate, df, est, pols, baseline="p0", engine=eng)
                jobs[f"wide_{eng}_full"] = partial(evaluate, df, est, pols, baseline="p0", n_boot=args.boot, seed=1,
                                                   boot_buckets=args.buckets, engine=eng)
        t, res = timed_rounds(jobs, args.repeat)
        mean_s, full_s, an_s = t["mean"], t["full"], t["analytic"]
        mean_v = res["mean"]
        res = res["full"]

        def ratio(k):
            return round(t[k] / mean_s, 2) if k in t else None

        def sec(k):
            return round(t[k], 3) if k in t else None

        out = {
            "rows": args.rows, "bootstrap_replicates": args.boot, "partitions": args.partitions,
            "cpu_count": os.cpu_count(), "spark_master": spark.sparkContext.master, "repeat": args.repeat,
            "generate_and_write_s": round(gen_s, 2),
            "plain_mean_reward_s": round(mean_s, 3),
            "input_columns_sum_s": sec("input_sums"),
            "ratio_input_columns_sum_vs_mean": ratio("input_sums"),
            "engine": "sql",
            "all_estimators_analytic_s": round(an_s, 3),
            "bootstrap_buckets": args.buckets,
            "all_estimators_analytic_plus_bootstrap_s": round(full_s, 3),
            "ratio_analytic_vs_mean": ratio("analytic"),
            "ratio_full_vs_mean": ratio("full"),
            "ratio_analytic_vs_input_columns_sum": round(an_s / t["input_sums"], 2),
            "ratio_full_vs_input_columns_sum": round(full_s / t["input_sums"], 2),
            "arrow_transfer_floor_s": sec("floor"),
            "arrow_engine_analytic_s": sec("arrow_analytic"),
            "arrow_engine_analytic_plus_bootstrap_s": sec("arrow_full"),
            "ratio_arrow_engine_full_vs_mean": ratio("arrow_full"),
            "all_estimators_analytic_plus_per_row_bootstrap_s": sec("per_row"),
            "ratio_per_row_bootstrap_vs_mean": ratio("per_row"),
            "multi_policy": None if args.policies == 1 else {
                "policies": args.policies, "baseline": "p0",
                **{f"{eng}_{kind}_s": sec(f"wide_{eng}_{kind}") for eng in ("sql", "arrow", "auto")
                   for kind in ("analytic", "full")}},
            "target_ratio": 2.0,
            "mean_reward": mean_v,
            "results": [
                {k: getattr(r, k) for k in ("estimator", "estimate", "std_err", "ci_low", "ci_high", "boot_std_err",
                                            "boot_ci_low", "boot_ci_high", "ess", "max_weight", "hyperparam")}
                for r in res
            ],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2))
    return out


if __name__ == "__main__":
    main()
