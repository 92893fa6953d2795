"""Benchmark the offline Delta write path against Spark's own parquet writer.

Same cached events-like DataFrame, same partitioning (by event_date), same
compression (snappy). Reports rows/s for writes and full-scan reads, best of
``--repeat`` warm runs, and the Delta/parquet write ratio (target >= 0.9).

    .venv/bin/python scripts/bench_delta.py --rows 1000000 10000000 --out bench_results/bench_delta.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def events_like(spark, n: int, partitions: int):
    from pyspark.sql import functions as F

    df = spark.range(0, n, numPartitions=partitions)
    return df.select(
        F.concat(F.lit("e"), F.col("id").cast("string")).alias("event_id"),
        F.concat(F.lit("u"), (F.hash("id") % 100000).cast("string")).alias("user_id"),
        F.concat(F.lit("i"), (F.abs(F.hash(F.col("id") * 7)) % 5000).cast("string")).alias("item_id"),
        (F.lit(1_700_000_000) + F.col("id") % (30 * 86400)).cast("timestamp").alias("event_time"),
        F.date_add(F.lit("2023-11-14").cast("date"), (F.col("id") % (30 * 86400) / 86400).cast("int")).alias("event_date"),
        F.element_at(F.array(F.lit("impression"), F.lit("click"), F.lit("purchase")), (F.col("id") % 3 + 1).cast("int")).alias("event_type"),
        (F.rand(1) * 5).alias("value"),
        (F.col("id") % 3 + 1).cast("int").alias("position"),
        (F.col("id") % 2 == 0).alias("recommended"),
        (F.rand(2) * 0.9 + 0.05).alias("logged_propensity"),
        F.lit("random").alias("policy"),
        F.lit('{"campaign":"all"}').alias("context"),
        F.lit("bench").alias("ingest_batch"),
    )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--out", default="bench_results/bench_delta.json")
    args = ap.parse_args()

    from pyspark.sql import functions as F

    from causalrec.config import Config
    from causalrec.sessions import get_spark
    from causalrec.storage import DeltaStore

    cfg = Config()
    cfg.spark.driver_memory = "8g"
    cfg.spark.conf = {"spark.ui.showConsoleProgress": "false"}
    spark = get_spark(cfg)
    spark.sparkContext.setLogLevel("ERROR")
    root = tempfile.mkdtemp(prefix="bench_delta_")
    store = DeltaStore(spark, root)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
               "backend": store.backend, "partition_by": "event_date", "runs": []}

    # warm-up: JVM, Python workers, the data source
    warm = events_like(spark, 200_000, args.partitions).cache()
    warm.count()
    store.write(warm, "warm", partition_by=["event_date"])
    warm.write.mode("overwrite").partitionBy("event_date").parquet(os.path.join(root, "warm_pq"))
    warm.unpersist()

    for n in args.rows:
        df = events_like(spark, n, args.partitions).cache()
        df.count()
        delta_w, pq_w, delta_r, pq_r = [], [], [], []
        for r in range(args.repeat):
            dpath, ppath = f"delta_{n}_{r}", os.path.join(root, f"pq_{n}_{r}")
            delta_w.append(timed(lambda: store.write(df, dpath, "overwrite", partition_by=["event_date"])))
            pq_w.append(timed(lambda: df.write.mode("overwrite").partitionBy("event_date")
                              .option("compression", "snappy").parquet(ppath)))
            cols = [F.col(c) for c in df.columns]
            delta_r.append(timed(lambda: store.read(dpath).select(F.sum(F.hash(*cols))).collect()))
            pq_r.append(timed(lambda: spark.read.parquet(ppath).select(F.sum(F.hash(*cols))).collect()))
            assert store.row_count(dpath) == n
        df.unpersist()
        run = {
            "rows": n,
            "delta_write_rows_per_s": round(n / min(delta_w)),
            "parquet_write_rows_per_s": round(n / min(pq_w)),
            "delta_to_parquet_write_ratio": round(min(pq_w) / min(delta_w), 3),
            "delta_read_rows_per_s": round(n / min(delta_r)),
            "parquet_read_rows_per_s": round(n / min(pq_r)),
            "seconds": {"delta_write": delta_w, "parquet_write": pq_w, "delta_read": delta_r, "parquet_read": pq_r},
        }
        print(json.dumps(run))
        results["runs"].append(run)
    results["target"] = "delta write >= 0.9 x parquet write throughput (warm)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
