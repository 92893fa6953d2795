"""Training objectives that correct for how the feedback was logged.

Logged ratings/clicks are missing not at random: users rate what they chose to
see, platforms show what they expect to be liked. A model fit on the observed
rows alone (:class:`Naive`) learns the exposure policy's taste along with the
users'. Each class below is one published correction, as a small dataclass with
one interface: ``objective(out, batch) -> dict`` holding ``loss`` (the scalar to
back-propagate) and its named parts, where ``out`` is a model's forward output and
``batch`` the featurized rows (``observed``, ``label``/``outcome``,
``exposure_propensity``, ``treated``, ``treatment_propensity``).

The per-pair error ``l`` is the squared error for ratings (``task="rating"``,
target ``label``) and the log-loss for clicks/purchases (``task="click"``, target
``outcome``).

Data parallelism (:func:`global_denominators`): every loss here is a sum over rows
divided by a normaliser of the batch (a count of observed rows, a sum of weights).
Under DDP each worker holds a slice of the union batch, so its normalisers are summed
over the process group and its loss multiplied by the world size; DDP's mean of the
workers' gradients is then exactly the gradient of the union batch's objective, and
each returned part is the worker's share of the union value times the world size (its
mean over workers is the union value). A single process (no process group) computes
the same expressions as before, untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def target_of(batch: dict, task: str) -> torch.Tensor:
    """The label the task predicts: ``label`` (rating) or ``outcome`` (click/purchase)."""
    key = "label" if task == "rating" else ("outcome" if "outcome" in batch else "label")
    if key not in batch:
        raise KeyError(f"batch has no {key!r} column, needed for task={task!r}")
    return batch[key].float()


def pointwise_loss(logit: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Per-row error: squared error (rating) or binary cross-entropy on the logit (click)."""
    logit = logit.float()
    if task == "rating":
        return (logit - target) ** 2
    return F.binary_cross_entropy_with_logits(logit, target.clamp(0.0, 1.0), reduction="none")


def observed_mask(batch: dict, target: torch.Tensor) -> torch.Tensor:
    """Rows with logged feedback (``observed == 1`` and a non-null target)."""
    obs = batch["observed"].float() > 0.5 if "observed" in batch else torch.ones_like(target, dtype=torch.bool)
    return obs & ~torch.isnan(target)


def inverse_propensity(p: torch.Tensor, clip: float) -> torch.Tensor:
    """``1 / max(p, clip)``: clipping bounds the variance at the price of a small bias (Schnabel 2016)."""
    return 1.0 / p.float().clamp(min=clip)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


def data_parallel_world() -> int:
    """Processes in the default process group; 1 without one (a single process, Tune trials)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def global_denominators(*dens: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int]:
    """The union batch's normalisers and the factor each worker's loss is scaled by.

    Why: DDP averages the workers' gradients, so with ``L_k = W * N_k / D`` (``N_k`` this
    worker's numerator, ``D`` the normaliser summed over the ``W`` workers) the average is
    ``grad sum_k N_k / D``, the single-process gradient on the union batch, whatever each
    worker's count of observed rows or weight sum. Local normalisers instead up-weight the
    rows of a worker with fewer observed rows (or smaller weights).

    One fused all-reduce per call (SUM, in float64: counts add exactly, float32 weight sums
    with no rounding worth the name), on *detached* values: every normaliser in this module is a function of the batch alone
    (``observed``, labels, propensities, ``treated``, ``sample_weight``), never of the model's
    parameters (DR-JL's imputation and the uplift heads appear only in numerators), so
    ``d/dθ [sum w l(θ) / sum w] = sum w dl/dθ / sum w`` and nothing should flow through the
    collective. Every worker calls this exactly once per objective call, in the same order,
    also when its batch has no observed row (its zeros are summed like any other value):
    Ray Train's ``streaming_split(equal=True)`` gives each worker the same row count, hence
    the same number of batches, as DDP's own gradient all-reduce already requires.
    Single process: the inputs are returned as they are, with factor 1.
    """
    world = data_parallel_world()
    if world == 1:
        return dens, 1
    fused = torch.stack([d.detach().to(torch.float64) for d in dens])
    torch.distributed.all_reduce(fused, op=torch.distributed.ReduceOp.SUM)
    return tuple(f.to(d.dtype) for f, d in zip(fused.unbind(), dens)), world


def _share(num: torch.Tensor, den: torch.Tensor, scale: int) -> torch.Tensor:
    """``num / den``; times ``scale`` (the world size) under DDP, see :func:`global_denominators`."""
    return num / den if scale == 1 else scale * num / den


@dataclass
class Naive:
    """Mean error over observed rows: the biased baseline, ``(1/|O|) sum_{O} l``."""

    task: str = "rating"

    def __call__(self, out: dict, batch: dict) -> dict:
        y = target_of(batch, self.task)
        m = observed_mask(batch, y)
        l = _masked(pointwise_loss(out["logit"], torch.nan_to_num(y), self.task), m)
        (n,), k = global_denominators(m.sum())
        return {"loss": _share(l.sum(), n.clamp(min=1), k)}


def _weighted_losses(out: dict, batch: dict, task: str, clip: float):
    """Per-row inverse exposure weights and losses, zeroed where the label is not observed."""
    y = target_of(batch, task)
    m = observed_mask(batch, y)
    w = _masked(inverse_propensity(batch["exposure_propensity"], clip), m)
    l = _masked(pointwise_loss(out["logit"], torch.nan_to_num(y), task), m)
    return w, l, m


@dataclass
class IPS:
    """Inverse propensity scoring with clipping (Schnabel et al. 2016, "Recommendations as Treatments").

    ``L = (1/|O|) sum_{(u,i) in O} l_ui / max(p_ui, clip)``, ``p_ui = P(observed)``. This is the
    paper's unbiased estimate of the full-matrix error ``(1/(U I)) sum_{O} l/p`` times the constant
    ``U I / |O|``, which does not move the minimiser and keeps the loss on the naive scale.
    """

    task: str = "rating"
    clip: float = 0.01

    def __call__(self, out: dict, batch: dict) -> dict:
        w, l, m = _weighted_losses(out, batch, self.task, self.clip)
        (n,), k = global_denominators(m.sum())
        n = n.clamp(min=1)
        return {"loss": _share((w * l).sum(), n, k), "mean_weight": _share(w.sum(), n, k)}


@dataclass
class SNIPS:
    """Self-normalised IPS (Swaminathan & Joachims 2015; Schnabel et al. 2016).

    ``L = sum_O w l / sum_O w`` with ``w = 1 / max(p, clip)``: a ratio estimator, slightly biased
    but far less variable than IPS when a few propensities are tiny.
    """

    task: str = "rating"
    clip: float = 0.01

    def __call__(self, out: dict, batch: dict) -> dict:
        w, l, _ = _weighted_losses(out, batch, self.task, self.clip)
        (ws,), k = global_denominators(w.sum())
        return {"loss": _share((w * l).sum(), ws.clamp(min=1e-12), k)}


@dataclass
class DRJointLearning:
    """Doubly robust joint learning (Wang, Zhang, Sun & Qi, ICML 2019).

    Over every row (observed pairs and sampled unobserved pairs, ``o`` = observed):

    * prediction model: ``L_pred = sum [ s e_hat + o (e - e_hat) / p ] / sum s`` where ``e = l(pred, y)``
      is the true error (observed rows only), ``e_hat = l(pred, g)`` the error imputed with the
      imputation model's prediction ``g`` (held fixed for this part) and ``s`` the row's
      ``sample_weight``: 1 for an observed pair, the number of unobserved pairs a sampled one
      stands for. Without ``s`` the imputed term would cover only the sampled pairs while the
      ``1/p`` correction assumes all of them, leaving ``e_hat`` with a negative net coefficient
      on observed rows: the prediction would be pushed *away* from the imputation and diverge.
      Unbiased for the full-matrix error when *either* the propensities or the imputed errors are right.
    * imputation model: ``L_imp = (1/|O|) sum_O (e - e_hat)^2 / p`` (the prediction held fixed),
      which fits the imputed errors where it matters for the DR estimator's bias, plus
      ``label_fit_weight * (1/|O|) sum_O l(g, y) / p``, an IPS-weighted fit of ``g`` to the label.
      Why the second term: for squared error ``d e_hat / d g = -2 (pred - g)`` vanishes at
      ``g = pred``, and both models start at the global mean, so the error fit alone can leave
      the imputation near the prediction, where the imputed term only shrinks the prediction
      towards itself. ``g = y`` makes ``e_hat = e`` exactly, so the label fit picks a minimiser
      of the error fit and moves off that point from the first step. ``label_fit_weight=0`` is
      the paper's objective alone. Which is better depends on the data, so it is a
      hyperparameter (``train.dr_label_fit_weight``, searched by Ray Tune): on Coat's MCAR test
      the label fit took MF's MSE from 1.208 to 1.147 (five-seed means); on a simulated MNAR
      world the paper's objective alone did 4% better (``scripts/sim_dr_label_fit.py``).

    Both are minimised together in one backward pass; ``detach`` keeps each gradient on its own model.
    """

    task: str = "rating"
    clip: float = 0.01
    imputation_weight: float = 1.0
    label_fit_weight: float = 1.0

    def __call__(self, out: dict, batch: dict) -> dict:
        if "imputation" not in out or "imputation_logit" not in out:
            raise KeyError("DR joint learning needs a model built with imputation=True "
                           "(outputs 'imputation' and 'imputation_logit')")
        y = target_of(batch, self.task)
        o = observed_mask(batch, y)
        of = o.float()
        # zeroed off the observed rows, as in IPS / SNIPS: a sampled unobserved row may have no
        # propensity (NaN), and 0 * NaN in the ``o * ... * w`` terms below would make the loss NaN
        w = _masked(inverse_propensity(batch["exposure_propensity"], self.clip), o)
        pred = out["logit"]
        g = out["imputation"].float()
        y0 = torch.nan_to_num(y)
        e = _masked(pointwise_loss(pred, y0, self.task), o)
        e_hat = pointwise_loss(pred, g.detach(), self.task)
        s = torch.nan_to_num(batch["sample_weight"].float(), nan=1.0) if "sample_weight" in batch else torch.ones_like(of)
        (s_sum, n_obs), k = global_denominators(s.sum(), o.sum())
        n_obs = n_obs.clamp(min=1)
        l_pred = _share((s * e_hat + of * (e - e_hat) * w).sum(), s_sum.clamp(min=1e-12), k)
        e_hat_imp = pointwise_loss(pred.detach(), g, self.task)
        l_imp = _share((of * (e.detach() - e_hat_imp) ** 2 * w).sum(), n_obs, k)
        parts = {"loss_pred": l_pred, "loss_imputation": l_imp}
        if self.label_fit_weight:
            l_fit = _share((of * pointwise_loss(out["imputation_logit"], y0, self.task) * w).sum(), n_obs, k)
            parts["loss_label_fit"] = l_fit
            l_imp = l_imp + self.label_fit_weight * l_fit
        return {"loss": l_pred + self.imputation_weight * l_imp, **parts}


@dataclass
class UpliftIPW:
    """Unbiased learning of the causal effect of recommending (in the spirit of Sato et al. 2020).

    The uplift head pair is trained with inverse *treatment*-propensity weights ``e = P(T=1|x)``
    (clipped to ``[clip, 1-clip]``), self-normalised within each arm:

    ``L_1 = sum T l(y1, y)/e / sum T/e``, ``L_0 = sum (1-T) l(y0, y)/(1-e) / sum (1-T)/(1-e)``

    so each head estimates its potential outcome over the whole population, not only where the
    logging policy acted. Optionally (``transformed_outcome_weight > 0``) the difference is also
    regressed on the unbiased per-row effect ``Y* = Y (T/e - (1-T)/(1-e))``, whose expectation
    given x is the effect itself (Athey & Imbens 2015); Sato et al. use this identity to
    evaluate and learn uplift from logged data. The relevance head gets the exposure-IPS loss.
    Model selection (early stopping, the best checkpoint, Ray Tune) scores the same causal terms on the
    validation rows, ``L_1 + L_0`` and the transformed-outcome error, on top of the relevance head's
    validation error (:func:`validation_sums` with ``uplift=True``).
    """

    task: str = "click"
    clip: float = 0.01
    relevance_weight: float = 1.0
    transformed_outcome_weight: float = 0.0

    def __call__(self, out: dict, batch: dict) -> dict:
        for k in ("y1_logit", "y0_logit"):
            if k not in out:
                raise KeyError("the uplift objective needs a model built with uplift=True (outputs y1, y0)")
        if "treated" not in batch or "treatment_propensity" not in batch:
            raise KeyError("the uplift objective needs 'treated' and 'treatment_propensity' in the batch")
        y = target_of(batch, self.task)
        t = batch["treated"].float()
        m = observed_mask(batch, y) & ~torch.isnan(t) & ~torch.isnan(batch["treatment_propensity"].float())
        e = torch.nan_to_num(batch["treatment_propensity"].float(), nan=0.5).clamp(self.clip, 1.0 - self.clip)
        t0 = torch.nan_to_num(t)
        y0v = torch.nan_to_num(y)
        w1 = _masked(t0 / e, m)
        w0 = _masked((1.0 - t0) / (1.0 - e), m)
        # every normaliser of the step in one all-reduce: the arms' weight sums, the relevance
        # head's observed count (its exposure-IPS loss) and the transformed outcome's row count
        dens = [w1.sum(), w0.sum()]
        if self.relevance_weight:
            w_r, l_r, m_r = _weighted_losses(out, batch, self.task, self.clip)
            dens.append(m_r.sum())
        if self.transformed_outcome_weight:
            dens.append(m.sum())
        dens, k = global_denominators(*dens)
        l1 = _share((w1 * pointwise_loss(out["y1_logit"], y0v, self.task)).sum(), dens[0].clamp(min=1e-12), k)
        l0 = _share((w0 * pointwise_loss(out["y0_logit"], y0v, self.task)).sum(), dens[1].clamp(min=1e-12), k)
        parts = {"loss_y1": l1, "loss_y0": l0}
        loss = l1 + l0
        if self.relevance_weight:
            rel = _share((w_r * l_r).sum(), dens[2].clamp(min=1), k)  # IPS's loss
            parts["loss_relevance"] = rel
            loss = loss + self.relevance_weight * rel
        if self.transformed_outcome_weight:
            y_star = y0v * (t0 / e - (1.0 - t0) / (1.0 - e))
            l_to = _share(_masked((out["uplift"].float() - y_star) ** 2, m).sum(), dens[-1].clamp(min=1), k)
            parts["loss_transformed_outcome"] = l_to
            loss = loss + self.transformed_outcome_weight * l_to
        return {"loss": loss, **parts}


OBJECTIVES = {"naive": Naive, "ips": IPS, "snips": SNIPS, "dr_jl": DRJointLearning, "uplift": UpliftIPW}


def build_objective(name: str, task: str = "rating", clip: float = 0.01, **kwargs):
    """Objective by config name (``train.objective``)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if cls is Naive:
        return cls(task=task)
    return cls(task=task, clip=clip, **kwargs)


def objective_options(name: str, loop_config: dict) -> dict:
    """The objective's own settings from a loop config: ``dr_label_fit_weight`` for DR-JL."""
    if name == "dr_jl" and loop_config.get("dr_label_fit_weight") is not None:
        return {"label_fit_weight": float(loop_config["dr_label_fit_weight"])}
    return {}


def needs_imputation(name: str) -> bool:
    return name == "dr_jl"


def needs_uplift(name: str) -> bool:
    return name == "uplift"


def trains_on_unobserved(name: str) -> bool:
    """Whether the objective's gradient reaches the prediction model on unobserved rows (DR-JL's imputed term)."""
    return name == "dr_jl"


# --------------------------------------------------------------------------- unbiased validation


UPLIFT_VALIDATION_PARTS = ("y1", "y0", "transformed_outcome")


def validation_sums(out: dict, batch: dict, task: str, mode: str, clip: float = 0.01,
                    uplift: bool = False) -> torch.Tensor:
    """Additive sums for one batch; the metric is a function of their totals over batches and workers.

    ``[sum w l, sum w, rows]``: the relevance head's (``logit``) error, ``metric = sum w l / sum w``:

    ``mode="mcar"``: plain mean error over the random-exposure rows (``is_mcar``): unbiased by design.
    ``mode="ips"``: self-normalised IPS estimate of the error over all pairs from the logged rows.
    ``mode="naive"``: plain mean over observed rows (biased; for comparison only).

    ``uplift=True`` (``train.objective=uplift``) appends the causal terms of :func:`uplift_validation_sums`,
    which score the heads the uplift ranking uses (``y1``, ``y0``, ``uplift``); the relevance error
    alone would rank a model with swapped heads (every effect's sign flipped) equal to the right one.
    Every entry is a sum over rows (float64), so summing the vectors over batches and DDP workers
    (one all-reduce) gives exactly the union's totals; :func:`causalrec.train.step.validation_parts`
    turns them into the reported errors.
    """
    y = target_of(batch, task)
    m = observed_mask(batch, y)
    if mode == "mcar":
        if "is_mcar" not in batch:
            raise KeyError("validation mode 'mcar' needs the is_mcar column")
        m = m & (batch["is_mcar"].float() > 0.5)
        w = m.float()
    elif mode == "ips":
        w = _masked(inverse_propensity(batch["exposure_propensity"], clip), m)
    elif mode == "naive":
        w = m.float()
    else:
        raise ValueError(f"validation metric mode {mode!r}; expected mcar, ips or naive")
    l = _masked(pointwise_loss(out["logit"], torch.nan_to_num(y), task), m)
    rel = torch.stack([x.double().sum() for x in (w * l, w, m)])  # row values summed in float64
    if not uplift:
        return rel
    return torch.cat([rel, uplift_validation_sums(out, batch, task, clip)])


def uplift_validation_sums(out: dict, batch: dict, task: str, clip: float = 0.01) -> torch.Tensor:
    """The uplift objective's causal terms on validation rows, as sums (see :class:`UpliftIPW`).

    ``[sum w1 l(y1, y), sum w1, sum w0 l(y0, y), sum w0, sum (uplift - Y*)^2, causal rows]`` with
    ``w1 = T/e``, ``w0 = (1-T)/(1-e)``, ``e`` the treatment propensity clipped to ``[clip, 1-clip]``
    as in training, and ``Y* = y (T/e - (1-T)/(1-e))`` the transformed outcome (Athey & Imbens 2015).
    The ratios are the self-normalised IPW error of each potential-outcome head over the whole
    population (``L_1``, ``L_0`` of the objective) and the transformed-outcome error of the predicted
    effect: ``E[(tau_hat - Y*)^2 | x] = (tau_hat - tau)^2 + Var(Y* | x)``, so on fixed validation rows
    (and a fixed ``clip``) it ranks models by their effect's squared error, unbiasedly where the
    propensities are right. Rows: observed, labelled, with ``treated`` and ``treatment_propensity``
    (a row missing either, or a batch without the columns, adds nothing).
    """
    for k in ("y1_logit", "y0_logit", "uplift"):
        if k not in out:
            raise KeyError("uplift validation needs a model built with uplift=True (outputs y1, y0, uplift)")
    y = target_of(batch, task)
    m = observed_mask(batch, y)
    if "treated" in batch and "treatment_propensity" in batch:
        t_raw, e_raw = batch["treated"].float(), batch["treatment_propensity"].float()
        m = m & ~torch.isnan(t_raw) & ~torch.isnan(e_raw)
    else:
        t_raw = e_raw = torch.full_like(y, float("nan"))
        m = torch.zeros_like(m)
    e = torch.nan_to_num(e_raw, nan=0.5).clamp(clip, 1.0 - clip)
    t = torch.nan_to_num(t_raw)
    yv = torch.nan_to_num(y)
    w1 = _masked(t / e, m)
    w0 = _masked((1.0 - t) / (1.0 - e), m)
    l1 = _masked(pointwise_loss(out["y1_logit"], yv, task), m)
    l0 = _masked(pointwise_loss(out["y0_logit"], yv, task), m)
    y_star = yv * (t / e - (1.0 - t) / (1.0 - e))
    to = _masked((out["uplift"].float() - y_star) ** 2, m)
    return torch.stack([x.double().sum() for x in (w1 * l1, w1, w0 * l0, w0, to, m)])
