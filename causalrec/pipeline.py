"""Run the whole pipeline: skip stages whose outputs are up to date, resume after a failure.

A stage is up to date when its last successful run used the same config sections
and the same versions of its input tables as now, and its outputs still exist.
That one rule gives both behaviours users expect: a second ``causalrec run`` is
quick, and after a crash the rerun starts at the first stage that did not finish
(everything before it is up to date). Run records go to the ``_pipeline_runs``
Delta table (written with delta-rs on the driver, so the report stage needs no Spark).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Optional

from causalrec.context import Context
from causalrec.stages import PIPELINE, Stage, StageNotBuilt

log = logging.getLogger("causalrec.pipeline")

RUNS_TABLE = "_pipeline_runs"

# Config sections each stage depends on (project.seed always counts).
STAGE_SECTIONS = {
    "ingest": ("data", "simulator"),
    "features": ("features",),
    "propensity": ("propensity", "causal_graph"),
    "training_set": ("training_set",),
    "train": ("train",),
    "candidates": ("candidates",),
    "score": ("scoring",),
    "recommend": ("ranking",),
    "ope": ("ope",),
    "evaluate": ("evaluation",),
    "report": ("evaluation",),
}


def _table_version(ctx: Context, name: str) -> Optional[int]:
    from deltalake import DeltaTable

    path = ctx.cfg.table_path(name)
    if not DeltaTable.is_deltatable(path):
        return None
    return DeltaTable(path).version()


def fingerprint(ctx: Context, stage: Stage) -> tuple[str, dict]:
    cfg = ctx.cfg.to_dict()
    sections = {s: cfg[s] for s in STAGE_SECTIONS.get(stage.name, ())}
    sections["seed"] = cfg["project"]["seed"]
    inputs = {name: _table_version(ctx, name) for name in stage.inputs}
    blob = json.dumps({"config": sections, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], inputs


def _runs(ctx: Context) -> list[dict]:
    from deltalake import DeltaTable

    path = ctx.cfg.table_path(RUNS_TABLE)
    if not DeltaTable.is_deltatable(path):
        return []
    return DeltaTable(path).to_pyarrow_table().to_pylist()


def _record(ctx: Context, stage: Stage, fp: str, status: str, started: float, summary: dict, inputs: dict) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    row = {
        "stage": stage.name,
        "fingerprint": fp,
        "status": status,
        "started_at": datetime.fromtimestamp(started, tz=timezone.utc),
        "finished_at": datetime.now(tz=timezone.utc),
        "seconds": round(time.time() - started, 2),
        "input_versions": json.dumps(inputs, sort_keys=True),
        "output_versions": json.dumps({o: _table_version(ctx, o) for o in stage.outputs}, sort_keys=True),
        "summary": json.dumps(summary, default=str)[:100_000],
    }
    schema = pa.schema([
        ("stage", pa.string()), ("fingerprint", pa.string()), ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seconds", pa.float64()), ("input_versions", pa.string()), ("output_versions", pa.string()),
        ("summary", pa.string()),
    ])
    write_deltalake(ctx.cfg.table_path(RUNS_TABLE), pa.Table.from_pylist([row], schema=schema), mode="append")


def _outputs_exist(ctx: Context, stage: Stage, last_summary: dict) -> bool:
    import os

    if any(_table_version(ctx, o) is None for o in stage.outputs):
        return False
    report = last_summary.get("report_path")
    return not report or os.path.exists(report)


def stage_state(ctx: Context, stage: Stage, runs: list[dict]) -> tuple[str, str, dict]:
    """('up to date' | 'stale' | 'never run' | 'failed', fingerprint, last summary)."""
    fp, _ = fingerprint(ctx, stage)
    mine = [r for r in runs if r["stage"] == stage.name]
    if not mine:
        return "never run", fp, {}
    last = max(mine, key=lambda r: r["finished_at"])
    summary = json.loads(last["summary"] or "{}")
    if last["status"] != "success":
        return "failed", fp, summary
    ok = [r for r in mine if r["status"] == "success" and r["fingerprint"] == fp]
    if ok and _outputs_exist(ctx, stage, summary):
        return "up to date", fp, json.loads(max(ok, key=lambda r: r["finished_at"])["summary"] or "{}")
    return "stale", fp, summary


def pipeline_status(ctx: Context) -> dict:
    runs = _runs(ctx)
    out = {}
    for stage in PIPELINE:
        try:
            stage.load()
            state = stage_state(ctx, stage, runs)[0]
        except StageNotBuilt:
            state = "not built yet"
        out[stage.name] = state
        print(f"{stage.name:14s} {state}")
    return {"stages": out}


def run_pipeline(ctx: Context, from_stage: Optional[str] = None, until_stage: Optional[str] = None) -> dict:
    from causalrec.cli import run_stage

    names = [s.name for s in PIPELINE]
    force_from = names.index(from_stage) if from_stage else (0 if ctx.force else len(names))
    stop_at = names.index(until_stage) if until_stage else len(names) - 1
    t_start = time.time()
    results = {}
    missing = []
    runs = _runs(ctx)
    for i, stage in enumerate(PIPELINE[: stop_at + 1]):
        try:
            stage.load()
        except StageNotBuilt as exc:
            log.warning("stage %s: %s", stage.name, exc)
            missing.append(stage.name)
            results[stage.name] = {"status": "not built yet"}
            continue
        state, fp, last = stage_state(ctx, stage, runs)
        if state == "up to date" and i < force_from:
            log.info("stage %-13s up to date, skipped (use --force or --from %s to rerun)", stage.name, stage.name)
            results[stage.name] = {"status": "skipped (up to date)", **_brief(last)}
            continue
        _, inputs = fingerprint(ctx, stage)
        started = time.time()
        log.info("=" * 20 + " stage %d/%d: %s " + "=" * 20, i + 1, len(PIPELINE), stage.name)
        try:
            summary = run_stage(ctx, stage.name)
        except Exception as exc:
            _record(ctx, stage, fp, "failed", started, {"error": str(exc)[:2000]}, inputs)
            log.error("stage %s failed after %.1fs; rerun `causalrec run` to resume from here",
                      stage.name, time.time() - started)
            raise
        finally:
            _release_ray()
        # fingerprint again: a stage may legitimately bump its own inputs' versions (e.g. ingest)
        fp_after, inputs_after = fingerprint(ctx, stage)
        _record(ctx, stage, fp_after, "success", started, summary, inputs_after)
        runs = _runs(ctx)
        results[stage.name] = {"status": "ran", **_brief(summary)}
    total = round(time.time() - t_start, 1)
    report_path = next((r.get("report_path") for r in results.values() if r.get("report_path")), None)
    print("\ncausalrec pipeline summary")
    for name, r in results.items():
        print(f"  {name:14s} {r['status']:22s} {r.get('seconds', '')}")
    if missing:
        print(f"  stages not built yet: {', '.join(missing)}")
    print(f"  total {total}s")
    if report_path:
        print(f"\nreport: {report_path}")
    return {"stages": results, "total_seconds": total, "report_path": report_path, "missing_stages": missing}


def _release_ray() -> None:
    """Shut down a local Ray a stage started, so the next Ray stage starts after Spark's JVM.

    Starting the JVM in a process that already holds a Ray driver connection breaks that
    connection's gRPC channel (driver calls then hang); Ray started after the JVM is fine.
    """
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _brief(summary: dict) -> dict:
    keep = {}
    for k in ("seconds", "report_path", "rows_out", "rows", "model_version"):
        if k in summary:
            keep[k] = summary[k]
    return keep
