"""Data parallelism is exact when the workers' objective denominators agree: two DDP workers (gloo,
CPU), each on half of every batch of fully observed rows under the naive objective (so each half
holds the same number of observed rows), end with the parameters one process reaches on the whole
batches, with the DDP options the training loop uses (``DDP_OPTIONS``: gradients as views into the
all-reduce buckets, re-pointed after ``zero_grad(set_to_none=True)``). A stale or doubly-counted
gradient would show up here. With unequal observed counts (or weight sums, for the self-normalised
objectives) per worker DDP's mean of per-worker losses is not the whole-batch loss (step.py)."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from causalrec.models import build_model
from causalrec.train.objectives import build_objective
from causalrec.train.step import DDP_OPTIONS, make_optimizer, train_step

MC = {"model": "mf", "task": "rating", "n_users": 50, "n_items": 40, "dim": 8, "global_bias": 3.0}
STEPS, BATCH = 4, 64


def batches() -> list[dict]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(STEPS):
        out.append({
            "user_idx": torch.from_numpy(rng.integers(0, MC["n_users"], BATCH)),
            "item_idx": torch.from_numpy(rng.integers(0, MC["n_items"], BATCH)),
            "label": torch.from_numpy(rng.integers(1, 6, BATCH).astype(np.float32)),
            "observed": torch.ones(BATCH),
            "exposure_propensity": torch.from_numpy(rng.uniform(0.1, 1.0, BATCH).astype(np.float32)),
        })
    return out


def train(model, part=lambda b: b) -> dict:
    torch.manual_seed(0)
    opt = make_optimizer(model, 0.05, 0.01)
    objective = build_objective("naive", "rating", 0.05)
    for b in batches():
        train_step(model, objective, part(b), opt)
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(MC), **DDP_OPTIONS)
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        state = train(model, lambda b: {k: v[half] for k, v in b.items()})
        # after set_to_none zero_grads, every .grad is again a view into DDP's bucket (MF's few
        # parameters fit one bucket): one storage, not a copy per parameter
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
        if rank == 0:
            queue.put(({k: v.numpy() for k, v in state.items()}, len(storages)))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_ddp_workers_on_half_batches_match_one_process_on_whole_batches():
    import torch.multiprocessing as mp

    assert DDP_OPTIONS.get("gradient_as_bucket_view") is True
    torch.manual_seed(0)
    single = train(build_model(MC))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    state, n_grad_storages = queue.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert n_grad_storages == 1
    moved = 0.0
    torch.manual_seed(0)
    init = build_model(MC).state_dict()
    for k, v in single.items():
        np.testing.assert_allclose(state[k], v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
        if v.is_floating_point():  # not the known-id masks (bool buffers)
            moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # the runs trained: equal because of the same updates, not because none
