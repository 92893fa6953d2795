"""One run id in the commits of the tables a stage writes together.

Delta commits one table at a time, so a stage that writes several tables (features: user_features and
item_features; propensity: exposure_propensity and treatment_propensity) and fails between two writes,
or races another run of itself, leaves tables from different runs side by side. Each such write records
the run's id in its commit metadata; readers that pair the tables refuse a mix (:func:`check_same_run`)
instead of joining one run's rows to another's.
"""
from __future__ import annotations

import uuid
from typing import Optional, Sequence

RUN_KEY = "stage_run_id"


class TablesOutOfStep(RuntimeError):
    """Tables one stage writes together hold the outputs of different runs of it."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_of(store, name: str) -> Optional[str]:
    """The run id of the table's newest commit that records one (a compaction or a plain append records
    none); None for a table written before run ids were recorded, or missing."""
    if not store.exists(name):
        return None
    return next((m[RUN_KEY] for m in store.commit_metadata(name, 20) if RUN_KEY in m), None)


def check_same_run(store, names: Sequence[str], stage: str) -> None:
    """Raise :class:`TablesOutOfStep` when ``names`` (written by ``stage``) come from different runs.

    Tables without a recorded run pass: they predate the ids, or were written outside the stage."""
    runs = {n: r for n in names if (r := run_of(store, n)) is not None}
    if len(set(runs.values())) > 1:
        raise TablesOutOfStep(
            "; ".join(f"{n} ({store.path(n)}) is from {stage} run {r}" for n, r in runs.items())
            + f": the {stage} stage writes them in separate commits, and its last run failed between them or "
            f"another run wrote in between. Rerun it (`causalrec {stage} <config>`) so they come from one run")
