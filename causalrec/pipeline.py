"""Run the whole pipeline: skip stages whose outputs are up to date, resume after a failure.

A stage is up to date when its latest successful run used the same config sections
and the same versions of its input tables (and, for ingest, the same input files) as
now, and its outputs are still at the versions that run left them at. A table's version
is recorded with the table's Delta id (a table deleted and written again starts at
version 0 again, with another id), and the inputs recorded are those taken before the
stage ran (an input rewritten while it ran makes it stale, not up to date).
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

from causalrec.config import SPLIT_SETTINGS
from causalrec.context import Context
from causalrec.stages import PIPELINE, Stage, StageNotBuilt

log = logging.getLogger("causalrec.pipeline")

RUNS_TABLE = "_pipeline_runs"

# Config each stage's output depends on: a whole section, or "section.key" for a key a stage
# reads from another stage's section (project.seed always counts). Keep this complete: a
# missing entry lets a stage be skipped with stale output (tests/test_pipeline_state.py
# scans the stage modules' ``cfg.<section>[.<key>]`` reads against it).
STAGE_SECTIONS = {
    "ingest": ("data", "simulator"),
    "features": ("features", "data.event_types"),
    # the split settings (the time split's cutoff and the held-out pairs come from training_set.assign_splits),
    # not files_per_split, which only shards the training set's files; features: the feature tables
    # rebuilt at that cutoff
    "propensity": ("propensity", "causal_graph", *(f"training_set.{k}" for k in SPLIT_SETTINGS),
                   "training_set.unobserved_per_observed", "features", "data.event_types"),
    "training_set": ("training_set", "features", "data.event_types", "propensity.clip_min"),
    "train": ("train", "features.history_length"),
    # features.cutoff: the point in time when no feature tables are stored
    "candidates": ("candidates", "training_set.positive_threshold", "features.history_length", "features.cutoff",
                   "propensity.clip_min", "train.model_path", "train.max_seq_len"),
    # smoothing_prior_strength: the no-activity item vector of an item without a feature row
    "score": ("scoring", "features.history_length", "features.smoothing_prior_strength"),
    # train.task / objective: the explanations' units when a model version has no readable train run
    "recommend": ("ranking", "features.history_length", "ope.alpha", "train.task", "train.objective"),
    "ope": ("ope", "training_set.positive_threshold"),
    "evaluate": ("evaluation", "training_set.positive_threshold", "propensity.treatment_eps", "ranking.k",
                 "ranking.fair_base_policy", "ranking.blend_weight", "scoring.batch_size", "train.task",
                 "data.source", "storage.reports_dir"),
    "report": ("evaluation", "data.source", "ope.alpha", "storage.reports_dir"),
}


def _table_version(ctx: Context, name: str) -> Optional[str]:
    """A table's state as run records hold it: ``"<version>@<Delta table id>"``, None when there is no table.

    Why the id (``metaData.id``, set when a table is created): a table deleted and written again
    restarts at version 0, so the version alone would match a run that read the old table. Records
    written before the id was added hold bare versions: they match nothing now, so each stage is
    stale once (rerun), never wrongly up to date.
    """
    from deltalake import DeltaTable

    path = ctx.cfg.table_path(name)
    if not DeltaTable.is_deltatable(path):
        return None
    dt = DeltaTable(path)
    return f"{dt.version()}@{dt.metadata().id}"


# keys of a fingerprinted section that change how a stage runs, never what it writes
RUNTIME_KEYS = {"train": ("mlflow_tracking_uri", "max_failures", "tune_max_concurrent"),
                "scoring": ("num_actors", "cpus_per_actor")}


def _config_value(cfg: dict, key: str):
    section, _, name = key.partition(".")
    if name:
        return cfg[section][name]
    value = cfg[section]
    return {k: v for k, v in value.items() if k not in RUNTIME_KEYS.get(section, ())} if isinstance(value, dict) else value


def input_files(ctx: Context, stage: Stage) -> dict:
    """Identity of the files a stage reads outside Delta: ingest's ``data.path`` (not for the simulator)
    and, for the files source, ``data.users_path`` / ``data.items_path``.

    Why: a rewritten input file changes no table version, so without this the ingest would
    stay 'up to date' on old data. Path, size and mtime of each file (a folder: every file
    under it; a glob pattern, as ingest's reader accepts: every match, sorted, a matching
    folder with every file under it); a ``file://`` URI is its local path; object-store URIs are not
    listed (use --force after changing them).
    """
    data = ctx.cfg.data
    if stage.name != "ingest" or data.source == "simulator" or not data.path:
        return {}
    paths = [data.path] + ([p for p in (data.users_path, data.items_path) if p] if data.source == "files" else [])
    out: dict = {}
    for p in paths:
        out.update(_file_listing(p))
    return out


def _file_listing(path: str) -> dict:
    """{path: hash of (name, size, mtime) of every file it names}, {path: None} when nothing is there, {} for a URI."""
    import glob
    import os

    from causalrec.ingest.sources import _display_path

    path = _display_path(path)
    if "://" in path:
        return {}
    if any(ch in path for ch in "*?["):  # a glob (causalrec.ingest.sources._exists): hash every match
        roots = sorted(set(glob.glob(path)) | ({path} if os.path.exists(path) else set()))
    else:
        roots = [path] if os.path.exists(path) else []
    if not roots:
        return {path: None}
    listing = []
    for top in roots:
        found = [top] if os.path.isfile(top) else sorted(
            os.path.join(root, f) for root, _, names in os.walk(top) for f in names)
        for f in found:
            try:
                st = os.stat(f)
            except FileNotFoundError:  # removed while listed: the next fingerprint sees it gone
                continue
            name = os.path.relpath(f, path) if top == path else os.path.abspath(f)
            listing.append((name, st.st_size, st.st_mtime_ns))
    return {path: hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}


def _what_it_reads(ctx: Context, stage: Stage) -> dict:
    """The config sections, input table states and (ingest) input files a stage's output depends on."""
    cfg = ctx.cfg.to_dict()
    sections = {s: _config_value(cfg, s) for s in STAGE_SECTIONS.get(stage.name, ())}
    sections["seed"] = cfg["project"]["seed"]
    inputs = {name: _table_version(ctx, name) for name in stage.inputs}
    blob = {"config": sections, "inputs": inputs}
    files = input_files(ctx, stage)
    if files:
        blob["files"] = files
    return blob


def _digest(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(ctx: Context, stage: Stage) -> tuple[str, dict]:
    blob = _what_it_reads(ctx, stage)
    return _digest(blob), blob["inputs"]


def _runs(ctx: Context) -> list[dict]:
    from deltalake import DeltaTable

    path = ctx.cfg.table_path(RUNS_TABLE)
    if not DeltaTable.is_deltatable(path):
        return []
    return DeltaTable(path).to_pyarrow_table().to_pylist()


SUMMARY_MAX_CHARS = 100_000


def _summary_json(summary: dict) -> str:
    """The run record's summary as JSON, always parseable: one too long for the record keeps its
    scalar fields (a cut JSON string would make every later status and run fail to read it)."""
    text = json.dumps(summary, default=str)
    if len(text) <= SUMMARY_MAX_CHARS:
        return text
    small = {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool)) or v is None}
    small["summary_truncated"] = f"{len(text)} characters; only the scalar fields are kept"
    small_text = json.dumps(small, default=str)
    return small_text if len(small_text) <= SUMMARY_MAX_CHARS else \
        json.dumps({"summary_truncated": f"{len(text)} characters"})


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
        "summary": _summary_json(summary),
    }
    schema = pa.schema([
        ("stage", pa.string()), ("fingerprint", pa.string()), ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seconds", pa.float64()), ("input_versions", pa.string()), ("output_versions", pa.string()),
        ("summary", pa.string()),
    ])
    write_deltalake(ctx.cfg.table_path(RUNS_TABLE), pa.Table.from_pylist([row], schema=schema), mode="append")


SUPERSEDED = "superseded"


def _overlapping_runs(ctx: Context, stage: Stage, started: float) -> list[dict]:
    """Records of ``stage`` written since this run of it started: another process ran it at the same time.

    Why: the record stores the outputs' versions when it is written, which may then be the other run's
    commits, under this run's fingerprint; a later run with this config would skip the stage over the
    other config's rows. Of two overlapping runs the one that records last always sees the other's
    record (it finished after the later one started), and records itself as :data:`SUPERSEDED`, which
    no later run counts as up to date."""
    since = datetime.fromtimestamp(started, tz=timezone.utc)
    return [r for r in _runs(ctx) if r["stage"] == stage.name and r["finished_at"] >= since]


def _outputs_unchanged(ctx: Context, stage: Stage, run: dict) -> bool:
    """Every output is still at the version ``run`` recorded (a standalone stage run or another
    config since then rewrote it otherwise), and the files it recorded writing still exist: the
    report, and evaluate's JSON (the report reads its curves and model sections from it)."""
    import os

    recorded = json.loads(run.get("output_versions") or "{}")
    if any(_table_version(ctx, o) != recorded.get(o, -1) for o in stage.outputs):
        return False
    summary = json.loads(run["summary"] or "{}")
    return all(os.path.exists(summary[k]) for k in ("report_path", "json") if summary.get(k))


def stage_state(ctx: Context, stage: Stage, runs: list[dict]) -> tuple[str, str, dict]:
    """('up to date' | 'stale' | 'never run' | 'failed', fingerprint, last summary).

    Only the latest successful run counts: an older run with this fingerprint describes
    outputs that a later run (other config) has since replaced.
    """
    fp, _ = fingerprint(ctx, stage)
    mine = [r for r in runs if r["stage"] == stage.name]
    if not mine:
        return "never run", fp, {}
    last = max(mine, key=lambda r: r["finished_at"])
    summary = json.loads(last["summary"] or "{}")
    if last["status"] == SUPERSEDED:
        return "stale", fp, summary
    if last["status"] != "success":
        return "failed", fp, summary
    if last["fingerprint"] == fp and _outputs_unchanged(ctx, stage, last):
        return "up to date", fp, summary
    return "stale", fp, summary


def pipeline_status(ctx: Context) -> dict:
    """Each stage's state as ``run`` would find it: a stage whose own record is up to date but which
    reads a table an earlier stage will rerun is "stale if upstream rewrites <tables>": ``run`` reruns
    it if that stage writes a new version (an unchanged ingest rerun writes none)."""
    runs = _runs(ctx)
    out = {}
    rewritten: set = set()  # the outputs of the stages a run would rerun before this one
    for stage in PIPELINE:
        try:
            stage.load()
            state = stage_state(ctx, stage, runs)[0]
        except StageNotBuilt:
            state = "not built yet"
        upstream = sorted(set(stage.inputs) & rewritten)
        if state == "up to date" and upstream:
            state = f"stale if upstream rewrites {', '.join(upstream)}"
        if state != "up to date":
            rewritten |= set(stage.outputs)
        out[stage.name] = state
        print(f"{stage.name:14s} {state}")
    return {"stages": out}


def run_pipeline(ctx: Context, from_stage: Optional[str] = None, until_stage: Optional[str] = None) -> dict:
    from causalrec.cli import run_stage

    names = [s.name for s in PIPELINE]
    force_from = names.index(from_stage) if from_stage else (0 if ctx.force else len(names))
    stop_at = names.index(until_stage) if until_stage else len(names) - 1
    if from_stage and force_from > stop_at:
        raise ValueError(f"--from {from_stage} comes after --until {until_stage} in the pipeline "
                         f"({' -> '.join(names)}): no stage would rerun")
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
            # the recorded run's time is not this run's: kept apart, so the summary does not add it in
            brief = _brief(last)
            results[stage.name] = {"status": "skipped (up to date)", "last_run_seconds": brief.pop("seconds", None),
                                   **brief}
            continue
        # what the stage is about to read: the run record holds this, not the state after the run, so an
        # input another process rewrites while the stage runs leaves the stage stale (it read the old one)
        read = _what_it_reads(ctx, stage)
        fp, inputs = _digest(read), read["inputs"]
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
        own = [name for name in stage.inputs if name in stage.outputs]
        if own:  # a table the stage reads and rewrites: the next run reads the version this run left
            read["inputs"].update({name: _table_version(ctx, name) for name in own})
            fp, inputs = _digest(read), read["inputs"]
        status = "success"
        if _overlapping_runs(ctx, stage, started):
            status = SUPERSEDED
            log.warning("stage %s: another run of it finished while this one ran, so its outputs may hold that "
                        "run's commits; recorded as %s, the next `causalrec run` reruns it", stage.name, SUPERSEDED)
        _record(ctx, stage, fp, status, started, summary, inputs)
        runs = _runs(ctx)
        results[stage.name] = {"status": "ran", **_brief(summary)}
    total = round(time.time() - t_start, 1)
    report_path = next((r.get("report_path") for r in results.values() if r.get("report_path")), None)
    print("\ncausalrec pipeline summary")
    for name, r in results.items():
        took = r.get("seconds", "") if "last_run_seconds" not in r else \
            (f"(last run {r['last_run_seconds']}s)" if r["last_run_seconds"] is not None else "")
        print(f"  {name:14s} {r['status']:22s} {took}")
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
