"""OBD benchmark protocol (Saito et al. 2021, NeurIPS D&B; obp's examples/obd).

Estimate the click rate of the Bernoulli Thompson Sampling policy (BTS, with ZOZOTOWN's
prior) from the log of the uniform Random policy ("all" campaign, small sample shipped
with obp), and compare with BTS's own on-policy click rate. Relative error
|V_hat - V_bts| / V_bts over 30 bootstrap resamples of the Random log; the reward model
for DM/DR-type estimators is obp's RegressionModel(LogisticRegression) fit with 3-fold
cross-fitting, as in obp's example. obp is used for loading, the BTS action distribution
and the reward model only (a dev dependency); the estimates are ours, and obp's own
estimators are run on the identical inputs beside them.

    .venv/bin/python scripts/obd_benchmark.py [--data ../shared/data/obd] [--n-runs 30]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# obp README / Saito et al. 2021, Table: relative estimation error on the OBD small sample (Random -> BTS, all)
# obp's OBD benchmark grid for Switch-DR / DRos
LAMBDAS = [10, 50, 100, 500, 1000, 5000, 10000, float("inf")]
PUBLISHED = {"dm": 0.157, "ips": 0.311, "snips": 0.312, "dr": 0.292, "sndr": 0.302, "switch_dr": 0.258, "dr_os": 0.160}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "obd"))
    ap.add_argument("--n-runs", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "bench_results" / "obd_benchmark.json"))
    args = ap.parse_args(argv)

    from obp.dataset import OpenBanditDataset
    from obp.ope import DirectMethod, DoublyRobust, DoublyRobustWithShrinkageTuning, InverseProbabilityWeighting
    from obp.ope import RegressionModel, SwitchDoublyRobustTuning
    from obp.ope import SelfNormalizedDoublyRobust, SelfNormalizedInverseProbabilityWeighting
    from obp.policy import BernoulliTS
    from sklearn.linear_model import LogisticRegression

    from causalrec.estimators import ESTIMATORS, DRos, SwitchDR, evaluate, make_estimators
    from causalrec.ope.policies import rows_from_action_dist

    t0 = time.time()
    data = Path(args.data)
    ds = OpenBanditDataset(behavior_policy="random", campaign="all", data_path=data)
    truth = OpenBanditDataset.calc_on_policy_policy_value_estimate(behavior_policy="bts", campaign="all",
                                                                  data_path=data)
    fb0 = ds.obtain_batch_bandit_feedback()
    bts = BernoulliTS(n_actions=ds.n_actions, len_list=ds.len_list, is_zozotown_prior=True, campaign="all",
                      random_state=12345)
    action_dist = bts.compute_batch_action_dist(n_rounds=fb0["n_rounds"])  # same for every context (context-free)
    # Switch-DR / DRos: obp's OBD grid, lambda chosen by SLOPE (obp's default rule) and, for
    # comparison, by the estimated-MSE rule under its own name
    grid = [float(x) for x in LAMBDAS]
    estimators = make_estimators(list(ESTIMATORS), clip_max_weight=100.0, switch_lambdas=grid, dr_os_lambdas=grid,
                                 tuning_method="slope")
    estimators += [SwitchDR(lambdas=tuple(grid), tuning_method="mse", estimator_name="switch_dr_mse"),
                   DRos(lambdas=tuple(grid), tuning_method="mse", estimator_name="dr_os_mse")]
    names = [e.estimator_name for e in estimators]
    obp_est = {"ips": InverseProbabilityWeighting(), "snips": SelfNormalizedInverseProbabilityWeighting(),
               "dm": DirectMethod(), "dr": DoublyRobust(), "sndr": SelfNormalizedDoublyRobust(),
               "switch_dr": SwitchDoublyRobustTuning(lambdas=LAMBDAS, tuning_method="slope"),
               "dr_os": DoublyRobustWithShrinkageTuning(lambdas=LAMBDAS, tuning_method="slope"),
               "switch_dr_mse": SwitchDoublyRobustTuning(lambdas=LAMBDAS, tuning_method="mse"),
               "dr_os_mse": DoublyRobustWithShrinkageTuning(lambdas=LAMBDAS, tuning_method="mse")}
    chosen = {n: [] for n in names}
    rel = {n: [] for n in names}
    rel_obp = {n: [] for n in obp_est}
    covered = {n: 0 for n in names}
    for run in range(args.n_runs):
        fb = ds.sample_bootstrap_bandit_feedback(random_state=run)
        reg = RegressionModel(n_actions=ds.n_actions, len_list=ds.len_list, action_context=ds.action_context,
                              base_model=LogisticRegression(max_iter=1000, C=100, random_state=12345))
        q_hat = reg.fit_predict(context=fb["context"], action=fb["action"], reward=fb["reward"],
                                position=fb["position"], n_folds=3, random_state=12345)
        rows = rows_from_action_dist(fb["action"], fb["position"], action_dist, q_hat)
        d = {"row_id": np.arange(fb["n_rounds"]), "reward": fb["reward"].astype(float), "pscore": fb["pscore"], **rows}
        for r in evaluate(d, estimators):
            rel[r.estimator].append(abs(r.estimate - truth) / truth)
            covered[r.estimator] += r.ci_low <= truth <= r.ci_high
            chosen[r.estimator].append(r.hyperparam)
        kw = dict(reward=fb["reward"], action=fb["action"], position=fb["position"], pscore=fb["pscore"],
                  action_dist=action_dist, estimated_rewards_by_reg_model=q_hat)
        needs = {"dm": ("action_dist", "position", "estimated_rewards_by_reg_model"),
                 "ips": ("reward", "action", "position", "pscore", "action_dist"),
                 "snips": ("reward", "action", "position", "pscore", "action_dist"),
                 }
        for n, e in obp_est.items():
            v = e.estimate_policy_value(**{k: kw[k] for k in needs.get(n, kw)})
            rel_obp[n].append(abs(v - truth) / truth)
    out = {
        "protocol": "OBD small sample, campaign=all: estimate BTS (is_zozotown_prior) click rate from the Random "
                    "policy's log; relative error over bootstrap resamples (Saito et al. 2021; obp examples/obd)",
        "n_runs": args.n_runs,
        "n_rounds": int(fb0["n_rounds"]),
        "on_policy_bts_click_rate": truth,
        "reward_model": "obp RegressionModel(LogisticRegression(C=100)), 3-fold cross-fitting",
        "switch_dr_dr_os": f"lambdas {LAMBDAS}; switch_dr/dr_os by SLOPE, *_mse by the estimated-MSE rule",
        "estimators": {
            n: {
                "relative_error_mean": float(np.mean(rel[n])),
                "relative_error_std": float(np.std(rel[n])),
                "ci95_coverage_of_truth": covered[n] / args.n_runs,
                "obp_same_inputs_relative_error_mean": float(np.mean(rel_obp[n])) if n in rel_obp else None,
                "obp_published_relative_error": PUBLISHED.get(n),
                "lambda_chosen": ({str(k): chosen[n].count(k) for k in sorted(set(chosen[n]))}
                                  if chosen[n] and chosen[n][0] is not None else None),
            }
            for n in names
        },
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"BTS on-policy click rate {truth:.5f}; {args.n_runs} bootstrap runs")
    print(f"{'estimator':<14}{'ours':>10}{'obp(same)':>11}{'published':>11}{'coverage':>10}")
    for n, v in out["estimators"].items():
        o = v["obp_same_inputs_relative_error_mean"]
        p = v["obp_published_relative_error"]
        print(f"{n:<14}{v['relative_error_mean']:>10.3f}{(f'{o:.3f}' if o is not None else '-'):>11}"
              f"{(f'{p:.3f}' if p is not None else '-'):>11}{v['ci95_coverage_of_truth']:>10.2f}")
    return out


if __name__ == "__main__":
    main()
