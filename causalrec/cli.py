"""``causalrec``: one subcommand per stage, plus ``run`` for the whole pipeline.

Every subcommand takes a config file (positional or ``--config``) and
``--set section.key=value`` overrides; it exits 0 on success and 1 with a
one-line reason on failure (``-v`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from causalrec import __version__
from causalrec.stages import ALL, EXTRA, PIPELINE, StageNotBuilt

EPILOG = """\
pipeline (each stage reads and writes Delta tables under storage.root):
  ingest -> features -> propensity -> training_set -> train -> candidates
         -> score -> recommend -> ope -> evaluate -> report

examples:
  causalrec run conf/local.yaml                      # the whole pipeline on Coat
  causalrec run conf/simulated.yaml --set simulator.n_events=1000000
  causalrec ingest conf/local.yaml                   # one stage
  causalrec train conf/local.yaml --set train.epochs=3 --set train.objective=snips
  causalrec status conf/local.yaml                   # which stages are up to date
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", nargs="?", help="YAML config (e.g. conf/local.yaml)")
    p.add_argument("--config", dest="config_opt", help="YAML config (same as the positional argument)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="causalrec",
        description="causalrec: learn and evaluate recommendations by cause, not correlation "
                    "(Spark + Delta Lake + Ray Train).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"causalrec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run the whole pipeline, skipping up-to-date stages and resuming after a failure")
    _add_common(p)
    p.add_argument("--force", action="store_true", help="rerun every stage even if up to date")
    p.add_argument("--from", dest="from_stage", choices=[s.name for s in PIPELINE], help="force rerun from this stage on")
    p.add_argument("--until", dest="until_stage", choices=[s.name for s in PIPELINE], help="stop after this stage")
    p = sub.add_parser("status", help="show each pipeline stage and whether its outputs are up to date")
    _add_common(p)
    for stage in PIPELINE + EXTRA:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        _add_common(p)
        # a stage command always runs its stage (only `run` skips up-to-date stages); the flag stays
        # accepted so scripts written for `run` keep working
        p.add_argument("--force", action="store_true",
                       help="no effect: a single-stage command always runs its stage (`run` skips up-to-date ones)")
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "urllib3", "filelock", "matplotlib", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_py4j_retries)


def _drop_py4j_retries(record: logging.LogRecord) -> bool:
    """py4j logs a traceback at INFO on the root logger when it retries a command on a reset
    gateway connection; the retry succeeds, so the traceback only alarms users."""
    return not (record.levelno < logging.WARNING and record.name == "root"
                and str(record.msg).startswith(("Exception while sending command", "Closing down clientserver")))


def main(argv: list | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _setup_logging(args.verbose)
    config_path = args.config_opt or args.config_file
    try:
        from causalrec.context import make_context

        ctx = make_context(config_path, args.overrides, force=getattr(args, "force", False))
        if args.command == "run":
            from causalrec.pipeline import run_pipeline

            summary = run_pipeline(ctx, from_stage=args.from_stage, until_stage=args.until_stage)
        elif args.command == "status":
            from causalrec.pipeline import pipeline_status

            summary = pipeline_status(ctx)
        else:
            summary = run_stage(ctx, args.command)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    except KeyboardInterrupt:
        print("causalrec: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one-line reason; -v for the traceback
        if args.verbose:
            logging.getLogger("causalrec").exception("failed")
        reason = one_line_reason(exc)
        print(f"causalrec {args.command}: error: {type(exc).__name__}: {reason}", file=sys.stderr)
        return 1


def run_stage(ctx, name: str) -> dict:
    """Run one stage by name (used by the CLI, jobs/*.py and the pipeline)."""
    stage = ALL[name]
    log = logging.getLogger("causalrec")
    t0 = time.perf_counter()
    log.info("stage %s: starting", name)
    func = stage.load()
    summary = func(ctx) or {}
    summary.setdefault("stage", name)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("stage %s: done in %.1fs", name, summary["seconds"])
    return summary


def one_line_reason(exc: BaseException) -> str:
    """The message's first line and, for a message of several (a wrapped Python worker traceback), its
    last: where the cause usually is (``ModuleNotFoundError: No module named ...``)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]} (-v for the whole message)"


def _shutdown_and_exit(code: int) -> None:
    """Stop Spark and Ray, flush, and leave without running native destructors.

    JVM gateway threads, Ray's core worker and delta-rs/torch thread pools can abort the
    interpreter's teardown ("terminate called without an active exception"), which would turn
    a successful run into exit code 134; the work is committed by now, so exit directly.
    """
    import os

    try:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        pyspark_sql = sys.modules.get("pyspark.sql")
        if pyspark_sql is not None:
            active = pyspark_sql.SparkSession.getActiveSession()
            if active is not None:
                active.stop()
    except Exception:  # best effort: never mask the run's own exit code
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_main() -> None:
    """The ``causalrec`` console script."""
    _shutdown_and_exit(main())


def job_main(stage_name: str, argv: list | None = None) -> int:
    """Entry point of ``jobs/<stage>.py`` (spark-submit or ray job submit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _shutdown_and_exit(main([stage_name, *argv]))
    return 0  # not reached


__all__ = ["main", "console_main", "run_stage", "job_main", "StageNotBuilt"]
