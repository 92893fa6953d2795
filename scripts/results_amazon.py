"""Amazon Scientific results (Ni, Li & McAuley 2018, UniSRec format): popularity, MF and the text model.

Data: ``causalrec.loaders.amazon`` (Industrial and Scientific, 8,442 users, 4,385 items
with title/description text), keeping the files' own leave-one-out split: each user's
last item is ``test``, the one before ``valid``, the rest ``train``.

Protocol:

* Implicit feedback, ``task="click"`` (log-loss on the logit): every train interaction is
  a positive with ``--neg`` negatives drawn once (seeded) from the items seen in training,
  uniformly (``--neg-alpha 0``), never one of the user's own train items. Models see the
  train split only; items that never occur in it map to the *unknown* id row.
* Models: popularity (train counts); MF (``causalrec.models.mf``); TwoTower
  (``causalrec.models.text``) on the bundled all-MiniLM-L6-v2, encoder frozen so each
  distinct text is encoded once (the model's text cache). An example's user side is what
  precedes its target in the user's sequence: the last ``features.history_length`` item
  ids (``history_item_idx``) and, as ``user_text``, the text of the most recent of those
  items (an item text, so it hits the cache; the pipeline's "Recently: ..." list of five
  texts would need an encoder pass per distinct history, too slow on 2 CPU cores). Items
  are scored from text + id; items never seen in training from text + the unknown id row,
  which the TwoTower learns through ``id_dropout``; MF scores them from its biases only. The
  TwoTower's logit includes ``text_scale * cos(user text, item text)`` on the frozen encoder's
  vectors (its text-match path, ``text_scale`` learned from ``--text-match-init``, a grid
  dimension: 5.0, the library's default for clicks, and 20.0), so it starts from the
  zero-shot cosine below. The scale moves little in a few epochs, so its start acts as the
  cosine's temperature: at 5 the id and popularity terms outweigh the text.
  Supplementary, untrained: "MiniLM-cosine", the cosine between the frozen encoder's
  vectors of the user text (the last earlier item) and each item text.
* Selection on ``valid`` only: every fit stops early on valid NDCG@10 (``fit_local``'s
  ``valid_fn``) and the grid point with the best valid NDCG@10 is kept; test is scored
  once per model.
* Evaluation: full ranking of all 4,385 items per user (scores as one user x item matrix
  product through the model's own linear head, checked against its per-pair scoring); the
  user's own earlier items (train, and valid for test; never the target itself) are
  removed from the ranking; ties go to the lower item index (popularity gives every
  unseen item 0, MF one score per user). Recall@10 (= hit rate, one target) and NDCG@10,
  averaged over users: all test users; "cold" (test item never in the train split); and,
  because cold items are few, "tail" (test item with <= ``--tail-max`` train
  interactions, cold included).

  python scripts/results_amazon.py [--epochs 20] [--max-users 2000] [--skip-text] [--set k=v ...]

The default run took 6 minutes 15 s on 2 CPU cores shared with other jobs (up to about
twice that when they are busy); the text model (one-off encoding of the 4,385 item texts,
tokenisation, training) is most of it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from causalrec.config import load_config  # noqa: E402
from causalrec.models.featurize import Featurizer  # noqa: E402
from causalrec.train.job import model_config_from  # noqa: E402
from causalrec.train.local import featurize_frame, fit_local  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "amazon_scientific_unisrec"
K = 10
# No published anchor: the UniSRec paper (Hou et al., KDD 2022) reports Recall@10/NDCG@10 on this
# data, but its table could not be found with the search tool, and its protocol (sequential models,
# no removal of history items) differs; no numbers are quoted from memory.
ANCHORS: dict = {}


# --------------------------------------------------------------------------- data


def load_amazon_frames(cfg, path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events (user_id, item_id, event_time, split) and items (item_id, text) via the project's loader."""
    from causalrec.loaders import load
    from causalrec.sessions import get_spark

    spark = get_spark(cfg)
    try:
        d = load("amazon", spark, path)
        ev = d.events.select("user_id", "item_id", "event_time", "context").toPandas()
        items = d.items.select("item_id", "text").toPandas()
    finally:
        spark.stop()
    ev["split"] = ev["context"].map(lambda c: json.loads(c)["split"])
    return ev.drop(columns=["context"]), items


def sequences(ev: pd.DataFrame, items: pd.DataFrame):
    """Dense indices (ids in sorted order, like ``id_index``) and each user's time-ordered item sequence."""
    item_ids = np.sort(items["item_id"].unique())
    user_ids = np.sort(ev["user_id"].unique())
    ev = ev.assign(user_idx=np.searchsorted(user_ids, ev["user_id"]), item_idx=np.searchsorted(item_ids, ev["item_id"]))
    ev = ev.sort_values(["user_idx", "event_time"], kind="stable")
    seqs = ev.groupby("user_idx", sort=True)["item_idx"].apply(list)
    splits = ev.groupby("user_idx", sort=True)["split"].apply(list)
    for u, s in splits.items():  # the loader's split: ..., train, valid, test
        if s[-1] != "test" or s[-2] != "valid" or set(s[:-2]) - {"train"}:
            raise ValueError(f"user {u}: splits {s[-3:]} are not train..., valid, test")
    text = items.set_index("item_id").loc[item_ids, "text"].fillna("").to_numpy()
    return list(seqs), text, len(user_ids), len(item_ids)


class Examples:
    """Builds model-input frames; the user side of an example is the sequence before its target."""

    def __init__(self, seqs: list, text: np.ndarray, warm: np.ndarray, history_len: int):
        self.seqs, self.text, self.warm, self.h = seqs, text, warm, history_len

    def model_id(self, items) -> np.ndarray:
        """Item index, or -1 (the unknown row) for items never seen in training."""
        items = np.asarray(items, dtype=np.int64)
        return np.where(self.warm[items], items, -1)

    def user_side(self, u: int, k: int) -> tuple[list, str]:
        prev = self.seqs[u][max(0, k - self.h):k]
        return self.model_id(prev).tolist(), (self.text[prev[-1]] if prev else "")

    def rows(self, pairs: list[tuple[int, int]], targets=None) -> pd.DataFrame:
        """One row per (user, position); ``targets`` overrides the item (for negatives)."""
        hist, utext = zip(*(self.user_side(u, k) for u, k in pairs)) if pairs else ((), ())
        items = np.array([self.seqs[u][k] for u, k in pairs] if targets is None else targets, dtype=np.int64)
        return pd.DataFrame({"user_idx": [u for u, _ in pairs], "item_idx": self.model_id(items),
                             "target": items, "history_item_idx": list(hist), "user_text": list(utext),
                             "item_text": self.text[items]})


def sample_negatives(users: np.ndarray, seen: list, candidates: np.ndarray, p: np.ndarray, k: int,
                     rng) -> np.ndarray:
    """(len(users), k) items drawn from ``candidates`` with probabilities ``p``, never one of the user's ``seen``."""
    out = rng.choice(candidates, (len(users), k), p=p)
    for r, u in enumerate(users):
        bad = np.isin(out[r], seen[u])
        while bad.any():
            out[r, bad] = rng.choice(candidates, int(bad.sum()), p=p)
            bad = np.isin(out[r], seen[u])
    return out


def labelled_frame(ex: Examples, pairs: list, seen: list, candidates, p, k: int, rng) -> pd.DataFrame:
    """Positives at ``pairs`` plus ``k`` sampled negatives each (same user side), ``outcome`` 1/0.

    Each positive is followed by its negatives (rows sharing a user text stay together, so the
    featurizer's per-batch tokenization sees repeats; training shuffles rows every epoch anyway).
    """
    pos = ex.rows(pairs)
    neg_items = sample_negatives(np.array([u for u, _ in pairs]), seen, candidates, p, k, rng)
    neg = ex.rows([pair for pair in pairs for _ in range(k)], targets=neg_items.reshape(-1))
    order = np.argsort(np.concatenate([np.arange(len(pos)), np.repeat(np.arange(len(pos)), k)]), kind="stable")
    both = pd.concat([pos.assign(outcome=1.0), neg.assign(outcome=0.0)], ignore_index=True)
    return both.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- scoring and metrics


def tower_vectors(model, users: dict, items: dict):
    """(user vectors, item vectors, user bias, item bias) whose elementwise product feeds the model's head.

    MF: ``u . i`` + biases (:class:`causalrec.models.mf.MF`); TwoTower: ``encode_users`` x
    ``encode_items`` + the id biases (:meth:`causalrec.models.text.TwoTower.score`), the vectors
    carrying the unit text vectors of its text-match path when it has one (see :func:`head_logits`).
    """
    if hasattr(model, "encode_users"):
        uv, iv = model.encode_users(users), model.encode_items(items)
    else:
        uv, iv = model.ids.user(users["user_idx"]), model.ids.item(items["item_idx"])
    ub = model.ids.user_bias(users["user_idx"]).squeeze(-1) + model.global_bias
    ib = model.ids.item_bias(items["item_idx"]).squeeze(-1)
    return uv, iv, ub, ib


def head_logits(model, uv, iv, ub, ib) -> torch.Tensor:
    """``heads(u * i, bias)`` for every (user, item) pair at once: the relevance head is linear, so
    ``w . (u * i) = (u * w) . i`` and the whole grid is one matrix product. A TwoTower with its
    text-match path adds ``text_scale * cos`` (another matrix product of the unit text vectors)."""
    if model.heads.uplift is not None:
        raise ValueError("full ranking scores the relevance head only; build the model without uplift")
    text = 0.0
    if hasattr(model, "split_vectors"):
        (uv, ut), (iv, it) = model.split_vectors(uv), model.split_vectors(iv)
        if ut is not None:
            text = model.text_scale * (ut.float() @ it.float().T)
    w = model.heads.relevance.proj.weight[0]
    return ((uv * w) @ iv.T + ub[:, None] + ib[None, :] + text).float()


class Ranker:
    """Ranks every row's target among all items for a fitted model; inputs are featurized once."""

    def __init__(self, mc: dict, frame: pd.DataFrame, item_frame: pd.DataFrame, exclude: list, chunk: int = 1024):
        feat = Featurizer(mc)
        self.users = featurize_frame(feat, frame)
        self.items = featurize_frame(feat, item_frame)
        self.targets, self.exclude, self.chunk = frame["target"].to_numpy(), exclude, chunk
        self.checked = False

    def _check(self, model, logits: torch.Tensor) -> None:
        """Once: the matrix-product scores equal the model's own per-pair scoring for a few users."""
        n_u, n_i = min(3, logits.shape[0]), len(self.items["item_idx"])
        ut = {k: v[:n_u] for k, v in self.users.items()}
        uidx, iidx = ut["user_idx"][:, None].expand(-1, n_i), self.items["item_idx"][None, :].expand(n_u, -1)
        if hasattr(model, "encode_users"):
            ref = model.score(model.encode_users(ut)[:, None, :], model.encode_items(self.items)[None], uidx, iidx)
        else:
            ref = model({"user_idx": uidx, "item_idx": iidx})
        torch.testing.assert_close(logits[:n_u], ref["logit"].float(), rtol=1e-4, atol=1e-4)
        self.checked = True

    @torch.no_grad()
    def ranks(self, model, scorer=None) -> np.ndarray:
        """Target ranks under ``model``'s scores, or under ``scorer(user_batch) -> (users, items)`` scores."""
        model.eval()
        n = len(self.targets)
        out = np.empty(n, dtype=np.int64)
        for s in range(0, n, self.chunk):
            ut = {k: v[s:s + self.chunk] for k, v in self.users.items()}
            if scorer is not None:
                logits = scorer(ut).float()
            else:
                logits = head_logits(model, *tower_vectors(model, ut, self.items))
                if not self.checked:
                    self._check(model, logits)
            e = min(s + self.chunk, n)
            out[s:e] = target_ranks(logits.numpy(), self.targets[s:e], self.exclude[s:e])
        return out


@torch.no_grad()
def text_cosine_ranks(model, ranker: Ranker) -> np.ndarray:
    """Zero-shot reference: cosine of the frozen encoder's user-text and item-text vectors (no training)."""
    items = ranker.items
    item_vecs = F.normalize(model.encode_text(items["item_input_ids"], items["item_attention_mask"]), dim=-1)

    def scorer(ut):
        return F.normalize(model.encode_text(ut["user_input_ids"], ut["user_attention_mask"]), dim=-1) @ item_vecs.T

    return ranker.ranks(model, scorer)


def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: list) -> np.ndarray:
    """0-based rank of each row's target; excluded items removed; ties go to the lower item index."""
    s = scores.astype(np.float64, copy=True)
    for r, ex in enumerate(exclude):
        if len(ex):
            s[r, ex] = -np.inf
    rows = np.arange(len(s))
    st = s[rows, targets][:, None]
    idx = np.arange(s.shape[1])[None, :]
    return (s > st).sum(1) + ((s == st) & (idx < targets[:, None])).sum(1)


def metrics(ranks: np.ndarray, k: int = K) -> dict:
    if len(ranks) == 0:
        return {f"recall@{k}": None, f"ndcg@{k}": None, "users": 0}
    hit = ranks < k
    return {f"recall@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0).mean()),
            "users": int(len(ranks))}


def slices(ranks: np.ndarray, targets: np.ndarray, train_count: np.ndarray, tail_max: int) -> dict:
    cold = train_count[targets] == 0
    tail = train_count[targets] <= tail_max
    return {"all": metrics(ranks), "cold": metrics(ranks[cold]), f"tail_le{tail_max}": metrics(ranks[tail])}


def popularity_ranks(train_count: np.ndarray, targets: np.ndarray, exclude: list) -> np.ndarray:
    ranks = np.empty(len(targets), dtype=np.int64)
    for s in range(0, len(targets), 1024):
        t = targets[s:s + 1024]
        sc = np.broadcast_to(train_count.astype(np.float64), (len(t), len(train_count)))
        ranks[s:s + 1024] = target_ranks(sc, t, exclude[s:s + 1024])
    return ranks


# --------------------------------------------------------------------------- fitting


def select_and_fit(cfg, kind: str, grid: list[dict], train, valid_eval, valid_excl, item_frame, shape: dict,
                   epochs: int, batch_size: int, patience: int) -> dict:
    """Fit every grid point, early stopping on valid NDCG@10 (full ranking); keep the best grid point."""
    best, trials = None, []
    for params in grid:
        cfg.train.model = kind
        cfg.train.embedding_dim = params["dim"]
        if "text_match_init" in params:
            cfg.train.text_match_init = params["text_match_init"]
        mc = model_config_from(cfg, objective="naive", **shape)
        ranker = Ranker(mc, valid_eval, item_frame, valid_excl)
        t0 = time.time()
        fit = fit_local(mc, "naive", train, None, epochs=epochs, batch_size=batch_size, lr=params["lr"],
                        weight_decay=params["wd"], patience=patience, seed=cfg.project.seed,
                        valid_fn=lambda m: -metrics(ranker.ranks(m))[f"ndcg@{K}"])
        v = metrics(ranker.ranks(fit["model"]))
        trials.append({**params, "best_epoch": fit["best_epoch"], "epochs_run": len(fit["history"]),
                       f"valid_ndcg@{K}": v[f"ndcg@{K}"], f"valid_recall@{K}": v[f"recall@{K}"],
                       "train_loss": [round(h["train_loss"], 4) for h in fit["history"]],
                       "seconds": round(time.time() - t0, 1)})
        print(f"  {kind} {params} -> valid NDCG@{K} {v[f'ndcg@{K}']:.4f} R@{K} {v[f'recall@{K}']:.4f} "
              f"(epoch {fit['best_epoch']} of {len(fit['history'])}, {trials[-1]['seconds']}s)", flush=True)
        if best is None or v[f"ndcg@{K}"] > best["valid"][f"ndcg@{K}"]:
            best = {"fit": fit, "params": params, "mc": mc, "valid": v}
    best["trials"] = trials
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "conf" / "local.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--epochs", type=int, default=20, help="max MF epochs (early stopping on valid)")
    ap.add_argument("--text-epochs", type=int, default=6, help="max text-model epochs (early stopping on valid)")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--neg", type=int, default=4, help="sampled negatives per positive")
    ap.add_argument("--neg-alpha", type=float, default=0.0,
                    help="negatives drawn with probability ~ train count ** alpha (0: uniform, 1: popularity)")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.02], help="MF learning rates tried")
    ap.add_argument("--wd", type=float, nargs="+", default=[0.5, 1.0], help="MF weight decays tried")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512], help="MF embedding sizes tried")
    ap.add_argument("--batch-size", type=int, default=4096, help="MF batch size")
    ap.add_argument("--text-wd", type=float, nargs="+", default=[0.1],
                    help="text-model weight decays tried (each grid point re-encodes the item texts)")
    ap.add_argument("--text-match-init", type=float, nargs="+", default=[5.0, 20.0],
                    help="starts of the text-match path's scale tried (train.text_match_init; it moves little "
                         "in a few epochs, so it acts as the cosine's temperature)")
    ap.add_argument("--text-dim", type=int, default=128)
    ap.add_argument("--text-lr", type=float, default=0.005)
    ap.add_argument("--text-batch-size", type=int, default=1024)
    ap.add_argument("--max-seq-len", type=int, default=64, help="tokens per text (item texts: median ~44)")
    ap.add_argument("--id-dropout", type=float, default=0.5, help="text model: share of ids replaced by unknown")
    ap.add_argument("--patience", type=int, default=2, help="epochs without a better valid NDCG@10 before stopping")
    ap.add_argument("--tail-max", type=int, default=5, help="tail slice: test items with <= this many train rows")
    ap.add_argument("--max-users", type=int, default=0, help="random subset of users (quick runs; 0 = all)")
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "results_amazon.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    t_start = time.time()
    cfg = load_config(args.config, args.set)
    cfg.data.source, cfg.data.path = "amazon", args.data
    cfg.train.task = "click"
    rng = np.random.default_rng(cfg.project.seed)

    ev, items = load_amazon_frames(cfg, args.data)
    seqs, text, n_users, n_items = sequences(ev, items)
    users = np.arange(n_users)
    if args.max_users and args.max_users < n_users:
        users = np.sort(rng.choice(n_users, args.max_users, replace=False))
    t_load = time.time() - t_start
    print(f"loaded {len(ev)} events, {n_users} users, {n_items} items in {t_load:.0f}s; "
          f"using {len(users)} users", flush=True)

    # training statistics come from the train split of the users in use only
    train_count = np.zeros(n_items, dtype=np.int64)
    for u in users:
        np.add.at(train_count, seqs[u][:-2], 1)
    warm = train_count > 0
    candidates = np.flatnonzero(warm)
    ex = Examples(seqs, text, warm, int(cfg.features.history_length))
    train_pairs = [(int(u), k) for u in users for k in range(len(seqs[u]) - 2)]
    seen_train = [np.unique(s[:-2]) for s in seqs]
    p_neg = train_count[candidates] ** args.neg_alpha
    train = labelled_frame(ex, train_pairs, seen_train, candidates, p_neg / p_neg.sum(), args.neg, rng)
    valid_pairs = [(int(u), len(seqs[u]) - 2) for u in users]
    test_pairs = [(int(u), len(seqs[u]) - 1) for u in users]
    valid_eval, test_eval = ex.rows(valid_pairs), ex.rows(test_pairs)

    def exclusions(frame, upto):  # the user's earlier items, never the target itself
        return [np.setdiff1d(seqs[u][:upto(u)], [t]) for u, t in zip(frame["user_idx"], frame["target"])]

    valid_excl = exclusions(valid_eval, lambda u: len(seqs[u]) - 2)
    test_excl = exclusions(test_eval, lambda u: len(seqs[u]) - 1)
    all_items = np.arange(n_items)
    item_frame = pd.DataFrame({"user_idx": -1, "item_idx": ex.model_id(all_items), "user_text": "",
                               "item_text": text, "history_item_idx": [[] for _ in all_items]})
    test_targets = test_eval["target"].to_numpy()
    n_cold = int((train_count[test_targets] == 0).sum())
    n_tail = int((train_count[test_targets] <= args.tail_max).sum())
    shape = {"n_users": n_users, "n_items": n_items, "n_features": 0,
             "global_bias": float(np.log(1.0 / args.neg))}  # logit of the positive share
    print(f"train rows {len(train)} ({len(train_pairs)} positives), valid users {len(valid_eval)}, "
          f"test users {len(test_eval)}; cold test items {n_cold}, tail (<= {args.tail_max}) {n_tail}", flush=True)

    results, selection, seconds = {}, {}, {}
    t0 = time.time()
    results["Popularity"] = slices(popularity_ranks(train_count, test_targets, test_excl), test_targets,
                                   train_count, args.tail_max)
    results["Popularity"]["valid"] = metrics(popularity_ranks(train_count, valid_eval["target"].to_numpy(),
                                                              valid_excl))
    seconds["Popularity"] = round(time.time() - t0, 1)
    print(f"Popularity: {results['Popularity']}", flush=True)

    print("MF:", flush=True)
    t0 = time.time()
    grid = [{"lr": lr, "wd": wd, "dim": d} for lr, wd, d in itertools.product(args.lr, args.wd, args.dims)]
    best = select_and_fit(cfg, "mf", grid, train, valid_eval, valid_excl, item_frame, shape, args.epochs,
                          args.batch_size, args.patience)
    ranks = Ranker(best["mc"], test_eval, item_frame, test_excl).ranks(best["fit"]["model"])
    results["MF"] = slices(ranks, test_targets, train_count, args.tail_max)
    results["MF"]["valid"] = best["valid"]
    selection["MF"] = {"chosen": best["params"], "trials": best["trials"]}
    seconds["MF"] = round(time.time() - t0, 1)
    print(f"  test: {results['MF']}", flush=True)

    if not args.skip_text:
        label = "TwoTower-MiniLM"
        print(f"{label}:", flush=True)
        t0 = time.time()
        cfg.train.max_seq_len, cfg.train.freeze_encoder, cfg.train.id_dropout = args.max_seq_len, True, args.id_dropout
        tgrid = [{"lr": args.text_lr, "wd": wd, "dim": args.text_dim, "text_match_init": t}
                 for wd, t in itertools.product(args.text_wd, args.text_match_init)]
        best = select_and_fit(cfg, "two_tower", tgrid, train, valid_eval, valid_excl, item_frame, shape,
                              args.text_epochs, args.text_batch_size, args.patience)
        test_ranker = Ranker(best["mc"], test_eval, item_frame, test_excl)
        results[label] = slices(test_ranker.ranks(best["fit"]["model"]), test_targets, train_count, args.tail_max)
        results[label]["valid"] = best["valid"]
        selection[label] = {"chosen": best["params"], "trials": best["trials"],
                            "model_config": {k: v for k, v in best["mc"].items() if k != "encoder_path"}}
        seconds[label] = round(time.time() - t0, 1)
        print(f"  test: {results[label]}", flush=True)
        t0 = time.time()
        model = best["fit"]["model"]  # only its frozen encoder and text cache are used
        results["MiniLM-cosine"] = slices(text_cosine_ranks(model, test_ranker), test_targets, train_count,
                                          args.tail_max)
        results["MiniLM-cosine"]["valid"] = metrics(text_cosine_ranks(
            model, Ranker(best["mc"], valid_eval, item_frame, valid_excl)))
        seconds["MiniLM-cosine"] = round(time.time() - t0, 1)
        print(f"MiniLM-cosine (zero-shot): {results['MiniLM-cosine']}", flush=True)

    total = round(time.time() - t_start, 1)
    report = {
        "data": "Amazon Review Data 2018 (Ni, Li & McAuley), Industrial and Scientific, UniSRec format "
                "(Hou et al., KDD 2022), via causalrec.loaders.amazon; the files' leave-one-out split",
        "protocol": {
            "train": "train split only; implicit feedback (task=click, log-loss); every train interaction a "
                     f"positive with {args.neg} negatives drawn once from items seen in training with probability "
                     f"~ train count ** {args.neg_alpha} (0 = uniform), never one of the user's train items",
            "user_side": f"per example: the last {cfg.features.history_length} item ids before its target "
                         "(history_item_idx) and the text of the most recent one (user_text)",
            "selection": f"valid split only: early stopping on valid NDCG@{K} (full ranking, patience "
                         f"{args.patience}); grid point by valid NDCG@{K}; test scored once per model",
            "evaluation": f"full ranking over all {n_items} items; the user's own earlier items (train, and "
                          "valid for test) removed from the ranking except the target itself; ties broken by "
                          f"lower item index; Recall@{K} (= hit rate, one target) and NDCG@{K} averaged over users",
            "cold": "test item never in the train split; scored from its text (text-match cosine and tower) + "
                    "the unknown id row (TwoTower), "
                    "biases only (MF: all such items tie), 0 (popularity)",
            "tail": f"test item with <= {args.tail_max} train interactions (cold included); supplementary "
                    "because the cold slice is small",
            "MiniLM-cosine": "supplementary, untrained: cosine between the frozen all-MiniLM-L6-v2 mean-pooled "
                             "vectors of the user text (the last earlier item's text) and each item's text",
        },
        "counts": {"users": int(len(users)), "items": n_items, "train_positives": len(train_pairs),
                   "train_rows": len(train), "items_in_train": int(warm.sum()), "test_users": len(test_eval),
                   "cold_test_users": n_cold, f"tail_le{args.tail_max}_test_users": n_tail},
        "cold_note": (f"only {n_cold} of {len(test_eval)} test items never occur in the train split, so the cold "
                      "slice is small and noisy; the tail slice is reported as well"),
        "results": results, "selection": selection, "anchors": ANCHORS,
        "anchor_note": "none: no published Recall@10/NDCG@10 table for this data could be found with the search "
                       "tool (UniSRec's own evaluation also differs: sequential models, no history removal)",
        "seconds": {"load": round(t_load, 1), **seconds, "total": total},
        "machine": "2 CPU cores shared with another job; torch threads 2",
        "args": {k: (os.path.relpath(v, ROOT) if k in ("config", "data") else v) for k, v in vars(args).items()
                 if k != "out"},
        "overrides": args.set,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    tail = f"tail_le{args.tail_max}"
    print(f"\n| model | Recall@{K} | NDCG@{K} | cold Recall@{K} | cold NDCG@{K} | tail<={args.tail_max} Recall@{K} "
          f"| tail<={args.tail_max} NDCG@{K} |\n|---|---|---|---|---|---|---|")
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    for name, r in results.items():
        print(f"| {name} | {fmt(r['all'][f'recall@{K}'])} | {fmt(r['all'][f'ndcg@{K}'])} | "
              f"{fmt(r['cold'][f'recall@{K}'])} | {fmt(r['cold'][f'ndcg@{K}'])} | {fmt(r[tail][f'recall@{K}'])} | "
              f"{fmt(r[tail][f'ndcg@{K}'])} |")
    print(f"\nusers: all {len(test_eval)}, cold {n_cold}, tail {n_tail}; total {total:.0f}s")
    return report


if __name__ == "__main__":
    main()
