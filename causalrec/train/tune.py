"""Hyperparameter search: Ray Tune + Optuna (TPE) with ASHA stopping poor trials early.

Why these pieces: Optuna's TPE proposes the next values from the trials so far
(far fewer trials than a grid), ASHA stops a trial whose *unbiased* validation
error after ``grace`` epochs is in the bottom of its rung, so the budget goes to
promising settings. Trials train in-process (:func:`causalrec.train.local.fit_local`)
on the train/valid splits materialised once into the object store: a search on a
table that does not fit one worker should instead launch a TorchTrainer per trial.
The chosen values go into the final run's ``hyperparameters`` (saved with the
checkpoint and in ``train_runs``).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)


def search_space(objective: str, model: str, text_match: bool = False):
    """``text_match``: the two-tower has its text-match path, whose scale's start is searched too.

    Why that start: the scale barely moves in a few epochs, so it acts as the zero-shot
    cosine's temperature, and it decides how much the text outweighs the id and popularity
    terms (on Amazon Scientific, valid NDCG@10 0.065 at 5 and 0.078 at 20).
    """
    from ray import tune

    space = {
        "learning_rate": tune.loguniform(1e-3, 1e-1) if model == "mf" else tune.loguniform(1e-4, 1e-2),
        "weight_decay": tune.loguniform(1e-6, 1e-2),
        "embedding_dim": tune.choice([8, 16, 32, 64]),
    }
    if objective != "naive":
        space["ips_clip"] = tune.choice([0.01, 0.02, 0.05, 0.1])
    if objective == "dr_jl":
        space["dr_label_fit_weight"] = tune.choice([0.0, 0.5, 1.0])
    if model == "two_tower" and text_match:
        space["text_match_init"] = tune.loguniform(1.0, 50.0)
    return space


def apply_params(loop_config: dict, params: dict) -> dict:
    """Return a copy of the loop config with the tuned values in place.

    ``ips_clip`` sets the training clip only: ``valid_clip`` stays, so every trial is scored
    by the same validation estimator (a larger clip would otherwise lower its own error).
    """
    lc = copy.deepcopy(loop_config)
    if "learning_rate" in params:
        lc["lr"] = float(params["learning_rate"])
    if "weight_decay" in params:
        lc["weight_decay"] = float(params["weight_decay"])
    if "embedding_dim" in params:
        lc["model_config"]["dim"] = int(params["embedding_dim"])
    if "ips_clip" in params:
        lc["clip"] = float(params["ips_clip"])
    if "text_match_init" in params:
        lc["model_config"]["text_match_init"] = float(params["text_match_init"])
    if "dr_label_fit_weight" in params:
        lc["dr_label_fit_weight"] = float(params["dr_label_fit_weight"])
    lc["hyperparameters"] = {**lc.get("hyperparameters", {}), **params}
    return lc


def _trial(params: dict, loop_config: dict, train_df, valid_df):
    import torch
    from ray import tune

    from causalrec.train.local import fit_local
    from causalrec.train.objectives import objective_options

    torch.set_num_threads(1)
    lc = apply_params(loop_config, params)
    fit_local(lc["model_config"], lc["objective"], train_df, valid_df, epochs=lc["epochs"],
              batch_size=lc["batch_size"], lr=lc["lr"], weight_decay=lc["weight_decay"],
              encoder_lr=lc.get("encoder_lr"), clip=lc["clip"], valid_mode=lc["valid_mode"],
              valid_clip=lc.get("valid_clip"), known_ids=lc.get("known_ids"),
              patience=lc["patience"], seed=lc["seed"], objective_options=objective_options(lc["objective"], lc),
              report=lambda rec: tune.report({"valid_metric": rec["valid_metric"], "train_loss": rec["train_loss"],
                                              "epoch": rec["epoch"]}))


def tune_hyperparameters(cfg, loop_config: dict, train_ds, valid_ds) -> dict:
    """Search ``cfg.train.tune_trials`` settings; returns the best values and the updated loop config."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from causalrec.models.text import text_match_enabled

    train_df, valid_df = train_ds.to_pandas(), valid_ds.to_pandas()
    mc = loop_config["model_config"]
    epochs = int(loop_config["epochs"])
    storage = cfg.checkpoint_dir if "://" in cfg.checkpoint_dir else os.path.abspath(cfg.checkpoint_dir)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, loop_config=loop_config, train_df=train_df,
                                                 valid_df=valid_df), {"cpu": cfg.train.cpus_per_worker}),
        param_space=search_space(loop_config["objective"], mc["model"], text_match_enabled(mc)),
        tune_config=tune.TuneConfig(
            metric="valid_metric", mode="min", num_samples=int(cfg.train.tune_trials),
            search_alg=OptunaSearch(seed=cfg.project.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max(epochs, 1),
                                    grace_period=max(1, min(cfg.train.tune_grace_epochs, epochs)), reduction_factor=2),
            max_concurrent_trials=max(1, cfg.train.tune_max_concurrent),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="valid_metric", mode="min", scope="all")
    chosen = dict(best.config)
    best_valid = best_reported(best)
    log.info("tune: best valid_metric %.4f with %s over %d trials", best_valid, chosen, len(results))
    trials = [{"config": r.config, "valid_metric": best_reported(r),
               "epochs": (r.metrics or {}).get("training_iteration")} for r in results]
    return {"best": {**chosen, "valid_metric": best_valid}, "trials": trials,
            "loop_config": apply_params(loop_config, chosen)}


def best_reported(result) -> Optional[float]:
    """The lowest ``valid_metric`` a trial reported over its epochs: what ``scope="all"`` chose it on.

    ``result.metrics`` is the trial's last report, which can be worse than trials not chosen.
    """
    df = result.metrics_dataframe
    if df is not None and "valid_metric" in df and df["valid_metric"].notna().any():
        return float(df["valid_metric"].min())
    return (result.metrics or {}).get("valid_metric")
