"""The Ray Train loop: one ``train_loop_per_worker(config)`` run by every worker.

Each worker streams its own shard of ``training_examples`` (``get_dataset_shard``;
Ray Data splits the Delta files between workers with equal row counts,
``streaming_split(equal=True)``, dropping at most ``world - 1`` rows, so DDP workers
take the same number of steps, their last batches of equal size: DDP's gradient
all-reduce and the objectives' all-reduce of their normalisers run once a step on
every worker and would hang otherwise), featurizes in Ray's prefetch threads
(``iter_torch_batches(collate_fn=..., prefetch_batches=...)``, pinned memory on
GPU), trains the DDP-wrapped model (``prepare_model``; each step follows the
gradient of the union of the workers' batches, whatever each one holds) with bf16
autocast on GPU, then computes the *unbiased* validation error on its validation shard (for
``objective=uplift`` plus the uplift heads' causal error, :func:`causalrec.train.objectives.validation_sums`)
and all-reduces the sums on the training device (nccl takes CUDA tensors only), so every worker takes
the same early-stopping decision.
Every epoch rank 0 saves a checkpoint (weights, optimizer, model config, epoch
state) and all workers ``ray.train.report`` the metrics; a restarted run
(``FailureConfig``) or an explicit ``resume_from`` continues from the next epoch
(each epoch reseeds torch from (seed, epoch), so id-dropout draws do not depend on
where a run was resumed; a resumed run that has nothing left to train reports the
saved state once, so the job still records it).

``config`` keys: model_config, objective, task, clip, valid_clip (the IPS clip of the
validation metric; default ``clip``), epochs, batch_size, lr, encoder_lr, weight_decay,
patience, valid_mode (ips | mcar | naive), bf16, prefetch_batches, torch_threads, seed,
deterministic, resume_from, hyperparameters, known_ids (:func:`causalrec.models.mf.set_known_ids`),
id_index_version and feature_names (the ``features`` layout; both recorded in every checkpoint's
meta.json for scoring).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch
from ray.data.collate_fn import PandasBatchCollateFn

from causalrec.models import build_model
from causalrec.models.featurize import Featurizer
from causalrec.models.mf import set_known_ids
from causalrec.train.checkpoint import (FEATURE_NAMES, ID_INDEX_VERSION, architecture_of, load_optimizer_state,
                                        load_weights, save_checkpoint, unwrap)
from causalrec.train.loop_state import (checkpoint_name, early_stopping_update, epoch_seed, initial_state,
                                        resumed_in_new_run)
from causalrec.train.objectives import build_objective, needs_uplift, objective_options
from causalrec.train.step import (DDP_OPTIONS, all_reduce_sum, make_optimizer, metric_from_totals, skip_constant_buffers,
                                  train_step, validation_label, validation_parts, validation_totals)


class FeaturizeCollate(PandasBatchCollateFn):
    """Ray Data collate hook: pandas batch -> model inputs, in Ray's prefetch threads."""

    def __init__(self, model_config: dict):
        super().__init__()
        self.featurizer = Featurizer(model_config)

    def __call__(self, batch):
        return self.featurizer(batch)


def load_resume_state(directory: str, model: torch.nn.Module) -> dict:
    """Weights into ``model`` and the epoch state from a checkpoint directory."""
    load_weights(unwrap(model), os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    state = initial_state()
    state.update(meta.get("train_state", {}))
    return state


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    threads = int(config.get("torch_threads") or 1)
    torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = bool(config.get("bf16", True)) and on_gpu
    seed = int(config.get("seed", 42))
    torch.manual_seed(seed)
    if config.get("deterministic", True):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)

    mc = config["model_config"]
    task = mc.get("task", "rating")
    objective = build_objective(config["objective"], task, float(config.get("clip", 0.01)),
                                **objective_options(config["objective"], config))

    state = initial_state()
    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()  # local copy; survives for the optimizer load below
    elif config.get("resume_from"):
        resume_dir = config["resume_from"]
    if resume_dir:
        mc = architecture_of(resume_dir, mc)  # e.g. a two-tower saved before its text-match path
    model = build_model(mc)
    if resume_dir:
        state = load_resume_state(resume_dir, model)
        if checkpoint is None:  # resume_from: a new run, without the earlier epochs' checkpoints
            resumed_in_new_run(state, resume_dir)
        if rank == 0:
            print(f"[train] resuming from {resume_dir} at epoch {state['epoch']}", flush=True)
    set_known_ids(model, config.get("known_ids"))
    model = ray.train.torch.prepare_model(skip_constant_buffers(model), parallel_strategy_kwargs=dict(DDP_OPTIONS))
    optimizer = make_optimizer(model, float(config.get("lr", 0.01)), float(config.get("weight_decay", 0.0)),
                               config.get("encoder_lr"))
    if resume_dir:
        load_optimizer_state(resume_dir, optimizer)

    collate = FeaturizeCollate(mc)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    batch_size = int(config.get("batch_size", 256))
    prefetch = int(config.get("prefetch_batches", 2))
    valid_mode = config.get("valid_mode", "ips")
    epochs = int(config.get("epochs", 1))
    patience = int(config.get("patience", 0))
    valid_clip = float(config["valid_clip"] if config.get("valid_clip") is not None else config.get("clip", 0.01))
    uplift = needs_uplift(config["objective"])  # validate the uplift heads too (objectives.uplift_validation_sums)
    valid_label = validation_label(valid_mode, uplift)
    report = dict(rank=rank, model=model, mc=mc, optimizer=optimizer, config=config, valid_mode=valid_mode)

    # patience can run out on the last configured epoch (stopped_early stays False there): a resume
    # with more epochs must stop too, as the uninterrupted run with those epochs did
    if patience > 0 and state["bad_epochs"] >= patience and state["epoch"] < epochs:
        state["stopped_early"] = True
    finished = state["stopped_early"] or state["epoch"] >= epochs
    if resume_dir and checkpoint is None and state["history"] and finished:
        last = state["history"][-1]
        if rank == 0:
            print(f"[train] {resume_dir} had finished (epoch {state['epoch']} of {epochs}, stopped early: "
                  f"{state['stopped_early']}); reporting it unchanged", flush=True)
        _report(int(last["epoch"]), {**last, "best_valid": state["best_valid"], "best_epoch": state["best_epoch"],
                                     "stopped_early": state["stopped_early"]}, state, **report)
        return

    for epoch in range(int(state["epoch"]), epochs):
        if state["stopped_early"]:
            break
        torch.manual_seed(epoch_seed(seed, epoch))
        t0 = time.perf_counter()
        total, steps, rows, wait = 0.0, 0, 0, 0.0
        t_fetch = time.perf_counter()
        for batch in train_shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                                    prefetch_batches=prefetch, pin_memory=on_gpu,
                                                    local_shuffle_buffer_size=batch_size * 4,
                                                    # from (seed, epoch) like the torch draws: a resumed
                                                    # run shuffles as an uninterrupted one, and seeds 42
                                                    # and 43 share no epoch's order (seed + epoch did)
                                                    local_shuffle_seed=epoch_seed(seed, epoch)):
            wait += time.perf_counter() - t_fetch
            parts = train_step(model, objective, batch, optimizer, device=device, bf16=bf16)
            # under DDP a worker's loss is its share of the union batch's loss times the world
            # size, so the all-reduced total / steps below is the mean union-batch loss per step
            total += parts["loss"]
            steps += 1
            rows += int(batch["user_idx"].shape[0])
            t_fetch = time.perf_counter()
        train_time = time.perf_counter() - t0
        sums = torch.tensor([total, steps, rows], dtype=torch.float64)
        vt = validation_totals(unwrap(model), valid_shard.iter_torch_batches(
            batch_size=batch_size * 4, collate_fn=collate, prefetch_batches=prefetch, pin_memory=on_gpu),
            task, valid_mode, valid_clip, device=device, bf16=bf16, uplift=uplift)
        # one collective for both, on the training device (a GPU worker's nccl group takes CUDA tensors only)
        if world > 1 and torch.distributed.is_initialized():
            reduced = all_reduce_sum(torch.cat([sums, vt]), device).cpu()
            sums, vt = reduced[:3], reduced[3:]
        train_loss = float(sums[0] / max(sums[1], 1))
        valid, valid_parts = metric_from_totals(vt), validation_parts(vt)
        stop = early_stopping_update(state, epoch, valid, patience)
        state["epoch"] = epoch + 1
        state["stopped_early"] = stop and epoch + 1 < epochs
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "valid_metric": valid if not math.isnan(valid) else train_loss,
            "valid_metric_source": valid_label if not math.isnan(valid) else "train_loss (no validation rows)",
            **{f"valid_{k}": v for k, v in valid_parts.items()},
            "valid_rows": int(vt[2]), **({"valid_causal_rows": int(vt[-1])} if uplift else {}),
            "train_rows": int(sums[2]), "best_valid": state["best_valid"],
            "best_epoch": state["best_epoch"], "samples_per_s": float(sums[2]) / max(train_time, 1e-9) / 1.0,
            "input_wait_share": wait / max(train_time, 1e-9), "stopped_early": state["stopped_early"],
        }
        state["history"].append({k: metrics[k] for k in ("epoch", "train_loss", "valid_metric", "valid_rows")})
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{epochs} train_loss={train_loss:.4f} "
                  f"valid({valid_mode}{'+uplift' if uplift else ''})={valid:.4f} "
                  f"[{' '.join(f'{k}={v:.4f}' for k, v in valid_parts.items())}] best_epoch={state['best_epoch'] + 1} "
                  f"{metrics['samples_per_s']:.0f} samples/s", flush=True)
        _report(epoch, metrics, state, **report)
        if stop:
            break


def _report(epoch: int, metrics: dict, state: dict, *, rank: int, model, mc: dict, optimizer, config: dict,
            valid_mode: str) -> None:
    """Every worker reports the epoch's metrics; rank 0 with the checkpoint (weights, optimizer, state)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"train_state": state, "hyperparameters": config.get("hyperparameters", {}),
                "objective": config["objective"], "valid_mode": valid_mode, "metrics": metrics,
                # the id map the rows were indexed with: scoring reads id_index at this version
                ID_INDEX_VERSION: config.get("id_index_version"),
                # the names of the feature slots: scoring maps served vectors onto them by name
                FEATURE_NAMES: config.get("feature_names")}
        save_checkpoint(tmp, model, mc, meta, optimizer)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(epoch))
