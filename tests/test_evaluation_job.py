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
