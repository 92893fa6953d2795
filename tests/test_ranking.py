"""Ranking policies on simulated data with known potential outcomes, fair re-ranking,
and explanations that carry the numbers."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from causalrec.ranking import fair_rerank, group_targets, minmax, policy_score, top_k


# --------------------------------------------------------------------------- pure functions


def test_minmax():
    np.testing.assert_allclose(minmax([2.0, 4.0, np.nan, 3.0]), [0.0, 1.0, 0.0, 0.5])


def test_summarise_gini_pads_the_catalogue_and_shares_leave_out_ungrouped_items(ctx, spark):
    """ranking_summary's Gini is over recommendation counts per item with the catalogue's unrecommended
    items at zero (the sorted-array definition), computed in Spark; group shares are of all slots."""
    from causalrec.ranking import summarise

    rows = [("base", "u1", "a", "head", 1.0, False), ("base", "u2", "a", "head", 1.0, False),
            ("base", "u3", "a", "head", 0.5, False), ("base", "u1", "b", "tail", 0.5, False),
            ("policy", "u1", "a", "head", 1.0, False), ("policy", "u2", "b", "tail", 0.5, True),
            ("policy", "u3", "c", None, 0.25, True), ("policy", "u1", "b", "tail", 0.5, False)]
    result = spark.createDataFrame(rows, "kind string, user_id string, item_id string, `group` string, "
                                         "relevance double, fairness_boosted boolean")

    def ref(counts, n):
        x = np.sort(np.concatenate([np.zeros(n - len(counts)), counts]))
        return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean()))

    out = summarise(result, 5, "fair", ctx.cfg)
    assert out["gini_before"] == pytest.approx(ref([3, 1], 5)) and out["gini_after"] == pytest.approx(ref([1, 2, 1], 5))
    assert json.loads(out["group_exposure_before"]) == {"head": 0.75, "tail": 0.25}
    assert json.loads(out["group_exposure_after"]) == {"head": 0.25, "tail": 0.5}  # c has no group
    assert (out["n_users"], out["n_boosted"]) == (3, 2)
    assert out["relevance_cost"] == pytest.approx(1 - 2.25 / 3.0)
    assert summarise(result, None, "fair", ctx.cfg)["gini_before"] == pytest.approx(ref([3, 1], 2))


def test_fair_rerank_strength_zero_is_unconstrained_and_one_meets_targets():
    rng = np.random.default_rng(0)
    base = np.sort(rng.random(30))[::-1]
    groups = np.array(["head"] * 10 + ["mid"] * 10 + ["tail"] * 10)  # head scores highest
    ids = [f"i{j:02d}" for j in range(30)]
    targets = group_targets({"head": 2, "mid": 3, "tail": 5}, "catalogue")
    assert targets == pytest.approx({"head": 0.2, "mid": 0.3, "tail": 0.5})
    np.testing.assert_array_equal(fair_rerank(base, groups, 10, 0.0, targets, ids), top_k(base, 10, ids))
    full = fair_rerank(base, groups, 10, 1.0, targets, ids)
    counts = pd.Series(groups[full]).value_counts().to_dict()
    assert counts == {"head": 2, "mid": 3, "tail": 5}
    # within a group the higher base score still goes first
    tail_picks = [j for j in full if groups[j] == "tail"]
    assert tail_picks == sorted(tail_picks)
    half = fair_rerank(base, groups, 10, 0.5, targets, ids)
    n_head = lambda sel: int((groups[sel] == "head").sum())  # noqa: E731
    assert n_head(full) <= n_head(half) <= n_head(top_k(base, 10, ids))
    assert len(set(half)) == 10


def test_policy_score_blend_and_uplift():
    rel, upl = np.array([0.9, 0.5, 0.1]), np.array([-0.1, 0.2, 0.05])
    np.testing.assert_allclose(policy_score(rel, upl, "blend", 0.0), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(policy_score(rel, upl, "blend", 1.0), minmax(upl))
    # a user without effect estimates is ranked, not an error: the unknown candidates go last, by relevance
    up = np.array([np.nan, 0.1, np.nan, 0.3])
    rel4 = np.array([0.2, 0.0, 0.9, 0.5])
    np.testing.assert_array_equal(top_k(policy_score(rel4, up, "uplift"), 4, list("abcd"), rel4), [3, 1, 2, 0])


def test_blend_reads_a_missing_effect_as_no_effect():
    """Min-max alone put a missing effect level with the user's lowest known one (a known harmful item
    beat an unknown one of equal relevance) and a lone known effect at 0.5 whatever its sign."""
    from causalrec.ranking import effect_scale

    ids = list("ABC")
    rel = np.array([0.5, 0.5])
    # A harmful, B unknown, equal relevance: B first
    assert list(top_k(policy_score(rel, np.array([-0.2, np.nan]), "blend", 0.5), 2, ids[:2], rel)) == [1, 0]
    # A known positive beats B unknown at equal relevance
    assert list(top_k(policy_score(rel, np.array([0.2, np.nan]), "blend", 0.5), 2, ids[:2], rel)) == [0, 1]
    # weight 1: A +0.30 > C +0.10 > B unknown, whatever the relevance says
    rel3 = np.array([0.1, 0.9, 0.5])
    sc = policy_score(rel3, np.array([0.3, np.nan, 0.1]), "blend", 1.0)
    assert list(top_k(sc, 3, ids, rel3)) == [0, 2, 1]
    np.testing.assert_allclose(effect_scale([0.3, np.nan, 0.1]), [1.0, 0.0, 1 / 3])
    np.testing.assert_allclose(effect_scale([-0.4, np.nan, 0.1]), [0.0, 0.8, 1.0])  # unknown at 0's place
    np.testing.assert_allclose(effect_scale([0.0, np.nan]), [0.5, 0.5])
    # all known or none known: plain min-max, as before
    np.testing.assert_allclose(effect_scale([0.3, 0.1, 0.2]), minmax([0.3, 0.1, 0.2]))
    np.testing.assert_allclose(effect_scale([np.nan, np.nan]), [0.0, 0.0])


def test_fair_rerank_ties_go_to_the_better_item_and_unknown_scores_stay_last():
    # strength 1: every item of a group has the same adjusted score; the best of the group must win
    base, groups, ids = np.array([0.9, 0.1, 0.8, 0.2]), ["head", "head", "tail", "tail"], ["z", "a", "y", "b"]
    picked = fair_rerank(base, groups, 2, 1.0, {"head": 0.5, "tail": 0.5}, ids)
    assert sorted(ids[j] for j in picked) == ["y", "z"]
    # strength 0 with a candidate lacking a base score (uplift policy, no estimate): exactly top_k
    upl = policy_score(np.zeros(3), np.array([0.1, np.nan, 0.3]), "uplift")
    ids3 = ["b", "a", "c"]
    np.testing.assert_array_equal(fair_rerank(upl, ["g"] * 3, 2, 0.0, {"g": 1.0}, ids3), top_k(upl, 2, ids3))
    np.testing.assert_array_equal(top_k(upl, 2, ids3), [2, 0])


def test_effect_policies_are_refused_only_when_no_score_has_an_effect(spark):
    from causalrec.ranking import check_effects_available

    none = spark.createDataFrame([("u1", "i1", 0.5, None), ("u2", "i2", 0.4, float("nan"))],
                                 "user_id string, item_id string, relevance double, uplift double")
    with pytest.raises(ValueError, match="ranking.policy='uplift' but scores.uplift is null"):
        check_effects_available(none, "uplift", "relevance")
    with pytest.raises(ValueError, match="fair_base_policy='uplift'"):
        check_effects_available(none, "fair", "uplift")
    check_effects_available(none, "relevance", "uplift")  # relevance needs no effect
    check_effects_available(none, "fair", "relevance")
    some = none.union(spark.createDataFrame([("u3", "i1", 0.1, 0.2)], none.schema))
    check_effects_available(some, "uplift", "relevance")  # u1 and u2 lack estimates: ranked, not refused


# --------------------------------------------------------------------------- simulated world


@pytest.fixture(scope="module")
def sim_world(spark):
    from causalrec.config import SimulatorConfig
    from causalrec.simulator import simulate

    sc = SimulatorConfig(n_users=120, n_items=60, n_events=6000, ate=0.05, effect_heterogeneity=1.0,
                         mcar_share=0.05, n_days=5, partitions=2)
    t = simulate(spark, sc, seed=7)
    truth = t["ground_truth"].select("user_id", "item_id", "p_y0", "p_y1").toPandas()
    items = t["items"].toPandas()
    return truth, items


def _write_inputs(spark, store, truth: pd.DataFrame, items: pd.DataFrame, with_groups=True):
    from causalrec.schemas import ITEMS, SCORES

    sc = truth.assign(relevance=truth["p_y1"], uplift=truth["p_y1"] - truth["p_y0"], uplift_se=0.01,
                      model_version="truth", scored_at=pd.Timestamp("2024-01-01", tz="UTC"))
    store.write(spark.createDataFrame(sc[SCORES.names]), "scores", mode="overwrite", spec=SCORES)
    store.write(spark.createDataFrame(items), "items", mode="overwrite", spec=ITEMS)
    if with_groups:
        # popularity groups as logged data would produce them: the items a relevance ranker
        # shows most (highest mean predicted relevance) become the head
        pop = truth.groupby("item_id")["p_y1"].mean().sort_values(ascending=False)
        n = len(pop)
        grp = ["head" if r < 0.2 * n else ("mid" if r < 0.5 * n else "tail") for r in range(n)]
        feats = pd.DataFrame({"item_id": pop.index, "popularity_group": grp})
        store.write(spark.createDataFrame(feats), "item_features", mode="overwrite")


def _recs(store):
    return store.read_arrow("recommendations").to_pandas()


def _causal_metrics(recs: pd.DataFrame, truth: pd.DataFrame):
    m = recs.merge(truth, on=["user_id", "item_id"])
    assert len(m) == len(recs)
    effect = m["p_y1"] - m["p_y0"]
    return float((effect > 0).mean()), float(effect.sum())


def test_uplift_ranking_beats_relevance_on_true_effects(ctx, spark, sim_world):
    from causalrec.ranking import run

    truth, items = sim_world
    _write_inputs(spark, ctx.store, truth, items)
    ctx.cfg.ranking.k = 10
    res = {}
    for policy in ("relevance", "uplift", "blend"):
        ctx.cfg.ranking.policy = policy
        out = run(ctx)
        recs = _recs(ctx.store)
        assert (recs["policy"] == policy).all()
        assert recs.groupby("user_id")["rank"].apply(lambda r: sorted(r) == list(range(1, len(r) + 1))).all()
        assert recs.groupby("user_id").size().max() == 10
        assert not recs.duplicated(["user_id", "item_id"]).any()
        res[policy] = _causal_metrics(recs, truth)
        res[policy + "_out"] = out
    prec_rel, up_rel = res["relevance"]
    prec_upl, up_upl = res["uplift"]
    prec_bl, up_bl = res["blend"]
    assert prec_upl > prec_rel + 0.05, res
    assert up_upl > up_rel * 1.2, res
    assert up_rel <= up_bl <= up_upl, res
    # relevance cost of the uplift policy against the relevance ranking is reported and positive
    assert res["uplift_out"]["relevance_cost"] > 0
    assert res["relevance_out"]["relevance_cost"] == pytest.approx(0.0)


def test_fair_reranking_reduces_gini_at_reported_cost(ctx, spark, sim_world):
    from causalrec.ranking import run

    truth, items = sim_world
    _write_inputs(spark, ctx.store, truth, items)
    ctx.cfg.ranking.k = 10
    ctx.cfg.ranking.policy = "fair"
    ctx.cfg.ranking.fair_base_policy = "relevance"
    summaries = {}
    for s in (0.0, 0.8):
        ctx.cfg.ranking.fairness_strength = s
        summaries[s] = run(ctx)
        recs = _recs(ctx.store)
        if s == 0.0:
            assert not recs["fairness_boosted"].any()
    s0, s8 = summaries[0.0], summaries[0.8]
    assert s0["gini_after"] == pytest.approx(s0["gini_before"]) and s0["relevance_cost"] == pytest.approx(0.0)
    assert s8["gini_after"] < s8["gini_before"] - 0.02, s8
    assert s8["relevance_cost"] > 0 and s8["n_boosted"] > 0
    before, after = json.loads(s8["group_exposure_before"]), json.loads(s8["group_exposure_after"])
    assert after.get("tail", 0) > before.get("tail", 0)
    recs = _recs(ctx.store)
    boosted = recs[recs["fairness_boosted"]]
    assert len(boosted) == s8["n_boosted"]
    assert boosted["explanation"].str.contains("exposure-fairness re-ranking \\(popularity_group = ").all()
    hist = ctx.store.read_arrow("ranking_summary").to_pandas()
    assert len(hist) == 2 and hist["gini_after"].min() == pytest.approx(s8["gini_after"])


# --------------------------------------------------------------------------- explanations


def test_explanations_carry_the_numbers(ctx, spark):
    from causalrec.ranking import run
    from causalrec.schemas import ITEM_EMBEDDINGS, ITEMS, SCORES

    store = ctx.store
    titles = {"a": "red wool coat", "b": "blue denim jacket", "c": "red wool scarf", "d": "green rain boots"}
    vec = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0.9, 0.1, 0], "d": [0, 0.2, 1]}
    store.write(spark.createDataFrame([(i, None, "x", t, 1.0) for i, t in titles.items()],
                                      ITEMS.spark_schema()), "items", mode="overwrite", spec=ITEMS)
    store.write(spark.createDataFrame([(i, [float(v) for v in vec[i]], None, "test") for i in titles],
                                      ITEM_EMBEDDINGS.spark_schema()), "item_embeddings", mode="overwrite")
    # the history the model was served (most recent first), as the features stage writes it
    store.write(spark.createDataFrame([("u", ["b", "a"])], "user_id string, history_item_ids array<string>"),
                "user_features", mode="overwrite")
    ts = pd.Timestamp("2024-01-02", tz="UTC")
    sc = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["c", "d"], "relevance": [0.42, 0.30],
                       "uplift": [0.031, -0.012], "uplift_se": [0.008, None], "model_version": "m1",
                       "scored_at": ts})
    store.write(spark.createDataFrame(sc[SCORES.names]), "scores", mode="overwrite", spec=SCORES)
    ctx.cfg.train.task = "click"  # m1 has no train run: its units are the configured task's
    ctx.cfg.ranking.policy = "uplift"
    ctx.cfg.ranking.k = 2
    run(ctx)
    recs = _recs(store).set_index("item_id")
    c, d = recs.loc["c", "explanation"], recs.loc["d", "explanation"]
    # lift 0.031 with se 0.008 -> 3.1 points, interval 3.1 +- 1.96 * 0.8 = +1.5 to +4.7
    assert "raise the chance you respond by 3.1 percentage points" in c
    assert "(95% interval +1.5 to +4.7)" in c
    # the most responsible history item is the red wool coat (cosine 0.99), named by title
    m = re.search(r"most similar to 'red wool coat' \(similarity (0\.\d\d)\)", c)
    assert m and float(m.group(1)) == pytest.approx(0.9 / np.sqrt(0.82), abs=0.01)
    assert "'blue denim jacket'" not in c  # cosine 0.11: below the similarity floor, not named
    assert "Predicted response probability 42.0%; rank 1 under the uplift policy." in c
    # negative lift is stated as such, with no interval when there is no standard error
    assert "lower the chance you respond by 1.2 percentage points." in d and "interval" not in d
    assert recs.loc["c", "rank"] == 1 and not recs["fairness_boosted"].any()


def test_rank_all_one_slot_per_item_with_real_uplift_effects(ctx, spark):
    """uplift_effects holds overall/item/segment rows x (ips, dr): joining them all gave an item
    several slots of one top-K."""
    from test_scoring import _uplift_effects

    from causalrec.ranking import rank_all

    scores = spark.createDataFrame([("u", "a", 0.5, 0.09), ("u", "b", 0.5, 0.08), ("u", "c", 0.5, 0.01)],
                                   "user_id string, item_id string, relevance double, uplift double").selectExpr(
        "*", "cast(null as double) as uplift_se", "'m1' as model_version")
    ctx.cfg.ranking.k = 3
    ctx.cfg.ranking.policy = "uplift"
    res, _, _ = rank_all(ctx, scores, None, _uplift_effects(spark, ["a", "b"]), None)
    pol = res.where("kind = 'policy'").toPandas().sort_values("rank")
    assert pol["item_id"].tolist() == ["a", "b", "c"]
    base = res.where("kind = 'base'").toPandas()
    assert not base.duplicated(["user_id", "item_id"]).any()
    # the item's own DR estimate (a: 0.03 [0.01, 0.05]) is quoted as such, not as an interval of 9.0 points
    a = pol.set_index("item_id").loc["a", "explanation"]
    assert "by 9.0 percentage points." in a and "item's effect of being recommended is estimated at +3.0" in a


def _quoted(explanation: str) -> list[tuple[float, float, float]]:
    """(number, low, high) for every '95% interval' in an explanation, with the number it is attached to."""
    out = []
    for sentence in explanation.split(". "):
        m = re.search(r"(raise|lower)[^.]* by (\d+\.\d) percentage points \(95% interval ([+-]\d+\.\d) to "
                      r"([+-]\d+\.\d)", sentence)
        if m:
            x = float(m.group(2)) * (1 if m.group(1) == "raise" else -1)
            out.append((x, float(m.group(3)), float(m.group(4))))
            continue
        m = re.search(r"estimated at ([+-]\d+\.\d) percentage points \(95% interval ([+-]\d+\.\d) to "
                      r"([+-]\d+\.\d)", sentence)
        if m:
            assert "item's effect" in sentence and "Averaged over the users" in sentence, sentence
            out.append(tuple(float(g) for g in m.groups()))
            continue
        assert "interval" not in sentence, sentence  # an interval with no number of its own
    return out


@pytest.mark.parametrize("se", [np.nan, 0.01])
def test_explanation_quotes_an_interval_only_for_its_own_number(se):
    """A model's per-pair uplift (uplift_se null, as ScoreBatch writes for uplift heads) must not be
    given the item-level interval of another estimate: 'raise by 20.0 points (95% interval -5.0 to -1.0)'."""
    from causalrec.ranking import HISTORY_SCHEMA, explain_user, rank_user

    pdf = pd.DataFrame({"user_id": ["u"], "item_id": ["a"], "relevance": [0.4], "uplift": [0.20], "uplift_se": [se],
                        "model_version": ["m"], "item_effect": [-0.03], "item_se": [0.02 / 1.959964]})
    pdf = pdf.assign(ci_low=-0.05, ci_high=-0.01)  # as the item interval was joined before
    ranked = rank_user(pdf, policy="uplift", k=1, blend_weight=0.5, fair_base="relevance", strength=0.5, targets={})
    no_history = pd.DataFrame(columns=[c.split()[0] for c in HISTORY_SCHEMA.split(", ")])
    out = explain_user(ranked.assign(item_vec=None), no_history, attribute="popularity_group")
    text = out.loc[out.kind == "policy", "explanation"].item()
    quoted = _quoted(text)
    assert quoted, text
    for x, lo, hi in quoted:
        assert lo <= x <= hi, text
    if np.isnan(se):  # no interval of its own: the item's average is quoted beside it, as that
        assert "by 20.0 percentage points." in text
        assert quoted == [(-3.0, -5.0, -1.0)]
    else:
        assert quoted == [(20.0, 18.0, 22.0)] and "item's effect" not in text


def _train_runs(spark, store, folder, model_configs: dict) -> None:
    """train_runs rows (model_version -> model config) whose checkpoints hold only the model config:
    all the recommend stage reads of them."""
    import datetime as dt

    from causalrec.schemas import TRAIN_RUNS
    from causalrec.train.checkpoint import MODEL_CONFIG

    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for version, mc in model_configs.items():
        ckpt = folder / version
        ckpt.mkdir(parents=True)
        (ckpt / MODEL_CONFIG).write_text(json.dumps(mc))
        rows.append((version, mc["model"], "uplift" if mc["uplift"] else "ips", version, str(ckpt), None, None, None,
                     now))
    store.write(spark.createDataFrame(rows, TRAIN_RUNS.spark_schema()), "train_runs", mode="overwrite", spec=TRAIN_RUNS)


def test_explanation_units_follow_the_model_task_and_the_uplift_source(ctx, spark, tmp_path):
    """Units were guessed from max(relevance) over every user: one rating above 1 anywhere turned every
    probability into "rating points", and the uplift_effects prior (a change in click probability) was
    quoted in rating points whenever relevance was a rating."""
    from test_scoring import _uplift_effects

    from causalrec.ranking import rank_all

    _train_runs(spark, ctx.store, tmp_path / "ckpt", {
        "rating_prior": {"model": "mf", "task": "rating", "uplift": False},  # uplift comes from the prior
        "rating_head": {"model": "mf", "task": "rating", "uplift": True},  # its own heads: rating points
        "click": {"model": "mf", "task": "click", "uplift": False},
    })
    scores = spark.createDataFrame([
        ("u_rating_low", "a", 0.80, 0.05, 0.01, "rating_prior"),  # a rating regression can predict below 1
        ("u_head", "a", 4.20, 0.30, None, "rating_head"),
        ("u_click", "b", 0.70, 0.02, 0.01, "click"),
        ("u_custom", "b", 0.60, 0.02, 0.01, "custom_loader"),  # no train run: train.task / train.objective
    ], "user_id string, item_id string, relevance double, uplift double, uplift_se double, model_version string")
    ctx.cfg.train.task = "click"  # the checkpoints' own task wins over the config for the trained versions
    ctx.cfg.ranking.policy = "uplift"
    ctx.cfg.ranking.k = 1
    res, _, _ = rank_all(ctx, scores, None, _uplift_effects(spark, ["a", "b"]), None)
    text = res.where("kind = 'policy'").toPandas().set_index("user_id")["explanation"]
    low = text["u_rating_low"]
    assert "Predicted rating 0.80;" in low, low
    assert "raise the chance you respond by 5.0 percentage points (95% interval +3.0 to +7.0)" in low, low
    head = text["u_head"]
    assert "raise your rating by 0.30 rating points." in head and "Predicted rating 4.20;" in head, head
    # the item's average effect beside it comes from uplift_effects: a probability change, whatever the task
    assert "item's effect of being recommended is estimated at +3.0 percentage points (95% interval +1.0 to +5.0)" \
        in head, head
    for user, rel in (("u_click", "70.0%"), ("u_custom", "60.0%")):
        assert f"Predicted response probability {rel};" in text[user], text[user]
        assert "raise the chance you respond by 2.0 percentage points" in text[user], text[user]
    assert "rating points" not in low + text["u_click"] + text["u_custom"]
    # uplift_effects keeps the bounds of its own run's ope.alpha (0.05 here); at this run's 0.10 the item's
    # interval is rebuilt from its se, not quoted at 95% under a "90%" label
    ctx.cfg.ope.alpha = 0.10
    res, _, _ = rank_all(ctx, scores, None, _uplift_effects(spark, ["a", "b"]), None)
    head = res.where("kind = 'policy' AND user_id = 'u_head'").toPandas()["explanation"].item()
    assert "estimated at +3.0 percentage points (90% interval +1.4 to +4.6)" in head, head


def test_explanation_history_is_the_history_the_model_was_served(ctx, spark):
    """The explanation named the user's last liked items from all events, while scoring fed the model
    user_features.history_item_ids cut to features.history_length (interactions of any kind): it could
    cite an item the model never saw."""
    from causalrec.features.user import user_history
    from causalrec.ranking import load_history, rank_all

    store = ctx.store
    t = lambda day: pd.Timestamp(f"2024-01-{day:02d}", tz="UTC")  # noqa: E731
    # liked A long ago, then rated B and C low: the model's two-item window is (C, B)
    events = spark.createDataFrame(pd.DataFrame(
        [("e1", "u", "A", t(1), "rating", 5.0), ("e2", "u", "B", t(2), "rating", 1.0),
         ("e3", "u", "C", t(3), "rating", 2.0)],
        columns=["event_id", "user_id", "item_id", "event_time", "event_type", "value"]))
    store.write(events, "events", mode="overwrite")
    ctx.cfg.training_set.positive_threshold = 4.0
    # the features stage ran with a longer window than scoring now serves (history_length 3 -> 2)
    store.write(user_history(events, "2024-02-01", 3), "user_features", mode="overwrite")
    ctx.cfg.features.history_length = 2
    hist = load_history(ctx).toPandas().set_index("user_id")["history"]
    assert list(hist["u"]) == ["C", "B"]
    titles = {"A": "Alpha jacket", "B": "Beta boots", "C": "Gamma hat", "D": "Delta coat"}
    vec = {"A": [1, 0, 0], "B": [0, 1, 0], "C": [0, 0, 1], "D": [0.95, 0, 0.31]}  # D: close to A, near C
    store.write(spark.createDataFrame(pd.DataFrame({"item_id": list(titles), "text": list(titles.values())})),
                "items", mode="overwrite")
    store.write(spark.createDataFrame([(i, [float(v) for v in vec[i]]) for i in vec],
                                      "item_id string, embedding array<float>"), "item_embeddings", mode="overwrite")
    scores = spark.createDataFrame([("u", "D", 0.8, 0.05, 0.01, "m1")], "user_id string, item_id string, "
                                   "relevance double, uplift double, uplift_se double, model_version string")
    ctx.cfg.ranking.policy, ctx.cfg.ranking.k = "relevance", 1
    res, _, _ = rank_all(ctx, scores, None, None, load_history(ctx))
    text = res.where("kind = 'policy'").first()["explanation"]
    assert "most similar to 'Gamma hat' (similarity 0.31) from your recent history" in text, text
    assert "Alpha jacket" not in text, text


def test_explanation_history_is_cut_to_the_trained_history_length(ctx, spark, tmp_path):
    """Scoring cuts a two-tower's history to its checkpoint's history_len, not to features.history_length
    (scoring.run): an explanation must cite only those items, else it names items the model never read."""
    from causalrec.ranking import load_history, served_history_length

    store = ctx.store
    store.write(spark.createDataFrame([("u", ["C", "X", "B", "A"])], "user_id string, history_item_ids array<string>"),
                "user_features")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model_config.json").write_text(json.dumps({"model": "two_tower", "history_len": 2}))
    store.write(spark.createDataFrame([("m1", str(ckpt)), ("mf", str(tmp_path / "gone"))],
                                      "model_version string, checkpoint_path string"), "train_runs", mode="overwrite")
    ctx.cfg.features.history_length = 3
    assert served_history_length(ctx, ["m1"]) == 2
    assert list(load_history(ctx, None, 2).first()["history"]) == ["C", "X"]
    # no trained length to follow (an unreadable checkpoint, several versions): features.history_length
    assert served_history_length(ctx, ["mf"]) == 3
    assert served_history_length(ctx, ["m1", "mf"]) == 3
    (ckpt / "model_config.json").write_text(json.dumps({"model": "mf"}))
    assert served_history_length(ctx, ["m1"]) == 3
    assert list(load_history(ctx).first()["history"]) == ["C", "X", "B"]


def test_explanation_history_leaves_out_items_the_models_id_index_lacks(ctx, spark, tmp_path):
    """Scoring serves the history less the items the model's id_index (at its trained version) has no row for,
    then cuts it to features.history_length: the explanation's history is that list, so an unindexed item is
    never cited and the next indexed one takes its place."""
    import json

    from causalrec.ranking import load_history, served_history_items

    store = ctx.store
    store.write(spark.createDataFrame([("u", ["C", "X", "B", "A"]), ("v", ["X"])],
                                      "user_id string, history_item_ids array<string>"), "user_features")
    ids = lambda items: spark.createDataFrame([("item", i, n) for n, i in enumerate(items)] + [("user", "u", 0)],  # noqa: E731
                                              "kind string, id string, idx int")
    store.write(ids(["A", "B", "C"]), "id_index", mode="overwrite")  # version 0: what the model was trained with
    store.write(ids(["A", "B", "C", "X"]), "id_index", mode="overwrite")  # X indexed since
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"id_index_version": 0}))
    store.write(spark.createDataFrame([("m1", str(ckpt))], "model_version string, checkpoint_path string"),
                "train_runs", mode="overwrite")
    ctx.cfg.features.history_length = 2
    served = served_history_items(ctx, ["m1"])
    assert sorted(r["item_id"] for r in served.collect()) == ["A", "B", "C"]
    hist = {r["user_id"]: list(r["history"]) for r in load_history(ctx, served).collect()}
    assert hist == {"u": ["C", "B"]}  # X left out, B moves up; v has no indexed history item
    # a version without a train run, or whose id_index version is gone: the current id_index (the scores stand)
    assert sorted(r["item_id"] for r in served_history_items(ctx, ["other"]).collect()) == ["A", "B", "C", "X"]
    assert list(load_history(ctx).where("user_id = 'u'").first()["history"]) == ["C", "X"]
    (ckpt / "meta.json").write_text(json.dumps({"id_index_version": 7}))
    assert sorted(r["item_id"] for r in served_history_items(ctx, ["m1"]).collect()) == ["A", "B", "C", "X"]


def test_explanation_never_says_an_item_is_similar_to_itself():
    """With candidates.exclude_consumed=False a consumed item is recommended again; it is in the history
    and was named as the history item "most similar" to itself (similarity 1.00)."""
    from causalrec.ranking import explain_user, rank_user

    emb = {"d": [0.95, 0.0, 0.31], "a": [1.0, 0.0, 0.0]}
    pdf = pd.DataFrame({"user_id": ["u"], "item_id": ["d"], "relevance": [0.9], "uplift": [0.04],
                        "uplift_se": [0.01], "model_version": ["m"]})
    ranked = rank_user(pdf, policy="relevance", k=1, blend_weight=0.5, fair_base="relevance", strength=0.0, targets={})
    history = pd.DataFrame({"user_id": "u", "pos": [0, 1], "item_id": ["d", "a"], "title": ["Delta coat", "Alpha jacket"],
                            "embedding": [emb["d"], emb["a"]]})
    out = explain_user(ranked.assign(item_vec=[emb[i] for i in ranked["item_id"]]), history,
                       attribute="popularity_group")
    text = out.loc[out.kind == "policy", "explanation"].item()
    assert "most similar to 'Alpha jacket' (similarity 0.95) from your recent history" in text, text
    assert "Delta coat" not in text, text


def test_explanation_names_history_items_by_title_or_id_and_only_those_with_a_vector(ctx, spark):
    """The explanation pass joins vectors and titles in Spark (no catalogue shipped with the function): a
    history item without item text is named by its id, one without an embedding cannot be compared and is
    never named, and a user without any history still gets the rest of the explanation."""
    from causalrec.ranking import rank_all

    store = ctx.store
    store.write(spark.createDataFrame([("A", ""), ("B", "Beta boots"), ("D", "Delta coat")], "item_id string, text string"),
                "items", mode="overwrite")
    store.write(spark.createDataFrame([("A", [1.0, 0.0]), ("D", [0.8, 0.6])], "item_id string, embedding array<float>"),
                "item_embeddings", mode="overwrite")
    history = spark.createDataFrame([("u", ["B", "A"])], "user_id string, history array<string>")
    scores = spark.createDataFrame([("u", "D", 0.8, 0.05, 0.01, "m1"), ("v", "D", 0.7, 0.02, None, "m1")],
                                   "user_id string, item_id string, relevance double, uplift double, "
                                   "uplift_se double, model_version string")
    ctx.cfg.ranking.policy, ctx.cfg.ranking.k = "relevance", 1
    res, _, _ = rank_all(ctx, scores, None, None, history)
    text = res.where("kind = 'policy'").toPandas().set_index("user_id")["explanation"]
    assert "most similar to 'A' (similarity 0.80) from your recent history" in text["u"], text["u"]
    assert "Beta boots" not in text["u"]
    assert "most similar" not in text["v"] and "rank 1 under the relevance policy" in text["v"], text["v"]
    assert res.where("kind = 'base'").count() == 2


def test_effects_on_a_summed_value_are_quoted_in_that_value_not_in_percentage_points(ctx, spark, tmp_path):
    """uplift_effects of ope.uplift_outcome_event=purchase whose value is revenue: an effect of +5.83 was
    quoted as "583.1 percentage points" of a response probability, beside the model's own prior lift and
    as the item's average effect. The uplift stage records that its outcome was not 0/1."""
    from test_scoring import _uplift_effects

    from causalrec.ranking import rank_all

    _train_runs(spark, ctx.store, tmp_path / "ckpt", {"prior": {"model": "mf", "task": "click", "uplift": False},
                                                      "head": {"model": "mf", "task": "click", "uplift": True}})
    scores = spark.createDataFrame([("u_prior", "a", 0.4, 5.83, 2.35, "prior"), ("u_head", "a", 0.4, 0.01, None, "head")],
                                   "user_id string, item_id string, relevance double, uplift double, "
                                   "uplift_se double, model_version string")
    ctx.cfg.ranking.policy, ctx.cfg.ranking.k = "relevance", 1
    effects = _uplift_effects(spark, ["a"], dr=5.83, outcome="purchase", binary=False)
    res, _, _ = rank_all(ctx, scores, None, effects, None)
    text = res.where("kind = 'policy'").toPandas().set_index("user_id")["explanation"]
    prior, head = text["u_prior"], text["u_head"]
    assert "raise the expected value of your purchase events by 5.83 (95% interval +1.22 to +10.44)" in prior, prior
    # the model's own head is a click probability; the item's average effect beside it is in purchase value
    assert "raise the chance you respond by 1.0 percentage points." in head, head
    assert "effect of being recommended on the value of purchase events is estimated at +5.83 (95% interval " \
           "+5.81 to +5.85)" in head, head
    assert "583" not in prior + head and "percentage points" not in prior
    # a 0/1 outcome (and a table written before the column existed) stays a probability change
    res, _, _ = rank_all(ctx, scores, None, _uplift_effects(spark, ["a"], dr=0.0583).drop("outcome_binary"), None)
    prior = res.where("kind = 'policy' AND user_id = 'u_prior'").toPandas()["explanation"].item()
    assert "raise the chance you respond by" in prior and "purchase" not in prior, prior


def test_a_lift_that_rounds_to_zero_is_not_quoted_as_zero():
    """-0.0004 read "lower the chance you respond by 0.0 percentage points": a verb of change with no change."""
    from causalrec.explain import explain

    for uplift, verb in ((-0.0004, "lower"), (0.0004, "raise")):
        text = explain(policy="uplift", rank=1, relevance=0.3, uplift=uplift, interval=None, similar=[], boosted=False)
        assert f"{verb} the chance you respond by less than 0.1 percentage points." in text, text
    text = explain(policy="uplift", rank=1, relevance=4.0, uplift=0.001, interval=None, similar=[], boosted=False,
                   probability=False)
    assert "raise your rating by less than 0.01 rating points." in text, text


def test_history_items_sharing_a_title_are_named_once():
    """608 of the 2,900 Coat explanations read "most similar to 'women's jacket, other colour' (similarity
    0.86) and 'women's jacket, other colour' (similarity 0.86)": two items, one title, named twice."""
    from causalrec.explain import most_similar_history

    hist = np.array([[1.0, 0.0], [1.0, 0.01], [0.8, 0.6], [0.0, 1.0]])
    titles = ["women's jacket", "women's jacket", "wool coat", "scarf"]
    got = most_similar_history(np.array([1.0, 0.0]), hist, titles)
    assert [t for t, _ in got] == ["women's jacket", "wool coat"]
    assert got[1][1] == pytest.approx(0.8)


def test_a_whitespace_title_names_the_item_by_id(ctx, spark):
    """An item whose text is only spaces was named '' in the explanation."""
    from causalrec.ranking import rank_all

    store = ctx.store
    store.write(spark.createDataFrame([("A", "   "), ("D", "Delta coat")], "item_id string, text string"),
                "items", mode="overwrite")
    store.write(spark.createDataFrame([("A", [1.0, 0.0]), ("D", [0.8, 0.6])], "item_id string, embedding array<float>"),
                "item_embeddings", mode="overwrite")
    history = spark.createDataFrame([("u", ["A"])], "user_id string, history array<string>")
    scores = spark.createDataFrame([("u", "D", 0.8, 0.05, 0.01, "m1")], "user_id string, item_id string, "
                                   "relevance double, uplift double, uplift_se double, model_version string")
    ctx.cfg.ranking.policy, ctx.cfg.ranking.k = "relevance", 1
    res, _, _ = rank_all(ctx, scores, None, None, history)
    text = res.where("kind = 'policy'").first()["explanation"]
    assert "most similar to 'A' (similarity 0.80)" in text, text
