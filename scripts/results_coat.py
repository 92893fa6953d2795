"""Coat results (Schnabel et al. 2016 data): debiased MF and the text model, judged on the MCAR test.

Trains on Coat's ``training_examples`` (MNAR ratings; observed=0 rows = sampled
unobserved pairs for DR-JL) and evaluates on the randomly exposed (MCAR) test ratings:
MSE, MAE, AUC, NDCG@5, Recall@5 (rating >= 4 is positive). Every model's
hyperparameters and epoch are picked on the validation slice only, by one unbiased
validation error: plain error on the MCAR validation pairs when the config moves a
share of the MCAR ratings to valid (``training_set.mcar_valid_fraction``, as
conf/local.yaml does; the test is then the remaining MCAR ratings), otherwise the
IPS-weighted error on a random slice of the MNAR ratings. Writes
bench_results/results_coat.json and prints a Markdown table.

  python scripts/results_coat.py --config conf/local.yaml [--build] [--set k=v ...]

``--build`` runs the ingest, features, propensity and training_set stages first
when ``training_examples`` is missing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from causalrec.config import load_config  # noqa: E402
from causalrec.models.feature_scaling import frame_feature_scaling  # noqa: E402
from causalrec.train.job import TRAIN_COLUMNS, model_config_from  # noqa: E402
from causalrec.train.local import fit_local, predict_frame  # noqa: E402
from causalrec.train.objectives import objective_options  # noqa: E402

ANCHORS = {
    "schnabel2016": {"MF-Naive": {"mse": 1.202, "mae": 0.920}, "MF-IPS": {"mse": 1.093, "mae": 0.860}},
    "cdr_song2023": {"MF": {"auc": 0.7053, "ndcg@5": 0.6025}, "MF-IPS": {"auc": 0.7144, "ndcg@5": 0.6173},
                     "MF-DR-JL": {"auc": 0.7286, "ndcg@5": 0.6271}},
}

def auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    from scipy.stats import rankdata

    pos = y > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ranking_metrics(df: pd.DataFrame, k: int = 5) -> dict:
    """Per-user NDCG@k and Recall@k with binary gains, averaged over users with a positive."""
    ndcgs, recalls = [], []
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    for _, g in df.groupby("user_idx"):
        rel = g.sort_values("score", ascending=False)["positive"].to_numpy()
        npos = int(rel.sum())
        if npos == 0:
            continue
        top = rel[:k]
        dcg = float((top * disc[: len(top)]).sum())
        idcg = float(disc[: min(npos, k)].sum())
        ndcgs.append(dcg / idcg)
        recalls.append(float(top.sum()) / npos)
    return {f"ndcg@{k}": float(np.mean(ndcgs)), f"recall@{k}": float(np.mean(recalls)), "users": len(ndcgs)}


def evaluate(model, mc, test: pd.DataFrame, threshold: float) -> dict:
    pred = predict_frame(model, mc, test)["relevance"]
    y = test["label"].to_numpy(dtype=float)
    pos = (y >= threshold).astype(float)
    res = {"mse": float(np.mean((pred - y) ** 2)), "mae": float(np.mean(np.abs(pred - y))), "auc": auc(pos, pred)}
    res.update(ranking_metrics(pd.DataFrame({"user_idx": test["user_idx"].to_numpy(), "score": pred,
                                             "positive": pos}), 5))
    return res


def load_examples(cfg) -> pd.DataFrame:
    from deltalake import DeltaTable

    return DeltaTable(cfg.table_path("training_examples")).to_pyarrow_table(columns=TRAIN_COLUMNS).to_pandas()


def build_tables(cfg) -> None:
    from causalrec.context import Context
    from causalrec.stages import ALL

    ctx = Context(cfg)
    for name in ("ingest", "features", "propensity", "training_set"):
        t0 = time.time()
        summary = ALL[name].load()(ctx)
        logging.info("stage %s done in %.0fs: %s", name, time.time() - t0, summary)


def select_and_fit(cfg, kind: str, objective: str, grid: list[dict], train, valid, shape: dict, epochs: int,
                   batch_size: int, text_overrides: dict | None = None, valid_mode: str = "ips",
                   seed: int | None = None) -> dict:
    """Fit every grid point; keep the one with the lowest unbiased validation error."""
    best = None
    trials = []
    for params in grid:
        cfg.train.model = kind
        cfg.train.embedding_dim = params["dim"]
        mc = model_config_from(cfg, objective=objective, **shape)
        mc.update(text_overrides or {})
        t0 = time.time()
        fit = fit_local(mc, objective, train, valid, epochs=epochs, batch_size=batch_size, lr=params["lr"],
                        weight_decay=params["wd"], clip=params.get("clip", cfg.train.ips_clip), valid_mode=valid_mode,
                        patience=3, seed=cfg.project.seed if seed is None else seed,
                        objective_options=objective_options(objective, params))
        trials.append({**params, "best_valid": fit["best_valid"], "best_epoch": fit["best_epoch"],
                       "seconds": round(time.time() - t0, 1)})
        print(f"  {kind}/{objective} {params} -> valid {fit['best_valid']:.4f} (epoch {fit['best_epoch']})",
              flush=True)
        if best is None or fit["best_valid"] < best["fit"]["best_valid"]:
            best = {"fit": fit, "params": params, "mc": mc}
    best["trials"] = trials
    return best

SEED_METRICS = ("mse", "mae", "auc", "ndcg@5", "recall@5")


def summarise_seeds(runs_by_label: dict) -> dict:
    """Mean and (population) standard deviation of each test metric over one row's seeded runs."""
    return {label: {m: {"mean": float(np.mean([r[m] for r in runs])), "sd": float(np.std([r[m] for r in runs]))}
                    for m in SEED_METRICS} | {"runs": runs}
            for label, runs in runs_by_label.items()}



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "conf" / "local.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--build", action="store_true", help="run upstream stages when training_examples is missing")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--text-epochs", type=int, default=8)
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.01], help="MF learning rates tried")
    ap.add_argument("--wd", type=float, nargs="+", default=[3.0, 10.0], help="MF weight decays tried")
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32], help="MF embedding sizes tried")
    ap.add_argument("--dr-wd", type=float, nargs="+", default=[1.0, 3.0],
                    help="weight decays tried for DR-JL (its imputed term regularises too, so it needs less)")
    ap.add_argument("--dr-label-fit", type=float, nargs="+", default=[0.0, 1.0],
                    help="DR-JL label-fit weights tried (train.dr_label_fit_weight; 0 = the paper's objective)")
    ap.add_argument("--text-wd", type=float, nargs="+", default=[1.0, 3.0], help="weight decays tried for the text model")
    ap.add_argument("--text-lr", type=float, nargs="+", default=[0.003, 0.01],
                    help="learning rates tried for the text model")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4],
                    help="extra training seeds: the MF rows are refit (selection included) with each, and the "
                         "JSON gets every metric's mean and spread over project.seed and these")
    ap.add_argument("--text-seeds", type=int, nargs="*", default=[1, 2],
                    help="extra training seeds for the text model's naive and chosen rows (each about 1 min)")
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "results_coat.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    cfg = load_config(args.config, args.set)
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(cfg.table_path("training_examples")):
        if not args.build:
            raise SystemExit(f"{cfg.table_path('training_examples')} does not exist; rerun with --build")
        build_tables(cfg)
    ex = load_examples(cfg)
    train = ex[ex["split"] == "train"].reset_index(drop=True)
    valid = ex[ex["split"] == "valid"].reset_index(drop=True)
    # the same rule as the train stage (train.valid_metric: auto): MCAR validation pairs when there are any
    valid_mode = "mcar" if bool((valid["is_mcar"] & (valid["observed"] == 1)).any()) else "ips"
    test = ex[(ex["split"] == "test") & ex["is_mcar"] & (ex["observed"] == 1)].reset_index(drop=True)
    obs = train[train["observed"] == 1]
    n_features = int(max((len(f) for f in ex["features"].dropna().head(100)), default=0))
    shape = {"n_users": int(ex["user_idx"].max()) + 1, "n_items": int(ex["item_idx"].max()) + 1,
             "n_features": n_features, "global_bias": float(obs["label"].mean())}
    print(f"train rows {len(train)} (observed {len(obs)}), valid {len(valid)}, MCAR test {len(test)}; {shape}",
          flush=True)
    if cfg.train.standardize_features and n_features:  # the text models' z-scores, as the train stage takes them
        shape["feature_scaling"] = frame_feature_scaling(train, n_features)
    cfg.train.task = "rating"
    threshold = cfg.training_set.positive_threshold
    # AdamW's decoupled decay (biases exempt) is the L2 regulariser; Coat's 7k ratings need a strong one
    grid = [{"lr": lr, "wd": wd, "dim": d} for lr, wd, d in itertools.product(args.lr, args.wd, args.dims)]
    results, selection = {}, {}
    mf_runs = (("naive", "MF-Naive"), ("ips", "MF-IPS"), ("snips", "MF-SNIPS"), ("dr_jl", "MF-DR-JL"))

    def with_label_fit(points: list[dict]) -> list[dict]:  # DR-JL's grid: each point with each label-fit weight
        return [{**p, "dr_label_fit_weight": f} for p in points for f in args.dr_label_fit]

    dr_grid = with_label_fit([{"lr": lr, "wd": wd, "dim": d} for lr, wd, d in itertools.product(args.lr, args.dr_wd,
                                                                                               args.dims)])

    def fit_mf(objective: str, seed: int | None = None) -> dict:
        train_rows = train if objective == "dr_jl" else obs  # only DR-JL uses the unobserved pairs
        return select_and_fit(cfg, "mf", objective, dr_grid if objective == "dr_jl" else grid, train_rows, valid,
                              shape, args.epochs, 256, valid_mode=valid_mode, seed=seed)

    for objective, label in mf_runs:
        print(f"{label}:", flush=True)
        best = fit_mf(objective)
        results[label] = evaluate(best["fit"]["model"], best["mc"], test, threshold)
        results[label]["valid_error"] = best["fit"]["best_valid"]
        selection[label] = {"chosen": best["params"], "trials": best["trials"]}
        print(f"  test: {results[label]}", flush=True)
    # training noise: Coat is small, so the same protocol with other seeds says how far a row can move
    over_seeds = {label: [dict(results[label], seed=cfg.project.seed)] for _, label in mf_runs}
    for seed in args.seeds:
        for objective, label in mf_runs:
            best = fit_mf(objective, seed)
            over_seeds[label].append(dict(evaluate(best["fit"]["model"], best["mc"], test, threshold), seed=seed))
    seed_summary = summarise_seeds(over_seeds)
    text_summary: dict = {}
    if not args.skip_text:
        text_over = {"freeze_layers": -1, "max_seq_len": 32, "id_dropout": 0.1}
        cfg.train.max_seq_len = 32
        text_valid = {}

        def fit_text(objective: str, seed: int | None = None) -> dict:
            train_rows = train if objective == "dr_jl" else obs
            wds = args.dr_wd if objective == "dr_jl" else args.text_wd
            tgrid = [{"lr": lr, "wd": wd, "dim": 32} for lr in args.text_lr for wd in wds]
            if objective == "dr_jl":
                tgrid = with_label_fit(tgrid)
            return select_and_fit(cfg, "two_tower", objective, tgrid, train_rows, valid, shape, args.text_epochs,
                                  256, text_over, valid_mode=valid_mode, seed=seed)

        for objective in ("naive", "ips", "snips", "dr_jl"):
            label = f"TwoTower-MiniLM-{objective}"
            print(f"{label}:", flush=True)
            best = fit_text(objective)
            results[label] = evaluate(best["fit"]["model"], best["mc"], test, threshold)
            results[label]["valid_error"] = text_valid[objective] = best["fit"]["best_valid"]
            selection[label] = {"chosen": best["params"], "trials": best["trials"]}
            print(f"  test: {results[label]}", flush=True)
        # the text model's best debiasing objective, chosen on its own validation error only
        selection["text_best_objective"] = min((o for o in text_valid if o != "naive"), key=text_valid.get)
        # one text run is noisy too: naive and the chosen objective again under other seeds
        text_runs = {f"TwoTower-MiniLM-{o}": o for o in ("naive", selection["text_best_objective"])}
        text_seeds = {label: [dict(results[label], seed=cfg.project.seed)] for label in text_runs}
        for seed in args.text_seeds:
            for label, objective in text_runs.items():
                best = fit_text(objective, seed)
                text_seeds[label].append(dict(evaluate(best["fit"]["model"], best["mc"], test, threshold), seed=seed))
        text_summary = summarise_seeds(text_seeds)
    report = {"data": "Coat (Schnabel et al. 2016): train = MNAR ratings, test = MCAR ratings",
              "rows": {"train": len(train), "train_observed": len(obs), "valid": len(valid),
                       "valid_mcar": int((valid["is_mcar"] & (valid["observed"] == 1)).sum()), "test_mcar": len(test)},
              "valid_mode": valid_mode,
              "positive_threshold": threshold, "results": results, "selection": selection,
              "mf_over_seeds": seed_summary, "text_over_seeds": text_summary, "anchors": ANCHORS,
              "config": args.config, "overrides": args.set}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print("\n| model | MSE | MAE | AUC | NDCG@5 | Recall@5 |\n|---|---|---|---|---|---|")
    for k, r in results.items():
        if k == f"TwoTower-MiniLM-{selection.get('text_best_objective')}":
            k += " (best debiased on valid)"
        print(f"| {k} | {r['mse']:.3f} | {r['mae']:.3f} | {r['auc']:.4f} | {r['ndcg@5']:.4f} | {r['recall@5']:.4f} |")
    for name, summary in (("MF", seed_summary), ("Text model", text_summary)):
        seeds = [r["seed"] for r in next(iter(summary.values()), {}).get("runs", [])]
        if len(seeds) > 1:
            print(f"\n{name} over seeds {seeds}: mean (sd)\n"
                  "| model | MSE | MAE | AUC | NDCG@5 | Recall@5 |\n|---|---|---|---|---|---|")
            for label, summ in summary.items():
                print(f"| {label} | " + " | ".join(f"{summ[m]['mean']:.3f} ({summ[m]['sd']:.3f})"
                                                  for m in SEED_METRICS) + " |")
    return report


if __name__ == "__main__":
    main()
