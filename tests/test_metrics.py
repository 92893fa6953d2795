"""Metric library checked against scikit-learn and hand-computed debiased examples."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, mean_absolute_error, mean_squared_error, ndcg_score, roc_auc_score

from causalrec.evaluation import metrics as M


def sdf(spark, pdf: pd.DataFrame):
    return spark.createDataFrame(pdf)


# --------------------------------------------------------------------------- rating error


def test_rating_metrics_match_sklearn(spark):
    rng = np.random.default_rng(0)
    y = rng.integers(1, 6, 200).astype(float)
    p = y + rng.normal(0, 0.8, 200)
    df = sdf(spark, pd.DataFrame({"user_id": [f"u{i % 20}" for i in range(200)], "item_id": [f"i{i}" for i in range(200)],
                                  "rating": y, "prediction": p}))
    r = M.rating_metrics(df)
    assert r["mse"].value == pytest.approx(mean_squared_error(y, p))
    assert r["mae"].value == pytest.approx(mean_absolute_error(y, p))
    assert r["rmse"].value == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert r["mse"].ci_low < r["mse"].value < r["mse"].ci_high
    assert r["mse"].n == 200


def test_rating_metrics_ips_and_snips_by_hand(spark):
    # errors 1, 2, 0 (squared 1, 4, 0) with observation propensities 0.5, 0.25, 1.0
    df = sdf(spark, pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"],
                                  "rating": [3.0, 5.0, 2.0], "prediction": [4.0, 3.0, 2.0], "p": [0.5, 0.25, 1.0]}))
    ips = M.rating_metrics(df, col_propensity="p", weighting="ips", population_size=10)
    assert ips["mse"].value == pytest.approx((1 / 0.5 + 4 / 0.25 + 0) / 10)  # 1.8
    assert ips["mae"].value == pytest.approx((1 / 0.5 + 2 / 0.25) / 10)  # 1.0
    # default population: #users x #items = 2 x 2
    assert M.rating_metrics(df, col_propensity="p", weighting="ips")["mse"].value == pytest.approx(18 / 4)
    snips = M.rating_metrics(df, col_propensity="p", weighting="snips")
    assert snips["mse"].value == pytest.approx(18 / (2 + 4 + 1))
    with pytest.raises(ValueError, match="col_propensity"):
        M.rating_metrics(df, weighting="ips")
    with pytest.raises(ValueError, match="'nope' is missing"):
        M.rating_metrics(df, col_rating="nope")


def test_rating_metrics_snips_interval_is_the_delta_methods(spark):
    """SNIPS is a ratio of two random sums, so its interval is the delta method's: the half-width is
    z * sqrt(sum w^2 (e - m)^2 * n / (n - 1)) / sum w. Every row with the same error leaves no doubt
    (width 0); before, the denominator counted as fixed and the interval was c^2 (n / ESS - 1) wide there
    and too narrow on MNAR logs (83% coverage for a nominal 95%)."""
    rng = np.random.default_rng(3)
    n = 300
    p = rng.uniform(0.05, 1.0, n)
    const = sdf(spark, pd.DataFrame({"rating": np.zeros(n), "prediction": np.full(n, 1.5), "p": p}))
    r = M.rating_metrics(const, col_propensity="p", weighting="snips")
    assert r["mse"].value == pytest.approx(2.25)
    assert r["mse"].ci_low == pytest.approx(2.25) and r["mse"].ci_high == pytest.approx(2.25)
    err = rng.normal(0, 1, n) * (1 + 1 / p) ** 0.5
    df = sdf(spark, pd.DataFrame({"rating": np.zeros(n), "prediction": err, "p": p}))
    r = M.rating_metrics(df, col_propensity="p", weighting="snips")["mse"]
    w, e = 1 / p, err ** 2
    m = (w * e).sum() / w.sum()
    half = 1.959963984540054 * math.sqrt((w * w * (e - m) ** 2).sum() * n / (n - 1)) / w.sum()
    assert r.value == pytest.approx(m)
    assert (r.ci_low, r.ci_high) == (pytest.approx(m - half), pytest.approx(m + half))


# --------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn_with_and_without_ties(spark, ties):
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    s = y * 0.7 + rng.normal(0, 1, n)
    if ties:
        s = np.round(s, 1)  # many tied scores, across positives and negatives
    df = sdf(spark, pd.DataFrame({"label": y, "prediction": s}))
    a = M.auc(df)
    assert a.value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert a.ci_low < a.value < a.ci_high


def test_weighted_auc_matches_sklearn_sample_weight(spark):
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 2, n)
    s = np.round(y * 0.5 + rng.normal(0, 1, n), 1)
    p = rng.uniform(0.05, 1.0, n)
    df = sdf(spark, pd.DataFrame({"label": y, "prediction": s, "p": p}))
    for weighting in ("ips", "snips"):
        a = M.auc(df, col_propensity="p", weighting=weighting)
        assert a.value == pytest.approx(roc_auc_score(y, s, sample_weight=1 / p), abs=1e-10)
    # the interval counts each class by its effective size (sum w)^2 / sum w^2, not its rows
    w = 1 / p
    e_pos, e_neg = w[y == 1].sum() ** 2 / (w[y == 1] ** 2).sum(), w[y == 0].sum() ** 2 / (w[y == 0] ** 2).sum()
    v = a.value
    q1, q2 = v / (2 - v), 2 * v * v / (1 + v)
    half = M.Z95 * math.sqrt((v * (1 - v) + (e_pos - 1) * (q1 - v * v) + (e_neg - 1) * (q2 - v * v)) / (e_pos * e_neg))
    assert (a.ci_low, a.ci_high) == pytest.approx((v - half, v + half))
    plain = M.auc(df)  # equal weights: the effective sizes are the counts
    assert plain.ci_high - plain.ci_low < a.ci_high - a.ci_low


def test_nan_predictions_and_null_propensities_are_missing_not_extreme(spark):
    """NaN sorted above every score (AUC 0.5 instead of 1 below) and fell into calibration's top bin as
    p = 1; a null propensity became greatest(null, clip) = clip, a 1e6 weight that ran SNIPS."""
    nan = float("nan")
    df = spark.createDataFrame([("a", "x", 0.0, nan), ("b", "x", 1.0, 0.9), ("c", "x", 0.0, 0.1), ("d", "x", 1.0, 0.2)],
                               "user_id string, item_id string, y double, prediction double")  # NaN, not null
    assert M.auc(df, col_label="y").value == pytest.approx(1.0)
    cal = M.calibration(df, col_label="y")
    assert cal["n"] == 3 and cal["brier"] == pytest.approx((0.01 + 0.64 + 0.01) / 3)
    err = sdf(spark, pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "x"], "rating": [1.0, 0.0],
                                   "prediction": [0.0, 0.0], "p": [None, 0.5]}))
    assert M.rating_metrics(err, col_propensity="p", weighting="snips")["mse"].value == pytest.approx(0.0)
    assert M.rating_metrics(err)["mse"].value == pytest.approx(0.5)  # unweighted, the row counts
    with pytest.raises(ValueError, match="n_total=2 is smaller than the 3 rows"):
        M.lorenz_curve(sdf(spark, pd.DataFrame({"exposure": [1.0, 2.0, 3.0]})), n_total=2)


def test_auc_prefix_sums_cross_partitions(spark):
    # enough distinct scores that the range partitioner uses every partition
    y = np.array([0, 1] * 500)
    s = np.arange(1000) % 97 + y * 3.0
    df = sdf(spark, pd.DataFrame({"label": y, "prediction": s.astype(float)})).repartition(4)
    assert M.auc(df).value == pytest.approx(roc_auc_score(y, s))


# --------------------------------------------------------------------------- ranking


def _ranking_data(seed=3, n_users=6, n_items=8):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in range(n_items):
            rows.append((f"u{u}", f"i{i}", float(rng.integers(1, 6)), float(rng.normal()), float(rng.uniform(0.1, 1))))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "prediction", "p"])


def test_ndcg_matches_sklearn_graded_and_binary(spark):
    pdf = _ranking_data()
    df = sdf(spark, pdf)
    for k in (3, 5):
        got = M.ranking_metrics(df, df, k=k, ndcg_gain="rating")["ndcg"].value
        want = np.mean([
            ndcg_score([g["rating"].to_numpy()], [g["prediction"].to_numpy()], k=k) for _, g in pdf.groupby("user_id")
        ])
        assert got == pytest.approx(want)
        got_b = M.ranking_metrics(df, df, k=k, relevance_threshold=4.0)["ndcg"].value
        want_b = np.mean([
            ndcg_score([(g["rating"] >= 4).astype(float).to_numpy()], [g["prediction"].to_numpy()], k=k)
            for _, g in pdf.groupby("user_id") if (g["rating"] >= 4).any()
        ])
        assert got_b == pytest.approx(want_b)


def test_precision_recall_map_by_hand_and_sklearn_ap(spark):
    pdf = _ranking_data(seed=4)
    df = sdf(spark, pdf)
    k = 3
    per = M.ranking_metrics_by_user(df, df, k=k, relevance_threshold=4.0).toPandas().set_index("user_id")
    for u, g in pdf.groupby("user_id"):
        rel = g["rating"] >= 4
        if not rel.any():
            assert u not in per.index
            continue
        top = g.sort_values("prediction", ascending=False).head(k)
        hits = (top["rating"] >= 4).sum()
        assert per.loc[u, "precision"] == pytest.approx(hits / k)
        assert per.loc[u, "recall"] == pytest.approx(hits / rel.sum())
    # with K >= catalog, AP@K is scikit-learn's average precision
    full = M.ranking_metrics_by_user(df, df, k=8, relevance_threshold=4.0).toPandas().set_index("user_id")
    for u, g in pdf.groupby("user_id"):
        rel = (g["rating"] >= 4).astype(int).to_numpy()
        if rel.any():
            assert full.loc[u, "map"] == pytest.approx(average_precision_score(rel, g["prediction"].to_numpy()))


def test_ranking_ips_and_snips_by_hand(spark):
    # one user, items a,b,c relevant with propensities .5, .25, 1; predicted order a > c > b > d; K = 2
    truth = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "rating": [5.0] * 3,
                                     "p": [0.5, 0.25, 1.0]}))
    pred = sdf(spark, pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["a", "b", "c", "d"],
                                    "prediction": [0.9, 0.3, 0.5, 0.1]}))
    w = {"a": 2.0, "b": 4.0, "c": 1.0}
    snips = M.ranking_metrics(truth, pred, k=2, col_propensity="p", weighting="snips")
    v = {i: x * 3 / 7 for i, x in w.items()}  # rescaled to sum to 3 relevant items
    assert snips["recall"].value == pytest.approx((v["a"] + v["c"]) / 3)  # = 3/7
    assert snips["precision"].value == pytest.approx((v["a"] + v["c"]) / 2)
    dcg = v["a"] / math.log2(2) + v["c"] / math.log2(3)
    # the ideal orders by gain, ties in the model's order (a, c, then b): the top 2 are relevant, as
    # unweighted; ordering the weighted gains (b first, as the rarest) gave dcg / (v_b + v_a / log2 3)
    idcg = v["a"] / math.log2(2) + v["c"] / math.log2(3)
    assert snips["ndcg"].value == pytest.approx(dcg / idcg) == pytest.approx(1.0)
    ap = (v["a"] * 1 / 1 + v["c"] * (v["a"] + 1) / 2) / 2  # each row's own hit weighted once
    assert snips["map"].value == pytest.approx(ap)
    # ips with one user: weights divided by their global mean 7/3 -> same as snips here
    ips = M.ranking_metrics(truth, pred, k=2, col_propensity="p", weighting="ips")
    assert ips["recall"].value == pytest.approx(3 / 7)
    naive = M.ranking_metrics(truth, pred, k=2)
    assert naive["recall"].value == pytest.approx(2 / 3)


def test_ranking_ips_normalises_by_the_mean_weight_of_the_relevant_rows_only(spark):
    """weighting="ips" divides 1/p by its mean over the *relevant* rows (the Horvitz-Thompson estimate
    of their count), not over every truth row: an irrelevant row's weight must not move the metric."""
    truth = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "rating": [1.0, 1.0, 0.0],
                                     "p": [0.1, 0.9, 0.5]}))
    pred = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"],
                                    "prediction": [0.9, 0.5, 0.1]}))
    ips = M.ranking_metrics(truth, pred, k=1, col_propensity="p", weighting="ips", relevance_threshold=0.5)
    v_a = 10.0 / ((10.0 + 1 / 0.9) / 2)  # a is the one hit; c (rating 0) stays out of the mean
    assert v_a == pytest.approx(1.8)
    assert ips["recall"].value == pytest.approx(v_a / 2) == pytest.approx(0.9)
    assert ips["precision"].value == pytest.approx(v_a / 1) == pytest.approx(1.8)


def test_weighted_ndcg_of_a_perfect_ranking_is_one_and_nan_predictions_rank_last(spark):
    # relevant a (p = 0.1) and b (p = 0.9) ranked first and second: no ranking can do better
    truth = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "rating": [1.0, 1.0, 0.0],
                                     "p": [0.1, 0.9, 0.5]}))
    pred = sdf(spark, pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["a", "b", "c", "d"],
                                    "prediction": [0.9, 0.8, 0.1, float("nan")]}))
    # and b (p = 0.9) before a: as perfect, since both relevant rows lead (the weights estimate how
    # many such rows there are; they do not make a rarely-shown row more relevant than a common one)
    pred_ba = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "prediction": [0.8, 0.9, 0.1]}))
    for weighting in ("none", "ips", "snips"):
        kw = dict(col_propensity="p" if weighting != "none" else None, weighting=weighting)
        got = M.ranking_metrics(truth, pred, k=3, relevance_threshold=0.5, **kw)
        assert got["ndcg"].value == pytest.approx(1.0), weighting
        got = M.ranking_metrics(truth, pred_ba, k=3, relevance_threshold=0.5, **kw)
        assert got["ndcg"].value == pytest.approx(1.0), weighting
        # c (irrelevant) first: a partial score, below 1 under every weighting
        worse = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "prediction": [0.8, 0.7, 0.9]}))
        assert M.ranking_metrics(truth, worse, k=3, relevance_threshold=0.5, **kw)["ndcg"].value < 0.99, weighting
    # snips weights 1.8 (a) and 0.2 (b): AP weights b's own hit once, (1.8 + 0.2 * (1.8 + 1) / 2) / 2
    snips = M.ranking_metrics(truth, pred, k=3, relevance_threshold=0.5, col_propensity="p", weighting="snips")
    assert snips["map"].value == pytest.approx((1.8 + 0.2 * 2.8 / 2) / 2)
    # a NaN prediction is not the best one (Spark orders NaN above every number)
    assert M.top_k(pred, 4).toPandas().sort_values("rank")["item_id"].tolist() == ["a", "b", "c", "d"]
    nan_top = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"],
                                       "prediction": [float("nan"), 0.2, 0.1]}))
    assert M.ranking_metrics(truth, nan_top, k=1, relevance_threshold=0.5)["precision"].value == pytest.approx(1.0)


def test_ranking_ips_differs_from_snips_across_users(spark):
    truth = sdf(spark, pd.DataFrame({"user_id": ["u", "v"], "item_id": ["a", "a"], "rating": [5.0, 5.0], "p": [0.5, 0.1]}))
    pred = sdf(spark, pd.DataFrame({"user_id": ["u", "v"], "item_id": ["a", "b"], "prediction": [1.0, 1.0]}))
    ips = M.ranking_metrics(truth, pred, k=1, col_propensity="p", weighting="ips")
    # weights 2 and 10, mean 6 -> u's hit counts 2/6, v misses
    assert ips["recall"].value == pytest.approx((2 / 6 + 0) / 2)
    snips = M.ranking_metrics(truth, pred, k=1, col_propensity="p", weighting="snips")
    assert snips["recall"].value == pytest.approx(0.5)


def test_ranking_metrics_count_a_repeated_pair_once(spark):
    """Logs repeat (user, item) rows (OBD: one per impression); each pair counts once, so no metric
    exceeds 1 and the result equals that of the deduplicated rows."""
    rep = pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["a", "a", "b", "c"], "outcome": [1.0, 0.0, 0.0, 1.0],
                        "prediction": [0.9, 0.8, 0.5, 0.2]})
    once = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "outcome": [1.0, 0.0, 1.0],
                         "prediction": [0.9, 0.5, 0.2]})
    for k in (1, 2, 3):
        kw = dict(k=k, col_rating="outcome", relevance_threshold=0.5)
        got = M.ranking_metrics_by_user(sdf(spark, rep), sdf(spark, rep), **kw).toPandas()
        want = M.ranking_metrics_by_user(sdf(spark, once), sdf(spark, once), **kw).toPandas()
        pd.testing.assert_frame_equal(got, want)
        assert got["n_rel"].item() == 2
        assert (got[list(M.RANKING_METRICS)] <= 1.0).all(axis=None), got
    top1 = M.ranking_metrics_by_user(sdf(spark, rep), sdf(spark, rep), k=1, col_rating="outcome",
                                     relevance_threshold=0.5).toPandas().iloc[0]
    assert (top1["precision"], top1["recall"], top1["ndcg"], top1["map"]) == pytest.approx((1.0, 0.5, 1.0, 1.0))


def test_causal_top_k_by_prediction_lists_an_item_once(spark):
    pred = sdf(spark, pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "a", "b"], "prediction": [0.9, 0.9, 0.2]}))
    eff = sdf(spark, pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "effect": [0.1, 0.3]}))
    top = M.top_k(pred, 2).toPandas()
    assert top.sort_values("rank")["item_id"].tolist() == ["a", "b"]
    per = M.causal_metrics_by_user(pred, eff, k=2, col_rank=None, col_prediction="prediction").toPandas().iloc[0]
    assert per["causal_precision"] == pytest.approx((0.1 + 0.3) / 2)
    assert per["cdcg"] == pytest.approx(0.1 + 0.3 / math.log2(3))


def test_auc_and_gini_leave_no_cached_data(spark):
    """_prefix_sums persists its range-partitioned rows for two passes; they must be released."""
    rng = np.random.default_rng(11)
    df = sdf(spark, pd.DataFrame({"label": rng.integers(0, 2, 300), "prediction": rng.normal(size=300),
                                  "exposure": rng.uniform(size=300)}))
    cached = lambda: spark.sparkContext._jsc.getPersistentRDDs().size()  # noqa: E731
    before = cached()
    assert M.auc(df).value is not None and M.gini(df) is not None
    assert cached() == before


# --------------------------------------------------------------------------- causal


def test_causal_precision_and_cdcg_with_known_effects(spark):
    recs = sdf(spark, pd.DataFrame({"user_id": ["u", "u", "u", "v", "v"], "item_id": ["a", "b", "c", "a", "c"],
                                    "rank": [1, 2, 3, 1, 2]}))
    eff = sdf(spark, pd.DataFrame({"user_id": ["u", "u", "u", "v"], "item_id": ["a", "b", "c", "a"],
                                   "effect": [0.2, -0.1, 0.5, 0.4]}))
    per = M.causal_metrics_by_user(recs, eff, k=2).toPandas().set_index("user_id")
    assert per.loc["u", "causal_precision"] == pytest.approx((0.2 - 0.1) / 2)
    assert per.loc["u", "cdcg"] == pytest.approx(0.2 / 1 - 0.1 / math.log2(3))
    assert per.loc["v", "causal_precision"] == pytest.approx(0.4 / 2)  # (v, c) has no effect row -> 0
    assert per.loc["v", "matched"] == pytest.approx(0.5)
    mean = M.causal_metrics(recs, eff, k=2)
    assert mean["causal_precision"].value == pytest.approx((0.05 + 0.2) / 2)


def test_ips_effect_estimate_recovers_true_effect(spark):
    # randomised treatment with e = 0.3: y1 ~ Bern(.6), y0 ~ Bern(.2), true effect .4 for every pair
    rng = np.random.default_rng(5)
    n = 4000
    z = (rng.uniform(size=n) < 0.3).astype(int)
    y = np.where(z == 1, rng.uniform(size=n) < 0.6, rng.uniform(size=n) < 0.2).astype(float)
    logs = sdf(spark, pd.DataFrame({"user_id": ["u"] * n, "item_id": ["a"] * n, "treated": z, "outcome": y,
                                    "treatment_propensity": 0.3}))
    est = M.ips_effect_estimates(logs).collect()[0]
    assert est["n_logged"] == n
    assert est["effect"] == pytest.approx(0.4, abs=0.06)
    recs = sdf(spark, pd.DataFrame({"user_id": ["u"], "item_id": ["a"], "rank": [1]}))
    cp = M.causal_metrics(recs, M.ips_effect_estimates(logs), k=1)["causal_precision"].value
    assert cp == pytest.approx(est["effect"])



def test_ips_effect_estimates_leave_out_a_nan_propensity(spark):
    """NaN is a missing propensity, as null is: clipped, it became 1 - clip and gave its control row a
    weight of 1/clip (effect -24 instead of 2)."""
    logs = spark.createDataFrame([("u", "a", 1, 1.0, 0.5), ("u", "a", 0, 0.5, float("nan"))],
                                 "user_id string, item_id string, treated int, outcome double, treatment_propensity double")
    assert logs.where("isnan(treatment_propensity)").count() == 1  # a NaN, not a null
    est = M.ips_effect_estimates(logs, clip=0.01).collect()[0]
    assert (est["effect"], est["n_logged"]) == (pytest.approx(2.0), 1)


def test_ips_effect_estimates_cap_the_propensity_at_one_minus_clip(spark):
    """e is clipped to [clip, 1 - clip]: a control row logged at e = 0.999 weighs 1/(1 - 0.99) = 100,
    not 1/0.001 = 1000, so the pair's effect is (1/0.5 - 100) / 2 = -49 (without the cap -499)."""
    logs = spark.createDataFrame([("u", "a", 1, 1.0, 0.5), ("u", "a", 0, 1.0, 0.999)],
                                 "user_id string, item_id string, treated int, outcome double, "
                                 "treatment_propensity double")
    est = M.ips_effect_estimates(logs, clip=0.01).collect()[0]
    assert (est["effect"], est["n_logged"]) == (pytest.approx((1 / 0.5 - 1 / 0.01) / 2), 2)
    assert est["effect"] == pytest.approx(-49.0)


# --------------------------------------------------------------------------- exposure / fairness


def test_gini_known_distributions(spark):
    equal = sdf(spark, pd.DataFrame({"exposure": [2.0] * 10}))
    assert M.gini(equal) == pytest.approx(0.0)
    one = sdf(spark, pd.DataFrame({"exposure": [5.0]}))
    assert M.gini(one, n_total=10) == pytest.approx(1 - 1 / 10)  # one of ten items gets everything
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 0.5])
    want = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())  # mean-difference definition
    assert M.gini(sdf(spark, pd.DataFrame({"exposure": x}))) == pytest.approx(want)
    xz = np.concatenate([x, np.zeros(5)])
    want_z = np.abs(xz[:, None] - xz[None, :]).sum() / (2 * len(xz) ** 2 * xz.mean())
    assert M.gini(sdf(spark, pd.DataFrame({"exposure": x})), n_total=12) == pytest.approx(want_z)
    lc = M.lorenz_curve(sdf(spark, pd.DataFrame({"exposure": x})), n_total=12)
    assert lc["x"][0] == 0 and lc["x"][-1] == 1 and lc["y"][-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(lc["y"], lc["y"][1:]))
    # against the sorted-array definition, with ties, zero rows, the catalog's absent items and thinning
    vals = np.array([3.0, 0.0, 1.0, 1.0, 1.0, 7.5, 2.0, 2.0, 0.25, 9.0, 1.0, 4.0])
    for n_total, points in ((None, 101), (20, 101), (20, 6), (12, 4)):
        n = n_total or len(vals)
        ref = np.sort(np.concatenate([np.zeros(n - len(vals)), vals]))
        cum = np.concatenate([[0.0], np.cumsum(ref) / ref.sum()])
        idx = np.unique(np.linspace(0, n, min(points, n + 1)).round().astype(int))
        got = M.lorenz_curve(sdf(spark, pd.DataFrame({"exposure": vals})), n_total=n_total, points=points)
        assert got["x"] == pytest.approx(list(idx / n)) and got["y"] == pytest.approx(list(cum[idx])), (n_total, points)


def test_exposure_coverage_and_groups(spark):
    recs = sdf(spark, pd.DataFrame({"user_id": ["u", "u", "v", "v"], "item_id": ["a", "b", "a", "c"],
                                    "rank": [1, 2, 1, 2]}))
    exp = M.item_exposure(recs).toPandas().set_index("item_id")
    assert exp.loc["a", "exposure"] == pytest.approx(2.0)
    assert exp.loc["b", "exposure"] == pytest.approx(1 / math.log2(3))
    groups = sdf(spark, pd.DataFrame({"item_id": ["a", "b", "c", "d"], "popularity_group": ["head", "tail", "tail", "tail"]}))
    g = M.exposure_by_group(M.item_exposure(recs), groups)
    total = 2 + 2 / math.log2(3)
    assert g["head"]["exposure_share"] == pytest.approx(2 / total)
    assert g["tail"]["item_share"] == pytest.approx(0.75)
    assert M.catalog_coverage(recs, 4) == pytest.approx(0.75)


def test_user_group_gap(spark):
    per_user = sdf(spark, pd.DataFrame({"user_id": ["a", "b", "c", "d"], "ndcg": [0.9, 0.7, 0.4, 0.2]}))
    users = sdf(spark, pd.DataFrame({"user_id": ["a", "b", "c", "d"], "segment": ["x", "x", "y", "y"]}))
    r = M.user_group_gap(per_user, users, "ndcg")
    assert r["groups"]["x"]["mean"] == pytest.approx(0.8)
    assert r["gap"] == pytest.approx(0.5)


def test_calibration_ece_by_hand(spark):
    df = sdf(spark, pd.DataFrame({"label": [0, 1, 1, 1, 0], "prediction": [0.05, 0.15, 0.85, 0.95, 0.9]}))
    c = M.calibration(df, n_bins=10)
    # bins: [0,.1): p .05 y 0; [.1,.2): p .15 y 1; [.8,.9): p .85 y 1; [.9,1]: p .95,.9 y 1,0
    want = (1 * 0.05 + 1 * 0.85 + 1 * 0.15 + 2 * abs(0.5 - 0.925)) / 5
    assert c["ece"] == pytest.approx(want)
    assert c["brier"] == pytest.approx(np.mean((np.array([0.05, 0.15, 0.85, 0.95, 0.9]) - [0, 1, 1, 1, 0]) ** 2))
    assert sum(b["count"] for b in c["bins"]) == 5


def test_qini_curve_orders_by_uplift(spark):
    rng = np.random.default_rng(6)
    n = 2000
    uplift = rng.uniform(size=n)
    z = rng.integers(0, 2, n)
    y = (rng.uniform(size=n) < 0.1 + z * 0.5 * uplift).astype(float)  # effect grows with predicted uplift
    q = M.qini_curve(sdf(spark, pd.DataFrame({"uplift": uplift, "treated": z, "outcome": y})), points=10)
    assert q["x"][0] == 0 and q["x"][-1] == pytest.approx(1.0)
    assert q["qini_coefficient"] > 0  # targeting by uplift beats random
    h = M.histogram(sdf(spark, pd.DataFrame({"v": [0.1, 0.2, 0.2, 0.9]})), "v", bins=4, lo=0.0, hi=1.0)
    assert h["counts"] == [3, 0, 0, 1]
    # the same log with a constant propensity: the weighted curve is the unweighted one
    q2 = M.qini_curve(sdf(spark, pd.DataFrame({"uplift": uplift, "treated": z, "outcome": y, "e": 0.5})), points=10,
                      col_propensity="e")
    assert q2["y"] == pytest.approx(q["y"]) and q2["qini_coefficient"] == pytest.approx(q["qini_coefficient"])


def test_qini_weighs_out_a_confounded_treatment(spark):
    """No effect at all, but the policy treated the rows likely to convert anyway: raw arm means
    credit a score that only predicts the baseline; the propensity-weighted curve does not."""
    rng = np.random.default_rng(11)
    n = 40000
    base = rng.uniform(size=n)
    e = 0.1 + 0.8 * base
    z = (rng.uniform(size=n) < e).astype(int)
    y = (rng.uniform(size=n) < 0.05 + 0.5 * base).astype(float)  # independent of z
    df = sdf(spark, pd.DataFrame({"uplift": base, "treated": z, "outcome": y, "e": e}))
    raw = M.qini_curve(df, points=10)
    ipw = M.qini_curve(df, points=10, col_propensity="e")
    # raw: 2,700 "incremental" conversions out of ~11,000, and a curve bent by the confounder
    assert raw["y"][-1] > 0.2 * y.sum() and abs(raw["qini_coefficient"]) > 0.005
    assert abs(ipw["y"][-1]) < 0.02 * y.sum() and abs(ipw["qini_coefficient"]) < 0.2 * abs(raw["qini_coefficient"])


# --------------------------------------------------------------------------- the evaluate stage end to end


def _write_eval_tables(ctx, tmp_path, objectives=("naive",)):
    """Small but complete inputs: test examples (MCAR + MNAR), two trained MF checkpoints, recommendations,
    item groups, user segments, ground-truth effects and exposure propensities."""
    import torch

    from causalrec import schemas as S
    from causalrec.models import build_model
    from causalrec.train.checkpoint import save_checkpoint

    spark, store = ctx.spark, ctx.store
    rng = np.random.default_rng(7)
    n_users, n_items = 12, 10
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, 6, replace=False):
            mcar = u < 6
            p = 1.0 if mcar else float(rng.uniform(0.1, 0.9))
            rating = float(rng.integers(1, 6))
            rows.append({"example_id": f"e{u}_{i}", "split": "test", "user_id": f"u{u}", "item_id": f"i{i}",
                         "user_idx": u, "item_idx": int(i), "observed": 1, "label": rating,
                         "outcome": float(rating >= 4), "exposure_propensity": p, "is_mcar": mcar})
    te = spark.createDataFrame(pd.DataFrame(rows))
    store.write(te, "training_examples", mode="overwrite", spec=S.TRAINING_EXAMPLES)
    runs = []
    for j, obj in enumerate(objectives):
        torch.manual_seed(j)
        mc = {"model": "mf", "task": "rating", "n_users": n_users, "n_items": n_items, "dim": 4, "global_bias": 3.0}
        path = save_checkpoint(tmp_path / f"ckpt_{obj}", build_model(mc), mc, {"objective": obj})
        runs.append({"run_id": f"mf-{obj}", "model": "mf", "objective": obj, "model_version": f"mf-{obj}",
                     "checkpoint_path": path, "metrics_json": json.dumps({"epochs": [{"epoch": 0, "train_loss": 1.0,
                                                                                      "valid_metric": 1.1}]}),
                     "best_epoch": 0, "created_at": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=j)})
    store.write(spark.createDataFrame(pd.DataFrame(runs)), "train_runs", mode="overwrite", spec=S.TRAIN_RUNS)
    recs = []
    for u in range(n_users):
        for r in range(3):
            recs.append((f"u{u}", f"i{r}", r + 1, "relevance"))  # everyone gets the same 3 items
            recs.append((f"u{u}", f"i{(u + r) % n_items}", r + 1, "fair"))  # spread over the catalog
    rec_df = spark.createDataFrame(pd.DataFrame(recs, columns=["user_id", "item_id", "rank", "policy"])).selectExpr(
        "*", "cast(1.0 / rank as double) as score", "false as fairness_boosted", "'' as explanation",
        "'mf-ips' as model_version")
    store.write(rec_df, "recommendations", mode="overwrite", spec=S.RECOMMENDATIONS)
    groups = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                           "popularity_group": ["head"] * 2 + ["mid"] * 3 + ["tail"] * 5})
    store.write(spark.createDataFrame(groups), "item_features", mode="overwrite")
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)], "segment": ["a", "b"] * (n_users // 2)})
    store.write(spark.createDataFrame(users), "users", mode="overwrite")
    gt = pd.DataFrame([(f"u{u}", f"i{i}", 0.1, 0.1 + 0.01 * i) for u in range(n_users) for i in range(n_items)],
                      columns=["user_id", "item_id", "p_y0", "p_y1"])
    store.write(spark.createDataFrame(gt), "ground_truth", mode="overwrite", spec=S.GROUND_TRUTH)
    ep = te.selectExpr("user_id", "item_id", "observed", "exposure_propensity", "'logistic' as method")
    store.write(ep, "exposure_propensity", mode="overwrite")
    return pd.DataFrame(rows), runs


def test_evaluate_job_end_to_end(ctx, tmp_path):
    """One trained checkpoint scored on test pairs; every metric family lands in the metrics table."""
    from causalrec.evaluation import job
    from causalrec.models.featurize import Featurizer
    from causalrec.train.checkpoint import load_checkpoint

    ctx.cfg.evaluation.k = [3]
    ctx.cfg.ranking.k = 3
    examples, runs = _write_eval_tables(ctx, tmp_path)
    out = job.run(ctx)
    assert out["models"] == ["mf:naive"]
    m = ctx.store.read("metrics").toPandas()
    v = lambda metric, model, slice_, k=None: m[(m.metric == metric) & (m.model == model) & (m.slice == slice_)  # noqa
                                               & ((m.k == k) if k is not None else m.k.isna())]["value"].item()
    # MSE on the MCAR slice equals scikit-learn on the checkpoint's own predictions
    import torch

    model, mc, _ = load_checkpoint(runs[0]["checkpoint_path"])
    mcar = examples[examples.is_mcar].reset_index(drop=True)
    with torch.no_grad():
        pred = model(Featurizer(mc)(mcar))["relevance"].numpy()
    assert v("mse", "mf:naive", "mcar_test") == pytest.approx(mean_squared_error(mcar["label"], pred), rel=1e-5)
    assert v("auc", "mf:naive", "mcar_test") == pytest.approx(roc_auc_score(mcar["outcome"], pred), rel=1e-6)
    for sl in ("mnar_test", "mnar_test_ips", "mnar_test_snips"):
        assert not np.isnan(v("ndcg", "mf:naive", sl, 3))
    # SNIPS-weighted MSE on the MNAR slice, by hand from the same predictions
    mnar = examples[~examples.is_mcar].reset_index(drop=True)
    with torch.no_grad():
        pm = model(Featurizer(mc)(mnar))["relevance"].numpy()
    w = 1 / np.maximum(mnar["exposure_propensity"], ctx.cfg.evaluation.propensity_clip)
    assert v("mse", "mf:naive", "mnar_test_snips") == pytest.approx(
        float((w * (pm - mnar["label"]) ** 2).sum() / w.sum()), rel=1e-5)
    # exposure: the fair policy spreads exposure, so its Gini is lower and it covers more of the catalog
    assert v("exposure_gini", "policy:fair", "recommendations", 3) < v("exposure_gini", "policy:relevance",
                                                                       "recommendations", 3)
    assert v("catalog_coverage", "policy:relevance", "recommendations", 3) == pytest.approx(0.3)
    assert v("exposure_share:head", "policy:relevance", "recommendations", 3) == pytest.approx(
        (1 + 1 / math.log2(3)) / (1 + 1 / math.log2(3) + 0.5))
    # causal precision with ground truth: relevance policy shows items 0,1,2 with effects .00, .01, .02
    assert v("causal_precision", "policy:relevance", "causal_ground_truth", 3) == pytest.approx(0.01)
    assert "user_group_gap:ndcg" in set(m.metric)
    assert v("weight_ess", "exposure_propensity", "observed") > 0
    with open(out["json"]) as f:
        ev = json.load(f, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert set(ev["curves"]) >= {"lorenz", "propensity_hist", "weight_hist"}
    # the report renders from what evaluate wrote
    from causalrec import report

    res = report.run(ctx)
    html_text = open(res["report"]).read()
    assert res["plots"] >= 5  # models, propensity hist, weights, Lorenz, training curves
    assert "mf:naive" in html_text and "no other model to compare with" in html_text


@pytest.mark.slow
def test_evaluate_job_two_models_and_rerun(ctx, tmp_path):
    """Naive and debiased runs side by side; a rerun replaces the metrics table instead of appending."""
    from causalrec.evaluation import job

    ctx.cfg.evaluation.k = [3]
    ctx.cfg.ranking.k = 3
    _write_eval_tables(ctx, tmp_path, objectives=("naive", "ips"))
    out = job.run(ctx)
    assert sorted(out["models"]) == ["mf:ips", "mf:naive"]
    n = ctx.store.read("metrics").count()
    job.run(ctx)
    assert ctx.store.read("metrics").count() == n
