"""The Ray Train loop: one ``train_loop_per_worker(config)`` run by every worker.

Each worker streams its own shard of ``training_examples`` (``get_dataset_shard``;
Ray Data splits the Delta files between workers with equal row counts, so DDP
workers take the same number of steps), featurizes in Ray's prefetch threads
(``iter_torch_batches(collate_fn=..., prefetch_batches=...)``, pinned memory on
GPU), trains the DDP-wrapped model (``prepare_model``) with bf16 autocast on GPU,
then computes the *unbiased* validation error on its validation shard and
all-reduces the sums, so every worker takes the same early-stopping decision.
Every epoch rank 0 saves a checkpoint (weights, optimizer, model config, epoch
state) and all workers ``ray.train.report`` the metrics; a restarted run
(``FailureConfig``) or an explicit ``resume_from`` continues from the next epoch.

``config`` keys: model_config, objective, task, clip, epochs, batch_size, lr,
encoder_lr, weight_decay, patience, valid_mode (ips | mcar | naive), bf16,
prefetch_batches, torch_threads, seed, deterministic, resume_from, hyperparameters.
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
from causalrec.train.checkpoint import architecture_of, load_optimizer_state, save_checkpoint, unwrap
from causalrec.train.loop_state import early_stopping_update, initial_state
from causalrec.train.objectives import build_objective, objective_options
from causalrec.train.step import DDP_OPTIONS, make_optimizer, metric_from_totals, train_step, validation_totals


class FeaturizeCollate(PandasBatchCollateFn):
    """Ray Data collate hook: pandas batch -> model inputs, in Ray's prefetch threads."""

    def __init__(self, model_config: dict):
        super().__init__()
        self.featurizer = Featurizer(model_config)

    def __call__(self, batch):
        return self.featurizer(batch)


def load_resume_state(directory: str, model: torch.nn.Module) -> dict:
    """Weights into ``model`` and the epoch state from a checkpoint directory."""
    from safetensors.torch import load_model

    load_model(unwrap(model), os.path.join(directory, "model.safetensors"), strict=True)
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
    torch.manual_seed(int(config.get("seed", 42)))
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
        if rank == 0:
            print(f"[train] resuming from {resume_dir} at epoch {state['epoch']}", flush=True)

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=dict(DDP_OPTIONS))
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

    for epoch in range(int(state["epoch"]), epochs):
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        total, steps, rows, wait = 0.0, 0, 0, 0.0
        t_fetch = time.perf_counter()
        for batch in train_shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                                    prefetch_batches=prefetch, pin_memory=on_gpu,
                                                    local_shuffle_buffer_size=batch_size * 4,
                                                    local_shuffle_seed=int(config.get("seed", 42)) + epoch):
            wait += time.perf_counter() - t_fetch
            parts = train_step(model, objective, batch, optimizer, device=device, bf16=bf16)
            total += parts["loss"]
            steps += 1
            rows += int(batch["user_idx"].shape[0])
            t_fetch = time.perf_counter()
        train_time = time.perf_counter() - t0
        sums = torch.tensor([total, steps, rows], dtype=torch.float64)
        vt = validation_totals(unwrap(model), valid_shard.iter_torch_batches(
            batch_size=batch_size * 4, collate_fn=collate, prefetch_batches=prefetch, pin_memory=on_gpu),
            task, valid_mode, float(config.get("clip", 0.01)), device=device, bf16=bf16)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(vt)
        train_loss = float(sums[0] / max(sums[1], 1))
        valid = metric_from_totals(vt)
        stop = early_stopping_update(state, epoch, valid, patience)
        state["epoch"] = epoch + 1
        state["stopped_early"] = stop and epoch + 1 < epochs
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "valid_metric": valid if not math.isnan(valid) else train_loss,
            "valid_metric_source": f"{valid_mode}" if not math.isnan(valid) else "train_loss (no validation rows)",
            "valid_rows": int(vt[2]), "train_rows": int(sums[2]), "best_valid": state["best_valid"],
            "best_epoch": state["best_epoch"], "samples_per_s": float(sums[2]) / max(train_time, 1e-9) / 1.0,
            "input_wait_share": wait / max(train_time, 1e-9), "stopped_early": state["stopped_early"],
        }
        state["history"].append({k: metrics[k] for k in ("epoch", "train_loss", "valid_metric", "valid_rows")})
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{epochs} train_loss={train_loss:.4f} "
                  f"valid({valid_mode})={valid:.4f} best_epoch={state['best_epoch'] + 1} "
                  f"{metrics['samples_per_s']:.0f} samples/s", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                meta = {"train_state": state, "hyperparameters": config.get("hyperparameters", {}),
                        "objective": config["objective"], "valid_mode": valid_mode, "metrics": metrics}
                save_checkpoint(tmp, model, mc, meta, optimizer)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break
