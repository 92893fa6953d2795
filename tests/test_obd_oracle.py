"""Peer cross-check on real logs: our IPS/SNIPS/DM/DR equal obp 0.5.7's on identical OBD inputs."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import data_dir

obp = pytest.importorskip("obp")


@pytest.fixture(scope="module")
def obd():
    from obp.dataset import OpenBanditDataset
    from obp.policy import BernoulliTS

    ds = OpenBanditDataset(behavior_policy="random", campaign="all", data_path=data_dir("obd"))
    fb = ds.obtain_batch_bandit_feedback()
    bts = BernoulliTS(n_actions=ds.n_actions, len_list=ds.len_list, is_zozotown_prior=True, campaign="all",
                      random_state=12345)
    action_dist = bts.compute_batch_action_dist(n_rounds=fb["n_rounds"])
    # a simple reward model shared by both libraries: click rate per (item, position), smoothed
    n, K, L = fb["n_rounds"], ds.n_actions, ds.len_list
    clicks = np.zeros((K, L)); shows = np.zeros((K, L))
    np.add.at(clicks, (fb["action"], fb["position"]), fb["reward"])
    np.add.at(shows, (fb["action"], fb["position"]), 1)
    prior = fb["reward"].mean()
    rate = (clicks + 10 * prior) / (shows + 10)
    q_hat = np.broadcast_to(rate[None], (n, K, L)).copy()
    return fb, action_dist, q_hat


def test_obd_random_log_shape(obd):
    fb, action_dist, _ = obd
    assert fb["n_rounds"] == 10_000 and fb["n_actions"] == 80 and action_dist.shape[2] == 3
    assert set(np.unique(fb["position"])) == {0, 1, 2}
    np.testing.assert_allclose(fb["pscore"], 1 / 80)  # uniform random logging, per slot
    np.testing.assert_allclose(action_dist.sum(axis=1), 1.0)


def test_ips_snips_dm_dr_equal_obp(obd):
    from obp.ope import DirectMethod, DoublyRobust, InverseProbabilityWeighting, SelfNormalizedDoublyRobust
    from obp.ope import SelfNormalizedInverseProbabilityWeighting

    from causalrec.estimators import DM, DR, IPS, SNDR, SNIPS, evaluate
    from causalrec.ope.policies import rows_from_action_dist

    fb, action_dist, q_hat = obd
    rows = rows_from_action_dist(fb["action"], fb["position"], action_dist, q_hat)
    data = {"row_id": np.arange(fb["n_rounds"]), "reward": fb["reward"].astype(float), "pscore": fb["pscore"], **rows}
    ours = {r.estimator: r for r in evaluate(data, [IPS(), SNIPS(), DM(), DR(), SNDR()])}
    kw = dict(reward=fb["reward"], action=fb["action"], position=fb["position"], pscore=fb["pscore"],
              action_dist=action_dist)
    theirs = {
        "ips": InverseProbabilityWeighting().estimate_policy_value(**kw),
        "snips": SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**kw),
        "dm": DirectMethod().estimate_policy_value(action_dist=action_dist, position=fb["position"],
                                                   estimated_rewards_by_reg_model=q_hat),
        "dr": DoublyRobust().estimate_policy_value(estimated_rewards_by_reg_model=q_hat, **kw),
        "sndr": SelfNormalizedDoublyRobust().estimate_policy_value(estimated_rewards_by_reg_model=q_hat, **kw),
    }
    for name, v in theirs.items():
        assert ours[name].estimate == pytest.approx(v, rel=1e-10, abs=1e-12), name
    # the per-row contributions agree too (obp's _estimate_round_rewards)
    rr = IPS().estimate_round_rewards(data["reward"], data["pscore"], data["pi_e"])
    np.testing.assert_allclose(rr, InverseProbabilityWeighting()._estimate_round_rewards(**kw), rtol=1e-12)
    # BTS's true on-policy click rate lies inside the unbiased estimators' 95% intervals
    from obp.dataset import OpenBanditDataset

    truth = OpenBanditDataset.calc_on_policy_policy_value_estimate(
        behavior_policy="bts", campaign="all", data_path=data_dir("obd"))
    for name in ("ips", "snips", "dr"):
        assert ours[name].ci_low <= truth <= ours[name].ci_high, (name, truth, ours[name])
