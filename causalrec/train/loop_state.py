"""Epoch bookkeeping shared by the Ray loop and the in-process trainer: best epoch, patience."""
from __future__ import annotations

import math
import os


def initial_state() -> dict:
    # best_checkpoint: the best epoch's checkpoint folder when it lies in an earlier run (see resumed_in_new_run)
    return {"epoch": 0, "best_valid": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [],
            "stopped_early": False, "best_checkpoint": None}


def early_stopping_update(state: dict, epoch: int, valid: float, patience: int) -> bool:
    """Record epoch ``epoch``'s validation error; True when training should stop.

    A NaN error (no validation row had weight: no labelled or no validation rows at all) says
    nothing about overfitting: the epoch neither becomes the best nor counts towards ``patience``.
    While no epoch had a validation error, ``best_epoch`` stays -1 and the weights kept are those
    of the epoch with the lowest train loss: the Ray loop then reports the train loss as its
    ``valid_metric``, which Ray ranks the checkpoints by (:func:`causalrec.train.job.best_checkpoint`),
    and :func:`causalrec.train.local.fit_local` keeps the same epoch's weights.
    """
    if math.isnan(valid):
        return False
    if valid < state["best_valid"] - 1e-9:
        state["best_valid"], state["best_epoch"], state["bad_epochs"] = valid, epoch, 0
        state["best_checkpoint"] = None  # this run's checkpoint of that epoch
    else:
        state["bad_epochs"] += 1
    return patience > 0 and state["bad_epochs"] >= patience


def checkpoint_name(epoch: int) -> str:
    """The folder an epoch's checkpoint is saved under, beside the run's other epochs."""
    return f"epoch_{epoch:04d}"


def resumed_in_new_run(state: dict, resume_dir: str) -> None:
    """Note where the best epoch's checkpoint is when ``resume_from`` starts a new run.

    The new run only holds checkpoints of the epochs it trains, so a best epoch from before
    the resume must be found elsewhere: beside ``resume_dir`` (a run keeps its best checkpoint),
    unless an earlier resume already recorded it.
    """
    if state["best_epoch"] >= 0 and not state.get("best_checkpoint"):
        parent = os.path.dirname(os.path.normpath(resume_dir))
        state["best_checkpoint"] = os.path.join(parent, checkpoint_name(state["best_epoch"]))


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed an epoch starts from: a resumed run draws the same id-dropout masks as an
    uninterrupted one, since the draws depend on (seed, epoch) only, not on the epochs before."""
    return int(seed) * 100_003 + int(epoch)
