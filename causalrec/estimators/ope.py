"""Off-policy estimators of a policy's value, one small dataclass per idea (Open Bandit Pipeline style).

Notation (per logged row i, i.e. per (context, position) unit where the data has positions):
``r_i`` reward, ``pi_b(a_i|x_i)`` the logging propensity (``pscore``), ``pi_e(a_i|x_i)`` the
evaluation policy's probability of the logged action, ``w_i = pi_e / pi_b``,
``q_hat(x_i, a_i)`` a reward model at the logged action and
``q_hat(x_i, pi_e) = sum_a pi_e(a|x_i) q_hat(x_i, a)``. ``E_n`` is the sample mean.

Slates / positions (OBD has 3): as obp does, the unit is (context, position); ``pscore``
and ``pi_e`` are position-specific probabilities of the item shown in that slot, and the
value is the mean reward per slot.

Every estimator is ``theta = sum_k E_n[A_k] + E_n[C] / E_n[D]`` over per-row terms, so the
analytic interval is the CLT (linear forms) or the delta method (self-normalised ratio
forms) from the same statistics; see :mod:`causalrec.estimators.base`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from causalrec.config import MIN_BOOTSTRAP_BUCKETS
from causalrec.estimators.base import (
    PI_E,
    PSCORE,
    Q_HAT,
    Q_HAT_PI,
    REWARD,
    ROW_ID,
    EstimateResult,
    Plan,
    Stats,
    Term,
    local_stats,
    spark_stats,
    z_value,
)

# -------------------------------------------------------------------- terms shared by estimators

T_WR = Term("wr", lambda o, q: q["w"] * q["r"])
T_W = Term("w", lambda o, q: q["w"])
T_QPI = Term("qpi", lambda o, q: q["qpi"])
T_WRES = Term("wres", lambda o, q: q["w"] * (q["r"] - q["qf"]))

log = logging.getLogger(__name__)


def _fmt(lam: float) -> str:
    return "inf" if math.isinf(lam) else repr(float(lam))


def _check_lambda(setting: str, lam, zero_ok: bool) -> None:
    """obp's rule for a weight threshold/shrinkage: a number, not NaN, >= 0 (inf allowed: no
    clipping); > 0 where 0 makes a 0/0 (DRos's lambda w / (w^2 + lambda) at w = 0)."""
    try:
        x = float(lam)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(lam, bool) or math.isnan(x) or x < 0 or (x == 0 and not zero_ok):
        raise ValueError(f"{setting}: {lam!r} is not a valid lambda; expected a number {'>=' if zero_ok else '>'} 0 "
                         f"(inf allowed)")


@dataclass(frozen=True)
class Form:
    """theta = sum(E_n[add]) + E_n[num] / E_n[den] (den None -> 1; num None -> 0)."""

    add: tuple = ()
    num: Optional[str] = None
    den: Optional[str] = None

    def names(self) -> list[str]:
        return [*self.add, *(x for x in (self.num, self.den) if x)]

    def value(self, mean) -> float:
        v = sum(mean(a) for a in self.add)
        if self.num:
            d = mean(self.den) if self.den else 1.0
            if d == 0:  # the policy puts no mass on any logged action: no support, undefined
                return float("nan")
            v += mean(self.num) / d
        return v

    def gradient(self, mean) -> dict:
        g: dict = {}
        for a in self.add:
            g[a] = g.get(a, 0.0) + 1.0
        if self.num:
            d = mean(self.den) if self.den else 1.0
            if d == 0:
                return {k: float("nan") for k in self.names()}
            g[self.num] = g.get(self.num, 0.0) + 1.0 / d
            if self.den:
                g[self.den] = g.get(self.den, 0.0) - mean(self.num) / d / d  # d**2 raises OverflowError past 1e154
        return g


@dataclass
class BaseOffPolicyEstimator:
    """One interface: terms for the pass, a :class:`Form` from the statistics, results with intervals."""

    estimator_name: str = "base"

    # --- what the pass must compute --------------------------------------------------------
    def terms(self) -> list[Term]:
        raise NotImplementedError(f"{type(self).__name__} must declare its per-row terms")

    def tuning_terms(self) -> list[Term]:
        """Extra terms only needed to choose a hyperparameter (no bootstrap sums)."""
        return []

    def form(self, stats: Stats, ns: str) -> Form:
        """The estimate's form, with term names namespaced by ``ns`` ("<policy>|")."""
        raise NotImplementedError(f"{type(self).__name__} must define its form")

    def candidate_forms(self, ns: str) -> list[Form]:
        """Every form :meth:`form` may return (the pass needs cross-products only within these).
        Fixed estimators have one, whatever the statistics; tuned ones one per candidate."""
        return [self.form(None, ns)]

    def hyperparam(self, stats: Stats, ns: str) -> Optional[float]:
        return None

    def reference_form(self, ns: str) -> Optional[Form]:
        """An unbiased candidate whose interval the reported one must contain (see :class:`_TunedDR`);
        None for estimators without a data-chosen bias-variance trade-off."""
        return None

    # whether the rows' spread is a valid interval for the policy value (not for DM: see DirectMethod)
    sampling_interval = True

    def needs_q_hat(self) -> bool:
        return False

    # --- OBP-style local convenience ---------------------------------------------------------
    def _local(self, reward, pscore, pi_e, q_hat=None, q_hat_pi=None, row_id=None) -> dict:
        n = np.shape(reward)[0]
        data = {REWARD: reward, PSCORE: pscore, PI_E: pi_e,
                Q_HAT: np.zeros(n) if q_hat is None else q_hat,
                Q_HAT_PI: np.zeros(n) if q_hat_pi is None else q_hat_pi,
                ROW_ID: np.arange(n) if row_id is None else row_id}
        if self.needs_q_hat() and (q_hat is None or q_hat_pi is None):
            raise ValueError(f"{self.estimator_name}: needs reward-model predictions q_hat and q_hat_pi")
        return data  # checked by the pass itself (local_stats), like every other input

    def estimate_round_rewards(self, reward, pscore, pi_e, q_hat=None, q_hat_pi=None) -> np.ndarray:
        """Per-row contributions (obp's ``_estimate_round_rewards``): add terms + num / mean(den)."""
        data = self._local(reward, pscore, pi_e, q_hat, q_hat_pi)
        (res,), stats = evaluate_with_stats(data, [self])
        form = self.form(stats, "policy|")
        from causalrec.estimators.base import NumpyOps, _quantities

        q = _quantities(NumpyOps, lambda c: np.asarray(data[c], dtype=float), (PI_E, Q_HAT_PI))
        terms = {f"policy|{t.name}": t for t in self.terms() + self.tuning_terms()}
        n = len(data[REWARD])

        def val(name):
            return np.broadcast_to(np.asarray(terms[name].fn(NumpyOps, q), dtype=float), (n,))

        out = np.zeros(n)
        for a in form.add:
            out = out + val(a)
        if form.num:
            out = out + val(form.num) / (stats.mean(form.den) if form.den else 1.0)
        assert math.isclose(float(out.mean()), res.estimate, rel_tol=1e-9, abs_tol=1e-12)
        return out

    def estimate_policy_value(self, reward, pscore, pi_e, q_hat=None, q_hat_pi=None) -> float:
        return evaluate(self._local(reward, pscore, pi_e, q_hat, q_hat_pi), [self])[0].estimate

    def estimate_interval(self, reward, pscore, pi_e, q_hat=None, q_hat_pi=None, *, alpha: float = 0.05,
                          n_boot: int = 0, seed: int = 0, row_id=None) -> EstimateResult:
        data = self._local(reward, pscore, pi_e, q_hat, q_hat_pi, row_id)
        return evaluate(data, [self], alpha=alpha, n_boot=n_boot, seed=seed)[0]

    def estimate_spark(self, df, *, alpha: float = 0.05, n_boot: int = 0, seed: int = 0) -> EstimateResult:
        """Distributed form over a DataFrame with columns row_id, reward, pscore, pi_e, q_hat, q_hat_pi."""
        return evaluate(df, [self], alpha=alpha, n_boot=n_boot, seed=seed)[0]


# -------------------------------------------------------------------- the estimators


@dataclass
class InverseProbabilityWeighting(BaseOffPolicyEstimator):
    """IPS: V = E_n[w_i r_i].

    Unbiased when pi_b > 0 wherever pi_e > 0. Precup et al. 2000; Strehl et al. 2010.
    """

    estimator_name: str = "ips"

    def terms(self):
        return [T_WR, T_W]

    def form(self, stats, ns):
        return Form(num=ns + "wr")


@dataclass
class ClippedIPS(BaseOffPolicyEstimator):
    """Clipped IPS: V = E_n[min(w_i, lambda) r_i]; biased down, lower variance.

    Bottou et al. 2013 ("Counterfactual reasoning and learning systems"); Strehl et al. 2010.
    """

    lambda_: float = 100.0
    estimator_name: str = "clipped_ips"

    def __post_init__(self):
        _check_lambda(f"{self.estimator_name}: lambda_ (the weight cap)", self.lambda_, zero_ok=True)

    def _t(self):
        lam = float(self.lambda_)
        return Term(f"clip{_fmt(lam)}", lambda o, q: o.minimum(q["w"], lam) * q["r"])

    def terms(self):
        return [self._t(), T_W]

    def form(self, stats, ns):
        return Form(num=ns + self._t().name)

    def hyperparam(self, stats, ns):
        return float(self.lambda_)


@dataclass
class SelfNormalizedIPS(BaseOffPolicyEstimator):
    """SNIPS: V = E_n[w_i r_i] / E_n[w_i]; delta-method interval for the ratio.

    Swaminathan & Joachims 2015 ("The self-normalized estimator for counterfactual learning").
    """

    estimator_name: str = "snips"

    def terms(self):
        return [T_WR, T_W]

    def form(self, stats, ns):
        return Form(num=ns + "wr", den=ns + "w")


@dataclass
class DirectMethod(BaseOffPolicyEstimator):
    """DM: V = E_n[q_hat(x_i, pi_e)]; only as good as the reward model. Beygelzimer & Langford 2009.

    No interval: the spread of q_hat over the rows treats the model as exact, and its error is the
    model's bias, which the rows cannot estimate. That interval covered the true value in 0 of 600
    simulated logs with a fitted per-item model, and the "random" baseline's q_hat is one constant
    (a zero-width interval). The estimate is reported; std_err and intervals are NaN."""

    estimator_name: str = "dm"
    sampling_interval = False

    def needs_q_hat(self):
        return True

    def terms(self):
        return [T_QPI, T_W]

    def form(self, stats, ns):
        return Form(add=(ns + "qpi",))


@dataclass
class DoublyRobust(BaseOffPolicyEstimator):
    """DR: V = E_n[q_hat(x_i, pi_e) + w_i (r_i - q_hat(x_i, a_i))].

    Unbiased if either the propensities or the reward model are correct. Dudik et al. 2011/2014.
    """

    estimator_name: str = "dr"

    def needs_q_hat(self):
        return True

    def terms(self):
        return [T_QPI, T_WRES, T_W]

    def form(self, stats, ns):
        return Form(add=(ns + "qpi",), num=ns + "wres")


@dataclass
class SelfNormalizedDoublyRobust(BaseOffPolicyEstimator):
    """SNDR: V = E_n[q_hat(x_i, pi_e)] + E_n[w_i (r_i - q_hat(x_i, a_i))] / E_n[w_i].

    Self-normalised correction term; delta-method interval. Kallus & Uehara 2019; obp's SNDR.
    """

    estimator_name: str = "sndr"

    def needs_q_hat(self):
        return True

    def terms(self):
        return [T_QPI, T_WRES, T_W]

    def form(self, stats, ns):
        return Form(add=(ns + "qpi",), num=ns + "wres", den=ns + "w")


def _bias_bound(stats: Stats, ns: str, bias_term: str, delta: float) -> float:
    """|E_n[(w - w_hat)(r - q_hat)]| + sqrt(2 E_n[w^2] log(2/d) / n) + 2 max(w) log(2/d) / (3n).

    The high-probability bias upper bound of Su et al. 2020 (Sec. 5), as obp's
    ``estimate_high_probability_upper_bound_bias``.
    """
    n = stats.n
    w2 = stats.cross[(ns + "w", ns + "w")] / n
    return (abs(stats.mean(bias_term)) + math.sqrt(2 * w2 * math.log(2 / delta) / n)
            + 2 * stats.maxima[ns + "w"] * math.log(2 / delta) / (3 * n))


@dataclass
class _TunedDR(BaseOffPolicyEstimator):
    """A DR variant with a weight-shrinking hyperparameter chosen from a grid in the same pass.

    Two stated rules (``tuning_method``), both computed from the pass's sufficient statistics:

    * ``"mse"``: lambda minimising the estimated MSE = sample variance / n + (high-probability
      bias upper bound)^2 (Su et al. 2020, Sec. 5; obp's ``*Tuning(tuning_method="mse",
      use_bias_upper_bound=True, delta=0.1)``).
    * ``"slope"``: SLOPE++ (Su, Srinath & Krishnamurthy 2020, "Adaptive estimator selection for
      off-policy evaluation"; Tucker & Lee 2021, "Improved estimator selection for off-policy
      evaluation"). Candidates are ordered by their one-sided Student-t confidence width
      ``t_{n-1}(1-delta) sqrt(var / (n-1))``, widest (least biased) first; walk down the list and
      stop before the first candidate whose estimate leaves ``width_i + (sqrt(6)-1) width_j`` of
      any candidate j kept so far - the narrowest interval still consistent with the
      less-biased ones. obp's default rule.

    Intervals are bias-aware: the chosen lambda's own interval (bootstrap replicates reuse that
    lambda) ignores the bias its shrinkage trades for variance, and with the per-item reward model
    that bias was 3-6 standard errors in simulation (SLOPE's choice covered the true value in
    6-33% of logs). So the reported interval is the hull of the chosen lambda's interval and that of
    the least-shrunk candidate (:meth:`reference_form`; lambda = inf is DR, unbiased), and covers
    wherever DR's does; the point estimate stays the tuned one. ``interval_method`` says so.
    """

    lambdas: tuple = ()
    zero_lambda_ok = True  # class constant, not a field: whether lambda = 0 is a valid candidate
    delta: float = 0.1  # confidence level of the bias bound and of SLOPE's widths (obp's default)
    tuning_method: str = "slope"

    def __post_init__(self):
        if self.tuning_method not in ("mse", "slope"):
            raise ValueError(f"{self.estimator_name}: tuning_method is {self.tuning_method!r}; expected 'mse' or 'slope'")
        if not self.lambdas:
            raise ValueError(f"{self.estimator_name}: lambdas is empty; expected at least one candidate")
        for lam in self.lambdas:
            _check_lambda(f"{self.estimator_name}: lambdas", lam, zero_ok=self.zero_lambda_ok)

    def _wh(self, lam: float):
        raise NotImplementedError

    def _contribution(self, lam):
        """A candidate's whole per-row value, q_hat_pi + w_hat (r - q_hat): one term, so the pass
        needs its sum and sum of squares only (not three sums of the model and correction parts)."""
        wh = self._wh(lam)
        return Term(f"{self.estimator_name}{_fmt(lam)}", lambda o, q: q["qpi"] + wh(o, q) * (q["r"] - q["qf"]))

    def _bias(self, lam):
        wh = self._wh(lam)
        return Term(f"{self.estimator_name}b{_fmt(lam)}", lambda o, q: (q["w"] - wh(o, q)) * (q["r"] - q["qf"]),
                    bootstrap=False)

    def needs_q_hat(self):
        return True

    def terms(self):
        return [T_QPI, T_W] + [self._contribution(float(l)) for l in self.lambdas]

    def tuning_terms(self):
        return [self._bias(float(l)) for l in self.lambdas] if self.tuning_method == "mse" else []

    def _form_at(self, lam: float, ns: str) -> Form:
        return Form(add=(ns + self._contribution(lam).name,))

    def candidate_forms(self, ns: str) -> list[Form]:
        return [self._form_at(float(lam), ns) for lam in self.lambdas]

    def reference_form(self, ns: str) -> Form:
        """The least-shrunk candidate: the largest lambda (inf, the default grids' last: DR itself)."""
        return self._form_at(max(float(lam) for lam in self.lambdas), ns)

    def mse_scores(self, stats: Stats, ns: str) -> dict:
        out = {}
        for lam in map(float, self.lambdas):
            var = _form_var(self._form_at(lam, ns), stats)
            out[lam] = var / stats.n + _bias_bound(stats, ns, ns + self._bias(lam).name, self.delta) ** 2
        return out

    def slope_choice(self, stats: Stats, ns: str) -> float:
        from scipy.stats import t as student_t

        n = stats.n
        t_q = float(student_t(n - 1).ppf(1.0 - self.delta))
        lams = [float(l) for l in self.lambdas]
        theta = [self._form_at(l, ns).value(stats.mean) for l in lams]
        width = [t_q * math.sqrt(_form_var(self._form_at(l, ns), stats) / (n - 1)) for l in lams]
        order = np.argsort(width, kind="stable")[::-1]  # widest first (obp: argsort()[::-1])
        c = math.sqrt(6) - 1
        kept = []
        for i, idx in enumerate(order):
            if kept and not all(abs(theta[j] - theta[idx]) <= width[idx] + c * width[j] for j in kept):
                return lams[order[i - 1]]
            kept.append(idx)
        return lams[order[-1]]

    def hyperparam(self, stats, ns):
        if self.tuning_method == "slope":
            return self.slope_choice(stats, ns)
        scores = self.mse_scores(stats, ns)
        # ties -> the larger lambda (less bias; obp keeps the first in its list): same estimate either way
        return min(sorted(scores, reverse=True), key=lambda l: scores[l])

    def form(self, stats, ns):
        return self._form_at(self.hyperparam(stats, ns), ns)


@dataclass
class SwitchDoublyRobust(_TunedDR):
    """Switch-DR: V = E_n[q_hat(x_i, pi_e) + w_i (r_i - q_hat(x_i, a_i)) 1{w_i <= lambda}].

    Uses the model where weights are large. Wang, Agarwal & Dudik 2017 ("Optimal and adaptive
    off-policy evaluation in contextual bandits"); lambda by _TunedDR's rule (estimated MSE or SLOPE).
    """

    lambdas: tuple = (1.0, 2.0, 5.0, 10.0, 50.0, 100.0, math.inf)
    estimator_name: str = "switch_dr"

    def _wh(self, lam):
        if math.isinf(lam):
            return lambda o, q: q["w"]
        return lambda o, q: o.where(q["w"] <= lam, q["w"], o.lit(0.0))


@dataclass
class DoublyRobustWithShrinkage(_TunedDR):
    """DRos: V = E_n[q_hat(x_i, pi_e) + w_hat_i (r_i - q_hat(x_i, a_i))], w_hat = lambda w / (w^2 + lambda).

    Optimistic shrinkage, Su, Dimakopoulou, Krishnamurthy & Dudik 2020 ("Doubly robust off-policy
    evaluation with shrinkage"); lambda by _TunedDR's rule (estimated MSE or SLOPE).
    """

    lambdas: tuple = (1.0, 10.0, 100.0, 1000.0, 10000.0, math.inf)
    estimator_name: str = "dr_os"
    zero_lambda_ok = False  # lambda = 0: w_hat = 0 / 0 where w = 0

    def _wh(self, lam):
        if math.isinf(lam):
            return lambda o, q: q["w"]
        return lambda o, q: (q["w"] * lam) / (q["w"] * q["w"] + lam)


# OBP-style short aliases
IPS = InverseProbabilityWeighting
SNIPS = SelfNormalizedIPS
DM = DirectMethod
DR = DoublyRobust
SNDR = SelfNormalizedDoublyRobust
SwitchDR = SwitchDoublyRobust
DRos = DoublyRobustWithShrinkage

ESTIMATORS = {
    "ips": IPS,
    "clipped_ips": ClippedIPS,
    "snips": SNIPS,
    "dm": DM,
    "dr": DR,
    "sndr": SNDR,
    "switch_dr": SwitchDR,
    "dr_os": DRos,
}


def make_estimators(names: Sequence[str], clip_max_weight: float = 100.0, switch_lambdas=None,
                    dr_os_lambdas=None, tuning_method: str = "slope") -> list[BaseOffPolicyEstimator]:
    """Estimators by name; ``tuning_method`` ("mse" or "slope") picks Switch-DR's and DRos's lambda."""
    out = []
    for name in names:
        if name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
        if name == "clipped_ips":
            _check_lambda("ope.clip_max_weight", clip_max_weight, zero_ok=True)
            out.append(ClippedIPS(lambda_=float(clip_max_weight)))
        elif name in ("switch_dr", "dr_os"):
            setting = "ope.switch_dr_lambdas" if name == "switch_dr" else "ope.dr_os_lambdas"
            grid = switch_lambdas if name == "switch_dr" else dr_os_lambdas
            for lam in grid or ():
                _check_lambda(setting, lam, zero_ok=ESTIMATORS[name].zero_lambda_ok)
            kw = {"lambdas": tuple(float(x) for x in grid)} if grid else {}
            out.append(ESTIMATORS[name](tuning_method=tuning_method, **kw))
        else:
            out.append(ESTIMATORS[name]())
    return out


# -------------------------------------------------------------------- one pass, every estimator, every policy


def _form_cov(f1: Form, f2: Form, stats: Stats) -> float:
    g1, g2 = f1.gradient(stats.mean), f2.gradient(stats.mean)
    return sum(a * b * stats.cov(k1, k2) for k1, a in g1.items() for k2, b in g2.items())


def _form_var(f: Form, stats: Stats) -> float:
    return max(_form_cov(f, f, stats), 0.0)


def _boot_values(f: Form, stats: Stats) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate replicate is NaN (see _kept)
        v = np.zeros_like(stats.boot_n, dtype=float)
        for a in f.add:
            v = v + stats.boot_mean(a)
        if f.num:
            v = v + stats.boot_mean(f.num) / (stats.boot_mean(f.den) if f.den else 1.0)
    return v


# a bootstrap interval needs at least this share of the B replicates to be finite
BOOT_MIN_FINITE_SHARE = 0.5


def _kept(v: np.ndarray) -> tuple[Optional[np.ndarray], int]:
    """(the finite replicates, how many were dropped); None instead of the replicates when fewer
    than ``BOOT_MIN_FINITE_SHARE`` of them are finite. A replicate whose resample has no row (all
    Poisson weights 0) or, in a self-normalised form, no weight (sum m_i w_i = 0) is 0/0: it has
    no value, and one such replicate would make the whole std / quantile NaN. Dropping it
    conditions the bootstrap on resamples where the estimator is defined; the count is reported
    (``EstimateResult.boot_dropped``, the ``ope_results`` interval method)."""
    ok = np.isfinite(v)
    dropped = int(v.size - ok.sum())
    return (v[ok] if ok.sum() >= BOOT_MIN_FINITE_SHARE * v.size else None), dropped


def build_plan(estimators, policies: dict, baseline: Optional[str], n_boot: int, seed: int,
               boot_buckets: int = 0) -> Plan:
    """Terms per (policy, estimator); cross-products only where a covariance is needed."""
    if boot_buckets < 0 or boot_buckets == 1:
        raise ValueError(f"boot_buckets is {boot_buckets}; expected 0 (a weight per row) or a bucket count >= 2 "
                         "(with one bucket every replicate is the point estimate)")
    if n_boot and 1 < boot_buckets < MIN_BOOTSTRAP_BUCKETS:
        log.warning("boot_buckets is %d: each bucket is one resampling unit, so the bootstrap interval rests on "
                    "%d units (use hundreds or more)", boot_buckets, boot_buckets)
    plan = Plan(policies=dict(policies), n_boot=int(n_boot), seed=int(seed), boot_buckets=int(boot_buckets))
    def form_names(est, pol):
        return sorted({k for f in est.candidate_forms(pol + "|") for k in f.names()})

    for pol in policies:
        for est in estimators:
            for t in est.terms() + est.tuning_terms():
                plan.add_term(pol, t)
            for f in est.candidate_forms(pol + "|"):
                plan.add_pairs(f.names())  # a form's variance: cross-products of its own terms
        plan.add_max(pol, T_W)
        plan.add_pairs([plan.add_term(pol, T_W)])  # sum of w^2 for the ESS
    if baseline is not None:  # a paired difference's covariance: every term of both policies' forms
        for est in estimators:
            base = form_names(est, baseline)
            for pol in policies:
                if pol != baseline:
                    for a in form_names(est, pol):
                        for b in base:
                            plan.pairs.add(tuple(sorted((a, b))))
    return plan


def evaluate(data, estimators: Sequence[BaseOffPolicyEstimator], policies: Optional[dict] = None, *,
             baseline: Optional[str] = None, alpha: float = 0.05, n_boot: int = 0, seed: int = 0,
             boot_buckets: int = 0, engine: str = "auto") -> list[EstimateResult]:
    """Every estimator for every policy from ONE pass over ``data``.

    ``data``: a dict of numpy arrays (local form) or a Spark DataFrame (distributed form) with
    ``row_id, reward, pscore, q_hat`` and, per policy, its ``pi_e`` and ``q_hat_pi`` columns.
    ``policies``: name -> (pi_e column, q_hat_pi column); default ``{"policy": ("pi_e", "q_hat_pi")}``.
    ``baseline``: a policy name; each other policy gets a paired difference with its interval.
    ``boot_buckets``: 0 = a Poisson weight per row; G > 0 = rows hashed into G buckets sharing a
    weight (the event-scale form; see :mod:`causalrec.estimators.base`).
    ``engine`` (DataFrames only): "auto", "sql" or "arrow"; see :func:`~causalrec.estimators.base.spark_stats`.
    """
    return evaluate_with_stats(data, estimators, policies, baseline=baseline, alpha=alpha, n_boot=n_boot,
                               seed=seed, boot_buckets=boot_buckets, engine=engine)[0]


def evaluate_with_stats(data, estimators, policies: Optional[dict] = None, *, baseline=None, alpha=0.05,
                        n_boot=0, seed=0, boot_buckets=0, engine="auto") -> tuple[list[EstimateResult], Stats]:
    """:func:`evaluate`, also returning the pass's :class:`Stats` (for diagnostics and tests)."""
    policies = policies or {"policy": (PI_E, Q_HAT_PI)}
    if baseline is not None and baseline not in policies:
        raise ValueError(f"baseline {baseline!r} is not among the policies {sorted(policies)}")
    plan = build_plan(estimators, policies, baseline, n_boot, seed, boot_buckets)
    stats = local_stats(data, plan) if isinstance(data, dict) else spark_stats(data, plan, engine)
    return summarize(stats, estimators, policies, baseline=baseline, alpha=alpha), stats


BIAS_AWARE = "_bias_aware"  # interval_method suffix: the hull with the unbiased reference's interval (_TunedDR)
NO_INTERVAL = "none: the reward model's error is not estimable from the rows"


def _hull(estimates: list, z: float) -> tuple[float, float]:
    """The smallest interval containing each (estimate, std_err)'s ``estimate -+ z std_err``."""
    return min(t - z * se for t, se in estimates), max(t + z * se for t, se in estimates)


def _withhold_interval(r: EstimateResult) -> None:
    """No interval where the rows' spread does not bound the error (DirectMethod): NaN, said in interval_method."""
    for k in ("std_err", "ci_low", "ci_high", "boot_std_err", "boot_ci_low", "boot_ci_high"):
        setattr(r, k, math.nan)
    if r.diff_to_baseline is not None:
        r.diff_std_err = r.diff_ci_low = r.diff_ci_high = math.nan
        r.diff_boot_ci_low = r.diff_boot_ci_high = None if r.diff_boot_ci_low is None else math.nan
    r.interval_method = NO_INTERVAL


# E_n[w] further than this from 1 (and than 3 standard errors) is warned about
MEAN_WEIGHT_TOLERANCE = 0.05


def _check_mean_weight(pol: str, stats: Stats) -> None:
    """Warn when the mean importance weight E_n[pi_e / pi_b] is off 1, its expectation wherever pi_b covers
    pi_e. Why: a policy with mass on actions the log (almost) never shows has no rows there, so IPS and DR
    lose that mass and their intervals, built from the rows seen, look tight and healthy (the ESS counts
    only the rows present): in simulated logs where a 5e-4 propensity action was never drawn, every interval
    missed the truth while E_n[w] read 0.7. The same check catches miscalibrated pi_b."""
    n = stats.n
    mean = stats.sums[pol + "|w"] / n
    var = max(stats.cross[(pol + "|w", pol + "|w")] / n - mean * mean, 0.0)
    se = math.sqrt(var / (n - 1))
    if abs(mean - 1.0) > max(3 * se, MEAN_WEIGHT_TOLERANCE):
        why = ("the policy puts mass on actions the log (almost) never shows, or pi_b overstates the ones it "
               "favours: IPS, DR and their intervals miss that mass" if mean < 1 else
               "pi_b understates how often the log shows the actions the policy favours (a misspecified "
               "propensity model): IPS and DR overstate their weight")
        log.warning("policy %r: the mean importance weight E_n[pi_e/pi_b] is %.3f (std. error %.3f), where 1 is "
                    "expected: %s; SNIPS/SNDR rescale by it", pol, mean, se, why)


def summarize(stats: Stats, estimators, policies: dict, *, baseline=None, alpha=0.05) -> list[EstimateResult]:
    if stats.n < 2:
        raise ValueError(f"off-policy evaluation needs at least 2 logged rows, got {int(stats.n)}")
    z = z_value(alpha)
    out = []
    for pol in policies:
        if stats.sums[pol + "|w"] == 0:
            log.warning("policy %r puts no probability on any logged action (no overlap with the "
                        "logging policy): self-normalised estimates are undefined (NaN)", pol)
        else:
            _check_mean_weight(pol, stats)
    q = (alpha / 2, 1 - alpha / 2)
    for est in estimators:
        forms = {pol: est.form(stats, pol + "|") for pol in policies}
        refs = {pol: est.reference_form(pol + "|") for pol in policies}
        for pol in policies:
            ns = pol + "|"
            f = forms[pol]
            # the candidates whose intervals the reported one spans: the chosen form, and the unbiased
            # reference when the data chose a shrunk one (_TunedDR)
            fs = [f] + ([refs[pol]] if refs[pol] is not None and refs[pol] != f else [])
            spread = [(g.value(stats.mean), math.sqrt(_form_var(g, stats) / (stats.n - 1))) for g in fs]
            (theta, se), (lo, hi) = spread[0], _hull(spread, z)
            sw, sw2 = stats.sums[ns + "w"], stats.cross[(ns + "w", ns + "w")]
            r = EstimateResult(
                policy=pol, estimator=est.estimator_name, estimate=theta, std_err=se, ci_low=lo, ci_high=hi,
                interval_method="analytic" + (BIAS_AWARE if len(fs) > 1 else ""),
                n=int(stats.n), ess=(sw * sw / sw2) if sw2 > 0 else 0.0, max_weight=stats.maxima[ns + "w"],
                hyperparam=est.hyperparam(stats, ns),
            )
            if stats.boot_n is not None:
                bvs = [_kept(_boot_values(g, stats)) for g in fs]
                r.boot_dropped = max(dropped for _, dropped in bvs)
                if all(bv is not None for bv, _ in bvs):
                    r.boot_std_err = float(np.std(bvs[0][0], ddof=1))
                    r.boot_ci_low = min(float(np.quantile(bv, q[0])) for bv, _ in bvs)
                    r.boot_ci_high = max(float(np.quantile(bv, q[1])) for bv, _ in bvs)
            if baseline is not None:
                pairs = [(f, forms[baseline])] + ([(refs[pol], refs[baseline])] if len(fs) > 1 else [])
                diffs = []
                for g, gb in pairs:
                    var = _form_var(g, stats) + _form_var(gb, stats) - 2 * _form_cov(g, gb, stats)
                    diffs.append((g.value(stats.mean) - gb.value(stats.mean), math.sqrt(max(var, 0.0) / (stats.n - 1))))
                (r.diff_to_baseline, r.diff_std_err) = diffs[0]
                r.diff_ci_low, r.diff_ci_high = _hull(diffs, z)
                if stats.boot_n is not None:
                    bds = [_kept(_boot_values(g, stats) - _boot_values(gb, stats)) for g, gb in pairs]
                    r.diff_boot_dropped = max(dropped for _, dropped in bds)
                    r.diff_boot_ci_low, r.diff_boot_ci_high = (math.nan, math.nan) \
                        if any(bd is None for bd, _ in bds) else \
                        (min(float(np.quantile(bd, q[0])) for bd, _ in bds), max(float(np.quantile(bd, q[1])) for bd, _ in bds))
            if not est.sampling_interval:
                _withhold_interval(r)
            if r.boot_dropped:
                log.warning("%s / %s: %d of %d bootstrap replicates have no value (a resample without rows "
                            "or weight) and were dropped%s", pol, r.estimator, r.boot_dropped, stats.boot_n.size,
                            "" if math.isfinite(r.boot_std_err) else "; too few remain: no bootstrap interval")
            out.append(r)
    return out
