"""Benchmark: simulate + validated ingest at growing scale; is time linear in events?

Runs the ``simulate`` stage (generate users, items, candidate pairs with ground truth,
logged and MCAR events in Spark, then validate and write every table to Delta) for
each size and reports events/s and the time ratio between consecutive sizes
(target: 10x events -> <= 11x time).

    python scripts/bench_ingest.py --sizes 1000000,10000000 --out bench_results/bench_ingest.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_size(n_events: int, root: str, args) -> dict:
    from causalrec.config import Config
    from causalrec.context import Context
    from causalrec.simulator import run

    cfg = Config()
    cfg.storage.root = root
    cfg.spark.driver_memory = args.driver_memory
    cfg.spark.shuffle_partitions = args.partitions
    cfg.spark.conf = {"spark.ui.showConsoleProgress": "false"}
    sc = cfg.simulator
    sc.n_events = n_events
    sc.n_users = max(1000, n_events // 50)
    sc.n_items = args.items
    sc.partitions = args.partitions
    ctx = Context(cfg=cfg)
    _ = ctx.spark  # session start is not part of the measurement
    t0 = time.perf_counter()
    summary = run(ctx)
    dt = time.perf_counter() - t0
    ev = summary["tables"]["events"]
    return {
        "target_events": n_events,
        "events_written": ev["rows_accepted"],
        "events_quarantined": ev["rows_quarantined"],
        "mcar_events": summary["tables"]["mcar_events"]["rows_accepted"],
        "ground_truth_rows": summary["tables"]["ground_truth"]["rows"],
        "seconds": round(dt, 2),
        "events_per_s": round(ev["rows_read"] / dt, 1),
        "step_seconds": summary.get("timings_s", {}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated event counts")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--root", default=None, help="scratch folder for the tables (default: a temp folder)")
    p.add_argument("--out", default="bench_results/bench_ingest.json")
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    results = []
    for n in sizes:
        root = tempfile.mkdtemp(prefix=f"bench_ingest_{n}_", dir=args.root)
        try:
            r = run_size(n, root, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(r), flush=True)
        results.append(r)
    ratios = []
    for a, b in zip(results, results[1:]):
        ratios.append({
            "from_events": a["target_events"], "to_events": b["target_events"],
            "events_ratio": round(b["events_written"] / max(a["events_written"], 1), 2),
            "time_ratio": round(b["seconds"] / a["seconds"], 2),
        })
    out = {
        "benchmark": "simulate + validated ingest into Delta (causalrec simulate stage)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "results": results,
        "scaling": ratios,
        "target": "10x events -> <= 11x time",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["scaling"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
