"""Training throughput benchmark -> bench_results/bench_train.json.

CPU (default): samples/s for MF, the MiniLM two-tower and the MiniLM cross-encoder,
one process with 2 threads vs two DDP processes (gloo, the training loop's DDP_OPTIONS)
with 1 thread each on the same global batch, alternated for --rounds rounds (medians);
target: two workers >= 0.85x one.

GPU (``--device cuda``): samples/s, model FLOPs utilisation (MFU) and the share of
step time spent waiting on input, in bf16 autocast with pinned-memory batches
produced by a background thread. Imports only torch, transformers, numpy and
causalrec.models / causalrec.train.{step,objectives} so it runs where Ray, Spark
and deltalake are absent. ``--random-init`` builds the MiniLM architecture from its
config.json (or the built-in MiniLM-L6 shape) when the weights are not there.

FLOPs per training step (stated formula, Kaplan et al. 2020 / PaLM appendix B):
``6 * N * T + 12 * L * H * S * T`` with N the encoder's non-embedding parameters
(the transformer layers; the token/position embeddings are lookups, and BERT's pooler
is left out too: it sees one token per sequence and is frozen), T tokens in the step
(batch x seq_len, x2 for the two-tower's two sequences), L layers, H hidden size,
S seq_len (the second term is attention's QK^T and AV, forward + backward). The small
heads and id embeddings are left out (<1%). Only matmul FLOPs count (no norms,
softmax or optimizer). MFU = achieved FLOP/s / the GPU's dense bf16 peak without
sparsity: 989.4 TFLOP/s for the H100 SXM (and H200), 756 for the H100 PCIe.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from causalrec.models import build_model  # noqa: E402
from causalrec.train.objectives import build_objective  # noqa: E402
from causalrec.train.step import DDP_OPTIONS, make_optimizer, skip_constant_buffers, train_step  # noqa: E402

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


def encoder_path(random_init: bool):
    try:
        from causalrec.models.text import default_encoder_path

        return default_encoder_path()
    except Exception:
        if not random_init:
            raise SystemExit("bundled all-MiniLM-L6-v2 not found: pass --random-init")
        return None


def model_config(kind: str, seq_len: int, random_init: bool, n_users=5000, n_items=5000,
                 no_dropout: bool = False, attn=None, sdpa_backends=None) -> dict:
    mc = {"model": kind, "task": "click", "n_users": n_users, "n_items": n_items, "dim": 64, "n_features": 8,
          "global_bias": 0.0}
    if kind != "mf":
        mc.update({"encoder_path": encoder_path(random_init), "random_init": random_init, "max_seq_len": seq_len,
                   "history_len": 10, "freeze_layers": 0, "id_dropout": 0.1})
        if no_dropout:
            mc["encoder_overrides"] = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        if attn:
            mc["attn_implementation"] = attn
        if sdpa_backends:
            mc["sdpa_backends"] = sdpa_backends
    return mc


def synthetic_batch(mc: dict, batch: int, rng: np.random.Generator, pin: bool = False) -> dict:
    """Rows shaped like the featurizer's output (token ids drawn uniformly, full-length sequences)."""
    b = {
        "user_idx": torch.from_numpy(rng.integers(0, mc["n_users"], batch)),
        "item_idx": torch.from_numpy(rng.integers(0, mc["n_items"], batch)),
        "features": torch.from_numpy(rng.standard_normal((batch, mc["n_features"]), dtype=np.float32)),
        "outcome": torch.from_numpy((rng.random(batch) < 0.3).astype(np.float32)),
        "observed": torch.ones(batch), "exposure_propensity": torch.from_numpy(
            rng.uniform(0.05, 1.0, batch).astype(np.float32)),
    }
    s = mc.get("max_seq_len", 0)
    if mc["model"] == "two_tower":
        b["history_item_idx"] = torch.from_numpy(rng.integers(0, mc["n_items"], (batch, mc["history_len"])))
        for side in ("user", "item"):
            b[f"{side}_input_ids"] = torch.from_numpy(rng.integers(1000, 30000, (batch, s)))
            b[f"{side}_attention_mask"] = torch.ones(batch, s, dtype=torch.int64)
    elif mc["model"] == "cross_encoder":
        b["pair_input_ids"] = torch.from_numpy(rng.integers(1000, 30000, (batch, s)))
        b["pair_attention_mask"] = torch.ones(batch, s, dtype=torch.int64)
    if pin:
        b = {k: v.pin_memory() for k, v in b.items()}
    return b


def flops_per_step(model, mc: dict, batch: int) -> float | None:
    enc = getattr(model, "encoder", None)
    if enc is None:
        return None
    n_all = sum(p.numel() for p in enc.parameters())
    n_emb = sum(p.numel() for p in enc.embeddings.parameters())
    pooler = getattr(enc, "pooler", None)  # one token per sequence, frozen: not 6 FLOPs per token
    n_pool = sum(p.numel() for p in pooler.parameters()) if pooler is not None else 0
    n = n_all - n_emb - n_pool
    c = enc.config
    s = mc["max_seq_len"]
    tokens = batch * s * (2 if mc["model"] == "two_tower" else 1)
    return 6.0 * n * tokens + 12.0 * c.num_hidden_layers * c.hidden_size * s * tokens


# --------------------------------------------------------------------------- CPU


def _cpu_run(kind, seq_len, batch, steps, threads, random_init, rank=0, world=1, ddp_options=DDP_OPTIONS):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mc = model_config(kind, seq_len, random_init)
    model = build_model(mc)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(skip_constant_buffers(model), **ddp_options)
    opt = make_optimizer(model, 1e-3, 0.0)
    obj = build_objective("ips", "click", 0.05)
    rng = np.random.default_rng(rank)
    data = [synthetic_batch(mc, batch // world, rng) for _ in range(4)]
    for i in range(2):  # warm-up
        train_step(model, obj, data[i % 4], opt)
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(model, obj, data[i % 4], opt)
    if world > 1:
        torch.distributed.barrier()
    return batch * steps / (time.perf_counter() - t0)


def _ddp_worker(rank, world, port, args, out, ddp_options):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sps = _cpu_run(*args, rank=rank, world=world, ddp_options=ddp_options)
        if rank == 0:
            out.put(sps)
    finally:
        torch.distributed.destroy_process_group()


def _two_workers(kind, seq_len, batch, steps, random_init, ddp_options) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port: rounds follow each other quickly
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker,
                         args=(r, 2, port, (kind, seq_len, batch, steps, 1, random_init), out, ddp_options))
             for r in range(2)]
    for p in procs:
        p.start()
    two = out.get(timeout=1800)
    for p in procs:
        p.join()
    return two


def cpu_bench(kind, seq_len, batch, steps, random_init, rounds: int = 3, ddp_options=None) -> dict:
    """``rounds`` alternations of one worker then two (so drifting machine load hits both alike);
    medians, and the ratio of the medians. ``ddp_options``: the training loop's unless a
    comparison run overrides them."""
    ddp_options = DDP_OPTIONS if ddp_options is None else ddp_options
    ones, twos = [], []
    for _ in range(rounds):
        ones.append(_cpu_run(kind, seq_len, batch, steps, 2, random_init))
        twos.append(_two_workers(kind, seq_len, batch, steps, random_init, ddp_options))
    one, two = float(np.median(ones)), float(np.median(twos))
    return {"model": kind, "seq_len": seq_len if kind != "mf" else None, "global_batch": batch, "steps": steps,
            "rounds": rounds, "ddp_options": ddp_options,
            "one_worker_2_threads_samples_per_s": round(one, 1), "two_ddp_workers_1_thread_samples_per_s": round(two, 1),
            "two_over_one": round(two / one, 3), "per_round_two_over_one": [round(t / o, 3) for o, t in zip(ones, twos)],
            "target_two_over_one": 0.85}


# --------------------------------------------------------------------------- GPU


def gpu_bench(kind, seq_len, batch, steps, random_init, compile_model: bool, no_dropout: bool = False,
              attn=None, sdpa_backends=None, compile_mode=None) -> dict:
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    mc = model_config(kind, seq_len, random_init, no_dropout=no_dropout, attn=attn, sdpa_backends=sdpa_backends)
    base = build_model(mc).to(dev)
    model = torch.compile(base, mode=compile_mode) if compile_model else base
    opt = make_optimizer(model, 1e-4, 0.0)
    obj = build_objective("ips", "click", 0.05)
    q: "queue.Queue" = queue.Queue(maxsize=6)
    stop = threading.Event()

    def producer():  # the input pipeline: builds pinned batches while the GPU computes
        rng = np.random.default_rng(0)
        while not stop.is_set():
            b = synthetic_batch(mc, batch, rng, pin=True)
            while not stop.is_set():
                try:
                    q.put(b, timeout=0.1)
                    break
                except queue.Full:
                    continue

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    warm = 10 if compile_model else 5
    compile_error = None
    try:
        train_step(model, obj, q.get(), opt, device=dev, bf16=True)
    except Exception as exc:  # compile failure: measure eager instead, and say so
        if not compile_model:
            raise
        compile_error, model = f"{type(exc).__name__}: {str(exc)[:300]}", base
    for _ in range(warm):
        train_step(model, obj, q.get(), opt, device=dev, bf16=True)
    torch.cuda.synchronize()
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        b = q.get()
        wait += time.perf_counter() - tw
        # train_step reads the loss (.item) each step, so every step is synchronised
        train_step(model, obj, b, opt, device=dev, bf16=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    stop.set()
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    f = flops_per_step(base, mc, batch)
    achieved = f * steps / dt if f else None
    enc = getattr(base, "encoder", None)
    extra = {} if enc is None else {"attn_implementation": enc.config._attn_implementation,
                                    "sdpa_backends": getattr(base, "sdpa_order", None)}
    if compile_error:
        extra["compile_error"] = compile_error
    return {"model": kind, "device": name, "seq_len": seq_len if kind != "mf" else None, "batch": batch,
            "steps": steps, "bf16": True, "compiled": compile_model and compile_error is None,
            "compile_mode": compile_mode, **extra, "samples_per_s": round(batch * steps / dt, 1),
            "step_ms": round(1000 * dt / steps, 2), "input_wait_share": round(wait / dt, 4),
            "flops_per_step": f, "achieved_tflops": None if achieved is None else round(achieved / 1e12, 1),
            "peak_bf16_tflops": None if peak is None else peak / 1e12,
            "mfu": None if (achieved is None or peak is None) else round(achieved / peak, 4),
            "random_init": random_init, "encoder_dropout": not no_dropout}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--models", default="mf,two_tower,cross_encoder")
    ap.add_argument("--random-init", action="store_true", help="MiniLM architecture with random weights")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 32 on CPU, 64 on GPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="GPU: torch.compile the model")
    ap.add_argument("--batch", type=int, default=None, help="(global) batch size (default per model and device)")
    ap.add_argument("--no-dropout", action="store_true", help="encoder dropout 0 (fine-tuning without dropout)")
    ap.add_argument("--attn", default=None, help="encoder attn_implementation (sdpa, eager)")
    ap.add_argument("--sdpa-backends", default=None, help="SDPA kernel order, or 'default' for PyTorch's own")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--ddp-options", type=json.loads, default=None,
                    help='CPU: DDP keyword arguments instead of the loop\'s DDP_OPTIONS, e.g. \'{"gradient_as_bucket_view": false}\'')
    ap.add_argument("--rounds", type=int, default=3, help="CPU: alternations of one worker and two (medians)")
    ap.add_argument("--key", default=None, help="key in the JSON file (default: device[_compiled][_nodropout])")
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "bench_train.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for kind in args.models.split(","):
        if args.device == "cpu":
            seq = args.seq_len or 32
            batch = args.batch or (8192 if kind == "mf" else 32)
            steps = args.steps or (40 if kind == "mf" else 10)
            r = cpu_bench(kind, seq, batch, steps, args.random_init, args.rounds, args.ddp_options)
        else:
            seq = args.seq_len or 64
            batch = args.batch or {"mf": 65536, "two_tower": 1024, "cross_encoder": 2048}[kind]
            steps = args.steps or (50 if kind == "mf" else 30)
            r = gpu_bench(kind, seq, batch, steps, args.random_init, args.compile, args.no_dropout, args.attn,
                          args.sdpa_backends, args.compile_mode)
        print(json.dumps(r), flush=True)
        results.append(r)
    report = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2), "results": results,
              "flops_formula": "6*N_nonembedding*tokens + 12*layers*hidden*seq_len*tokens per training step "
                               "(N: transformer-layer parameters, embeddings and pooler excluded; matmul FLOPs only)",
              "peak": "dense bf16 without sparsity: H100 SXM / H200 989.4 TFLOP/s, H100 PCIe 756"}
    if args.device == "cuda":
        report["mfu_target"] = 0.40
        report["input_wait_target"] = 0.05
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    key = args.key or (args.device + ("_compiled" if args.compile else "") + ("_nodropout" if args.no_dropout else ""))
    existing[key] = report
    out.write_text(json.dumps(existing, indent=2))
    return report


if __name__ == "__main__":
    main()
