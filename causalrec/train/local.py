"""In-process training on a pandas frame: the same step, objective and unbiased metric as the Ray loop.

Why: Ray Tune trials, the Coat results script and quick experiments on small tables
do not need a distributed run; they featurize once, shuffle per epoch and call
:func:`causalrec.train.step.train_step`, so their numbers are comparable with the
Ray Train path. Imports torch and pandas only.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from causalrec.models import build_model
from causalrec.models.featurize import Featurizer
from causalrec.models.mf import set_known_ids
from causalrec.train.loop_state import early_stopping_update, initial_state
from causalrec.train.objectives import build_objective, needs_uplift
from causalrec.train.step import make_optimizer, metric_from_totals, train_step, validation_totals


def batches(tensors: dict, batch_size: int, order: Optional[np.ndarray] = None):
    n = next(iter(tensors.values())).shape[0]
    order = np.arange(n) if order is None else order
    for s in range(0, n, batch_size):
        idx = torch.from_numpy(order[s:s + batch_size])
        yield {k: v[idx] for k, v in tensors.items()}


def featurize_frame(featurizer: Featurizer, df: pd.DataFrame, chunk: int = 4096) -> dict:
    """``df`` as one dict of tensors, featurized in chunks; an empty frame gives an empty batch."""
    parts = [featurizer(df.iloc[s:s + chunk]) for s in range(0, len(df), chunk)] or [featurizer(df)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def fit_local(model_config: dict, objective: str, train_df: pd.DataFrame, valid_df: Optional[pd.DataFrame], *,
              epochs: int = 10, batch_size: int = 256, lr: float = 0.01, weight_decay: float = 0.0,
              encoder_lr: Optional[float] = None, clip: float = 0.01, valid_mode: str = "ips", patience: int = 3,
              seed: int = 42, device: str = "cpu", report: Optional[Callable[[dict], None]] = None,
              valid_fn: Optional[Callable[[torch.nn.Module], float]] = None,
              objective_options: Optional[dict] = None, valid_clip: Optional[float] = None,
              known_ids: Optional[dict] = None) -> dict:
    """Train with early stopping on the unbiased validation error; return the best model and history.

    ``valid_fn(model) -> float`` (lower is better), when given, replaces that error as the
    per-epoch validation metric, e.g. minus a ranking metric on a held-out split; then
    ``valid_df`` may be None. Without ``valid_fn``, a None or empty ``valid_df``, or one without a
    labelled row, gives no validation error (NaN): training then runs every epoch and keeps the weights
    of the epoch with the lowest train loss (:func:`causalrec.train.loop_state.early_stopping_update`).
    ``objective_options``: the objective's own settings
    (:func:`causalrec.train.objectives.objective_options`). ``valid_clip``: the IPS clip of the
    validation metric (default ``clip``); fixed across Tune trials that search ``clip``, so they are
    ranked by one metric. With ``objective="uplift"`` the error adds the uplift heads' causal terms
    (:func:`causalrec.train.objectives.uplift_validation_sums`). ``known_ids``: the ids training reaches
    (:func:`causalrec.models.mf.set_known_ids`).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    task = model_config.get("task", "rating")
    model = build_model(model_config)
    set_known_ids(model, known_ids)
    model = model.to(dev)
    valid_clip = clip if valid_clip is None else valid_clip
    obj = build_objective(objective, task, clip, **(objective_options or {}))
    opt = make_optimizer(model, lr, weight_decay, encoder_lr)
    feat = Featurizer(model_config)
    train_t = featurize_frame(feat, train_df)
    has_valid = valid_fn is None and valid_df is not None and len(valid_df) > 0
    valid_t = featurize_frame(feat, valid_df) if has_valid else None
    state = initial_state()
    best_state = copy.deepcopy(model.state_dict())
    best_train_loss = math.inf  # the weights kept while no epoch had a validation error
    n = len(train_df)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        losses = [train_step(model, obj, b, opt, device=dev)["loss"]
                  for b in batches(train_t, batch_size, rng.permutation(n))]
        train_loss = float(np.mean(losses)) if losses else math.nan
        if valid_fn is not None:
            valid = float(valid_fn(model))
        elif valid_t is None:
            valid = math.nan  # no validation rows
        else:
            totals = validation_totals(model, batches(valid_t, batch_size * 4), task, valid_mode, valid_clip,
                                       device=dev, uplift=needs_uplift(objective))
            valid = metric_from_totals(totals)
        improved_before = state["best_epoch"]
        stop = early_stopping_update(state, epoch, valid, patience)
        lowest_loss_so_far = state["best_epoch"] < 0 and train_loss < best_train_loss  # no validation error yet
        if state["best_epoch"] != improved_before or lowest_loss_so_far:
            best_state = copy.deepcopy(model.state_dict())
        if lowest_loss_so_far:
            best_train_loss = train_loss
        rec = {"epoch": epoch, "train_loss": train_loss, "valid_metric": valid,
               "samples_per_s": n / max(time.perf_counter() - t0, 1e-9)}
        state["history"].append(rec)
        if report is not None:
            report(dict(rec))
        if stop:
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"model": model, "history": state["history"], "best_epoch": state["best_epoch"],
            "best_valid": state["best_valid"], "model_config": model_config}


@torch.no_grad()
def predict_frame(model: torch.nn.Module, model_config: dict, df: pd.DataFrame, batch_size: int = 1024,
                  device: str = "cpu") -> dict:
    """Model outputs for every row of ``df`` as numpy arrays."""
    model.eval()
    feat = Featurizer(model_config)
    outs: dict = {}
    for s in range(0, len(df), batch_size):
        b = {k: v.to(device) for k, v in feat(df.iloc[s:s + batch_size]).items()}
        for k, v in model(b).items():
            outs.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}
