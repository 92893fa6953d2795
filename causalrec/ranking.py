"""Ranking policies: scores -> top-K ``recommendations`` per user, with explanations.

Policies (``ranking.policy``):

* ``relevance``: predicted outcome; what correlational recommenders do.
* ``uplift``: the estimated causal effect of recommending (Radcliffe & Surry 2011;
  Sato et al., RecSys 2019 "Uplift-based evaluation and optimization of
  recommenders"): recommend what changes behaviour, not what would happen anyway.
* ``blend``: ``(1 - w) * norm(relevance) + w * norm(uplift)``, each min-max
  normalised within the user's candidates, ``w = ranking.blend_weight``.
* ``fair``: greedy re-ranking of ``ranking.fair_base_policy``'s score that pulls each
  group of ``ranking.fairness_attribute`` (default ``popularity_group``: head / mid /
  tail) towards a target share of the K slots (``catalogue``: the group's share of
  items, i.e. equal exposure per item in expectation; ``equal``: 1/G per group).
  At each slot the candidate maximising
  ``(1 - s) * norm(base) + s * (target_g - share_g so far)`` is taken, ``s =
  ranking.fairness_strength``: 0 is the unconstrained ranking, 1 fills slots by
  group deficit alone (cf. the FA*IR / exposure-fair re-rankers of Zehlike et al.
  2017 and Singh & Joachims 2018, simplified to a per-user greedy pass).

Each user's candidate list is bounded, so ranking runs per user in pandas inside
``applyInPandas`` on the executors, never on the driver; the explanations follow in a
second per-user pass (the picks cogrouped with the user's served history items), so only
the picks' and the history items' text vectors travel, never the catalogue's. The job also writes
``ranking_summary``: the relevance the policy costs against the unconstrained
top-K of its base score, and the Gini of recommendation counts across catalogue items
before/after (plain slot counts; the evaluate stage's ``exposure_gini`` is position-discounted).
"""
from __future__ import annotations

import json
import logging
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from causalrec.explain import PROBABILITY, RATING, explain, lift_interval, most_similar_history
from causalrec.uplift import EffectScale

log = logging.getLogger(__name__)

POLICIES = ("relevance", "uplift", "blend", "fair")


# --------------------------------------------------------------------------- pure functions


def minmax(x) -> np.ndarray:
    """Scale to [0, 1] within the list; constant or missing values map to 0.5 / 0."""
    a = np.asarray(x, dtype="float64")
    ok = np.isfinite(a)
    out = np.zeros_like(a)
    if not ok.any():
        return out
    lo, hi = a[ok].min(), a[ok].max()
    out[ok] = 0.5 if hi == lo else (a[ok] - lo) / (hi - lo)
    return out


def effect_scale(x) -> np.ndarray:
    """Effects scaled to [0, 1] within the list, a missing estimate read as no effect (0).

    All known: :func:`minmax`. With some missing, the scale spans 0 as well and a missing one
    sits at 0's place: below every known positive effect, above every known harmful one. (Min-max
    alone put a missing effect level with the list's lowest known one, and a lone known effect at
    0.5 whatever its sign.)"""
    a = np.asarray(x, dtype="float64")
    ok = np.isfinite(a)
    if ok.all() or not ok.any():
        return minmax(a)
    lo, hi = min(a[ok].min(), 0.0), max(a[ok].max(), 0.0)
    if hi == lo:  # every known effect is 0: nothing tells the candidates apart
        return np.full(a.shape, 0.5)
    return (np.where(ok, a, 0.0) - lo) / (hi - lo)


def policy_score(relevance, uplift, policy: str, blend_weight: float = 0.5) -> np.ndarray:
    """The ranking score of one user's candidates under ``policy`` (fair -> its base).

    ``uplift``: ranks by the estimate alone, so a candidate without one scores -inf (ranked after
    every estimated one, by relevance among themselves; :func:`rank_all` refuses the policy when
    no candidate has one). ``blend``: relevance and effect each min-max scaled within the list
    and mixed by ``blend_weight``; a missing effect counts as none (:func:`effect_scale`), so
    relevance still places the candidate."""
    rel = np.asarray(relevance, dtype="float64")
    upl = np.asarray(uplift, dtype="float64")
    if policy == "relevance":
        return rel
    if policy == "uplift":
        return np.where(np.isfinite(upl), upl, -np.inf)
    if policy == "blend":
        return (1 - blend_weight) * minmax(rel) + blend_weight * effect_scale(upl)
    raise ValueError(f"ranking policy {policy!r}; expected one of {POLICIES}")


def _desc(x, n: int) -> np.ndarray:
    """A lexsort key for "higher first", missing (NaN) last; zeros when there is no such key."""
    if x is None:
        return np.zeros(n)
    return -np.nan_to_num(np.asarray(x, dtype="float64"), nan=-np.inf)


def top_k(score: np.ndarray, k: int, tie: Optional[Sequence[str]] = None,
          secondary: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the k highest scores; ties by ``secondary`` (higher first), then item id."""
    n = len(score)
    tie = np.asarray(tie if tie is not None else np.arange(n).astype(str))
    order = np.lexsort((tie, _desc(secondary, n), _desc(score, n)))
    return order[:k]


def fair_rerank(base: np.ndarray, groups: Sequence, k: int, strength: float, targets: dict,
                tie: Optional[Sequence[str]] = None, secondary: Optional[np.ndarray] = None) -> np.ndarray:
    """Greedy exposure-fair top-k: indices in slot order (see module docstring).

    Equal adjusted scores go to the higher base score, then as :func:`top_k` breaks ties, so
    strength 1 takes a group's best item, not its first id. A candidate without a base score
    (-inf, NaN) ranks below every scored one: strength 0 is exactly :func:`top_k` of ``base``.
    """
    n = len(base)
    k = min(k, n)
    raw = np.asarray(base, dtype="float64")
    b = np.where(np.isfinite(raw), minmax(raw), -1.0)
    g = np.asarray(groups, dtype=object)
    tie = np.asarray(tie if tie is not None else np.arange(n).astype(str))
    first, second = _desc(raw, n), _desc(secondary, n)  # the tie-break keys, after the adjusted score
    counts: dict = {}
    chosen: list = []
    free = np.ones(n, dtype=bool)
    tgt = np.array([targets.get(x, 0.0) for x in g], dtype="float64")
    for slot in range(k):
        share = np.array([counts.get(x, 0) for x in g], dtype="float64") / max(slot, 1)
        adj = (1 - strength) * b + strength * (tgt - share)
        adj = np.where(free, adj, -np.inf)
        cand = np.flatnonzero(adj >= adj.max() - 1e-12)
        pick = cand[np.lexsort((tie[cand], second[cand], first[cand]))[0]] if len(cand) > 1 else cand[0]
        chosen.append(pick)
        free[pick] = False
        counts[g[pick]] = counts.get(g[pick], 0) + 1
    return np.asarray(chosen, dtype=int)


def group_targets(group_sizes: dict, mode: str = "catalogue") -> dict:
    """Target share of slots per group: its share of catalogue items, or equal."""
    groups = [gname for gname, n in group_sizes.items() if n > 0]
    if not groups:
        return {}
    if mode == "equal":
        return {gname: 1.0 / len(groups) for gname in groups}
    total = float(sum(group_sizes[gname] for gname in groups))
    return {gname: group_sizes[gname] / total for gname in groups}


def policy_top_k(rel: np.ndarray, upl: np.ndarray, ids: np.ndarray, policy: str, blend_weight: float, k: int):
    """(scores, unconstrained top-``k`` positions, tie-break key) of one user's candidates under
    ``policy``'s score (relevance / uplift / blend): the list a policy ranks, or fair re-ranking
    starts from. Equal scores (no effect estimate, equal blends) go to the more relevant candidate,
    then to the lower item id."""
    score = policy_score(rel, upl, policy, blend_weight)
    second = rel if policy != "relevance" else None
    return score, top_k(score, k, ids, second), second


class Units(NamedTuple):
    """How an explanation states each number: ``relevance`` as a probability (True: percent) or a
    rating; ``uplift`` in the unit of where it came from (:func:`units_of`); the item's average effect
    from ``uplift_effects`` in that table's :class:`EffectScale`."""
    relevance: bool
    uplift: str
    effects: EffectScale = EffectScale()


PROBABILITY_UNITS = Units(relevance=True, uplift=PROBABILITY)


def units_of(task: str, uplift_head: bool, effects: EffectScale = EffectScale()) -> Units:
    """The units of a model's scores: relevance on its task's scale (click: a probability, rating: rating
    points); uplift on that scale when the model's own heads estimated it, else scores.uplift is the
    ``uplift_effects`` prior (:class:`causalrec.scoring.ScoreBatch`), in that table's units."""
    click = task == "click"
    return Units(relevance=click, uplift=(PROBABILITY if click else RATING) if uplift_head else effects.unit,
                 effects=effects)


def recorded_effect_scale(uplift_effects) -> EffectScale:
    """The :class:`EffectScale` the uplift stage recorded with its effects (the overall rows: a couple of
    rows); a table written before it recorded one, or none at all, reads as a probability change."""
    from pyspark.sql import functions as F

    if uplift_effects is None or "outcome_binary" not in uplift_effects.columns:
        return EffectScale()
    row = uplift_effects.where(F.col("level") == "overall").select("outcome", "outcome_binary").first()
    return EffectScale.of(None if row is None else row.asDict())


def rank_user(pdf: pd.DataFrame, *, policy: str, k: int, blend_weight: float, fair_base: str,
              strength: float, targets: dict) -> pd.DataFrame:
    """One user's candidates -> the policy's top-k (kind='policy') and the unconstrained
    top-k of its base score (kind='base', for the relevance cost and exposure before).

    Rows in :data:`RANKED_COLUMNS`: the recommendation and what its explanation rests on
    (:func:`explain_user` writes the text once the picks are known and their vectors joined)."""
    pdf = pdf.reset_index(drop=True)
    ids = pdf["item_id"].astype(str).to_numpy()
    rel = pd.to_numeric(pdf["relevance"], errors="coerce").to_numpy("float64")
    upl = pd.to_numeric(pdf["uplift"], errors="coerce").to_numpy("float64")
    base_policy = fair_base if policy == "fair" else policy
    base, unconstrained, second = policy_top_k(rel, upl, ids, base_policy, blend_weight, k)
    grp = pdf["group"].astype(object).where(pdf["group"].notna(), "unknown").to_numpy() \
        if "group" in pdf.columns else np.full(len(pdf), "unknown", dtype=object)
    if policy == "fair":
        picked = fair_rerank(base, grp, k, strength, targets, ids, second)
    else:
        picked = unconstrained
    boosted = ~np.isin(picked, unconstrained)
    # baseline for the summary: relevance top-k for non-fair policies, base top-k for fair
    baseline = unconstrained if policy == "fair" else top_k(rel, k, ids)
    rows = []
    for kind, chosen in (("policy", picked), ("base", baseline)):
        for r, i in enumerate(chosen, start=1):
            row = pdf.iloc[i]
            rows.append({
                "user_id": row["user_id"], "item_id": ids[i], "rank": r,
                "score": float(base[i]) if kind == "policy" and np.isfinite(base[i]) else float("nan"),
                "relevance": _f(rel[i]), "uplift": _f(upl[i]), "policy": policy,
                "fairness_boosted": kind == "policy" and bool(boosted[r - 1]),
                "model_version": row["model_version"], "group": str(grp[i]), "kind": kind,
                **{c: _f(row.get(c)) for c in EXPLANATION_INPUTS},
            })
    return pd.DataFrame(rows, columns=RANKED_COLUMNS)


def explain_user(picks: pd.DataFrame, history: pd.DataFrame, *, attribute: str, units: Optional[dict] = None,
                 alpha: float = 0.05) -> pd.DataFrame:
    """One user's recommendations (:func:`rank_user`'s rows, plus ``item_vec``: the item's text embedding or
    None) -> :data:`OUT_COLUMNS`, with the explanation of each kind='policy' row.

    ``history``: the items the model was served (:func:`load_history`), the only ones an explanation may
    name, one row each with ``pos`` (0 = most recent), ``title`` and ``embedding``; items without an
    embedding are left out. ``units``: model_version -> :class:`Units` (:func:`explanation_units`); a version
    not in it is explained in probability units."""
    hist_ids, hist_vecs, hist_titles = [], None, []
    if len(history):
        history = history.sort_values("pos")
        hist_ids, hist_titles = history["item_id"].astype(str).tolist(), history["title"].tolist()
        hist_vecs = np.stack([np.asarray(v, dtype="float64") for v in history["embedding"]])
    texts = []
    for _, row in picks.iterrows():
        if row["kind"] != "policy":
            texts.append("")
            continue
        interval = lift_interval(_f(row["uplift"]), _f(row.get("uplift_se")), alpha)
        # the item-level estimate is a different quantity: quoted as such, with its own interval
        item = None if interval is not None else _item_estimate(row, alpha)
        # a consumed item can be recommended again (candidates.exclude_consumed=False): never "similar to" itself
        others = [j for j, h in enumerate(hist_ids) if h != row["item_id"]]
        vec = row.get("item_vec")
        sim = most_similar_history(None if vec is None else np.asarray(vec, dtype="float64"),
                                   hist_vecs[others] if others else None, [hist_titles[j] for j in others])
        unit = (units or {}).get(row["model_version"], PROBABILITY_UNITS)
        texts.append(explain(policy=row["policy"], rank=int(row["rank"]), relevance=_f(row["relevance"]),
                             uplift=_f(row["uplift"]), interval=interval, similar=sim,
                             boosted=bool(row["fairness_boosted"]), group=row["group"], attribute=attribute,
                             probability=unit.relevance, uplift_unit=unit.uplift, item_effect=item,
                             alpha=alpha, effect_unit=unit.effects.unit, outcome=unit.effects.outcome))
    return picks.assign(explanation=texts)[OUT_COLUMNS] if len(picks) else pd.DataFrame(columns=OUT_COLUMNS)


def _item_estimate(row, alpha: float) -> Optional[tuple[float, float, float]]:
    """(effect, ci_low, ci_high) of the item's average effect from uplift_effects, at level ``1 - alpha``
    (the normal interval the uplift stage computes, from the item's se), when effect and se are known."""
    interval = lift_interval(_f(row.get("item_effect")), _f(row.get("item_se")), alpha)
    return None if interval is None else (_f(row.get("item_effect")), *interval)


def _f(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


OUT_COLUMNS = ["user_id", "item_id", "rank", "score", "relevance", "uplift", "policy", "fairness_boosted",
               "explanation", "model_version", "group", "kind"]
OUT_SCHEMA = ("user_id string, item_id string, rank int, score double, relevance double, uplift double, "
              "policy string, fairness_boosted boolean, explanation string, model_version string, "
              "group string, kind string")
# what an explanation rests on besides the recommendation: the lift's se, the item-level effect and its se
EXPLANATION_INPUTS = ["uplift_se", "item_effect", "item_se"]
RANKED_COLUMNS = [c for c in OUT_COLUMNS if c != "explanation"] + EXPLANATION_INPUTS
RANKED_SCHEMA = (OUT_SCHEMA.replace("explanation string, ", "")
                 + "".join(f", {c} double" for c in EXPLANATION_INPUTS))
HISTORY_SCHEMA = "user_id string, pos int, item_id string, title string, embedding array<float>"


# --------------------------------------------------------------------------- Spark job


def rank_all(ctx, scores, groups=None, uplift_effects=None, history=None, *, policy: Optional[str] = None,
             versions: Optional[Sequence[str]] = None):
    """Spark: join the per-user inputs and run :func:`rank_user` per user via applyInPandas.

    ``groups``: (item_id, group); ``uplift_effects``: the uplift stage's table (one item-level row
    per item is used, see :func:`causalrec.scoring.item_uplift`);
    ``history``: (user_id, history array<string>, most recent first): what the model was served
    (:func:`load_history`); ``versions``: the scores' distinct model versions, when the caller has them.
    Returns (result DataFrame with kind policy/base, targets, group_sizes).
    """
    from pyspark.sql import functions as F

    cfg = ctx.cfg.ranking
    policy = policy or cfg.policy
    if policy not in POLICIES:
        raise ValueError(f"ranking.policy {policy!r}; expected one of {POLICIES}")
    check_effects_available(scores, policy, cfg.fair_base_policy)
    df = scores.select("user_id", "item_id", "relevance", "uplift", "uplift_se", "model_version")
    group_sizes: dict = {}
    if groups is not None:
        groups = groups.select("item_id", F.col("group").cast("string"))
        group_sizes = {r["group"] if r["group"] is not None else "unknown": int(r["count"])
                       for r in groups.groupBy("group").count().collect()}  # a handful of groups
        df = df.join(groups, "item_id", "left")
    elif policy == "fair":
        raise ValueError(f"ranking.policy='fair' needs the item attribute {cfg.fairness_attribute!r} "
                         "(item_features.popularity_group, or a column of items/item_features)")
    if uplift_effects is not None:
        from causalrec.scoring import item_uplift

        # the item's se, not its stored bounds: those are at the ope.alpha of the uplift run, which
        # need not be this run's (the explanation labels the interval with this run's level)
        ue = item_uplift(uplift_effects).select("item_id", F.col("effect").alias("item_effect"),
                                                F.col("se").alias("item_se"))
        df = df.join(ue, "item_id", "left")
    targets = group_targets(group_sizes, cfg.fairness_target)
    kw = dict(policy=policy, k=cfg.k, blend_weight=cfg.blend_weight, fair_base=cfg.fair_base_policy,
              strength=cfg.fairness_strength, targets=targets)

    def rank(pdf: pd.DataFrame) -> pd.DataFrame:
        return rank_user(pdf, **kw)

    ranked = df.groupBy("user_id").applyInPandas(rank, RANKED_SCHEMA)
    if versions is None:
        versions = model_versions(scores)
    units = explanation_units(ctx, versions, recorded_effect_scale(uplift_effects))
    return explain_all(ctx, ranked, history, units), targets, group_sizes


def explain_all(ctx, ranked, history, units: dict):
    """:func:`explain_user` per user: the picks, each with its item's text embedding, cogrouped with the
    user's served history items (:func:`history_side`).

    Why after ranking and not with the candidates: only the k picks need a vector, so each user's group
    carries k + history-length vectors instead of one per candidate, and no item table travels with the
    function (the catalogue's vectors would be shipped to every task)."""
    from pyspark.sql import functions as F

    store = ctx.store
    if store.exists("item_embeddings"):
        vectors = store.read("item_embeddings").select(F.col("item_id").alias("_vec_item"),
                                                         F.col("embedding").alias("item_vec"))
        # the picks only: a base row (the summary's baseline) is never explained
        on = (ranked["item_id"] == vectors["_vec_item"]) & (ranked["kind"] == "policy")
        ranked = ranked.join(vectors, on, "left").drop("_vec_item")
    else:
        ranked = ranked.withColumn("item_vec", F.lit(None).cast("array<float>"))
    kw = dict(attribute=ctx.cfg.ranking.fairness_attribute, units=units, alpha=ctx.cfg.ope.alpha)

    def fn(picks: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
        return explain_user(picks, hist, **kw)

    side = history_side(ctx, history)
    return ranked.groupBy("user_id").cogroup(side.groupBy("user_id")).applyInPandas(fn, OUT_SCHEMA)


def history_side(ctx, history):
    """(user_id, pos, item_id, title, embedding) per served history item (:data:`HISTORY_SCHEMA`): the
    items :func:`load_history` lists that have a text embedding, titled by their item text (the id
    when it has none). Empty without a history or without embeddings: nothing can be named."""
    from pyspark.sql import functions as F

    store = ctx.store
    if history is None or not store.exists("item_embeddings"):
        return ctx.spark.createDataFrame([], HISTORY_SCHEMA)
    rows = history.select("user_id", F.posexplode("history").alias("pos", "item_id"))
    rows = rows.join(store.read("item_embeddings").select("item_id", "embedding"), "item_id")
    title = F.col("item_id")
    if store.exists("items"):
        rows = rows.join(store.read("items").select("item_id", F.col("text").alias("_text")), "item_id", "left")
        title = F.coalesce(F.when(F.trim(F.col("_text")) != "", F.col("_text")), F.col("item_id"))
    return rows.select("user_id", F.col("pos").cast("int"), "item_id", title.alias("title"), "embedding")


def model_versions(scores) -> list:
    """The scores' distinct model versions (one per scoring run)."""
    return [r[0] for r in scores.select("model_version").distinct().collect()]


def check_effects_available(scores, policy: str, fair_base: str) -> None:
    """Refuse the uplift policy (or a fair re-ranking on it) when no score has an effect estimate:
    a configuration error (no uplift head, no uplift stage), checked once here; warn for the blend,
    which then ranks by relevance alone. A user whose candidates lack estimates is not an error:
    :func:`policy_score` says where those candidates rank."""
    from pyspark.sql import functions as F

    base = fair_base if policy == "fair" else policy
    if base not in ("uplift", "blend"):
        return
    known = F.col("uplift").isNotNull() & ~F.isnan(F.col("uplift"))
    if scores.where(known).limit(1).collect():
        return
    name = f"ranking.policy={policy!r}" if policy == base else f"ranking.fair_base_policy={base!r}"
    if base == "uplift":
        raise ValueError(f"{name} but scores.uplift is null for every candidate "
                         "(train with an uplift head or run the uplift stage)")
    log.warning("%s but scores.uplift is null for every candidate: the blend ranks by relevance alone "
                "(train with an uplift head or run the uplift stage)", name)


def explanation_units(ctx, model_versions: Sequence[str], effects: EffectScale = EffectScale()) -> dict:
    """model_version -> :class:`Units` of the scores it wrote, from the model config of its train run.

    Not from the size of the numbers: a rating regression can predict below 1 and one user's score above 1
    says nothing about another's. A version without a train run or a readable checkpoint (a custom scoring
    loader, a removed checkpoint) falls back to ``train.task`` and ``train.objective``, with a warning.
    """
    from causalrec.train.objectives import needs_uplift

    configs = trained_model_configs(ctx.store, model_versions)
    task, objective = ctx.cfg.train.task, ctx.cfg.train.objective
    out = {}
    for v in model_versions:
        mc = configs.get(v)
        if mc is None:
            log.warning("recommend: no train run with a readable checkpoint wrote model_version %r; explaining "
                        "its scores in the units of train.task=%r, train.objective=%r", v, task, objective)
            out[v] = units_of(task, needs_uplift(objective), effects)
        else:
            out[v] = units_of(mc.get("task", task), bool(mc.get("uplift")), effects)
    return out


def trained_checkpoints(store, model_versions: Sequence[str]) -> dict:
    """model_version -> the checkpoint path of the train run that has that version (the train stage writes its
    run_id as the version); versions without a run are left out."""
    if not model_versions or not store.exists("train_runs"):
        return {}
    runs = store.read_arrow("train_runs", columns=["model_version", "checkpoint_path"]).to_pandas()
    return {v: path for v, path in zip(runs["model_version"], runs["checkpoint_path"]) if v in model_versions}


def trained_model_configs(store, model_versions: Sequence[str]) -> dict:
    """model_version -> the model config saved with its train run's checkpoint (:func:`trained_checkpoints`);
    versions without a run or a readable checkpoint are left out."""
    from causalrec.train.checkpoint import saved_model_config

    out = {}
    for v, path in trained_checkpoints(store, model_versions).items():
        try:
            out[v] = saved_model_config(path)
        except (OSError, ValueError) as exc:
            log.warning("recommend: cannot read the model config of model_version %r at %s (%s)", v, path, exc)
    return out


def summarise(result, catalogue_items: Optional[int], policy: str, cfg) -> dict:
    """Relevance cost and Gini of recommendation counts per item before (kind=base) / after (kind=policy).

    Spark aggregations: the Gini over per-item counts (:func:`causalrec.evaluation.metrics.gini`, the
    catalogue's unrecommended items at zero), and (kind, group) totals - a handful of rows - for the
    shares; no per-item rows reach the driver."""
    from pyspark.sql import functions as F

    from causalrec.evaluation.metrics import gini

    per_item = result.groupBy("kind", "item_id").agg(F.count(F.lit(1)).alias("n")).persist()
    n_items = {r["kind"]: int(r["count"]) for r in per_item.groupBy("kind").count().collect()}
    groups = (result.groupBy("kind", "group")
              .agg(F.count(F.lit(1)).alias("n"), F.sum("relevance").alias("rel"),
                   F.sum(F.col("fairness_boosted").cast("long")).alias("boosted")).collect())
    n_users = result.filter(F.col("kind") == "policy").select("user_id").distinct().count()
    out: dict = {}
    for kind in ("base", "policy"):
        part = [r for r in groups if r["kind"] == kind]
        slots = max(sum(int(r["n"]) for r in part), 1)
        g = gini(per_item.where(F.col("kind") == kind), "n", n_total=max(catalogue_items or 0, n_items.get(kind, 0)))
        out[kind] = {"relevance": float(sum(r["rel"] or 0.0 for r in part)), "gini": g if g is not None else 0.0,
                     "groups": {str(r["group"]): int(r["n"]) / slots for r in part if r["group"] is not None},
                     "boosted": int(sum(r["boosted"] or 0 for r in part))}
    per_item.unpersist()
    rb, rp = out["base"]["relevance"], out["policy"]["relevance"]
    return {
        "policy": policy, "k": cfg.ranking.k, "fairness_attribute": cfg.ranking.fairness_attribute,
        "fairness_strength": cfg.ranking.fairness_strength, "n_users": int(n_users),
        "relevance_unconstrained": rb, "relevance_policy": rp,
        "relevance_cost": (1.0 - rp / rb) if rb else None,
        "gini_before": out["base"]["gini"], "gini_after": out["policy"]["gini"],
        "group_exposure_before": json.dumps(out["base"]["groups"], sort_keys=True),
        "group_exposure_after": json.dumps(out["policy"]["groups"], sort_keys=True),
        "n_boosted": out["policy"]["boosted"],
    }


def load_groups(store, attribute: str):
    """(item_id, group) from item_features, else items; None when neither has the attribute."""
    from pyspark.sql import functions as F

    for name in ("item_features", "items"):
        if store.exists(name):
            df = store.read(name)
            if attribute in df.columns:
                return df.select("item_id", F.col(attribute).cast("string").alias("group")).dropDuplicates(["item_id"])
    return None


def load_history(ctx, indexed_items=None, history_length: Optional[int] = None):
    """(user_id, history): each user's history as scoring served it to the model, most recent first.

    Scoring feeds the model ``user_features.history_item_ids`` (the latest interactions of any kind before the
    features cutoff) less the items its id_index lacks, cut to the length the model was trained with
    (:func:`causalrec.training_set.indexed_history`, :func:`causalrec.scoring.prepare_input`); an explanation
    built from any other list (positive events only, events after the cutoff, items the model has no row
    for) would name items the model never saw. ``indexed_items`` (item_id): the items of the model's id_index
    (:func:`served_history_items`); None keeps every item. ``history_length``: the served length
    (:func:`served_history_length`), None: ``features.history_length``. None without user_features: then no
    history item is named."""
    from pyspark.sql import functions as F

    store = ctx.store
    if not store.exists("user_features"):
        return None
    n = int(history_length or ctx.cfg.features.history_length)
    uf = store.read("user_features")
    if indexed_items is None:
        return uf.select("user_id", F.slice("history_item_ids", 1, n).alias("history"))
    hist = uf.select("user_id", F.posexplode("history_item_ids").alias("pos", "item_id")).join(
        indexed_items.select("item_id"), "item_id")
    return hist.groupBy("user_id").agg(F.slice(F.transform(
        F.sort_array(F.collect_list(F.struct("pos", "item_id"))), lambda s: s["item_id"]), 1, n).alias("history"))


def served_history_length(ctx, model_versions: Sequence[str]) -> int:
    """The history length scoring served the scores' model: its checkpoint's ``history_len`` when one train run
    wrote them (:func:`causalrec.scoring.run`), else ``features.history_length``."""
    configs = trained_model_configs(ctx.store, model_versions) if len(model_versions) == 1 else {}
    trained = next(iter(configs.values()), {}).get("history_len")
    return int(trained or ctx.cfg.features.history_length)


def served_history_items(ctx, model_versions: Sequence[str]):
    """(item_id): the items of the id_index the scores' model was trained with (the version its checkpoint
    records, :func:`causalrec.scoring.trained_id_index`), which are the history items scoring can serve it.
    Scores of several model versions, of one without a train run, or of one whose id_index version can no
    longer be read: the current id_index (explanations only; the scores stand). None without an id_index
    (scores written outside the pipeline's training): every history item may be cited."""
    from pyspark.sql import functions as F

    from causalrec.scoring import trained_id_index
    from causalrec.train.checkpoint import trained_id_index_version

    store = ctx.store
    if not store.exists("id_index"):
        return None
    paths = trained_checkpoints(store, model_versions)
    idx = None
    if len(model_versions) == 1 and len(paths) == 1:
        v, path = next(iter(paths.items()))
        try:
            idx = trained_id_index(store, trained_id_index_version(path), model=v, stage="recommend")
        except RuntimeError as exc:
            log.warning("recommend: %s; explanations cite history items of the current id_index", exc)
    if idx is None:
        idx = store.read("id_index")
    return idx.where(F.col("kind") == "item").select(F.col("id").alias("item_id"))


def run(ctx) -> dict:
    from pyspark.sql import functions as F

    from causalrec.schemas import RANKING_SUMMARY, RECOMMENDATIONS

    cfg = ctx.cfg
    store = ctx.store
    with ctx.step("recommend: extract"):
        scores = store.read("scores")
        groups = load_groups(store, cfg.ranking.fairness_attribute)
        ue = store.read("uplift_effects") if store.exists("uplift_effects") else None
        versions = model_versions(scores)
        history = load_history(ctx, served_history_items(ctx, versions), served_history_length(ctx, versions))
        n_items = store.row_count("items") if store.exists("items") else None
    with ctx.step(f"recommend: rank ({cfg.ranking.policy})"):
        result, targets, sizes = rank_all(ctx, scores, groups, ue, history, versions=versions)
        result = result.localCheckpoint(eager=True)  # summary and write read the same ranking
    with ctx.step("recommend: load"):
        recs = result.filter(F.col("kind") == "policy")
        version = store.write(recs, "recommendations", mode="overwrite", spec=RECOMMENDATIONS, overwrite_schema=True)
        summary = summarise(result, n_items, cfg.ranking.policy, cfg)
        mv = scores.select("model_version").first()
        row = dict(summary, model_version=mv[0] if mv else None,
                   created_at=pd.Timestamp.now(tz="UTC").floor("us").to_pydatetime())
        sdf = ctx.spark.createDataFrame([row], RANKING_SUMMARY.spark_schema())
        store.write(sdf, "ranking_summary", mode="append", spec=RANKING_SUMMARY)
    n = store.row_count("recommendations")
    ctx.log_rows("scores", store.row_count("scores"), "in")
    ctx.log_rows("recommendations", n)
    return {"rows_out": {"recommendations": n, "ranking_summary": 1}, "version": version,
            "targets": targets, "group_sizes": sizes, **summary}
