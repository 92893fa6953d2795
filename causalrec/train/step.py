"""One optimisation step and one evaluation pass, free of Ray.

Why separate: the Ray Train loop, Ray Tune trials, the Coat results script and the
GPU benchmark (a machine with only torch + transformers) must run the *same* step,
so a number measured in one place means the same thing in the others. Imports
only torch and causalrec.train.objectives.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional

import torch

from causalrec.train.objectives import UPLIFT_VALIDATION_PARTS, data_parallel_world, validation_sums


def to_device(batch: dict, device: torch.device, non_blocking: bool = True) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on GPU (no loss scaling needed, unlike fp16); a no-op elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


ENCODER_DEFAULT_LR = 5e-5

# How every data-parallel run wraps its model (Ray Train's prepare_model and the benchmark).
# gradient_as_bucket_view: each parameter's .grad is a view into DDP's all-reduce bucket instead
# of a separate tensor copied into the bucket and back every step, so a worker holds one
# gradient-sized buffer fewer (about 91 MB for the MiniLM cross-encoder, more for the larger
# encoders a cluster points at). On this project's 2-core CPUs its speed effect was within
# run-to-run noise (bench_train, README). zero_grad(set_to_none=True) stays correct: DDP
# re-points an unset .grad at its bucket view (tests/test_ddp.py: two workers on half batches
# end with the parameters of one process on the whole batches).
# Exact whatever each worker's batch holds: every objective sums its normalisers (|O| observed rows,
# the weight sums of IPS/SNIPS, DR-JL and uplift) over the process group in one fused all-reduce
# per step and scales its loss by the world size, so DDP's mean of the workers' gradients is the
# gradient of the union batch's objective (objectives.global_denominators; tests/test_ddp.py:
# every objective, parts with unequal observed counts and weight sums). That collective, like DDP's
# own gradient all-reduce, needs every worker to take the same number of steps (loop.py).
DDP_OPTIONS = {"gradient_as_bucket_view": True}


def skip_constant_buffers(model: torch.nn.Module) -> torch.nn.Module:
    """Mark the buffers that never change in training (:func:`causalrec.models.mf.constant_buffer_names`) so
    DDP does not broadcast them from rank 0 before every forward; call before wrapping.

    Why: every worker sets the same known-id masks and feature moments before DDP's construction-time
    sync, so the per-step broadcast moves nothing, yet it is a collective each step: on gloo over
    loopback it took an MF step of two workers at batch 8192 from 13.7 to 17.3 ms (bench_train). Every data-parallel run
    (the Ray Train loop, the benchmark, tests/test_ddp.py) goes through here."""
    from causalrec.models.mf import constant_buffer_names

    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, constant_buffer_names(model))
    return model


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, encoder_lr: Optional[float] = None):
    """AdamW; the pre-trained encoder (if any) gets its own, usually smaller, learning rate.

    Biases (the global bias, user/item bias tables, layer biases and norms) are not decayed:
    shrinking the global bias towards 0 would bias every predicted rating.
    """
    buckets: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_enc = ".encoder." in f".{name}" or name.startswith("encoder.")
        no_decay = p.ndim < 2 or "bias" in name or "norm" in name.lower()
        buckets.setdefault((is_enc, no_decay), []).append(p)
    groups = []
    for (is_enc, no_decay), params in buckets.items():
        # a pre-trained encoder fine-tuned at the towers' rate diverges: default to the usual BERT range
        enc_lr = encoder_lr if encoder_lr is not None else min(lr, ENCODER_DEFAULT_LR)
        groups.append({"params": params, "lr": enc_lr if is_enc else lr,
                       "weight_decay": 0.0 if no_decay else weight_decay})
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    # fused: one kernel for the whole update on GPU instead of a few per parameter tensor. On CPU
    # the fused kernel is 5x faster per step for MF's tables but rounds differently, which moved
    # the Coat pipeline's two-tower figures for no end-to-end gain (README); it stays off there.
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True if on_cuda else None)


def train_step(model: torch.nn.Module, objective: Callable, batch: dict, optimizer: torch.optim.Optimizer,
               *, device: torch.device = torch.device("cpu"), bf16: bool = False,
               max_grad_norm: Optional[float] = 5.0) -> dict:
    """Forward, objective, backward, clip, step. Returns the objective's parts as floats."""
    model.train()
    batch = to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(device, bf16):
        out = model(batch)
    parts = objective(out, batch)
    loss = parts["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()} (parts: "
                                 f"{ {k: float(v) for k, v in parts.items()} })")
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def validation_totals(model: torch.nn.Module, batches: Iterable[dict], task: str, mode: str, clip: float,
                      *, device: torch.device = torch.device("cpu"), bf16: bool = False,
                      uplift: bool = False) -> torch.Tensor:
    """Sum :func:`validation_sums` over batches (float64, on CPU): ``[sum w l, sum w, rows]``, plus the
    uplift objective's causal sums with ``uplift=True``. Sum these over workers (:func:`all_reduce_sum`)
    before :func:`metric_from_totals`."""
    model.eval()
    total = torch.zeros(3 + (2 * len(UPLIFT_VALIDATION_PARTS) if uplift else 0), dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, device)
        with autocast_for(device, bf16):
            out = model(batch)
        total += validation_sums(out, batch, task, mode, clip, uplift=uplift).cpu()
    return total


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` summed over the default process group, returned on ``device``: the worker's training device.

    Why on the training device: Ray Train gives GPU workers a ``nccl`` group, whose collectives take
    CUDA tensors only (a CPU tensor fails with "No backend type associated with device type cpu");
    gloo (CPU workers) takes CPU tensors. The tensor is copied to ``device`` and reduced there; the
    caller moves the result where it needs it. Without a process group (or a group of one) it is
    only copied to ``device``.
    """
    x = t.to(device, copy=True)
    if data_parallel_world() > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


def validation_label(mode: str, uplift: bool = False) -> str:
    """What the validation metric measures, for logs and ``valid_metric_source``."""
    if not uplift:
        return mode
    return (f"{mode} relevance error + uplift causal error (IPW errors of y1 and y0 + transformed-outcome error "
            "of the predicted uplift)")


def validation_parts(total: torch.Tensor) -> dict:
    """The named errors in validation totals: ``relevance`` (the relevance head's error in the validation
    mode) and, for the uplift objective, ``y1`` / ``y0`` (each potential-outcome head's self-normalised
    IPW error) and ``transformed_outcome`` (the predicted uplift's squared error against the transformed
    outcome); NaN where no validation row had weight."""
    total = total.detach().cpu().double()

    def ratio(num: int) -> float:
        return float(total[num] / total[num + 1]) if float(total[num + 1]) > 0 else float("nan")

    parts = {"relevance": ratio(0)}
    if len(total) > 3:
        for k, name in enumerate(UPLIFT_VALIDATION_PARTS):
            parts[name] = ratio(3 + 2 * k)
    return parts


def metric_from_totals(total: torch.Tensor) -> float:
    """The unbiased validation error (lower is better): the sum of :func:`validation_parts` that have
    rows (the relevance error alone unless the objective is uplift); NaN when none had weight."""
    vals = [v for v in validation_parts(total).values() if not math.isnan(v)]
    return float(sum(vals)) if vals else float("nan")
