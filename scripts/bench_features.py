"""Benchmark: events/s per core for the feature + propensity jobs, and the same aggregation in DuckDB.

    python scripts/bench_features.py --sizes 1000000 10000000 50000000 [--cores N]

For each size: generate events as parquet (the simulator when it is built, else a
Zipf-popularity generator in Spark), then time (a) the user + item feature tables
(:func:`causalrec.features.job.build_features`) and the popularity exposure propensity
on every observed pair, in Spark, written to parquet; (b) the same per-user and
per-item aggregations written as SQL in DuckDB on the same parquet files. Results go
to bench_results/bench_features.json (events/s per core, scaling between sizes,
Spark/DuckDB ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def generate(spark, n_events: int, out: str, n_users: int, n_items: int, seed: int = 7, generator: str = "auto") -> str:
    """The simulator's events (``simulator``), or a fast Zipf generator (``zipf``): power-law item
    popularity (hot items included), uniform users, 30 days of timestamps. Returns the one used."""
    from pyspark.sql import functions as F

    try:
        from causalrec.simulator import simulate  # noqa: F401
        have_sim = True
    except ImportError:
        have_sim = False
    if generator == "simulator" and not have_sim:
        raise SystemExit("--generator simulator: causalrec.simulator is not available")
    if generator in ("auto", "simulator") and have_sim:
        from causalrec.config import Config
        from causalrec.simulator import simulate

        sc = Config().simulator
        sc.n_events, sc.n_users, sc.n_items = n_events, n_users, n_items
        t = simulate(spark, sc, seed)
        t["events"].write.mode("overwrite").parquet(out + "/events")
        t["items"].write.mode("overwrite").parquet(out + "/items")
        t["users"].write.mode("overwrite").parquet(out + "/users")
        return "simulator"
    parts = max(8, n_events // 2_000_000)
    u = F.rand(seed)
    df = spark.range(0, n_events, numPartitions=parts)
    df = df.select(
        F.concat(F.lit("e"), F.col("id").cast("string")).alias("event_id"),
        F.concat(F.lit("u"), F.floor(F.rand(seed + 1) * n_users).cast("string")).alias("user_id"),
        # item = floor(n * U^3): item k is drawn with probability ~ k^(-2/3) (a power law with hot head items)
        F.concat(F.lit("i"), F.least(F.floor(F.pow(u, F.lit(3.0)) * n_items), F.lit(n_items - 1)).cast("string")).alias("item_id"),
        (F.lit(1_704_067_200) + F.floor(F.rand(seed + 2) * 30 * 86400)).cast("timestamp").alias("event_time"),
        F.when(F.rand(seed + 3) < 0.8, "impression").when(F.rand(seed + 4) < 0.9, "click").otherwise("purchase").alias("event_type"),
        (F.rand(seed + 5) < 0.05).cast("double").alias("value"),
    ).withColumn("event_date", F.to_date("event_time"))
    df.write.mode("overwrite").parquet(out + "/events")
    items = spark.range(0, n_items).select(
        F.concat(F.lit("i"), F.col("id").cast("string")).alias("item_id"),
        F.array(F.concat(F.lit("color:"), (F.col("id") % 7).cast("string"))).alias("attributes"),
        F.concat(F.lit("c"), (F.col("id") % 13).cast("string")).alias("category"),
        F.concat(F.lit("item "), F.col("id").cast("string")).alias("text"),
        F.lit(None).cast("double").alias("price"))
    items.write.mode("overwrite").parquet(out + "/items")
    users = spark.range(0, n_users).select(
        F.concat(F.lit("u"), F.col("id").cast("string")).alias("user_id"),
        F.array(F.concat(F.lit("g:"), (F.col("id") % 2).cast("string"))).alias("attributes"),
        F.lit(None).cast("string").alias("text"), F.lit(None).cast("string").alias("segment"))
    users.write.mode("overwrite").parquet(out + "/users")
    return "zipf"


def spark_run(spark, cfg, root: str) -> float:
    from pyspark.sql import functions as F

    from causalrec.features.job import build_features
    from causalrec.propensity.exposure import PopularityExposure, Universe

    t0 = time.perf_counter()
    events = spark.read.parquet(root + "/events")
    users = spark.read.parquet(root + "/users")
    items = spark.read.parquet(root + "/items")
    ft = build_features(events, users, items, cfg, cutoff="2024-02-01T00:00:00")
    ft.users.write.mode("overwrite").parquet(root + "/out_user_features")
    ft.items.write.mode("overwrite").parquet(root + "/out_item_features")
    obs = events.where("event_type != 'impression' or value > 0").groupBy("user_id", "item_id").agg(
        F.count(F.lit(1)).alias("n")).withColumn("observed", F.lit(1))
    n_obs = obs.count()
    est = PopularityExposure(power=0.5).fit(obs, Universe(users.count(), items.count(), n_obs))
    est.predict(obs).write.mode("overwrite").parquet(root + "/out_exposure")
    return time.perf_counter() - t0


DUCK_SQL = """
COPY (
  SELECT user_id, count(*) n_events,
    {user_counts},
    sum(CASE WHEN event_type='rating' THEN 1 ELSE 0 END) n_rated,
    avg(CASE WHEN event_type='rating' THEN value END) rating_mean,
    var_pop(CASE WHEN event_type='rating' THEN value END) rating_var,
    approx_count_distinct(item_id) n_distinct_items, max(event_time) last_event_time
  FROM read_parquet('{root}/events/*.parquet') WHERE event_time < TIMESTAMP '2024-02-01'
  GROUP BY user_id) TO '{root}/duck_user.parquet' (FORMAT parquet);
COPY (
  SELECT item_id, count(*) n_exposures,
    sum(CASE WHEN event_type<>'impression' OR value>0 THEN 1 ELSE 0 END) n_interactions,
    sum(CASE WHEN event_type='click' THEN 1 WHEN event_type='impression' THEN coalesce(value,0) ELSE 0 END) n_clicks,
    sum(CASE WHEN event_type='purchase' THEN 1 ELSE 0 END) n_purchases,
    approx_count_distinct(user_id) n_users,
    {item_counts}
  FROM read_parquet('{root}/events/*.parquet') WHERE event_time < TIMESTAMP '2024-02-01'
  GROUP BY item_id) TO '{root}/duck_item.parquet' (FORMAT parquet);
COPY (
  SELECT * FROM (
    SELECT user_id, item_id, row_number() OVER (PARTITION BY user_id ORDER BY event_time DESC, event_id DESC) rn
    FROM read_parquet('{root}/events/*.parquet')
    WHERE event_time < TIMESTAMP '2024-02-01' AND (event_type<>'impression' OR value>0)) WHERE rn <= {hist}
  ) TO '{root}/duck_hist.parquet' (FORMAT parquet);
"""


def duck_run(root: str, cfg, threads: int) -> float:
    import duckdb

    types = cfg.data.event_types
    wins = cfg.features.windows_days
    cut = "TIMESTAMP '2024-02-01'"
    uc = [f"sum(CASE WHEN event_type='{t}' THEN 1 ELSE 0 END) n_{t}" for t in types]
    uc += [f"sum(CASE WHEN event_type='{t}' AND event_time >= {cut} - INTERVAL {w} DAY THEN 1 ELSE 0 END) n_{t}_{w}d"
           for t in types for w in wins]
    ic = [f"sum(CASE WHEN event_time >= {cut} - INTERVAL {w} DAY THEN 1 ELSE 0 END) n_exposures_{w}d" for w in wins]
    con = duckdb.connect()
    con.execute(f"SET threads={threads}")
    t0 = time.perf_counter()
    con.execute(DUCK_SQL.format(root=root, user_counts=",\n".join(uc), item_counts=",\n".join(ic),
                                hist=cfg.features.history_length))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default="/tmp/causalrec_bench_features")
    ap.add_argument("--out", default=str(REPO / "bench_results" / "bench_features.json"))
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--keep", action="store_true", help="keep the generated parquet")
    ap.add_argument("--generator", choices=["auto", "simulator", "zipf"], default="auto",
                    help="auto = the simulator when it is built, else zipf")
    args = ap.parse_args(argv)

    from causalrec.config import Config
    from causalrec.sessions import get_spark

    cfg = Config()
    cfg.spark.master = f"local[{args.cores}]"
    cfg.spark.driver_memory = args.driver_memory
    cfg.spark.shuffle_partitions = max(2 * args.cores, 8)
    cfg.spark.conf = {"spark.ui.showConsoleProgress": "false"}
    spark = get_spark(cfg)
    spark.sparkContext.setLogLevel("ERROR")
    results = []
    for n in args.sizes:
        root = f"{args.work}/n{n}"
        n_users, n_items = max(1000, n // 50), max(500, min(200_000, n // 200))
        t0 = time.perf_counter()
        gen = generate(spark, n, root, n_users, n_items, generator=args.generator)
        gen_s = time.perf_counter() - t0
        s = spark_run(spark, cfg, root)
        d = duck_run(root, cfg, args.cores)
        r = {"generator": gen, "events": n, "users": n_users, "items": n_items, "cores": args.cores, "generate_s": round(gen_s, 2),
             "spark_s": round(s, 2), "duckdb_s": round(d, 2),
             "spark_events_per_s_per_core": round(n / s / args.cores), "duckdb_events_per_s_per_core": round(n / d / args.cores),
             "spark_over_duckdb": round(s / d, 2)}
        results.append(r)
        print(json.dumps(r), flush=True)
        write_report(args.out, spark.version, results, partial=n != args.sizes[-1])
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    write_report(args.out, spark.version, results, partial=False)
    return 0


def write_report(out: str, spark_version: str, results: list, partial: bool) -> dict:
    """Written after every size, so a long run that is stopped still leaves its measured sizes."""
    scaling = []
    for a, b in zip(results, results[1:]):
        scaling.append({"from": a["events"], "to": b["events"], "events_x": b["events"] / a["events"],
                        "spark_time_x": round(b["spark_s"] / a["spark_s"], 2), "duckdb_time_x": round(b["duckdb_s"] / a["duckdb_s"], 2)})
    report = {"benchmark": "features+propensity", "spark_version": spark_version, "partial": partial,
              "load_average_at_end": os.getloadavg()[0], "results": results, "scaling": scaling,
              "targets": {"events_per_s_per_core_at_50M": 1_000_000, "time_x_for_10x_events": 11, "spark_over_duckdb_per_core": 2}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    return report
    return 0


if __name__ == "__main__":
    sys.exit(main())
