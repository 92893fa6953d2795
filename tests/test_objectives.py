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


def test_uplift_ipw_caps_the_treatment_propensity_at_one_minus_clip_in_training_and_validation():
    """e is clipped to [clip, 1 - clip] on both sides: a control row logged at e = 0.995 gets
    w0 = 1/(1 - 0.99) = 100, not 1/(1 - 0.995) = 200, in the loss (UpliftIPW), in the transformed
    outcome Y* = y (T/e - (1-T)/(1-e)) (whose control arm divides by 1 - e, not e) and in the
    validation sums. Catches a dropped upper cap (objective or validation) and a control arm over e."""
    from causalrec.train.step import validation_parts

    out = {"logit": torch.zeros(4), "y1_logit": torch.zeros(4), "y0_logit": torch.tensor([0.0, 0.0, 0.0, 2.0]),
           "uplift": torch.zeros(4)}
    batch = {"outcome": torch.tensor([1.0, 0.0, 1.0, 1.0]), "treated": torch.tensor([1.0, 1.0, 0.0, 0.0]),
             "treatment_propensity": torch.tensor([0.5, 0.25, 0.8, 0.995]), "observed": torch.ones(4),
             "exposure_propensity": torch.ones(4)}
    parts = UpliftIPW("click", clip=0.01, relevance_weight=1.0, transformed_outcome_weight=1.0)(out, batch)
    # control rows 2, 3: w0 = 1/0.2 = 5 and 1/0.01 = 100; both have y = 1, logits 0 and 2
    loss_y0 = (5 * math.log(2) + 100 * math.log1p(math.exp(-2))) / 105
    assert loss_y0 == pytest.approx(0.1538908, rel=1e-6)
    assert parts["loss_y0"].item() == pytest.approx(loss_y0, rel=1e-5)
    # uplift 0: Y* = [1/0.5, 0, -1/0.2, -1/0.01], squared and averaged over the 4 rows
    assert parts["loss_transformed_outcome"].item() == pytest.approx((4 + 0 + 25 + 10000) / 4, rel=1e-5)
    sums = validation_sums(out, batch, "click", "ips", clip=0.01, uplift=True)
    assert sums[6].item() == pytest.approx(105.0, rel=1e-5)  # sum w0 = 5 + 100 (float32 propensities)
    assert validation_parts(sums)["y0"] == pytest.approx(loss_y0, rel=1e-6)


def test_validation_sums_modes():
    out, batch = rating_batch()
    mcar = validation_sums(out, batch, "rating", "mcar")
    assert mcar.tolist() == pytest.approx([1 + 0, 2, 2])  # observed MCAR rows 0 and 3
    ips = validation_sums(out, batch, "rating", "ips", clip=0.01)
    assert (ips[0] / ips[1]).item() == pytest.approx(402 / 103)
    with pytest.raises(ValueError, match="mcar, ips or naive"):
        validation_sums(out, batch, "rating", "bogus")


def test_dr_joint_learning_ignores_the_propensity_of_unobserved_rows():
    """A sampled unobserved row may have no exposure propensity (NaN): DR-JL uses 1/p only on observed
    rows, so its loss, parts and gradients are those with any value there (before, 0 * NaN made them NaN)."""
    out, batch = rating_batch()  # row 1 is unobserved
    g = torch.tensor([1.5, 2.5, 2.0, 0.5], requires_grad=True)
    out["imputation"] = out["imputation_logit"] = g
    obj = DRJointLearning("rating", clip=0.01)
    ref = obj(out, batch)
    parts = obj(out, dict(batch, exposure_propensity=torch.tensor([0.5, NAN, 0.005, 1.0])))
    for k, v in ref.items():
        assert parts[k].item() == pytest.approx(v.item(), rel=1e-6), k
    grads = torch.autograd.grad(parts["loss"], [out["logit"], g])
    ref_grads = torch.autograd.grad(ref["loss"], [out["logit"], g])
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and torch.allclose(a, b)


def _uplift_validation_rows():
    """The uplift test's four rows plus two observed rows without a treatment flag / propensity."""
    y1_logit = torch.tensor([0.0, 2.0, 5.0, 5.0, 1.0, -1.0])
    y0_logit = torch.tensor([9.0, 9.0, 0.0, -1.0, 3.0, 2.0])
    out = {"logit": torch.zeros(6), "y1_logit": y1_logit, "y0_logit": y0_logit,
           "uplift": torch.sigmoid(y1_logit) - torch.sigmoid(y0_logit)}
    batch = {"outcome": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
             "treated": torch.tensor([1.0, 1.0, 0.0, 0.0, NAN, 1.0]),
             "treatment_propensity": torch.tensor([0.5, 0.25, 0.5, 0.8, 0.5, NAN]), "observed": torch.ones(6),
             "exposure_propensity": torch.ones(6), "is_mcar": torch.ones(6)}
    return out, batch


def test_uplift_validation_scores_the_uplift_heads_like_the_objective():
    """objective=uplift: the validation sums add the objective's causal terms on the validation rows, the
    arm-wise IPW errors of y1 / y0 and the transformed-outcome error of the uplift, over the rows with a
    treatment flag and propensity; the relevance error alone (the old metric, every mode) could not tell a
    model from one with swapped heads (every effect's sign flipped)."""
    from causalrec.train.step import metric_from_totals, validation_parts

    out, batch = _uplift_validation_rows()
    four = {k: v[:4] for k, v in batch.items()}
    obj = UpliftIPW("click", clip=0.01, relevance_weight=1.0, transformed_outcome_weight=1.0)(
        {k: v[:4] for k, v in out.items()}, four)
    sums = validation_sums(out, batch, "click", "ips", clip=0.01, uplift=True)
    assert sums.dtype == torch.float64 and sums.shape == (9,)
    parts = validation_parts(sums)
    assert parts["relevance"] == pytest.approx(math.log(2), rel=1e-6)  # all six rows, logit 0
    assert int(sums[2]) == 6 and int(sums[-1]) == 4  # the two rows without t or e: relevance only
    assert parts["y1"] == pytest.approx(obj["loss_y1"].item(), rel=1e-6)
    assert parts["y0"] == pytest.approx(obj["loss_y0"].item(), rel=1e-6)
    assert parts["transformed_outcome"] == pytest.approx(obj["loss_transformed_outcome"].item(), rel=1e-6)
    assert metric_from_totals(sums) == pytest.approx(sum(parts.values()), rel=1e-12)
    # sums over rows: any split of the rows (batches, DDP workers) adds up to the whole
    halves = [validation_sums({k: v[r] for k, v in out.items()}, {k: v[r] for k, v in batch.items()}, "click",
                              "ips", clip=0.01, uplift=True) for r in (slice(0, 3), slice(3, 6))]
    assert torch.allclose(halves[0] + halves[1], sums, rtol=1e-12, atol=0)
    # swapped heads: the relevance error (every mode) is blind to them, the uplift validation is not
    swapped = dict(out, y1_logit=out["y0_logit"], y0_logit=out["y1_logit"], uplift=-out["uplift"])
    for mode in ("ips", "mcar", "naive"):
        assert metric_from_totals(validation_sums(swapped, batch, "click", mode)) == pytest.approx(
            metric_from_totals(validation_sums(out, batch, "click", mode)))
        assert metric_from_totals(validation_sums(swapped, batch, "click", mode, uplift=True)) > \
            metric_from_totals(validation_sums(out, batch, "click", mode, uplift=True)) + 1.0
    # validation rows without the treatment columns: no causal row, the relevance error alone
    bare = {k: v for k, v in batch.items() if k not in ("treated", "treatment_propensity")}
    sums = validation_sums(out, bare, "click", "ips", uplift=True)
    assert sums[3:].tolist() == [0.0] * 6
    assert metric_from_totals(sums) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(KeyError, match="uplift=True"):
        validation_sums({"logit": out["logit"]}, batch, "click", "ips", uplift=True)


def test_build_objective_by_name():
    assert isinstance(build_objective("snips", "click", 0.05), SNIPS)
    assert build_objective("ips", clip=0.05).clip == 0.05
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("magic")


def _two_worker_halves(monkeypatch, obj, out_of, batch, cut):
    """What two DDP workers compute on ``[:cut]`` and ``[cut:]``, without processes: a stand-in
    process group of 2 whose all-reduce adds the other part's normalisers. Returns each part's loss
    and how many all-reduces each objective call made."""
    import torch.distributed as dist

    parts = [slice(0, cut), slice(cut, len(batch["observed"]))]
    calls = [[], []]  # each part's tensors as handed to the all-reduce, in call order
    second = False

    def all_reduce(tensor, op=None):
        assert op == dist.ReduceOp.SUM and not tensor.requires_grad
        if not second:  # first pass: record each part's own normalisers
            calls[current].append(tensor.clone())
        else:  # second pass: the sum over both parts, as the real collective returns it
            tensor.copy_(calls[0][done[current]] + calls[1][done[current]])
            done[current] += 1

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for current, rows in enumerate(parts):
        obj(out_of(rows), {k: v[rows] for k, v in batch.items()})
    n_calls = [len(c) for c in calls]
    second, done, losses = True, [0, 0], []
    for current, rows in enumerate(parts):
        losses.append(obj(out_of(rows), {k: v[rows] for k, v in batch.items()})["loss"])
    monkeypatch.undo()
    return losses, n_calls


def test_summed_normalisers_make_the_mean_of_worker_gradients_the_whole_batch_gradient(monkeypatch):
    """DDP applies the mean of the workers' gradients. With each objective's normalisers summed over
    the workers (one all-reduce per call, simulated here; tests/test_ddp.py runs real gloo workers)
    and each loss scaled by the world size, that mean is the whole batch's gradient and the mean
    of the losses the whole batch's loss, for every objective, although the parts differ in rows,
    observed counts, IPS / treatment weight sums and sample weights, and one part has no observed
    row. Local normalisers (the code before) up-weighted the part with fewer observed rows."""
    g = torch.Generator().manual_seed(0)
    n, cut = 20, 12
    first = torch.arange(n) < cut
    leaves = {k: torch.randn(n, generator=g, requires_grad=True)
              for k in ("logit", "imputation_logit", "y1_logit", "y0_logit")}

    def out_of(rows, task):
        out = {k: v[rows] for k, v in leaves.items()}
        out["imputation"] = out["imputation_logit"] if task == "rating" else torch.sigmoid(out["imputation_logit"])
        out["uplift"] = torch.sigmoid(out["y1_logit"]) - torch.sigmoid(out["y0_logit"])
        return out

    def batch_of(task, observed):
        y = torch.randn(n, generator=g) + 3 if task == "rating" else (torch.rand(n, generator=g) < 0.4).float()
        return {"label": torch.where(observed > 0, y, torch.full_like(y, NAN)), "outcome": y,
                "observed": observed,
                "exposure_propensity": torch.where(first, 0.6, 0.08) + 0.1 * torch.rand(n, generator=g),
                "sample_weight": torch.where(observed > 0, 1.0, torch.where(first, 3.0, 7.0)),
                "treated": (torch.rand(n, generator=g) < torch.where(first, 0.7, 0.3)).float(),
                "treatment_propensity": torch.where(first, 0.7, 0.2) + 0.1 * torch.rand(n, generator=g)}

    mostly_first = torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1] + [0, 1, 0, 0, 0, 0, 1, 0])  # 10 and 2 observed
    only_first = first.float()  # the second part has no observed row
    objectives = [(o, "rating") for o in (Naive("rating"), IPS("rating", 0.05), SNIPS("rating", 0.05),
                                          DRJointLearning("rating", 0.05))]
    objectives += [(DRJointLearning("click", 0.05), "click"),
                   (UpliftIPW("click", 0.05, transformed_outcome_weight=0.5), "click")]
    wrong = []
    for obj, task in objectives:
        for observed in (mostly_first, only_first):
            batch = batch_of(task, observed)
            whole = obj(out_of(slice(None), task), batch)["loss"]
            grad_whole = torch.autograd.grad(whole, list(leaves.values()), allow_unused=True)
            losses, n_calls = _two_worker_halves(monkeypatch, obj, lambda r: out_of(r, task), batch, cut)
            grads = [torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) for loss in losses]
            gap = abs(float(sum(losses).detach()) / 2 - float(whole.detach()))
            for gw, g0, g1 in zip(grad_whole, *grads):
                if gw is not None:
                    mean = (torch.zeros_like(gw) if g0 is None else g0) + (torch.zeros_like(gw) if g1 is None else g1)
                    gap = max(gap, float((mean / 2 - gw).abs().max()))
            if gap > 1e-5 * max(1.0, float(whole.detach())):
                wrong.append(f"{type(obj).__name__}({task}), {int(observed[:cut].sum())} and "
                             f"{int(observed[cut:].sum())} observed: gap {gap:.3g}")
            if n_calls != [1, 1]:  # the same single collective on every worker, whatever its rows
                wrong.append(f"{type(obj).__name__}({task}): {n_calls} all-reduces per call, not one fused")
    assert not wrong, "\n".join(wrong)


def test_one_process_calls_no_collective(monkeypatch):
    """Without a process group the objectives never touch torch.distributed's collectives."""
    import torch.distributed as dist

    def fail(*a, **k):
        raise AssertionError("all_reduce called in a single process")

    monkeypatch.setattr(dist, "all_reduce", fail)
    out, batch = rating_batch()
    out["imputation"] = out["imputation_logit"] = out["logit"].detach() + 0.5
    for name in ("naive", "ips", "snips", "dr_jl"):
        assert torch.isfinite(build_objective(name, "rating", 0.05)(out, batch)["loss"])
