"""Data parallelism is exact: two DDP workers (gloo, CPU), each on its part of every batch, end with
the parameters one process reaches on the whole batches, with the DDP options the training loop uses
(``DDP_OPTIONS``: gradients as views into the all-reduce buckets, re-pointed after
``zero_grad(set_to_none=True)``). A stale or doubly-counted gradient would show up here.

Exact also when the workers' objective normalisers differ (observed counts, IPS / SNIPS / uplift
weight sums, DR-JL's sample weights): each objective sums them over the process group and scales
its worker's loss by the world size (objectives.global_denominators), so DDP's gradient mean is the
union batch's gradient. Before, each worker normalised by its own part and a worker with fewer
observed rows had its rows up-weighted."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from causalrec.models import build_model
from causalrec.train.objectives import OBJECTIVES, build_objective, needs_imputation, needs_uplift
from causalrec.train.step import (DDP_OPTIONS, all_reduce_sum, make_optimizer, metric_from_totals, skip_constant_buffers,
                                  train_step, validation_totals)

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


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)


def _worker(rank: int, port: int, queue) -> None:
    _init(rank, port)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(skip_constant_buffers(build_model(MC)), **DDP_OPTIONS)
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        state = train(model, lambda b: {k: v[half] for k, v in b.items()})
        # after set_to_none zero_grads, every .grad is again a view into DDP's bucket (MF's few
        # parameters fit one bucket): one storage, not a copy per parameter
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
        if rank == 0:
            queue.put(({k: v.numpy() for k, v in state.items()}, len(storages)))
    finally:
        _close_group()


def _close_group() -> None:
    """Both ranks reach the barrier before either tears gloo down: a rank that destroys its group while
    the other is still closing its side can abort in gloo's threads ("terminate called without an
    active exception"), a crash at exit that would fail the test on a correct run."""
    try:
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target) -> list:
    """Run ``target(rank, port, queue)`` in two spawned processes; the one result they put on the queue."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    return result


@pytest.mark.timeout(300)
def test_two_ddp_workers_on_half_batches_match_one_process_on_whole_batches():
    assert DDP_OPTIONS.get("gradient_as_bucket_view") is True
    torch.manual_seed(0)
    single = train(build_model(MC))
    state, n_grad_storages = _spawn(_worker)
    assert n_grad_storages == 1
    moved = 0.0
    torch.manual_seed(0)
    init = build_model(MC).state_dict()
    for k, v in single.items():
        np.testing.assert_allclose(state[k], v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
        if v.is_floating_point():  # not the known-id masks (bool buffers)
            moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # the runs trained: equal because of the same updates, not because none


def _buffers_worker(rank: int, port: int, queue) -> None:
    _init(rank, port)
    try:
        plain = torch.nn.parallel.DistributedDataParallel(build_model(MC), **DDP_OPTIONS)
        skipped = torch.nn.parallel.DistributedDataParallel(skip_constant_buffers(build_model(MC)), **DDP_OPTIONS)
        b = batches()[0]
        for model in (plain, skipped):
            if rank == 1:  # a value only rank 1 holds: a broadcast from rank 0 before the forward restores it
                model.module.ids.user_known[0] = False
            model(b)
        if rank == 1:  # the one result _spawn reads
            queue.put((bool(plain.module.ids.user_known[0]), bool(skipped.module.ids.user_known[0])))
    finally:
        _close_group()


@pytest.mark.timeout(300)
def test_constant_buffers_are_not_broadcast_every_step():
    """skip_constant_buffers (the loop and the benchmark wrap through it) drops DDP's per-forward
    broadcast of the known-id masks, a collective per step that moves nothing; without it DDP sends
    rank 0's buffers before each forward."""
    plain_kept, skipped_kept = _spawn(_buffers_worker)
    assert plain_kept is True  # DDP's default: rank 0's True was broadcast over rank 1's False
    assert skipped_kept is False  # not broadcast: rank 1 keeps its own value


# --------------------------------------------------------------------------- unequal normalisers

# the batch sizes of an epoch (the last one smaller) and where rank 0's part of each batch ends:
# unequal parts, as nothing in the objectives' exactness needs Ray Data's equal shards
SIZES, CUTS = (64, 64, 64, 20), (40, 24, 32, 8)


def mixed_batches(task: str) -> list[dict]:
    """Rank 0's rows mostly observed, rank 1's rarely (none at all in step 2), with different
    propensities, treatment shares and sample weights: every normaliser differs between the parts."""
    rng = np.random.default_rng(7)
    out = []
    for step, (n, cut) in enumerate(zip(SIZES, CUTS)):
        first = np.arange(n) < cut
        p_obs = np.where(first, 0.9, 0.0 if step == 2 else 0.25)
        observed = (rng.random(n) < p_obs).astype(np.float32)
        observed[0] = 1.0  # the union always has an observed row
        label = rng.integers(1, 6, n).astype(np.float32)
        target = label if task == "rating" else (label >= 4).astype(np.float32)
        target = np.where(observed > 0, target, np.nan).astype(np.float32)
        out.append({
            "user_idx": torch.from_numpy(rng.integers(0, MC["n_users"], n)),
            "item_idx": torch.from_numpy(rng.integers(0, MC["n_items"], n)),
            "label": torch.from_numpy(target), "outcome": torch.from_numpy(target),
            "observed": torch.from_numpy(observed),
            "exposure_propensity": torch.from_numpy(
                np.where(first, rng.uniform(0.5, 1.0, n), rng.uniform(0.02, 0.3, n)).astype(np.float32)),
            "sample_weight": torch.from_numpy(np.where(observed > 0, 1.0, np.where(first, 2.0, 9.0)).astype(np.float32)),
            "treated": torch.from_numpy((rng.random(n) < np.where(first, 0.7, 0.2)).astype(np.float32)),
            "treatment_propensity": torch.from_numpy(
                np.where(first, rng.uniform(0.4, 0.9, n), rng.uniform(0.1, 0.4, n)).astype(np.float32)),
        })
    return out


def objective_setup(name: str):
    """The model config and objective the loop builds for ``name`` (uplift: clicks, with every term)."""
    task = "click" if needs_uplift(name) else "rating"
    mc = {**MC, "task": task, "global_bias": 3.0 if task == "rating" else 0.0,
          "imputation": needs_imputation(name), "uplift": needs_uplift(name)}
    kwargs = {"transformed_outcome_weight": 0.5} if needs_uplift(name) else {}
    return mc, task, build_objective(name, task, 0.05, **kwargs)


def train_objective(name: str, model, part=None) -> dict:
    """Steps of ``name`` on :func:`mixed_batches`: the final weights, every step's (clipped, averaged)
    gradients and losses."""
    mc, task, objective = objective_setup(name)
    torch.manual_seed(0)
    opt = make_optimizer(model, 0.05, 0.01)
    grads, losses = [], []
    for step, b in enumerate(mixed_batches(task)):
        parts = train_step(model, objective, part(step, b) if part else b, opt)
        grads.append([p.grad.detach().clone().numpy() for p in model.parameters()])
        losses.append(parts["loss"])
    m = model.module if hasattr(model, "module") else model
    return {"state": {k: v.detach().clone().numpy() for k, v in m.state_dict().items()},
            "grads": grads, "losses": losses}


def _objectives_worker(rank: int, port: int, queue) -> None:
    _init(rank, port)
    try:
        results = {}
        for name in OBJECTIVES:
            torch.manual_seed(0)
            model = torch.nn.parallel.DistributedDataParallel(build_model(objective_setup(name)[0]), **DDP_OPTIONS)

            def part(step, b, rank=rank):
                rows = slice(0, CUTS[step]) if rank == 0 else slice(CUTS[step], SIZES[step])
                return {k: v[rows] for k, v in b.items()}

            results[name] = train_objective(name, model, part)
            # the workers' reported losses, to check that their mean is the union batch's loss
            loss = torch.tensor(results[name]["losses"], dtype=torch.float64)
            torch.distributed.all_reduce(loss)
            results[name]["mean_loss"] = (loss / 2).tolist()
        # the uplift objective's validation sums (relevance + causal terms) summed over the two parts
        # the way the loop does it (all_reduce_sum): exactly the whole batches' totals
        mc, task, _ = objective_setup("uplift")
        torch.manual_seed(0)
        vt = validation_totals(build_model(mc), [part(step, b) for step, b in enumerate(mixed_batches(task))], task,
                               "ips", 0.05, uplift=True)
        results["uplift_validation"] = all_reduce_sum(vt, torch.device("cpu")).tolist()
        if rank == 0:
            queue.put(results)
    finally:
        _close_group()


@pytest.mark.timeout(300)
def test_ddp_is_exact_for_every_objective_when_the_workers_normalisers_differ():
    """Every objective: two workers on unequal parts (unequal observed counts and weight sums, a
    part without observed rows, a smaller last batch) take the single process's steps on the whole
    batches: the same averaged gradients at every step and the same weights at the end."""
    # the parts really differ in what each objective normalises by
    for b, cut in zip(mixed_batches("rating"), CUTS):
        first, rest = b["observed"][:cut].sum(), b["observed"][cut:].sum()
        assert first != rest and (first / cut) != (rest / (len(b["observed"]) - cut))
    single = {}
    for name in OBJECTIVES:
        torch.manual_seed(0)
        single[name] = train_objective(name, build_model(objective_setup(name)[0]))
    ddp = _spawn(_objectives_worker)
    mc, task, _ = objective_setup("uplift")
    torch.manual_seed(0)
    whole = validation_totals(build_model(mc), mixed_batches(task), task, "ips", 0.05, uplift=True)
    np.testing.assert_allclose(ddp.pop("uplift_validation"), whole.numpy(), rtol=1e-9)
    assert whole[1] > 0 and whole[-1] > 0 and np.isfinite(metric_from_totals(whole))
    assert set(ddp) == set(OBJECTIVES)
    wrong = []
    for name in OBJECTIVES:
        one, two = single[name], ddp[name]
        try:
            for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
                for a, b in zip(g1, g2):
                    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=f"{name} gradient, step {step}")
            for k, v in one["state"].items():
                np.testing.assert_allclose(two["state"][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
            # the mean of the workers' losses (what the loop reports) is the union batch's loss
            np.testing.assert_allclose(two["mean_loss"], one["losses"], rtol=1e-5, err_msg=f"{name} loss")
        except AssertionError as e:
            wrong.append(" ".join(str(e).strip().splitlines()[:2]))
        assert max(float(np.abs(g).max()) for g in one["grads"][0]) > 1e-3  # the objective has a gradient
    assert not wrong, "\n".join(wrong)


def test_all_reduce_sum_reduces_on_the_training_device(monkeypatch):
    """The loop's epoch totals are built on CPU, but a GPU worker's process group is nccl, which has a
    backend for CUDA tensors only ("No backend type associated with device type cpu"). all_reduce_sum
    hands the collective a copy on the training device; here a stand-in group of 2 and the meta device
    play the GPU worker's group and device (tests/test_train.py checks the loop calls it with its
    device). The objectives' own collective (global_denominators) reduces normalisers computed from
    the batch, which train_step has already moved to the training device: checked the same way."""
    import torch.distributed as dist

    from causalrec.train.objectives import global_denominators

    seen = []

    def all_reduce(tensor, op=None):
        assert op in (None, dist.ReduceOp.SUM)
        seen.append(tensor.device)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    meta = torch.device("meta")
    totals = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # as the loop builds them: on CPU
    out = all_reduce_sum(totals, meta)
    assert seen == [meta] and out.device == meta and out.dtype == torch.float64
    seen.clear()
    (n,), k = global_denominators(torch.ones(4, device=meta).sum())
    assert seen == [meta] and n.device == meta and k == 2
    monkeypatch.undo()
    # single process: a copy on the device, no collective
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("all_reduce in a single process"))
    out = all_reduce_sum(totals, torch.device("cpu"))
    assert torch.equal(out, totals) and out.data_ptr() != totals.data_ptr()
