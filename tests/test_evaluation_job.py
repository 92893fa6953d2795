"""The evaluate stage's inputs from the scores table: an empty table, and the list the fair re-ranker started from."""
from __future__ import annotations

import json

import pandas as pd
import pytest


def _recommendations(spark, rows):
    from causalrec import schemas as S

    df = spark.createDataFrame(pd.DataFrame(rows, columns=["user_id", "item_id", "rank", "policy"])).selectExpr(
        "*", "cast(1.0 / rank as double) as score", "false as fairness_boosted", "'' as explanation",
        "'m1' as model_version")
    return S.conform(df, S.RECOMMENDATIONS)


def test_evaluate_treats_an_empty_scores_table_as_missing(ctx):
    """A scores table that exists but holds no row (a score stage without candidates) is a missing input
    with its reason, in both places evaluate reads it, not a crash on max(scored_at) = None."""
    from causalrec import schemas as S
    from causalrec.evaluation import job

    spark, store = ctx.spark, ctx.store
    empty = spark.createDataFrame([], S.SCORES.spark_schema())
    test = spark.createDataFrame([("u1", "i1", 4.0)], "user_id string, item_id string, label double")
    assert job.test_predictions_from_scores(test, empty) == (None, 0.0)
    assert job.policy_top_k(empty, 3, "blend") is None
    # the stage: held-out test pairs and no checkpoint (predictions would come from scores), a fair
    # ranking (its base list would come from scores), and the empty scores table
    te = pd.DataFrame([{"example_id": f"e{u}", "split": "test", "user_id": f"u{u}", "item_id": "i1", "user_idx": u,
                        "item_idx": 1, "observed": 1, "label": 4.0, "outcome": 1.0, "is_mcar": True,
                        "exposure_propensity": 1.0}
                       for u in range(4)])
    store.write(spark.createDataFrame(te), "training_examples", mode="overwrite", spec=S.TRAINING_EXAMPLES)
    store.write(empty, "scores", mode="overwrite", spec=S.SCORES)
    store.write(_recommendations(spark, [(f"u{u}", f"i{u % 3}", 1, "fair") for u in range(4)]), "recommendations",
                mode="overwrite", spec=S.RECOMMENDATIONS)
    ctx.cfg.ranking.policy, ctx.cfg.ranking.k, ctx.cfg.evaluation.k = "fair", 1, [1]
    out = job.run(ctx)
    assert out["missing"]["scores"] == "scores table is empty"
    assert out["models"] == []
    m = store.read("metrics").toPandas()
    assert set(m[m.metric == "exposure_gini"].model) == {"policy:fair"}


def test_lorenz_before_fair_reranking_is_the_list_the_reranker_started_from(ctx, monkeypatch):
    """With ranking.fair_base_policy = blend the fair re-ranker starts from the blend top-K, whose Gini
    ranking_summary reports as gini_before; evaluate adds that list (not the relevance top-K) as the
    "before" curve, and the report's Lorenz legend shows the same Gini as the table (K = 1, so the
    position-discounted exposure is the slot count)."""
    from causalrec import ranking
    from causalrec import report as R
    from causalrec import schemas as S
    from causalrec.evaluation import job

    spark, store = ctx.spark, ctx.store
    rc = ctx.cfg.ranking
    rc.policy, rc.fair_base_policy, rc.blend_weight, rc.k = "fair", "blend", 0.7, 1
    ctx.cfg.evaluation.k = [1]
    n_items = 6
    now = pd.Timestamp("2026-01-01", tz="UTC")
    # relevance puts i0 first for everyone (Gini 5/6); the blend follows the uplift: i(u % 4), 6 users each
    scores = pd.DataFrame([{"user_id": f"u{u}", "item_id": f"i{j}", "relevance": 0.9 if j == 0 else 0.5 + 0.01 * j,
                            "uplift": 1.0 if j == u % 4 else (0.0 if j == 0 else 0.1), "uplift_se": None,
                            "model_version": "m1", "scored_at": now}
                           for u in range(24) for j in range(n_items)])
    store.write(spark.createDataFrame(scores, S.SCORES.spark_schema()), "scores", mode="overwrite", spec=S.SCORES)
    groups = ["head", "mid", "mid", "tail", "tail", "tail"]
    store.write(spark.createDataFrame(pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)],
                                                    "popularity_group": groups})), "item_features", mode="overwrite")
    items = spark.createDataFrame(pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)],
                                                "text": [f"item {j}" for j in range(n_items)]}))
    store.write(S.conform(items, S.ITEMS), "items", mode="overwrite", spec=S.ITEMS)
    ranking.run(ctx)
    summary = store.read("ranking_summary").toPandas().iloc[-1]
    out = job.run(ctx)
    with open(out["json"]) as f:
        lor = json.load(f)["curves"]["lorenz"]
    assert sorted(lor) == ["blend", "fair"]  # the relevance top-K is not what fair re-ranked
    assert [p for p, c in lor.items() if c.get("before_fair_reranking")] == ["blend"]
    assert lor["blend"]["gini"] == pytest.approx(summary["gini_before"])
    assert lor["fair"]["gini"] == pytest.approx(summary["gini_after"])
    # the report: the curve labelled "before fair re-ranking" carries the table's gini_before
    captured = {}

    def fig_html(fig, alt, caption):
        captured[alt] = fig.axes[0].get_legend_handles_labels()[1]
        return "<figure></figure>"

    monkeypatch.setattr(R, "_fig_html", fig_html)
    R.section_exposure({"tables": {"ranking_summary": [summary.to_dict()]}, "evaluation": {"curves": {"lorenz": lor}}})
    before = [s for s in captured["exposure lorenz curve"] if "before fair re-ranking" in s]
    assert before == [f"blend (before fair re-ranking), Gini {summary['gini_before']:.3f}"]


def test_evaluate_scores_test_rows_with_the_ids_the_checkpoint_was_trained_with(ctx, tmp_path, monkeypatch):
    """build_id_index numbers ids densely in sorted order: a training_set rerun after training (new user u2,
    new item i2) moves u3 from row 1 to 2 and i3 from row 1 to 2. The test rows carry the new indices;
    the checkpoint records the id_index version it was trained with (0), and evaluate maps the rows' ids
    through that version, as scoring does: u2 and i2 are unseen (-1), history items the model never saw
    drop out. Without it u2 would be scored with u3's embedding and u3 with the unknown row. A trained
    version that can no longer be read fails naming both versions."""
    import os

    import torch
    from deltalake import DeltaTable

    from causalrec import schemas as S
    from causalrec.evaluation import job
    from causalrec.models import build_model
    from causalrec.models.featurize import Featurizer
    from causalrec.train.checkpoint import load_checkpoint, save_checkpoint
    from causalrec.training_set import build_id_index

    spark, store = ctx.spark, ctx.store
    users = lambda ids: spark.createDataFrame([(u, None, "", None) for u in ids], S.USERS.spark_schema())  # noqa: E731
    items = lambda ids: spark.createDataFrame([(i, None, "c", i, None) for i in ids], S.ITEMS.spark_schema())  # noqa
    assert store.write(build_id_index(spark, users(["u1", "u3"]), items(["i1", "i3"])), "id_index", "overwrite",
                       spec=S.ID_INDEX) == 0
    torch.manual_seed(0)
    mc = {"model": "mf", "task": "rating", "n_users": 2, "n_items": 2, "dim": 4}
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mc), mc, {"id_index_version": 0})
    # training_set reruns with more data: id_index version 1, and training_examples indexed with it
    assert store.write(build_id_index(spark, users(["u1", "u2", "u3"]), items(["i1", "i2", "i3"])), "id_index",
                       "overwrite", spec=S.ID_INDEX) == 1
    new = {"u1": 0, "u2": 1, "u3": 2, "i1": 0, "i2": 1, "i3": 2}
    pairs = [("u1", "i3"), ("u2", "i1"), ("u3", "i2")]
    te = pd.DataFrame([{"example_id": f"e{k}", "split": "test", "user_id": u, "item_id": i, "user_idx": new[u],
                        "item_idx": new[i], "observed": 1, "label": 4.0, "outcome": 1.0, "is_mcar": True,
                        "exposure_propensity": 1.0, "history_item_idx": [2, 1, 0]}  # i3, i2, i1
                       for k, (u, i) in enumerate(pairs)])
    store.write(spark.createDataFrame(te), "training_examples", mode="overwrite", spec=S.TRAINING_EXAMPLES,
                metadata={"id_index_version": 1})
    run = {"run_id": "r1", "model": "mf", "objective": "naive", "model_version": "r1", "checkpoint_path": ckpt,
           "created_at": pd.Timestamp("2026-01-01", tz="UTC")}
    store.write(spark.createDataFrame(pd.DataFrame([run])), "train_runs", mode="overwrite", spec=S.TRAIN_RUNS)

    fed, preds = [], {}
    score = job.score_with_checkpoint

    def spy_score(examples, path, batch_size=1024):
        fed.extend(examples.collect())
        return score(examples, path, batch_size)

    def capture(rows, pred, model, *a, **k):  # the predictions, without the metric library's Spark jobs
        preds.update({r["example_id"]: r["prediction"] for r in pred.collect()})
        rows.add("captured", 1.0, model=model, slice_="test")

    monkeypatch.setattr(job, "score_with_checkpoint", spy_score)
    monkeypatch.setattr(job, "evaluate_predictions", capture)
    out = job.run(ctx)
    assert out["models"] == ["mf:naive"]
    got = {r["example_id"]: (r["user_idx"], r["item_idx"], list(r["history_item_idx"])) for r in fed}
    # version 0 numbers u1, u3 and i1, i3; u2 and i2 came later: unseen, and i2 leaves the history
    assert got == {"e0": (0, 1, [1, 0]), "e1": (-1, 0, [1, 0]), "e2": (1, -1, [1, 0])}
    model, mc, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        want = model(Featurizer(mc)(pd.DataFrame({"user_idx": [0, -1, 1], "item_idx": [1, 0, -1]})))["relevance"]
    assert [preds[f"e{k}"] for k in range(3)] == pytest.approx(want.numpy().tolist(), abs=1e-6)
    with open(out["json"]) as f:
        (m,) = json.load(f)["models"]
    assert (m["id_index_version"], m["test_rows_id_index_version"], m["reindexed"]) == (0, 1, True)

    # the trained version is gone (vacuumed): that model is not evaluated, with the reason
    for uri in DeltaTable(store.path("id_index"), version=0).file_uris():
        os.remove(uri.removeprefix("file://"))
    with pytest.raises(RuntimeError, match=r"evaluation: .* trained with id_index version 0, but .*id_index "
                                           r"\(now at version 1\) cannot be read at that version"):
        job.checkpoint_test_rows(store, store.read("training_examples"), ckpt, 1, "model mf:naive")


def test_evaluation_maps_rebuilt_test_rows_onto_the_trained_feature_layout(spark, tmp_path):
    """training_examples rebuilt after training (a new attribute token shifts the one-hot slots) hold their
    features in a new layout: evaluation maps them onto the checkpoint's recorded layout by name, as scoring
    does; a checkpoint (or table) without the record keeps the rows as they are."""
    from causalrec.evaluation.job import checkpoint_features
    from causalrec.models import build_model
    from causalrec.train.checkpoint import save_checkpoint

    trained = ["user:n", "item:attr=red", "item:attr=wool", "pair:cooc"]
    rows_layout = ["user:n", "item:attr=linen", "item:attr=red", "item:attr=wool", "pair:cooc"]
    test = spark.createDataFrame([("e1", [0.5, 1.0, 0.0, 1.0, 0.25])], "example_id string, features array<float>")
    mc = {"model": "mf", "task": "rating", "n_users": 1, "n_items": 1, "dim": 2, "n_features": 4}
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mc), mc, {"feature_names": trained})
    old = save_checkpoint(tmp_path / "old", build_model(mc), mc, {})
    assert checkpoint_features(test, rows_layout, ckpt, "m").first()["features"] == [0.5, 0.0, 1.0, 0.25]
    assert checkpoint_features(test, rows_layout, old, "m").first()["features"] == [0.5, 1.0, 0.0, 1.0, 0.25]
    assert checkpoint_features(test, None, ckpt, "m").first()["features"] == [0.5, 1.0, 0.0, 1.0, 0.25]


def test_ips_rating_error_on_the_test_split_speaks_for_every_pair(spark):
    """The test split holds a share f of the observed pairs while exposure_propensity is the chance of being
    observed at all: divided by users x items alone, the IPS MSE came out f times too small (0.25 here)."""
    import numpy as np

    from causalrec.evaluation import metrics as M
    from causalrec.evaluation.job import ips_population

    rng = np.random.default_rng(7)
    n_u, n_i = 100, 100
    u, i = np.divmod(np.arange(n_u * n_i), n_i)
    p = rng.uniform(0.2, 0.9, n_u * n_i)
    label = rng.integers(0, 3, n_u * n_i).astype(float)  # prediction 0: squared error label^2, mean 5/3
    observed = rng.random(n_u * n_i) < p
    split = np.where(rng.random(n_u * n_i) < 0.25, "test", np.where(rng.random(n_u * n_i) < 0.1, "valid", "train"))
    te = spark.createDataFrame(pd.DataFrame({
        "user_id": [f"u{x}" for x in u], "item_id": [f"i{x}" for x in i], "observed": observed.astype(int),
        "is_mcar": False, "split": split, "label": label, "prediction": 0.0, "exposure_propensity": p}))
    n = ips_population(te)
    f = ((split == "test") & observed).sum() / observed.sum()
    assert n == pytest.approx(n_u * n_i * f)
    test = te.where("split = 'test' AND observed = 1")
    mse = M.rating_metrics(test, col_rating="label", col_propensity="exposure_propensity", weighting="ips",
                           population_size=n)["mse"]
    truth = float(np.mean(label ** 2))
    assert mse.ci_low < truth < mse.ci_high and mse.value == pytest.approx(truth, rel=0.1)
    assert ips_population(te.where("split != 'test'")) is None  # no observed test rows: nothing to speak for


def test_logged_effects_come_from_the_test_split_only(spark):
    """Effects estimated from every split graded a ranking on the outcomes its model was fitted to."""
    from causalrec.evaluation.job import held_out_effects

    rows = [("train", "u1", "i1", 1, 1.0, 0.5), ("train", "u1", "i1", 0, 0.0, 0.5),
            ("test", "u1", "i1", 1, 0.0, 0.5), ("test", "u1", "i1", 0, 1.0, 0.5),
            ("train", "u2", "i2", 1, 1.0, 0.5)]
    te = spark.createDataFrame(rows, "split string, user_id string, item_id string, treated int, outcome double, "
                                     "treatment_propensity double")
    got = {(r["user_id"], r["item_id"]): r["effect"] for r in held_out_effects(te, 0.01).collect()}
    assert got == {("u1", "i1"): pytest.approx((0.0 / 0.5 - 1.0 / 0.5) / 2)}  # test rows: -1; all rows: 0
    assert held_out_effects(te.where("split = 'train'"), 0.01) is None


def test_unscored_test_pairs_count_as_misses_and_scale_the_ips_population(ctx):
    """Predictions from the scores table (no loadable checkpoint) cover 60% of the MNAR test pairs. The
    unscored relevant items are misses (an inner join dropped them from the truth: recall 1.0 for every
    user), and the IPS rating errors, summed over the scored rows, speak for 60% of the population (the
    whole population made the IPS MSE 0.6 for an error of 1 on every row)."""
    from causalrec import schemas as S
    from causalrec.evaluation import job

    spark, store = ctx.spark, ctx.store
    # 5 users x 4 items, all rated 4 (relevant) in the test split, every pair observed with propensity 1
    te = pd.DataFrame([{"example_id": f"e{u}_{i}", "split": "test", "user_id": f"u{u}", "item_id": f"i{i}",
                        "user_idx": u, "item_idx": i, "observed": 1, "label": 4.0, "outcome": 1.0, "is_mcar": False,
                        "exposure_propensity": 1.0} for u in range(5) for i in range(4)])
    store.write(spark.createDataFrame(te), "training_examples", mode="overwrite", spec=S.TRAINING_EXAMPLES)
    # scored: i0 and i1 for everyone, i2 for u0 and u1 (12 of 20 pairs), each predicting 3.0 (error 1)
    now = pd.Timestamp("2026-01-01", tz="UTC")
    scored = [(u, i) for u in range(5) for i in range(2)] + [(0, 2), (1, 2)]
    scores = pd.DataFrame([{"user_id": f"u{u}", "item_id": f"i{i}", "relevance": 3.0, "uplift": None,
                            "uplift_se": None, "model_version": "m1", "scored_at": now} for u, i in scored])
    store.write(spark.createDataFrame(scores, S.SCORES.spark_schema()), "scores", mode="overwrite", spec=S.SCORES)
    ctx.cfg.evaluation.k = [10]
    assert job.run(ctx)["models"] == ["scores"]
    m = store.read("metrics").toPandas()
    m = m[m.model == "scores"].set_index(["metric", "slice"])
    assert "60% of test pairs" in m.loc[("mse", "mnar_test"), "details_json"]
    assert m.loc[("mse", "mnar_test"), "value"] == pytest.approx(1.0)
    assert m.loc[("mse", "mnar_test_ips"), "value"] == pytest.approx(1.0)
    # recall@10: u0, u1 found 3 of their 4 relevant items, u2-u4 2 of 4
    assert m.loc[("recall", "mnar_test"), "value"] == pytest.approx((2 * 0.75 + 3 * 0.5) / 5)
