"""Epoch bookkeeping shared by the Ray loop and the in-process trainer: best epoch, patience."""
from __future__ import annotations

import math


def initial_state() -> dict:
    return {"epoch": 0, "best_valid": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [],
            "stopped_early": False}


def early_stopping_update(state: dict, epoch: int, valid: float, patience: int) -> bool:
    """Record epoch ``epoch``'s validation error; True when training should stop."""
    if not math.isnan(valid) and valid < state["best_valid"] - 1e-9:
        state["best_valid"], state["best_epoch"], state["bad_epochs"] = valid, epoch, 0
    else:
        state["bad_epochs"] += 1
    return patience > 0 and state["bad_epochs"] >= patience
