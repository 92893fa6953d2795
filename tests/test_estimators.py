"""Estimator library: hand-computed formulas, local == Spark to 1e-9, bootstrap sanity, coverage."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from causalrec.estimators import (
    DM,
    DR,
    ESTIMATORS,
    IPS,
    SNDR,
    SNIPS,
    ClippedIPS,
    DRos,
    SwitchDR,
    evaluate,
    make_estimators,
    poisson_weights_local,
)
from causalrec.estimators.base import POISSON_T, spark_xxhash64


def synthetic_log(n: int, seed: int, k: int = 5, model_noise: float = 0.2):
    """A contextual-bandit log with known true value of the evaluation policy."""
    rng = np.random.default_rng(seed)
    pb = rng.dirichlet(np.ones(k), n)
    pe = rng.dirichlet(np.ones(k), n)
    q = rng.uniform(0.05, 0.6, (n, k))
    a = (pb.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    idx = np.arange(n)
    r = rng.binomial(1, q[idx, a]).astype(float)
    qh = np.clip(q + rng.normal(0, model_noise, q.shape) * q, 0, 1)
    data = {
        "row_id": idx.astype(np.int64) * 7919 + seed,
        "reward": r,
        "pscore": pb[idx, a],
        "pi_e": pe[idx, a],
        "q_hat": qh[idx, a],
        "q_hat_pi": (pe * qh).sum(1),
        "pi_e_b": pb[idx, a] * 0 + 1.0 / k,  # a second policy: uniform
        "q_hat_pi_b": qh.mean(1),
    }
    # the population value the CLT interval targets: pi_e and q are independent and pi_e sums to 1,
    # so V = E[sum_a pi_e(a|x) q(x, a)] = E[q] = (0.05 + 0.6) / 2
    truth = 0.325
    return data, truth


ALL = make_estimators(list(ESTIMATORS), clip_max_weight=3.0) + [
    SwitchDR(tuning_method="mse", estimator_name="switch_dr_mse"), DRos(tuning_method="mse", estimator_name="dr_os_mse")]
FIELDS = ["estimate", "std_err", "ci_low", "ci_high", "ess", "max_weight", "boot_std_err", "boot_ci_low",
          "boot_ci_high", "diff_to_baseline", "diff_std_err", "diff_ci_low", "diff_ci_high", "diff_boot_ci_low",
          "diff_boot_ci_high"]


# ------------------------------------------------------------------ formulas on a tiny hand-computed log

TINY = {
    "row_id": np.array([0, 1, 2, 3]),
    "reward": np.array([1.0, 0.0, 1.0, 0.0]),
    "pscore": np.array([0.5, 0.25, 0.2, 0.5]),
    "pi_e": np.array([1.0, 0.5, 0.0, 0.25]),
    "q_hat": np.array([0.5, 0.5, 0.5, 0.5]),
    "q_hat_pi": np.array([0.4, 0.6, 0.2, 0.3]),
}
# w = [2, 2, 0, 0.5]; w*r = [2, 0, 0, 0]; w*(r - q) = [1, -1, 0, -0.25]


def test_ips_snips_dm_dr_match_hand_computation():
    k = {c: TINY[c] for c in ("reward", "pscore", "pi_e", "q_hat", "q_hat_pi")}
    assert IPS().estimate_policy_value(**k) == pytest.approx(2 / 4)
    assert SNIPS().estimate_policy_value(**k) == pytest.approx(2 / 4.5)
    assert DM().estimate_policy_value(**k) == pytest.approx(1.5 / 4)
    assert DR().estimate_policy_value(**k) == pytest.approx((1.5 - 0.25) / 4)
    assert SNDR().estimate_policy_value(**k) == pytest.approx(1.5 / 4 + (-0.25 / 4) / (4.5 / 4))
    assert ClippedIPS(lambda_=1.5).estimate_policy_value(**k) == pytest.approx(1.5 / 4)
    # switch at 1: rows with w=2 fall back to the model -> only row 3's correction is kept
    assert SwitchDR(lambdas=(1.0,)).estimate_policy_value(**k) == pytest.approx((1.5 - 0.25) / 4)
    # DRos: w_hat = l w / (w^2 + l) with l = 1 -> [0.4, 0.4, 0, 0.4]
    assert DRos(lambdas=(1.0,)).estimate_policy_value(**k) == pytest.approx((1.5 + 0.4 * (0.5 - 0.5 - 0.5)) / 4)
    # the switch keeps a weight equal to lambda (w <= lambda, as obp's iw <= lambda_): with rewards
    # [1, 1, 1, 0] the rows with w = 2 keep their corrections [1, 1] at lambda = 2 (w < lambda drops them: 0.3125)
    k2 = {**k, "reward": np.array([1.0, 1.0, 1.0, 0.0])}
    assert SwitchDR(lambdas=(2.0,)).estimate_policy_value(**k2) == pytest.approx((1.5 + 1 + 1 + 0 - 0.25) / 4)
    assert SwitchDR(lambdas=(2.0,)).estimate_policy_value(**k2) == pytest.approx(0.8125)


def test_ips_standard_error_is_the_clt_one_and_snips_uses_the_delta_method():
    k = {c: TINY[c] for c in ("reward", "pscore", "pi_e")}
    res = IPS().estimate_interval(**k)
    wr = np.array([2.0, 0, 0, 0])
    assert res.std_err == pytest.approx(wr.std(ddof=1) / 2)
    assert res.ci_high - res.estimate == pytest.approx(1.959964 * res.std_err, rel=1e-6)
    assert res.ess == pytest.approx(4.5**2 / 8.25)
    assert res.max_weight == 2.0
    sn = SNIPS().estimate_interval(**k)
    w = np.array([2, 2, 0, 0.5])
    theta = wr.sum() / w.sum()
    infl = (wr - theta * w) / w.mean()  # linearisation of the ratio
    assert sn.std_err == pytest.approx(np.sqrt(np.mean(infl**2) / 3))


def test_tuned_switch_dr_picks_the_lambda_with_smallest_estimated_mse():
    data, _ = synthetic_log(3000, 11)
    k = {c: data[c] for c in ("reward", "pscore", "pi_e", "q_hat", "q_hat_pi")}
    est = SwitchDR(lambdas=(0.5, 2.0, math.inf), tuning_method="mse")
    from causalrec.estimators import evaluate_with_stats

    (res,), stats = evaluate_with_stats({**k, "row_id": data["row_id"]}, [est])
    scores = est.mse_scores(stats, "policy|")
    assert res.hyperparam == min(scores, key=scores.get)
    fixed = SwitchDR(lambdas=(res.hyperparam,)).estimate_policy_value(**k)
    assert res.estimate == pytest.approx(fixed, abs=1e-12)


def test_bias_upper_bound_uses_log_2_over_delta_as_obp():
    """The "mse" rule's high-probability bias bound (Su et al. 2020; obp's
    estimate_high_probability_upper_bound_bias) has log(2/delta) in both Bernstein terms; a
    log(1/delta) there shrinks the bound and changes every estimated MSE and so the picked lambda.
    On TINY at lambda = 1: |mean bias term| = 0, E_n[w^2] = 8.25/4, max w = 2, n = 4, delta = 0.1."""
    from causalrec.estimators import evaluate_with_stats
    from causalrec.estimators.ope import _bias_bound

    k = {c: TINY[c] for c in ("reward", "pscore", "pi_e", "q_hat", "q_hat_pi")}
    est = SwitchDR(lambdas=(1.0,), tuning_method="mse")
    _, stats = evaluate_with_stats({**k, "row_id": TINY["row_id"]}, [est])
    assert est.delta == 0.1
    by_hand = math.sqrt(2 * (8.25 / 4) * math.log(2 / 0.1) / 4) + 2 * 2.0 * math.log(2 / 0.1) / (3 * 4)
    bound = _bias_bound(stats, "policy|", "policy|" + est._bias(1.0).name, 0.1)
    assert bound == pytest.approx(by_hand, rel=1e-9)
    assert bound == pytest.approx(2.7562318, rel=1e-7)  # = obp's bound on these rows, delta = 0.1
    # estimated MSE = population variance of the per-row values / n + bound^2
    v = TINY["q_hat_pi"] + np.array([0, 0, 0, 0.5]) * (TINY["reward"] - TINY["q_hat"])
    scores = est.mse_scores(stats, "policy|")
    assert scores == pytest.approx({1.0: v.var() / 4 + by_hand**2}, rel=1e-9)
    assert scores[1.0] == pytest.approx(7.6075559, rel=1e-7)


def test_slope_keeps_the_narrowest_interval_consistent_with_the_less_biased_ones():
    """SLOPE walks from the widest (least-biased) candidate down and stops before the first
    estimate that leaves the kept intervals. A reward model biased by +0.3 makes small switching
    thresholds (mostly model) inconsistent with large ones, so SLOPE must not pick them and lands
    near the truth; with the exact reward model every threshold is consistent and it picks the
    narrowest (the smallest threshold). A small bias (0.0075) sits between the two: the rule's
    constant sqrt(6) - 1 (obp's C) rejects the smallest threshold there and keeps 2.0 (obp's
    SwitchDoublyRobustTuning(tuning_method="slope") picks 2.0 with value 0.3278412 on this log); a
    looser constant such as sqrt(6) would keep 0.5. The widths use the library's (and obp's)
    one-sided quantile t_{n-1}(1 - delta), delta = 0.1."""
    from scipy.stats import t as student_t

    lams = (0.5, 2.0, 5.0, 20.0, math.inf)
    for bias in (0.3, 0.0, 0.0075):
        data, truth = synthetic_log(20_000, 17, model_noise=0.0)
        data["q_hat"] = data["q_hat"] + bias
        data["q_hat_pi"] = data["q_hat_pi"] + bias
        est = SwitchDR(lambdas=lams, tuning_method="slope")
        assert est.delta == 0.1
        (res,) = evaluate(data, [est])
        # the rule by hand on per-row values: widths t * sqrt(var/(n-1)), widest first
        w, n = data["pi_e"] / data["pscore"], 20_000
        vals = [data["q_hat_pi"] + np.where(w <= l, w, 0.0) * (data["reward"] - data["q_hat"]) for l in lams]
        theta = [v.mean() for v in vals]
        width = [student_t(n - 1).ppf(1 - est.delta) * np.sqrt(v.var() / (n - 1)) for v in vals]
        order = np.argsort(width)[::-1]
        pick = lams[order[-1]]
        for i in range(1, len(order)):
            if not all(abs(theta[j] - theta[order[i]]) <= width[order[i]] + (np.sqrt(6) - 1) * width[j]
                       for j in order[:i]):
                pick = lams[order[i - 1]]
                break
        assert res.hyperparam == pick
        assert res.estimate == pytest.approx(theta[lams.index(pick)], abs=1e-12)
        if bias == 0.3:
            assert theta[0] - truth > 0.2  # the smallest threshold is badly biased ...
            assert res.hyperparam > 0.5 and abs(res.estimate - truth) < 3 * res.std_err + 0.01  # ... and avoided
        elif bias == 0.0075:
            assert res.hyperparam == 2.0 and res.estimate == pytest.approx(0.3278412, abs=1e-7)
        else:
            assert res.hyperparam == 0.5


def test_tuning_method_is_validated():
    with pytest.raises(ValueError, match="tuning_method"):
        SwitchDR(tuning_method="cv")


@pytest.mark.parametrize("make, match", [
    (lambda: DRos(lambdas=(1.0, 0.0)), r"dr_os: lambdas: 0.0 .*expected a number > 0"),
    (lambda: DRos(lambdas=(-5.0,)), r"dr_os: lambdas: -5.0 "),
    (lambda: SwitchDR(lambdas=(float("nan"),)), r"switch_dr: lambdas: nan .*expected a number >= 0"),
    (lambda: SwitchDR(lambdas=(-1.0,)), r"switch_dr: lambdas: -1.0 "),
    (lambda: ClippedIPS(lambda_=float("nan")), r"clipped_ips: lambda_"),
    (lambda: make_estimators(["dr_os"], dr_os_lambdas=[10.0, 0.0]), r"^ope.dr_os_lambdas: 0.0 "),
    (lambda: make_estimators(["switch_dr"], switch_lambdas=[-1.0]), r"^ope.switch_dr_lambdas: -1.0 "),
    (lambda: make_estimators(["clipped_ips"], clip_max_weight=-3.0), r"^ope.clip_max_weight: -3.0 "),
])
def test_lambda_settings_are_validated_at_construction(make, match):
    """obp's rules (lambda >= 0, not NaN, inf allowed); DRos also refuses 0, whose w / (w^2 + 0) is
    0 / 0 at w = 0 (NaN locally, DIVIDE_BY_ZERO in SQL)."""
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_edge_lambdas_give_finite_estimates():
    """Switch-DR at 0 is the direct method; a 0 weight cap gives 0; inf is the plain estimator."""
    k = {c: TINY[c] for c in ("reward", "pscore", "pi_e", "q_hat", "q_hat_pi")}
    assert SwitchDR(lambdas=(0.0,)).estimate_policy_value(**k) == pytest.approx(DM().estimate_policy_value(**k))
    assert ClippedIPS(lambda_=0.0).estimate_policy_value(**k) == 0.0
    assert DRos(lambdas=(math.inf,)).estimate_policy_value(**k) == pytest.approx(DR().estimate_policy_value(**k))


def test_bad_input_names_the_column_and_row():
    with pytest.raises(ValueError, match=r"'pscore' row 1"):
        IPS().estimate_policy_value(reward=np.ones(3), pscore=np.array([0.5, 0.0, 0.5]), pi_e=np.ones(3))
    with pytest.raises(ValueError, match="q_hat"):
        DR().estimate_policy_value(reward=np.ones(3), pscore=np.full(3, 0.5), pi_e=np.ones(3))


# ------------------------------------------------------------------ local == Spark


@pytest.mark.parametrize("n_boot, buckets, engine", [(24, 0, "arrow"), (0, 0, "sql"), (24, 32, "sql")])
def test_local_and_spark_forms_agree_to_1e9_for_every_estimator_interval_and_difference(spark, n_boot, buckets,
                                                                                       engine):
    data, _ = synthetic_log(1500, 3)
    policies = {"target": ("pi_e", "q_hat_pi"), "uniform": ("pi_e_b", "q_hat_pi_b")}
    kw = dict(policies=policies, baseline="uniform", n_boot=n_boot, seed=5, alpha=0.1, boot_buckets=buckets)
    local = evaluate(data, ALL, **kw)
    df = spark.createDataFrame(pd.DataFrame(data)).repartition(3)
    dist = evaluate(df, ALL, engine=engine, **kw)
    assert [(r.policy, r.estimator) for r in local] == [(r.policy, r.estimator) for r in dist]
    assert len(local) == 2 * len(ALL)
    for a, b in zip(local, dist):
        assert a.n == b.n == 1500
        assert a.hyperparam == b.hyperparam
        for f in FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            if a.estimator == "dm" and f not in ("estimate", "diff_to_baseline", "ess", "max_weight") and x is not None:
                assert math.isnan(x) and math.isnan(y), (a.estimator, f, x, y)  # DM has no interval, in both forms
            elif n_boot == 0 and f.startswith("boot_"):  # no replicates: NaN, in both forms
                assert math.isnan(x) and math.isnan(y), (a.estimator, f, x, y)
            elif n_boot == 0 and f.startswith("diff_boot_"):
                assert x is None and y is None, (a.estimator, f, x, y)
            else:  # a baseline is given: every other field is a number in both forms
                assert x is not None and math.isfinite(x), (a.estimator, f, x)
                assert x == pytest.approx(y, abs=1e-9, rel=1e-9), (a.policy, a.estimator, f, x, y)
    # the baseline's own difference is exactly zero, others are paired differences
    for r in local:
        if r.estimator == "dm":
            continue
        if r.policy == "uniform":
            assert r.diff_to_baseline == 0.0 and r.diff_std_err == pytest.approx(0.0, abs=1e-12)
        else:
            assert r.diff_std_err > 0


@pytest.mark.parametrize("engine", ["arrow", "sql"])
def test_bucketed_bootstrap_local_and_spark_agree(spark, engine):
    data, _ = synthetic_log(1200, 4)
    kw = dict(n_boot=50, seed=9, boot_buckets=64)
    local = evaluate(data, ALL, **kw)
    dist = evaluate(spark.createDataFrame(pd.DataFrame(data)).repartition(3), ALL, engine=engine, **kw)
    for a, b in zip(local, dist):
        for f in ("estimate", "std_err", "boot_std_err", "boot_ci_low", "boot_ci_high"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), abs=1e-9, rel=1e-9, nan_ok=True), (a.estimator, f)
    # the buckets are real resampling units: another bucket count gives other replicates
    other = evaluate(data, ALL, n_boot=50, seed=9, boot_buckets=65)
    assert all(a.boot_std_err != b.boot_std_err for a, b in zip(local, other) if a.boot_std_err > 0)


@pytest.mark.parametrize("n_boot, buckets, engine", [(0, 0, "sql"), (8, 16, "sql"), (0, 0, "arrow"),
                                                     (8, 16, "arrow"), (8, 0, "auto")])
def test_spark_form_names_the_column_with_a_null(spark, n_boot, buckets, engine):
    data, _ = synthetic_log(50, 6)
    pdf = pd.DataFrame(data)
    pdf.loc[7, "pscore"] = None
    with pytest.raises(Exception, match=r"column 'pscore' has .*null/NaN"):
        evaluate(spark.createDataFrame(pdf), [IPS()], n_boot=n_boot, boot_buckets=buckets, engine=engine)


@pytest.mark.parametrize("column, value, expected", [("pscore", 0.0, r"\(0, 1\]"), ("pscore", 1.5, r"\(0, 1\]"),
                                                     ("pscore", float("nan"), "a finite number"),
                                                     ("q_hat", float("inf"), "a finite number")])
def test_local_form_names_the_row_and_what_was_expected(column, value, expected):
    data, _ = synthetic_log(40, 8)
    data = {k: np.array(v, dtype=float) if k != "row_id" else v for k, v in data.items()}
    data[column][11] = value
    with pytest.raises(ValueError, match=rf"column '{column}' row 11 is .*; expected {expected}$"):
        evaluate(data, [DR()])


@pytest.mark.parametrize("engine", ["sql", "arrow"])
@pytest.mark.parametrize("column, value", [("pscore", 0.0), ("pscore", 1.5), ("reward", float("nan")),
                                           ("q_hat_pi", None), ("reward", float("inf")), ("q_hat", float("-inf"))])
def test_both_engines_name_the_row_and_what_was_expected(spark, column, value, engine):
    """Both engines apply the local form's rule (a propensity outside (0, 1] is an error, not
    a huge weight; +-inf is refused like NaN - the sql engine used to return a number for it) and
    name a row; the arrow engine's error arrives wrapped by Spark."""
    data, _ = synthetic_log(40, 8)
    pdf = pd.DataFrame(data)
    pdf[column] = pdf[column].astype(object)
    pdf.loc[11, column] = value
    rid = int(pdf.loc[11, "row_id"])
    expected = r"a number in \(0, 1\]" if column == "pscore" else r"a number(\n|$)"
    with pytest.raises(ValueError if engine == "sql" else Exception,
                       match=rf"column '{column}' .*row_id {rid}\b.*expected {expected}"):
        evaluate(spark.createDataFrame(pdf, schema=", ".join(
            f"{c} {'long' if c == 'row_id' else 'double'}" for c in pdf.columns)), [DR()], engine=engine)


@pytest.mark.parametrize("n_boot, buckets, engine", [(0, 0, "sql"), (0, 0, "arrow"), (8, 4, "sql"), (8, 0, "arrow")])
def test_both_engines_refuse_a_null_row_id(spark, n_boot, buckets, engine):
    """The row id keys the bootstrap weights: a null one is an error in every engine (the arrow
    engine used to run on it)."""
    data, _ = synthetic_log(40, 8)
    pdf = pd.DataFrame(data).astype({"row_id": "Int64"})
    pdf.loc[5, "row_id"] = None
    schema = ", ".join(f"{c} {'long' if c == 'row_id' else 'double'}" for c in pdf.columns)
    df = spark.createDataFrame(pdf, schema=schema)
    with pytest.raises(ValueError if engine == "sql" else Exception,
                       match=r"column 'row_id' .*\(row_id null\); expected a non-null integer"):
        evaluate(df, [IPS()], n_boot=n_boot, boot_buckets=buckets, engine=engine)


def test_sql_engine_keeps_an_infinite_sum_infinite_like_the_local_form(spark):
    """Finite inputs whose weight overflows (pi_e / pscore = inf): the sum is inf in both forms; the
    sql engine used to turn it into 1.8e308 (np.nan_to_num) and report a finite estimate."""
    data, _ = synthetic_log(40, 8)
    data["pi_e"][3], data["pscore"][3], data["reward"][3] = 1e308, 0.1, 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        (local,) = evaluate(data, [IPS()])
    (sql,) = evaluate(spark.createDataFrame(pd.DataFrame(data)), [IPS()], engine="sql")
    assert local.estimate == sql.estimate == math.inf


def test_sql_engine_refuses_the_per_row_bootstrap_and_auto_falls_back(spark):
    data, _ = synthetic_log(200, 2)
    df = spark.createDataFrame(pd.DataFrame(data))
    with pytest.raises(ValueError, match="per-row Poisson bootstrap"):
        evaluate(df, [IPS()], n_boot=4, engine="sql")
    with pytest.raises(ValueError, match="engine"):
        evaluate(df, [IPS()], engine="jvm")
    (auto,) = evaluate(df, [IPS()], n_boot=4, seed=1)
    (local,) = evaluate(data, [IPS()], n_boot=4, seed=1)
    assert auto.boot_std_err == pytest.approx(local.boot_std_err, rel=1e-9)


def test_auto_engine_takes_sql_for_narrow_plans_and_the_kernel_for_wide_or_per_row_ones():
    """The measured crossover (sql_pass.SQL_MAX_WORK): one policy -> SQL with or without the
    bucketed bootstrap; several policies with a baseline -> the Arrow kernel; the per-row
    bootstrap -> the kernel whatever the width."""
    from causalrec.estimators import sql_pass
    from causalrec.estimators.ope import build_plan

    one = {"policy": ("pi_e", "q_hat_pi")}
    many = {f"p{k}": (f"pi_e{k}", f"q{k}") for k in range(3)}
    assert sql_pass.preferred(build_plan(ALL[:8], one, None, 0, 0, 0))
    assert sql_pass.preferred(build_plan(ALL[:8], one, None, 200, 0, 4096))
    assert not sql_pass.preferred(build_plan(ALL[:8], many, "p0", 0, 0, 0))
    assert not sql_pass.preferred(build_plan(ALL[:8], one, None, 200, 0, 0))


def test_sql_engine_is_one_compiled_scan_and_restores_the_session_conf(spark, tmp_path):
    """One pass means the input is scanned once; the wide aggregation must stay compiled
    (Spark turns whole-stage codegen off above spark.sql.codegen.maxFields, which a two-policy
    plan with a baseline exceeds), and the pass must not leave its raised limit in the session."""
    from causalrec.estimators import sql_pass
    from causalrec.estimators.ope import build_plan

    data, _ = synthetic_log(300, 5)
    spark.createDataFrame(pd.DataFrame(data)).write.parquet(str(tmp_path / "log"))
    df = spark.read.parquet(str(tmp_path / "log"))
    policies = {"a": ("pi_e", "q_hat_pi"), "b": ("pi_e_b", "q_hat_pi_b")}
    for buckets in (0, 64):
        plan = build_plan(ALL, policies, "b", 10 if buckets else 0, 0, buckets)
        query, fields = sql_pass.build_query(df, plan)
        assert len(query.columns) > 100 and fields >= len(query.columns)
        with sql_pass._session_conf(spark, sql_pass.CODEGEN_FIELDS_KEY, str(fields)):
            query.collect()  # adaptive execution settles the plan (and its codegen stages) when run
            physical = query._jdf.queryExecution().executedPlan().toString().split("== Initial Plan ==")[0]
        assert physical.count("FileScan parquet") == 1, physical
        # "*(k) HashAggregate": the aggregation runs inside a whole-stage-codegen stage
        assert re.search(r"\*\(\d+\) HashAggregate", physical), physical
    before = spark.conf.get(sql_pass.CODEGEN_FIELDS_KEY)
    evaluate(df, ALL, policies=policies, baseline="b", engine="sql")
    assert spark.conf.get(sql_pass.CODEGEN_FIELDS_KEY) == before


def test_spark_poisson_weight_columns_equal_local_ones(spark):
    from causalrec.estimators.base import poisson_weight_columns

    ids = np.array([0, 1, 2, -7, 2**40 + 3, 123456789], dtype=np.int64)
    df = spark.createDataFrame([(int(i),) for i in ids], "row_id long")
    got = np.array(df.select(*poisson_weight_columns("row_id", 9, 17)).collect(), dtype=float)
    np.testing.assert_array_equal(got, poisson_weights_local(ids, 9, 17))
    # and the hash is Spark's xxhash64 bit for bit
    from pyspark.sql import functions as F

    h = [r[0] for r in df.select(F.xxhash64("row_id", F.lit(3).cast("long"))).collect()]
    assert h == list(spark_xxhash64(ids, np.int64(3)).view(np.int64))


# ------------------------------------------------------------------ bootstrap sanity


def test_poisson_weights_have_mean_and_variance_one_and_differ_by_seed():
    assert POISSON_T == sorted(POISSON_T) and POISSON_T[-1] <= 65536
    w = poisson_weights_local(np.arange(100_000), 8, seed=1)
    assert w.shape == (100_000, 8)
    assert abs(w.mean() - 1) < 0.01 and abs(w.var() - 1) < 0.02
    assert abs(np.mean(w == 0) - math.exp(-1)) < 0.01
    w2 = poisson_weights_local(np.arange(100_000), 8, seed=2)
    assert np.mean(w == w2) < 0.5  # independent seeds: P(equal) = sum p_k^2 ~ 0.31
    # replicates are uncorrelated
    c = np.corrcoef(w.T)
    assert np.abs(c[np.triu_indices(8, 1)]).max() < 0.02


def _direct_bootstrap(data, M, alpha=0.05):
    """Each estimator recomputed on every replicate from the per-row weights M (n, B) by plain
    numpy, then its standard error and percentile interval: the pass's statistics, checked."""
    w = data["pi_e"] / data["pscore"]
    r, qf, qpi = data["reward"], data["q_hat"], data["q_hat_pi"]
    mean = lambda x: (M * x[:, None]).sum(0) / M.sum(0)  # noqa: E731
    reps = {"ips": mean(w * r), "snips": mean(w * r) / mean(w), "dr": mean(qpi + w * (r - qf)),
            "sndr": mean(qpi) + mean(w * (r - qf)) / mean(w)}
    return {k: (v.std(ddof=1), *np.quantile(v, [alpha / 2, 1 - alpha / 2])) for k, v in reps.items()}


def test_bootstrap_std_err_is_close_to_the_analytic_one():
    data, _ = synthetic_log(4000, 21)
    res = evaluate(data, [IPS(), SNIPS(), DR(), SNDR()], n_boot=200, seed=3)
    direct = _direct_bootstrap(data, poisson_weights_local(data["row_id"], 200, 3))
    for r in res:
        assert r.boot_std_err == pytest.approx(r.std_err, rel=0.2), r.estimator
        assert (r.boot_std_err, r.boot_ci_low, r.boot_ci_high) == pytest.approx(direct[r.estimator], rel=1e-9)


def test_paired_difference_bootstrap_interval_is_the_two_sided_percentile_one():
    """The paired difference's bootstrap interval is the alpha/2 and 1 - alpha/2 quantiles of the
    per-replicate differences (same Poisson weights for both policies); quantiles at alpha and
    1 - alpha would give a 90% interval labelled 95%."""
    data, _ = synthetic_log(4000, 21)
    policies = {"t": ("pi_e", "q_hat_pi"), "b": ("pi_e_b", "q_hat_pi_b")}
    res = evaluate(data, [IPS()], policies, baseline="b", n_boot=200, seed=3)
    r = {x.policy: x for x in res}
    M = poisson_weights_local(data["row_id"], 200, 3)
    ips = lambda pe: (M * (pe / data["pscore"] * data["reward"])[:, None]).sum(0) / M.sum(0)  # noqa: E731
    diff = ips(data["pi_e"]) - ips(data["pi_e_b"])
    lo, hi = np.quantile(diff, [0.025, 0.975])
    assert (r["t"].diff_boot_ci_low, r["t"].diff_boot_ci_high) == pytest.approx((lo, hi), rel=1e-9)
    assert (lo, hi) == pytest.approx((-0.0078866, 0.0365476), abs=1e-7)
    assert r["t"].diff_boot_dropped == 0


def test_degenerate_bootstrap_replicates_are_dropped_and_counted():
    """A policy on 3 of 1000 rows: about e^-3 of the replicates give those rows weight 0, so sum w = 0
    and SNIPS/SNDR are 0/0 there. They are dropped (and counted) instead of making the whole
    bootstrap NaN; the rest is the plain bootstrap of the finite replicates."""
    from causalrec.estimators.ope import evaluate_with_stats

    rng = np.random.default_rng(0)
    n, B = 1000, 200
    pi = np.zeros(n)
    pi[[10, 500, 900]] = 1.0
    data = dict(row_id=np.arange(n), reward=rng.binomial(1, 0.5, n).astype(float), pscore=np.full(n, 0.1),
                pi_e=pi, q_hat=np.full(n, 0.4), q_hat_pi=np.full(n, 0.4), pi_e_b=np.full(n, 0.1),
                q_hat_pi_b=np.full(n, 0.4))
    res, st = evaluate_with_stats(data, [IPS(), SNIPS(), SNDR()], {"target": ("pi_e", "q_hat_pi"),
                                  "base": ("pi_e_b", "q_hat_pi_b")}, baseline="base", n_boot=B, seed=0)
    degenerate = int((st.boot_sums["target|w"] == 0).sum())
    assert 0 < degenerate < B / 2
    r = {(x.policy, x.estimator): x for x in res}
    assert r[("target", "ips")].boot_dropped == 0 and r[("base", "snips")].boot_dropped == 0
    M = poisson_weights_local(data["row_id"], B, 0)
    w = pi / data["pscore"]
    keep = (M * w[:, None]).sum(0) > 0
    for est in ("snips", "sndr"):
        x = r[("target", est)]
        assert x.boot_dropped == degenerate and x.diff_boot_dropped == degenerate
        direct = _direct_bootstrap(data, M[:, keep])[est]
        assert (x.boot_std_err, x.boot_ci_low, x.boot_ci_high) == pytest.approx(direct, rel=1e-9)
        assert math.isfinite(x.diff_boot_ci_low) and math.isfinite(x.diff_boot_ci_high)


def test_a_bootstrap_with_too_few_finite_replicates_has_no_interval():
    from causalrec.estimators.ope import BOOT_MIN_FINITE_SHARE, _kept

    assert BOOT_MIN_FINITE_SHARE == 0.5
    kept, dropped = _kept(np.array([1.0, 2.0, np.nan, np.inf]))
    assert kept.tolist() == [1.0, 2.0] and dropped == 2
    assert _kept(np.array([1.0, np.nan, np.nan])) == (None, 2)
    data = dict(row_id=np.arange(3), reward=np.full(3, 0.5), pscore=np.full(3, 0.5), pi_e=np.array([0.5, 0, 0]),
                q_hat=np.zeros(3), q_hat_pi=np.zeros(3))
    (r,) = evaluate(data, [SNIPS()], n_boot=200, seed=0)  # one weighted row: ~37% of the replicates are 0/0
    assert 0 < r.boot_dropped < 100 and math.isfinite(r.boot_std_err)


def test_bucketed_bootstrap_std_err_is_close_to_the_analytic_one():
    from causalrec.estimators.base import bucket_of

    data, _ = synthetic_log(20000, 22)
    res = evaluate(data, [IPS(), SNIPS(), DR(), SNDR()], n_boot=200, seed=3, boot_buckets=2048)
    # every row of a bucket shares the bucket's weight, keyed by the bucket id
    M = poisson_weights_local(np.arange(2048), 200, 3)[bucket_of(data["row_id"], 2048, 3)]
    direct = _direct_bootstrap(data, M)
    for r in res:
        assert r.boot_std_err == pytest.approx(r.std_err, rel=0.2), r.estimator
        assert (r.boot_std_err, r.boot_ci_low, r.boot_ci_high) == pytest.approx(direct[r.estimator], rel=1e-9)
    with pytest.raises(ValueError, match="boot_buckets"):
        evaluate(data, [IPS()], n_boot=10, boot_buckets=-1)


def test_unbiased_estimators_cover_the_truth_on_simulated_logs():
    """Error within the interval (small seed sweep; the 200-seed check is marked slow)."""
    hits = {n: 0 for n in ("ips", "snips", "dr", "sndr")}
    seeds = range(20)
    for s in seeds:
        data, truth = synthetic_log(2000, 100 + s)
        for r in evaluate(data, [IPS(), SNIPS(), DR(), SNDR()]):
            hits[r.estimator] += r.ci_low <= truth <= r.ci_high
    for name, h in hits.items():
        assert h >= 16, (name, h)  # P(<=15 of 20 | p=.95) < 0.003


@pytest.mark.slow
def test_95pct_intervals_cover_93_to_97pct_over_200_seeds():
    hits = {n: 0 for n in ("ips", "snips", "dr", "sndr")}
    for s in range(200):
        data, truth = synthetic_log(5000, 1000 + s)
        for r in evaluate(data, [IPS(), SNIPS(), DR(), SNDR()]):
            hits[r.estimator] += r.ci_low <= truth <= r.ci_high
    for name, h in hits.items():
        assert 0.93 <= h / 200 <= 0.97, (name, h / 200)


def test_one_bootstrap_bucket_is_refused_and_a_tiny_pscore_does_not_crash_the_ratio_estimators():
    """One bucket makes every replicate the point estimate (a zero-width "bootstrap" interval), so
    build_plan refuses it. A legal pscore of 1e-160 gives a weight mean past 1e154: the ratio
    estimators' delta-method gradient squared it as a Python float and raised OverflowError, failing
    every estimator and policy of the call; it now overflows to inf like the rest of the arithmetic."""
    data, _ = synthetic_log(40, 8)
    with pytest.raises(ValueError, match="boot_buckets is 1; expected 0 .* or a bucket count >= 2"):
        evaluate(data, [IPS()], n_boot=10, boot_buckets=1)
    r, pi_e, p = np.array([1.0, 0.0, 1.0]), np.array([1.0, 0.5, 0.5]), np.array([1e-160, 0.5, 0.5])
    with np.errstate(over="ignore", invalid="ignore"):
        res = SNIPS().estimate_interval(r, p, pi_e)
    assert res.estimate == pytest.approx(1.0)


def _per_item_model_log(n: int, rng, m: int = 20, k: int = 10):
    """A log whose reward model ignores the context (per-action shrunk means fitted on the same rows, as the
    OPE job's reward model): the model is biased for a policy that picks actions by context, and with
    SLOPE's choice of a small lambda Switch-DR / DRos inherit that bias. The world is fixed (seed 7);
    ``rng`` draws the log. Returns (data, true value of pi_e)."""
    w = np.random.default_rng(7)
    q = w.uniform(0.02, 0.5, (m, k))
    pb = np.exp(w.normal(0, 1, (m, k)))
    pb /= pb.sum(1, keepdims=True)
    pe = np.exp((np.log(q) + w.normal(0, 0.5, (m, k))) / 0.5)
    pe /= pe.sum(1, keepdims=True)
    x = rng.integers(0, m, n)
    a = np.minimum((pb[x].cumsum(1) > rng.uniform(size=(n, 1))).argmax(1), k - 1)
    r = rng.binomial(1, q[x, a]).astype(float)
    qa = (np.bincount(a, weights=r, minlength=k) + 10 * r.mean()) / (np.bincount(a, minlength=k) + 10)
    data = {"row_id": np.arange(n), "reward": r, "pscore": pb[x, a], "pi_e": pe[x, a], "q_hat": qa[a],
            "q_hat_pi": pe[x] @ qa}
    return data, float((pe * q).mean(0).sum())


def test_tuned_dr_intervals_cover_despite_the_bias_of_the_chosen_lambda():
    """With the OPE job's kind of reward model, SLOPE picks lambda <= 10 and the chosen form's own interval
    (its sampling spread only) covered the true value in ~17% of logs for Switch-DR and ~15% for DRos, the
    bias being 3-6 standard errors. The reported interval is the hull with the unbiased lambda = inf
    (DR) interval: it contains DR's, and covers about as often; the point estimate stays the tuned one."""
    rng = np.random.default_rng(0)
    hits = {"switch_dr": 0, "dr_os": 0, "dr": 0}
    shrunk = 0
    for _ in range(60):
        data, truth = _per_item_model_log(1000, rng)
        res = {r.estimator: r for r in evaluate(data, [DR(), SwitchDR(), DRos()])}
        for name, r in res.items():
            hits[name] += r.ci_low <= truth <= r.ci_high
        for name in ("switch_dr", "dr_os"):
            r = res[name]
            if r.hyperparam < math.inf:
                shrunk += 1
                assert r.interval_method == "analytic_bias_aware"
                assert r.ci_low <= res["dr"].ci_low + 1e-12 and r.ci_high >= res["dr"].ci_high - 1e-12
                assert r.ci_low <= r.estimate - 1.6 * r.std_err and r.ci_high >= r.estimate + 1.6 * r.std_err
    assert shrunk >= 100  # the case at issue: a shrunk lambda was chosen almost every time
    assert hits["switch_dr"] >= 50 and hits["dr_os"] >= 50, hits  # was ~10 of 60


def test_direct_method_reports_no_interval():
    """DM's spread of q_hat over rows treats the model as exact: with a fitted per-item model it covered
    the truth in 0 of 600 simulated logs, and the constant q_hat of a uniform baseline gave a zero-width
    interval. The estimate stays; std_err and every interval are NaN, in both analytic and bootstrap form."""
    from causalrec.estimators.ope import NO_INTERVAL

    data, truth = _per_item_model_log(1000, np.random.default_rng(1))
    data["pi_e_u"], data["q_hat_pi_u"] = np.full(1000, 0.1), np.full(1000, data["q_hat"].mean())
    pols = {"pe": ("pi_e", "q_hat_pi"), "u": ("pi_e_u", "q_hat_pi_u")}
    for r in evaluate(data, [DM()], pols, baseline="u", n_boot=20):
        assert math.isfinite(r.estimate) and r.interval_method == NO_INTERVAL
        for f in ("std_err", "ci_low", "ci_high", "boot_ci_low", "boot_ci_high", "diff_ci_low", "diff_ci_high",
                  "diff_boot_ci_low", "diff_boot_ci_high"):
            assert math.isnan(getattr(r, f)), (r.policy, f)


def test_a_mean_weight_far_from_one_is_warned_about(caplog):
    """A policy with mass on an action of propensity 5e-4 that the log never drew: IPS / DR lose that mass and
    their intervals (tight, ESS healthy) missed the truth every time, silently. E_n[w] ~ 0.7 says so."""
    import logging

    rng = np.random.default_rng(3)
    n = 2000
    a = (rng.uniform(size=n) < 0.5).astype(int)  # logged actions 0 and 1; action 2 (pscore 5e-4) never drawn
    data = {"row_id": np.arange(n), "reward": rng.binomial(1, 0.3, n).astype(float), "pscore": np.full(n, 0.49975),
            "pi_e": np.where(a == 0, 0.35, 0.35), "pi_e_ok": np.full(n, 0.5), "pi_e_over": np.full(n, 0.8),
            "q_hat": np.full(n, 0.3), "q_hat_pi": np.full(n, 0.3)}
    pols = {"misses_mass": ("pi_e", "q_hat_pi"), "covered": ("pi_e_ok", "q_hat_pi"), "over": ("pi_e_over", "q_hat_pi")}
    with caplog.at_level(logging.WARNING, logger="causalrec.estimators.ope"):
        evaluate(data, [IPS()], pols)
    warned = sorted(r.getMessage() for r in caplog.records if "mean importance weight" in r.getMessage())
    assert len(warned) == 2, warned
    assert "'misses_mass'" in warned[0] and "0.700" in warned[0] and "never shows" in warned[0], warned
    # above 1 (the Coat pipeline's "popular" strategy reads 2.5): pi_b too small where the policy puts its mass
    assert "'over'" in warned[1] and "1.601" in warned[1] and "understates" in warned[1], warned
