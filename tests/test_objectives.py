"""Each objective on tiny tensors against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from causalrec.train.objectives import (
    IPS, SNIPS, DRJointLearning, Naive, UpliftIPW, build_objective, validation_sums)

NAN = float("nan")


def rating_batch():
    # logit 1,2,3,0 vs label 2,-,1,0 -> squared errors 1, -, 4, 0 on the observed rows 0, 2, 3
    out = {"logit": torch.tensor([1.0, 2.0, 3.0, 0.0], requires_grad=True)}
    batch = {
        "label": torch.tensor([2.0, NAN, 1.0, 0.0]),
        "observed": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "exposure_propensity": torch.tensor([0.5, 0.2, 0.005, 1.0]),
        "is_mcar": torch.tensor([1.0, 0.0, 0.0, 1.0]),
    }
    return out, batch


def test_naive_is_mean_over_observed_rows():
    out, batch = rating_batch()
    assert Naive("rating")(out, batch)["loss"].item() == pytest.approx(5 / 3)


def test_ips_weights_are_clipped_inverse_propensities():
    out, batch = rating_batch()
    # weights 1/0.5 = 2, 1/max(0.005, 0.01) = 100, 1/1 = 1
    parts = IPS("rating", clip=0.01)(out, batch)
    assert parts["loss"].item() == pytest.approx((2 * 1 + 100 * 4 + 1 * 0) / 3)
    assert parts["mean_weight"].item() == pytest.approx(103 / 3)
    # without clipping the tiny propensity dominates
    assert IPS("rating", clip=0.001)(out, batch)["loss"].item() == pytest.approx((2 + 200 * 4) / 3)


def test_snips_normalises_by_the_weights():
    out, batch = rating_batch()
    assert SNIPS("rating", clip=0.01)(out, batch)["loss"].item() == pytest.approx(402 / 103)


def test_dr_joint_learning_values_and_gradient_separation():
    out, batch = rating_batch()
    g = torch.tensor([1.5, 2.5, 2.0, 0.5], requires_grad=True)
    out["imputation"] = out["imputation_logit"] = g  # ratings: the imputed value is its own logit
    parts = DRJointLearning("rating", clip=0.01)(out, batch)
    # e_hat = (logit - g)^2 = .25, .25, 1, .25; w = 2, 5, 100, 1
    # rows: .25 + (1-.25)*2 = 1.75 | .25 | 1 + (4-1)*100 = 301 | .25 + (0-.25)*1 = 0
    assert parts["loss_pred"].item() == pytest.approx((1.75 + 0.25 + 301 + 0) / 4)
    # (e - e_hat)^2 w over observed: .5625*2 + 9*100 + .0625*1, over 3 observed rows
    assert parts["loss_imputation"].item() == pytest.approx((1.125 + 900 + 0.0625) / 3)
    # the prediction part does not move the imputation model and vice versa
    (g_grad,) = torch.autograd.grad(parts["loss_pred"], g, retain_graph=True, allow_unused=True)
    assert g_grad is None or torch.all(g_grad == 0)
    (l_grad,) = torch.autograd.grad(parts["loss_imputation"], out["logit"], retain_graph=True, allow_unused=True)
    assert l_grad is None or torch.all(l_grad == 0)
    (g_grad2,) = torch.autograd.grad(parts["loss_imputation"], g, retain_graph=True)
    assert g_grad2.abs().sum() > 0
    # the IPS-weighted label fit of the imputation: (g - y)^2 w = .25*2 + 1*100 + .25*1 over 3 observed rows
    assert parts["loss_label_fit"].item() == pytest.approx(100.75 / 3)
    assert parts["loss"].item() == pytest.approx(
        (parts["loss_pred"] + parts["loss_imputation"] + parts["loss_label_fit"]).item())
    (l_grad2,) = torch.autograd.grad(parts["loss_label_fit"], out["logit"], allow_unused=True)
    assert l_grad2 is None or torch.all(l_grad2 == 0)


def test_dr_joint_learning_imputation_leaves_the_prediction():
    """Both models start at the global mean: the error fit alone gives the imputation no gradient there.

    The label fit must move ``g`` towards the observed labels (the bug it fixes: on Coat the
    imputation stayed at the prediction and DR-JL was no better than naive).
    """
    _, batch = rating_batch()
    pred = torch.full((4,), 0.75, requires_grad=True)
    g = torch.full((4,), 0.75, requires_grad=True)
    out = {"logit": pred, "imputation": g, "imputation_logit": g}
    (paper_only,) = torch.autograd.grad(DRJointLearning("rating", label_fit_weight=0.0)(out, batch)["loss"], g)
    assert torch.all(paper_only == 0)
    (grad,) = torch.autograd.grad(DRJointLearning("rating")(out, batch)["loss"], g)
    # labels 2, -, 1, 0: gradient descent raises g on rows 0 and 2, lowers it on row 3, leaves the unobserved row
    assert grad[0] < 0 and grad[2] < 0 and grad[3] > 0 and grad[1] == 0


def test_dr_joint_learning_label_fit_for_clicks_is_the_log_loss_of_the_imputation():
    batch = {"outcome": torch.tensor([1.0, 0.0, NAN]), "observed": torch.tensor([1.0, 1.0, 0.0]),
             "exposure_propensity": torch.tensor([0.5, 0.25, 0.1])}
    g_logit = torch.tensor([0.0, 1.0, 3.0])
    out = {"logit": torch.zeros(3), "imputation_logit": g_logit, "imputation": torch.sigmoid(g_logit)}
    expected = (2 * math.log(2) + 4 * math.log1p(math.e)) / 2  # w = 2, 4; -log sigmoid(0), -log(1 - sigmoid(1))
    assert DRJointLearning("click")(out, batch)["loss_label_fit"].item() == pytest.approx(expected, rel=1e-6)
    del out["imputation_logit"]  # a probability alone is not enough: the fit is on the logit
    with pytest.raises(KeyError, match="imputation_logit"):
        DRJointLearning("click")(out, batch)


def test_dr_joint_learning_needs_the_imputation_output():
    out, batch = rating_batch()
    with pytest.raises(KeyError, match="imputation"):
        DRJointLearning("rating")(out, batch)


def test_dr_is_unbiased_where_ips_weighted_naive_is_not():
    """Many sampled pairs: with exact propensities, DR's loss estimates the full-matrix error."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    err_true = torch.rand(n, generator=gen) * 4  # per-pair squared error of a fixed prediction
    p = 0.05 + 0.9 * torch.rand(n, generator=gen)
    p = torch.where(err_true < 1, p, p * 0.2)  # bad pairs are rarely observed (MNAR)
    o = (torch.rand(n, generator=gen) < p).float()
    label = torch.where(o > 0, err_true.sqrt(), torch.full_like(err_true, NAN))
    batch = {"label": label, "observed": o, "exposure_propensity": p}
    g = torch.full((n,), 0.5)
    out = {"logit": torch.zeros(n), "imputation": g, "imputation_logit": g}  # imputed errors deliberately wrong
    dr = DRJointLearning("rating", clip=1e-6)(out, batch)["loss_pred"].item()
    naive = Naive("rating")(out, batch)["loss"].item()
    truth = err_true.mean().item()
    assert abs(dr - truth) < 0.05 * truth
    assert abs(naive - truth) > 0.2 * truth


def test_dr_with_sampled_unobserved_pairs_needs_their_sample_weight():
    """The training set keeps a tenth of the unobserved pairs, each standing for 10 (sample_weight)."""
    gen = torch.Generator().manual_seed(1)
    n = 400_000
    err_true = torch.rand(n, generator=gen) * 4
    p = (0.02 + 0.2 * torch.rand(n, generator=gen)) * torch.where(err_true < 1, 1.0, 0.3)
    o = (torch.rand(n, generator=gen) < p).float()
    keep = (o > 0) | (torch.rand(n, generator=gen) < 0.1)
    label = torch.where(o > 0, err_true.sqrt(), torch.full_like(err_true, NAN))
    batch = {"label": label[keep], "observed": o[keep], "exposure_propensity": p[keep],
             "sample_weight": torch.where(o[keep] > 0, 1.0, 10.0)}
    m = int(keep.sum())
    g = torch.full((m,), 0.5)
    out = {"logit": torch.zeros(m), "imputation": g, "imputation_logit": g}
    truth = err_true.mean().item()
    weighted = DRJointLearning("rating", clip=1e-6)(out, batch)["loss_pred"].item()
    assert abs(weighted - truth) < 0.05 * truth
    del batch["sample_weight"]
    unweighted = DRJointLearning("rating", clip=1e-6)(out, batch)["loss_pred"].item()
    assert abs(unweighted - truth) > 0.5 * truth


def test_uplift_ipw_weights_each_arm_by_inverse_treatment_propensity():
    y1_logit = torch.tensor([0.0, 2.0, 5.0, 5.0])
    y0_logit = torch.tensor([9.0, 9.0, 0.0, -1.0])
    out = {"logit": torch.zeros(4), "y1_logit": y1_logit, "y0_logit": y0_logit,
           "uplift": torch.sigmoid(y1_logit) - torch.sigmoid(y0_logit)}
    batch = {"outcome": torch.tensor([1.0, 0.0, 1.0, 0.0]), "treated": torch.tensor([1.0, 1.0, 0.0, 0.0]),
             "treatment_propensity": torch.tensor([0.5, 0.25, 0.5, 0.8]), "observed": torch.ones(4),
             "exposure_propensity": torch.ones(4)}
    parts = UpliftIPW("click", clip=0.01, relevance_weight=1.0, transformed_outcome_weight=1.0)(out, batch)
    log2, sp2, spm1 = math.log(2), math.log1p(math.exp(2)), math.log1p(math.exp(-1))
    assert parts["loss_y1"].item() == pytest.approx((2 * log2 + 4 * sp2) / 6, rel=1e-5)  # w1 = 1/.5, 1/.25
    assert parts["loss_y0"].item() == pytest.approx((2 * log2 + 5 * spm1) / 7, rel=1e-5)  # w0 = 1/.5, 1/.2
    assert parts["loss_relevance"].item() == pytest.approx(log2, rel=1e-5)  # logit 0 everywhere
    y_star = torch.tensor([2.0, 0.0, -2.0, 0.0])  # Y (T/e - (1-T)/(1-e))
    assert parts["loss_transformed_outcome"].item() == pytest.approx(((out["uplift"] - y_star) ** 2).mean().item(),
                                                                   rel=1e-5)
    total = parts["loss_y1"] + parts["loss_y0"] + parts["loss_relevance"] + parts["loss_transformed_outcome"]
    assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_validation_sums_modes():
    out, batch = rating_batch()
    mcar = validation_sums(out, batch, "rating", "mcar")
    assert mcar.tolist() == pytest.approx([1 + 0, 2, 2])  # observed MCAR rows 0 and 3
    ips = validation_sums(out, batch, "rating", "ips", clip=0.01)
    assert (ips[0] / ips[1]).item() == pytest.approx(402 / 103)
    with pytest.raises(ValueError, match="mcar, ips or naive"):
        validation_sums(out, batch, "rating", "bogus")


def test_build_objective_by_name():
    assert isinstance(build_objective("snips", "click", 0.05), SNIPS)
    assert build_objective("ips", clip=0.05).clip == 0.05
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("magic")


def test_ddp_mean_of_worker_losses_matches_whole_batch_only_for_equal_counts():
    """What DDP computes (the mean of the workers' gradients, each loss normalised by its own half)
    equals the whole-batch gradient when each half holds as many observed rows (naive, IPS), and
    not otherwise, nor for SNIPS whose weight sums differ: the condition step.py documents."""
    g = torch.Generator().manual_seed(0)
    n = 16
    logit = torch.randn(n, generator=g, requires_grad=True)
    label = torch.randn(n, generator=g) + 1
    p = torch.rand(n, generator=g) * 0.5 + 0.05

    def gap(obj, observed) -> float:
        batch = {"label": torch.where(observed > 0, label, torch.full_like(label, NAN)), "observed": observed,
                 "exposure_propensity": p}
        (whole,) = torch.autograd.grad(obj({"logit": logit}, batch)["loss"], logit)
        halves = [torch.autograd.grad(obj({"logit": logit[s]}, {k: v[s] for k, v in batch.items()})["loss"], logit)[0]
                  for s in (slice(0, n // 2), slice(n // 2, n))]
        return float(((halves[0] + halves[1]) / 2 - whole).abs().max())

    equal = torch.tensor([1.0, 1, 1, 0, 1, 0, 1, 1] * 2)  # 6 observed rows in each half
    unequal = torch.tensor([1.0] * 8 + [1, 0, 0, 0, 1, 0, 0, 0])  # 8 and 2
    for obj in (Naive("rating"), IPS("rating", 0.05)):
        assert gap(obj, equal) < 1e-6 and gap(obj, unequal) > 1e-3
    assert gap(SNIPS("rating", 0.05), equal) > 1e-3
