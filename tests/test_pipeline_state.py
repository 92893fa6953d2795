"""`causalrec run` skips a stage only when its outputs are up to date (no Spark needed)."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import time

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from causalrec import pipeline as P
from causalrec.config import SPLIT_SETTINGS, Config
from causalrec.context import Context
from causalrec.stages import ALL, PIPELINE


@pytest.fixture
def pctx(tmp_path):
    cfg = Config()
    cfg.storage.root = str(tmp_path / "tables")
    return Context(cfg=cfg)


def _table(ctx, name, value, mode="overwrite"):
    write_deltalake(ctx.cfg.table_path(name), pa.table({"x": [value]}), mode=mode)


def _run(ctx, stage, output_value):
    """What run_pipeline does around one stage: run it (write its outputs), then record it."""
    for o in stage.outputs:
        _table(ctx, o, output_value)
    fp, inputs = P.fingerprint(ctx, stage)
    P._record(ctx, stage, fp, "success", time.time(), {}, inputs)


def _state(ctx, stage):
    return P.stage_state(ctx, stage, P._runs(ctx))[0]


def _recommend_ran_at_k10(ctx):
    """The recommend stage, run once on fresh inputs (its output: 10) and so up to date."""
    rec = ALL["recommend"]
    for name in rec.inputs:
        _table(ctx, name, 1)
    _run(ctx, rec, 10)
    assert _state(ctx, rec) == "up to date"
    return rec


def test_only_the_latest_successful_run_makes_a_stage_up_to_date(pctx):
    """k=10, then k=5, then back to k=10: the table holds the k=5 output, so it is stale."""
    rec = _recommend_ran_at_k10(pctx)
    pctx.cfg.ranking.k = 5
    assert _state(pctx, rec) == "stale"
    _run(pctx, rec, 5)
    pctx.cfg.ranking.k = 10
    assert _state(pctx, rec) == "stale"


def test_an_output_rewritten_outside_the_pipeline_makes_the_stage_stale(pctx):
    """A standalone `causalrec recommend --set ranking.k=5` rewrites the table without a run record."""
    rec = _recommend_ran_at_k10(pctx)
    _table(pctx, "recommendations", 5)
    assert _state(pctx, rec) == "stale"


@pytest.mark.parametrize("stage, key, value", [
    ("candidates", "training_set.positive_threshold", 3.0),
    ("ope", "training_set.positive_threshold", 3.0),
    ("propensity", "training_set.unobserved_per_observed", 5.0),
    ("propensity", "training_set.mcar_valid_fraction", 0.5),
    ("propensity", "training_set.label_event_type", "click"),
    ("features", "data.event_types", ["click"]),
    ("report", "storage.reports_dir", "/elsewhere"),  # a run skipped report and printed the old report's path
    ("evaluate", "storage.reports_dir", "/elsewhere"),
])
def test_config_read_from_another_section_changes_the_fingerprint(pctx, stage, key, value):
    before = P.fingerprint(pctx, ALL[stage])[0]
    section, name = key.split(".")
    setattr(getattr(pctx.cfg, section), name, value)
    assert P.fingerprint(pctx, ALL[stage])[0] != before



def test_the_propensity_fingerprint_holds_every_split_setting_and_not_the_file_sharding():
    """Every training_set setting that decides what a propensity model may see is in its fingerprint;
    files_per_split, which only shards the training set's files, reran propensity and everything after."""
    assert _SPLIT_KEYS <= set(P.STAGE_SECTIONS["propensity"])
    assert "training_set" not in P.STAGE_SECTIONS["propensity"]


@pytest.mark.parametrize("stage, key, value", [
    ("propensity", "training_set.files_per_split", 8),
    ("train", "train.mlflow_tracking_uri", "sqlite:///mlflow.db"),
    ("train", "train.max_failures", 5),
    ("score", "scoring.num_actors", 3),
])
def test_settings_of_how_a_stage_runs_keep_its_fingerprint(pctx, stage, key, value):
    before = P.fingerprint(pctx, ALL[stage])[0]
    section, name = key.split(".")
    setattr(getattr(pctx.cfg, section), name, value)
    assert P.fingerprint(pctx, ALL[stage])[0] == before


def test_a_missing_evaluation_json_makes_evaluate_stale(pctx, tmp_path):
    """The report reads its curves and model sections from evaluate's JSON: with the reports folder
    deleted, evaluate stayed up to date and the rerun report silently lost those sections."""
    ev = ALL["evaluate"]
    for name in ev.inputs:
        _table(pctx, name, 1)
    for o in ev.outputs:
        _table(pctx, o, 1)
    path = tmp_path / "evaluation.json"
    path.write_text("{}")
    fp, inputs = P.fingerprint(pctx, ev)
    P._record(pctx, ev, fp, "success", time.time(), {"json": str(path)}, inputs)
    assert _state(pctx, ev) == "up to date"
    path.unlink()
    assert _state(pctx, ev) == "stale"


_SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "source_file"]
_READ = re.compile(r"\bcfg\.(%s)\b(?:\.([a-z_]+))?" % "|".join(_SECTIONS))
_SPLIT_KEYS = {f"training_set.{k}" for k in SPLIT_SETTINGS}
_RUNTIME = ("storage", "spark", "ray")  # where and how a stage runs, not what it computes
_INFRA = ("causalrec.context", "causalrec.config", "causalrec.sessions", "causalrec.schemas",
          "causalrec.stages", "causalrec.cli", "causalrec.pipeline", "causalrec.storage")


def _stage_sources(stage) -> list[str]:
    """The stage's module (a ``job.py``: its whole package) plus every causalrec function,
    class or module it imports (one level deep)."""
    origin = importlib.util.find_spec(stage.target.split(":")[0]).origin
    files = [origin]
    if os.path.basename(origin) == "job.py":
        folder = os.path.dirname(origin)
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    out = []
    for f in files:
        text = open(f).read()
        out.append(text)
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("causalrec")
                    and not node.module.startswith(_INFRA)):
                continue
            mod = importlib.import_module(node.module)
            for alias in node.names:
                obj = getattr(mod, alias.name, None)
                if inspect.ismodule(obj) or inspect.isfunction(obj) or inspect.isclass(obj):
                    out.append(inspect.getsource(obj))
    return out


@pytest.mark.parametrize("stage", [s for s in PIPELINE], ids=lambda s: s.name)
def test_stage_sections_cover_every_config_read(stage):
    """A config key a stage reads but its fingerprint ignores lets it be skipped with stale output."""
    try:
        stage.load()
    except Exception:  # pragma: no cover - a stage not built yet has nothing to scan
        pytest.skip(f"stage {stage.name} is not importable")
    covered = set(P.STAGE_SECTIONS[stage.name]) | {"project.seed"}
    missing = set()
    for text in _stage_sources(stage):
        for m in _READ.finditer(text):
            section, key = m.group(1), m.group(2)
            if section in _RUNTIME or section in covered:
                continue
            if (section, key) == ("training_set", None) and _SPLIT_KEYS <= covered:
                continue  # training_set.split_settings(cfg): getattr(cfg.training_set, k) for k in SPLIT_SETTINGS
            full = f"{section}.{key}" if key else section
            if full not in covered:
                missing.add(full)
    assert not missing, f"STAGE_SECTIONS[{stage.name!r}] lacks {sorted(missing)}"


_TABLE_READ = re.compile(r"""store\.(?:read|read_arrow|exists)\(\s*["']([a-z_]+)["']""")
_TABLE_WRITE = re.compile(r"""store\.write\(.*?,\s*["']([a-z_]+)["']""")


@pytest.mark.parametrize("stage", [s for s in ALL.values() if s.inputs or s.outputs], ids=lambda s: s.name)
def test_stage_inputs_cover_every_table_it_reads(stage):
    """A table a stage reads but does not declare is left out of its fingerprint: rewriting it (new item
    text, new user segments, a new propensity model) left candidates, evaluate and uplift "up to date"."""
    try:
        stage.load()
    except Exception:  # pragma: no cover
        pytest.skip(f"stage {stage.name} is not importable")
    sources = _stage_sources(stage)
    read = {m.group(1) for text in sources for m in _TABLE_READ.finditer(text)}
    if stage.name == "report":
        from causalrec.report import REPORT_TABLES

        read |= set(REPORT_TABLES)
    assert not read - set(stage.inputs) - set(stage.outputs) - {P.RUNS_TABLE}, stage.name
    # and every table it writes is an output: rewritten outside a run, it must make the stage stale
    written = {m.group(1) for text in sources for m in _TABLE_WRITE.finditer(text)} - {"overwrite", "append"}
    assert written <= set(stage.outputs), (stage.name, written - set(stage.outputs))


def test_ingest_declares_every_table_a_loader_or_the_simulator_writes():
    """Its writes name the table through a variable; a deleted mcar_events left ingest up to date."""
    from causalrec.ingest.job import EVENT_SPECS, SPECS

    assert set(EVENT_SPECS) | set(SPECS) | {"events_quarantine", "dimension_quarantine", "ingest_log"} <= \
        set(ALL["ingest"].outputs)


def test_ingest_of_files_tracks_the_input_files(pctx, tmp_path):
    ing = ALL["ingest"]
    pctx.cfg.data.source, pctx.cfg.data.format = "files", "csv"
    f = tmp_path / "in.csv"
    f.write_text("a\n1\n")
    pctx.cfg.data.path = str(f)
    first = P.fingerprint(pctx, ing)[0]
    assert P.fingerprint(pctx, ing)[0] == first
    f.write_text("a\n1\n2\n3\n")
    assert P.fingerprint(pctx, ing)[0] != first
    # the same file as a file:// URI is tracked too (it was taken for an object-store URI and never listed)
    pctx.cfg.data.path = f.as_uri()
    as_uri = P.fingerprint(pctx, ing)[0]
    f.write_text("a\n4\n")
    assert P.fingerprint(pctx, ing)[0] != as_uri
    # a folder: a new file in it changes the fingerprint too
    folder = tmp_path / "batches"
    folder.mkdir()
    (folder / "b1.csv").write_text("a\n1\n")
    pctx.cfg.data.path = str(folder)
    before = P.fingerprint(pctx, ing)[0]
    (folder / "b2.csv").write_text("a\n2\n")
    assert P.fingerprint(pctx, ing)[0] != before


def test_ingest_up_to_date_when_nothing_changed_even_without_dimension_tables(pctx, tmp_path):
    """The files source writes no users/items: their absence, as recorded, is not staleness."""
    ing = ALL["ingest"]
    pctx.cfg.data.source, pctx.cfg.data.format = "files", "csv"
    f = tmp_path / "in.csv"
    f.write_text("a\n1\n")
    pctx.cfg.data.path = str(f)
    for name in ("events", "events_quarantine", "ingest_log"):
        _table(pctx, name, 1)
    fp, inputs = P.fingerprint(pctx, ing)
    P._record(pctx, ing, fp, "success", time.time(), {}, inputs)
    assert _state(pctx, ing) == "up to date"
    f.write_text("a\n1\n2\n")
    assert _state(pctx, ing) == "stale"
    assert DeltaTable(pctx.cfg.table_path("events")).version() == 0


@pytest.mark.parametrize("stage, table", [("propensity", "mcar_events"), ("propensity", "ground_truth"),
                                          ("training_set", "mcar_events"), ("training_set", "users"),
                                          ("training_set", "items"), ("score", "id_index"), ("score", "uplift_effects"),
                                          ("score", "users")])
@pytest.mark.parametrize("present", [True, False], ids=["rewritten", "appears"])
def test_a_table_the_stage_reads_makes_it_stale_when_rewritten_or_new(pctx, stage, table, present):
    """mcar_events and ground_truth are optional: a stage run without them is up to date until they
    appear; a rewrite of one (a new MCAR sample alone) makes every stage reading it stale."""
    st = ALL[stage]
    for name in set(st.inputs) - {table}:
        _table(pctx, name, 1)
    if present:
        _table(pctx, table, 1)
    _run(pctx, st, 1)
    assert _state(pctx, st) == "up to date"
    _table(pctx, table, 2)
    assert _state(pctx, st) == "stale"


def test_ingest_of_a_glob_tracks_the_matching_files(pctx, tmp_path):
    """A glob data.path (ingest's reader accepts it): a new matching file or a rewritten one makes ingest stale."""
    ing = ALL["ingest"]
    d = tmp_path / "daily"
    d.mkdir()
    (d / "a.csv").write_text("a\n1\n")
    (d / "notes.txt").write_text("x")
    pctx.cfg.data.source, pctx.cfg.data.format, pctx.cfg.data.path = "files", "csv", str(d / "*.csv")
    first = P.fingerprint(pctx, ing)[0]
    assert P.fingerprint(pctx, ing)[0] == first
    (d / "notes.txt").write_text("not matched")
    assert P.fingerprint(pctx, ing)[0] == first
    (d / "b.csv").write_text("a\n2\n")
    second = P.fingerprint(pctx, ing)[0]
    assert second != first
    (d / "a.csv").write_text("a\n1\n3\n")
    assert P.fingerprint(pctx, ing)[0] != second
    pctx.cfg.data.path = str(tmp_path / "none-*.csv")
    assert P.input_files(pctx, ing) == {pctx.cfg.data.path: None}


def test_ingest_of_files_tracks_the_users_and_items_files(pctx, tmp_path):
    """data.items_path is read by the files ingest: a rewritten items file makes ingest stale like an events file."""
    ing = ALL["ingest"]
    (tmp_path / "events.csv").write_text("a\n1\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,text\ni1,coat\n")
    pctx.cfg.data.source, pctx.cfg.data.format, pctx.cfg.data.path = "files", "csv", str(tmp_path / "events.csv")
    pctx.cfg.data.items_path = str(items)
    first = P.fingerprint(pctx, ing)[0]
    assert set(P.input_files(pctx, ing)) == {str(tmp_path / "events.csv"), str(items)}
    items.write_text("item_id,text\ni1,red coat\n")
    assert P.fingerprint(pctx, ing)[0] != first


@pytest.fixture
def fake_stages(monkeypatch):
    """run_pipeline with stand-in stages: ``impl[name](ctx)`` runs for stage ``name``."""
    import causalrec.cli
    from causalrec.stages import Stage

    impl = {}
    monkeypatch.setattr(Stage, "load", lambda self: None)
    monkeypatch.setattr(causalrec.cli, "run_stage", lambda ctx, name: impl[name](ctx) or {"stage": name})
    return impl


def _ingest_writes_events(ctx, value=1):
    for t in ALL["ingest"].outputs:
        _table(ctx, t, value)


def test_status_shows_what_run_would_rerun_downstream(pctx, fake_stages, monkeypatch, capsys):
    """b and c are up to date on their own records, but a is stale and rewrites t1, which b reads:
    status said "up to date" for them while `run` reran all three."""
    from causalrec.stages import Stage

    chain = (Stage("a", "x:y", "", inputs=("t0",), outputs=("t1",)), Stage("b", "x:y", "", inputs=("t1",), outputs=("t2",)),
             Stage("c", "x:y", "", inputs=("t2",), outputs=("t3",)), Stage("d", "x:y", "", inputs=("t9",), outputs=()))
    monkeypatch.setattr(P, "PIPELINE", chain)
    monkeypatch.setattr(P, "STAGE_SECTIONS", {s.name: () for s in chain})
    for t in ("t0", "t9"):
        _table(pctx, t, 1)
    for st in chain:
        _run(pctx, st, 1)
    assert set(P.pipeline_status(pctx)["stages"].values()) == {"up to date"}
    _table(pctx, "t0", 2)
    assert P.pipeline_status(pctx)["stages"] == {"a": "stale", "b": "stale if upstream rewrites t1",
                                                 "c": "stale if upstream rewrites t2", "d": "up to date"}


def test_a_huge_summary_is_recorded_as_json_that_status_can_read(pctx):
    """Cut at 100k characters, the summary was invalid JSON, and every later status and run failed on it."""
    st = ALL["report"]
    for name in st.inputs:
        _table(pctx, name, 1)
    fp, inputs = P.fingerprint(pctx, st)
    P._record(pctx, st, fp, "success", time.time(), {"rows_out": 3, "every_row": ["x" * 100] * 2000}, inputs)
    state, _, summary = P.stage_state(pctx, st, P._runs(pctx))
    assert state == "up to date" and summary["rows_out"] == 3 and "summary_truncated" in summary


def test_from_after_until_is_refused(pctx):
    with pytest.raises(ValueError, match="--from report comes after --until features"):
        P.run_pipeline(pctx, from_stage="report", until_stage="features")


def test_an_input_rewritten_while_the_stage_runs_leaves_it_stale(pctx, fake_stages):
    """features reads events v0; another process appends v1 before features finishes: the run record
    must say v0, so the next `causalrec run` reruns features."""
    def features(ctx):
        _table(ctx, "events", 2, mode="append")  # a concurrent `causalrec ingest` of new files
        for t in ALL["features"].outputs:
            _table(ctx, t, 1)

    fake_stages.update(ingest=_ingest_writes_events, features=features)
    P.run_pipeline(pctx, until_stage="features")
    assert _state(pctx, ALL["ingest"]) == "stale"  # its output was rewritten outside its run
    assert _state(pctx, ALL["features"]) == "stale"
    recorded = [r for r in P._runs(pctx) if r["stage"] == "features"][0]
    assert json.loads(recorded["input_versions"])["events"].startswith("0@")


def test_a_stage_that_rewrites_a_table_it_reads_records_the_version_it_left(pctx, fake_stages, monkeypatch):
    """No pipeline stage does this today; if one does, its own rewrite must not make it stale."""
    from causalrec.stages import Stage

    assert not any(set(s.inputs) & set(s.outputs) for s in PIPELINE)
    own = Stage("compact", "x:y", "reads and rewrites t", inputs=("t", "u"), outputs=("t",))
    monkeypatch.setattr(P, "PIPELINE", (own,))
    _table(pctx, "t", 1)
    _table(pctx, "u", 1)
    fake_stages["compact"] = lambda ctx: _table(ctx, "t", 2)
    P.run_pipeline(pctx)
    assert _state(pctx, own) == "up to date"
    _table(pctx, "u", 2)
    assert _state(pctx, own) == "stale"


def test_a_deleted_and_rebuilt_input_table_makes_the_stage_stale(pctx):
    """A table written again from nothing restarts at version 0: its Delta id tells it from the old one."""
    import shutil

    rec = _recommend_ran_at_k10(pctx)
    assert DeltaTable(pctx.cfg.table_path("scores")).version() == 0
    shutil.rmtree(pctx.cfg.table_path("scores"))
    _table(pctx, "scores", 2)
    assert DeltaTable(pctx.cfg.table_path("scores")).version() == 0
    assert _state(pctx, rec) == "stale"
    # an output deleted and rebuilt outside the pipeline too
    _run(pctx, rec, 10)
    shutil.rmtree(pctx.cfg.table_path("recommendations"))
    _table(pctx, "recommendations", 10)
    assert _state(pctx, rec) == "stale"


def test_run_records_from_before_table_ids_make_a_stage_stale_once(pctx, monkeypatch):
    """Records holding bare versions (written before the table id was recorded) do not crash the status:
    they match nothing, so the stage reruns once and is up to date after."""
    rec = ALL["recommend"]
    for name in rec.inputs:
        _table(pctx, name, 1)
    with monkeypatch.context() as m:  # the old fingerprint: the version number alone
        m.setattr(P, "_table_version", lambda ctx, name: DeltaTable(ctx.cfg.table_path(name)).version()
                  if DeltaTable.is_deltatable(ctx.cfg.table_path(name)) else None)
        _run(pctx, rec, 10)
        assert _state(pctx, rec) == "up to date"
    assert _state(pctx, rec) == "stale"
    _run(pctx, rec, 10)
    assert _state(pctx, rec) == "up to date"


def test_a_run_overlapping_another_run_of_the_stage_is_not_up_to_date(pctx, tmp_path, fake_stages, monkeypatch):
    """Two `causalrec run`s (ranking.k 10 and 5) on one root: A writes the output, B runs the stage whole
    (write, record), then A records the output's version - B's rows - under A's fingerprint, and a later
    run with A's config skipped the stage over B's output. Whichever run records last now sees the other's
    record and records itself superseded, so the stage is rerun."""
    from causalrec.stages import Stage

    st = Stage("rank", "x:y", "", inputs=("t0",), outputs=("out",))
    monkeypatch.setattr(P, "PIPELINE", (st,))
    monkeypatch.setattr(P, "STAGE_SECTIONS", {"rank": ("ranking",)})
    other = Context(cfg=dataclasses.replace(pctx.cfg, ranking=dataclasses.replace(pctx.cfg.ranking, k=5)))
    pctx.cfg.ranking.k = 10
    _table(pctx, "t0", 1)
    nested = []

    def rank(ctx):
        _table(ctx, "out", ctx.cfg.ranking.k)
        if ctx is pctx and not nested:  # B starts and finishes before A records
            nested.append(1)
            P.run_pipeline(other)

    fake_stages["rank"] = rank
    P.run_pipeline(pctx)
    out = DeltaTable(pctx.cfg.table_path("out")).to_pyarrow_table()["x"].to_pylist()
    assert out == [5]  # B's rows, written last
    records = sorted(P._runs(pctx), key=lambda r: r["finished_at"])
    assert [r["status"] for r in records] == ["success", P.SUPERSEDED]  # B, then A
    assert _state(pctx, st) == "stale"  # A's config: its output is not A's
    calls = []
    fake_stages["rank"] = lambda ctx: calls.append(ctx.cfg.ranking.k)
    P.run_pipeline(pctx)
    assert calls == [10]  # rerun, not skipped
    assert _state(pctx, st) == "up to date"


def test_a_skipped_stage_reports_its_last_run_time_apart_from_this_run(pctx, fake_stages, monkeypatch, capsys):
    """The summary printed a skipped stage's recorded seconds in the column of this run's times ("features
    skipped (up to date) 41.19" above "total 2.1s"); the result dict gave it as this run's "seconds"."""
    from causalrec.stages import Stage

    one = Stage("a", "x:y", "", inputs=("t0",), outputs=("t1",))
    monkeypatch.setattr(P, "PIPELINE", (one,))
    monkeypatch.setattr(P, "STAGE_SECTIONS", {"a": ()})
    _table(pctx, "t0", 1)
    fake_stages["a"] = lambda ctx: (_table(ctx, "t1", 1), {"seconds": 41.19})[1]
    assert P.run_pipeline(pctx)["stages"]["a"]["seconds"] == 41.19
    capsys.readouterr()
    again = P.run_pipeline(pctx)["stages"]["a"]
    assert again["status"] == "skipped (up to date)" and "seconds" not in again and again["last_run_seconds"] == 41.19
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("a "))
    assert line.rstrip().endswith("(last run 41.19s)"), line
