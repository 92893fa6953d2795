"""Candidate generation: a bounded candidate set per user from several sources.

Why several sources: the scorer can only rank what it is shown. Popularity alone
feeds the feedback loop that biased the logs, so it is de-biased by exposure
propensity; co-occurrence and category affinity personalise; text neighbours give
cold items (no interactions yet) a way in.

Why no user x item cross join: every source is a per-source top-N (items are
joined to a user only through that user's own history or through a small global
top list), the union is bounded by ``len(sources) * per_source`` rows per user and
the final top ``max_candidates`` is a window function per user. Rows grow
linearly in users.

Extract (events, items, item_features, exposure_propensity) -> pure transforms
-> load (``candidates``, and ``item_embeddings`` as a by-product of the text source).
"""
from __future__ import annotations

import logging
from typing import Optional

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from causalrec.features.common import events_before, resolve_cutoff
from causalrec.features.job import stored_feature_tables
from causalrec.schemas import CANDIDATES

log = logging.getLogger(__name__)

SOURCES = ("popularity", "cooccurrence", "affinity", "text")


# --------------------------------------------------------------------------- transforms


def positive_events(events: DataFrame, rating_threshold: float) -> DataFrame:
    """Events that express a positive outcome: a rating >= threshold, a clicked impression,
    or a click / purchase / add-to-cart / view (value absent or > 0)."""
    et = F.col("event_type")
    v = F.col("value")
    pos = (
        F.when(et == "rating", v >= F.lit(rating_threshold))
        .when(et == "impression", F.coalesce(v, F.lit(0.0)) > 0)
        .otherwise(F.coalesce(v, F.lit(1.0)) > 0)
    )
    return events.filter(pos)


def consumed_pairs(events: DataFrame) -> DataFrame:
    """(user_id, item_id) the user already interacted with (any event but an unclicked impression)."""
    unclicked = (F.col("event_type") == "impression") & (F.coalesce(F.col("value"), F.lit(0.0)) <= 0)
    return events.filter(~unclicked).select("user_id", "item_id").distinct()


def recent_history(pos: DataFrame, length: int) -> DataFrame:
    """Each user's ``length`` most recent distinct positive items: (user_id, item_id, recency)."""
    last = pos.groupBy("user_id", "item_id").agg(F.max("event_time").alias("t"))
    w = Window.partitionBy("user_id").orderBy(F.col("t").desc(), F.col("item_id"))
    return (last.withColumn("recency", F.row_number().over(w))
            .filter(F.col("recency") <= length).select("user_id", "item_id", "recency"))


def debiased_popularity(pos: DataFrame, exposure: Optional[DataFrame], clip_min: float) -> DataFrame:
    """Item popularity with each positive (user, item) pair weighted by 1 / P(exposed): (item_id, pop, n_pos).

    Inverse-propensity weighting (Schnabel et al., ICML 2016): an item that users
    rarely got to see but liked when they did counts for more than an item shown to
    everyone. Pairs without a propensity get weight 1 (no correction). A pair counts once, as its
    propensity is per pair: a clicked and purchased impression logs three positive events, a
    re-rating two. ``n_pos``: the item's positive pairs. The sum is rounded to 1e-9, so that equal
    popularities summed in another row order still tie (and fall to the item id).
    """
    pos = pos.select("user_id", "item_id").distinct()
    if exposure is not None:
        prop = exposure.select("user_id", "item_id", F.col("exposure_propensity").alias("p"))
        pos = pos.join(prop, ["user_id", "item_id"], "left")
        w = 1.0 / F.greatest(F.coalesce(F.col("p"), F.lit(1.0)), F.lit(clip_min))
    else:
        w = F.lit(1.0)
    return pos.groupBy("item_id").agg(F.round(F.sum(w), 9).alias("pop"), F.count(F.lit(1)).alias("n_pos"))


def top_n_per(df: DataFrame, key: str, score: str, n: int, tie: str = "item_id") -> DataFrame:
    """Keep the ``n`` highest-scoring rows per ``key`` (window, no driver collect)."""
    w = Window.partitionBy(key).orderBy(F.col(score).desc(), F.col(tie))
    return df.withColumn("_r", F.row_number().over(w)).filter(F.col("_r") <= n).drop("_r")


def list_depth(keys: DataFrame, n: int, consumed: Optional[DataFrame], by: Optional[DataFrame] = None) -> DataFrame:
    """``keys`` with ``_depth``: how far down a ranked list each needs to read to find ``n`` items it has
    not consumed: ``n`` plus its consumed items (those of ``by``'s list, e.g. a category, when given)."""
    if consumed is None:
        return keys.withColumn("_depth", F.lit(n))
    c = consumed if by is None else consumed.join(by, "item_id")
    on = [x for x in keys.columns if x in c.columns and x != "item_id"]
    counts = c.groupBy(*on).agg(F.count(F.lit(1)).alias("_c"))
    return keys.join(counts, on, "left").withColumn("_depth", F.lit(n) + F.coalesce(F.col("_c"), F.lit(0))).drop("_c")


def read_down(depth: DataFrame, ranked: DataFrame, on: list) -> DataFrame:
    """Each row of ``depth`` joined to ranks 1 .. ``_depth`` of its ``ranked`` list (rows ``_rank``)."""
    rows = depth.withColumn("_rank", F.explode(F.sequence(F.lit(1), F.col("_depth").cast("int")))).drop("_depth")
    return rows.join(ranked, on + ["_rank"])


def popularity_source(users: DataFrame, pop: DataFrame, n: int, consumed: Optional[DataFrame]) -> DataFrame:
    """The ``n`` most debiased-popular items each user has not consumed.

    Each user reads the global list only down to ``n`` plus their consumed items, the deepest
    they can need; the list is bounded by the deepest user and broadcast. Rows: users x n plus
    the consumed pairs, never users x items, and every user gets ``n`` while the catalogue has them.
    """
    depth = list_depth(users.select("user_id").distinct(), n, consumed)
    deepest = int(depth.agg(F.max("_depth")).first()[0] or n)
    order = [F.col("pop").desc(), F.col("item_id")]
    top = (pop.orderBy(*order).limit(deepest)  # at most the catalogue: one small partition
           .select("item_id", F.col("pop").alias("score"), F.row_number().over(Window.orderBy(*order)).alias("_rank")))
    cand = read_down(depth, F.broadcast(top), []).select("user_id", "item_id", "score")
    if consumed is not None:
        cand = cand.join(consumed, ["user_id", "item_id"], "left_anti")
    return top_n_per(cand, "user_id", "score", n)


def item_cooccurrence(history: DataFrame, neighbours: int) -> DataFrame:
    """Item-item co-occurrence within users' recent histories, cosine-normalised
    (count / sqrt(n_i n_j)) so popular items do not neighbour everything; top ``neighbours``
    per item. Histories are capped, so pair counts are bounded per user."""
    a = history.select("user_id", F.col("item_id").alias("src"))
    b = history.select("user_id", F.col("item_id").alias("dst"))
    pairs = a.join(b, "user_id").filter(F.col("src") != F.col("dst"))
    counts = pairs.groupBy("src", "dst").agg(F.count(F.lit(1)).alias("c"))
    deg = history.groupBy("item_id").agg(F.count(F.lit(1)).alias("d"))
    counts = (counts.join(deg.select(F.col("item_id").alias("src"), F.col("d").alias("ds")), "src")
              .join(deg.select(F.col("item_id").alias("dst"), F.col("d").alias("dd")), "dst")
              .withColumn("sim", F.col("c") / F.sqrt(F.col("ds") * F.col("dd"))))
    w = Window.partitionBy("src").orderBy(F.col("sim").desc(), F.col("dst"))
    return (counts.withColumn("_r", F.row_number().over(w)).filter(F.col("_r") <= neighbours)
            .select("src", "dst", "sim"))


def neighbour_source(history: DataFrame, neighbours: DataFrame, n: int, consumed: Optional[DataFrame]) -> DataFrame:
    """Sum of neighbour similarities from the user's recent items: (user_id, item_id, score), rounded to
    1e-9 as :func:`debiased_popularity`'s sums (ties by item id whatever the row order)."""
    cand = (history.select("user_id", F.col("item_id").alias("src"))
            .join(neighbours, "src")
            .groupBy("user_id", F.col("dst").alias("item_id")).agg(F.round(F.sum("sim"), 9).alias("score")))
    if consumed is not None:
        cand = cand.join(consumed, ["user_id", "item_id"], "left_anti")
    return top_n_per(cand, "user_id", "score", n)


def affinity_source(pos: DataFrame, items: DataFrame, pop: DataFrame, n: int,
                    consumed: Optional[DataFrame]) -> DataFrame:
    """Category affinity: the user's share of positives in a category times the item's
    (debiased) popularity within the category (relative to the category's top item), over the
    top ``n`` unconsumed items of each of the user's categories (read down as
    :func:`popularity_source` reads its list)."""
    cat = items.select("item_id", "category").filter(F.col("category").isNotNull())
    pairs = pos.select("user_id", "item_id").distinct()  # a liked item counts once, however many events
    user_cat = (pairs.join(cat, "item_id").groupBy("user_id", "category").agg(F.count(F.lit(1)).alias("c")))
    tot = user_cat.groupBy("user_id").agg(F.sum("c").alias("t"))
    user_cat = user_cat.join(tot, "user_id").select("user_id", "category", (F.col("c") / F.col("t")).alias("share"))
    item_pop = cat.join(pop, "item_id", "left").fillna({"pop": 0.0})
    wcat = Window.partitionBy("category")
    ranked = (item_pop.withColumn("_rank", F.row_number().over(wcat.orderBy(F.col("pop").desc(), F.col("item_id"))))
              .withColumn("norm_pop", (F.col("pop") + 1.0) / (F.max("pop").over(wcat) + 1.0)))
    depth = list_depth(user_cat, n, consumed, by=cat)
    cand = (read_down(depth, ranked, ["category"])
            .groupBy("user_id", "item_id").agg(F.max(F.col("share") * F.col("norm_pop")).alias("score")))
    if consumed is not None:
        cand = cand.join(consumed, ["user_id", "item_id"], "left_anti")
    return top_n_per(cand, "user_id", "score", n)


def _top_targets(src_ids, src_mat, tgt_ids, tgt_mat, k: int) -> tuple[list, list, list]:
    """Each source row's ``k`` most cosine-similar target rows, never itself: (src, dst, sim) lists.

    ``tgt_ids`` must be in id order: equal similarities (items with the same text) then go to the lower
    item id, so the result does not depend on the embedding table's row order."""
    import numpy as np

    col_of = {t: c for c, t in enumerate(tgt_ids)}
    kk = min(k, len(tgt_ids))
    rows_src, rows_dst, rows_sim = [], [], []
    for s in range(0, len(src_ids), 1024):
        sims = src_mat[s:s + 1024] @ tgt_mat.T  # embeddings are L2-normalised: cosine
        for r in range(sims.shape[0]):
            self_col = col_of.get(src_ids[s + r])
            if self_col is not None:
                sims[r, self_col] = -np.inf
        kth = -np.partition(-sims, kk - 1, axis=1)[:, kk - 1]  # each row's kk-th largest similarity
        for r in range(sims.shape[0]):
            above = np.flatnonzero(sims[r] > kth[r])
            for c in np.concatenate([above, np.flatnonzero(sims[r] == kth[r])[:kk - len(above)]]):
                if np.isfinite(sims[r, c]):
                    rows_src.append(src_ids[s + r])
                    rows_dst.append(tgt_ids[c])
                    rows_sim.append(float(sims[r, c]))
    return rows_src, rows_dst, rows_sim


def text_neighbours(embeddings: DataFrame, targets: Optional[DataFrame], neighbours: int) -> DataFrame:
    """Per-item top text neighbours by cosine similarity of embeddings: (src, dst, sim).

    ``embeddings``: (item_id, embedding) of every item (the sources); ``targets``: (item_id) the
    destinations are restricted to (e.g. the cold items), None for every item. Only the destinations'
    vectors reach the driver, once, and travel with the task; the sources are scored where their rows
    are (``mapInPandas``), so the similarity work and the source vectors stay spread over the
    executors however large the catalogue. Restricting to cold items is what keeps the broadcast
    small; every item as a destination broadcasts the whole table."""
    import numpy as np
    import pandas as pd

    tgt = embeddings.select("item_id", "embedding")
    if targets is not None:
        tgt = tgt.join(targets.select("item_id").distinct(), "item_id")
    rows = sorted(((str(r["item_id"]), r["embedding"]) for r in tgt.collect()), key=lambda r: r[0])
    schema = "src string, dst string, sim double"
    if not rows:
        return embeddings.sparkSession.createDataFrame([], schema)
    tgt_ids = [i for i, _ in rows]
    tgt_mat = np.asarray([v for _, v in rows], dtype=np.float32)

    def score(batches):
        for pdf in batches:
            if len(pdf):
                src_ids = pdf["item_id"].astype(str).tolist()
                src_mat = np.stack([np.asarray(v, dtype=np.float32) for v in pdf["embedding"]])
                src, dst, sim = _top_targets(src_ids, src_mat, tgt_ids, tgt_mat, neighbours)
                yield pd.DataFrame({"src": src, "dst": dst, "sim": sim})

    return embeddings.select("item_id", "embedding").mapInPandas(score, schema)


def merge_sources(per_source: dict, max_candidates: int) -> DataFrame:
    """Union the sources; per (user, item) record every source and the one that ranked it
    highest (best within-source rank, ties by source order); keep ``max_candidates`` per user by
    that best rank, a round robin over the sources so none crowds the others out, and among
    items of equal rank those more sources agree on first."""
    parts = []
    for order, (name, df) in enumerate(per_source.items()):
        w = Window.partitionBy("user_id").orderBy(F.col("score").desc(), F.col("item_id"))
        parts.append(df.select("user_id", "item_id", F.col("score").cast("double").alias("score"))
                     .withColumn("src_rank", F.row_number().over(w))
                     .withColumn("source", F.lit(name)).withColumn("src_order", F.lit(order)))
    allc = parts[0]
    for p in parts[1:]:
        allc = allc.unionByName(p)
    best = F.min(F.struct("src_rank", "src_order", "source", "score"))
    g = (allc.groupBy("user_id", "item_id")
         .agg(best.alias("b"), F.sort_array(F.collect_set("source")).alias("sources")))
    g = g.select("user_id", "item_id", F.col("b.source").alias("source"), "sources",
                 F.col("b.score").alias("source_score"), F.col("b.src_rank").alias("src_rank"))
    w = Window.partitionBy("user_id").orderBy(F.col("src_rank"), F.size("sources").desc(),
                                              F.col("source_score").desc(), F.col("item_id"))
    return (g.withColumn("_r", F.row_number().over(w)).filter(F.col("_r") <= max_candidates)
            .drop("_r", "src_rank"))


# --------------------------------------------------------------------------- job


def build_candidates(ctx, events: DataFrame, items: DataFrame, users: DataFrame,
                     exposure: Optional[DataFrame], cached: Optional[list] = None) -> tuple[DataFrame, dict]:
    """All sources -> merged candidates; returns (candidates, per-source info). The intermediates the
    sources share are persisted and appended to ``cached``, for the caller to unpersist after the write."""
    cfg = ctx.cfg
    cc = cfg.candidates
    unknown = [s for s in cc.sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"candidates.sources: unknown source(s) {unknown}; allowed: {list(SOURCES)}")
    n = cc.per_source
    pos = positive_events(events, cfg.training_set.positive_threshold).select("user_id", "item_id", "event_time")
    pos = pos.persist()
    consumed = consumed_pairs(events).persist() if cc.exclude_consumed else None
    history = recent_history(pos, cfg.features.history_length).persist()
    pop = debiased_popularity(pos, exposure, cfg.propensity.clip_min).persist()
    if cached is not None:
        cached.extend(df for df in (pos, consumed, history, pop) if df is not None)
    all_users = users.select("user_id").unionByName(events.select("user_id")).distinct()
    per_source: dict = {}
    info: dict = {}
    if "popularity" in cc.sources:
        per_source["popularity"] = popularity_source(all_users, pop, n, consumed)
    if "cooccurrence" in cc.sources:
        nb = item_cooccurrence(history, cc.neighbours_per_item)
        per_source["cooccurrence"] = neighbour_source(history, nb, n, consumed)
    if "affinity" in cc.sources and "category" in items.columns:
        per_source["affinity"] = affinity_source(pos, items, pop, n, consumed)
    if "text" in cc.sources:
        from causalrec.item_embeddings import ensure_item_embeddings

        with ctx.step("candidates: item text embeddings"):
            info["embeddings"] = ensure_item_embeddings(ctx, items)
        targets = None
        if cc.text_cold_only:
            warm = pop.filter(F.col("n_pos") > cc.cold_item_max_events).select("item_id")
            targets = items.select("item_id").join(warm, "item_id", "left_anti")
            info["cold_items"] = targets.count()
        tn = text_neighbours(ctx.store.read("item_embeddings"), targets, cc.neighbours_per_item)
        per_source["text"] = neighbour_source(history, tn, n, consumed)
    if not per_source:
        raise ValueError(f"candidates.sources {cc.sources}: no source could run (affinity needs items.category)")
    return merge_sources(per_source, cc.max_candidates), info


def serving_cutoff(store, configured: Optional[str]):
    """The point in time candidates are generated at: the stored feature tables' cutoff (what scoring
    serves as the users' histories), else ``features.cutoff``; None: every event."""
    ft = stored_feature_tables(store)
    if ft is not None:
        return ft.cutoff
    return resolve_cutoff(None, configured) if configured is not None else None


def run(ctx) -> dict:
    store = ctx.store
    with ctx.step("candidates: extract"):
        events = store.read("events")
        cut = serving_cutoff(store, ctx.cfg.features.cutoff)
        if cut is not None:  # a backtest's later events must neither propose nor exclude items
            events = events_before(events, cut)
        items = store.read("items")
        users = store.read("users") if store.exists("users") else events.select("user_id").distinct()
        exposure = store.read("exposure_propensity") if store.exists("exposure_propensity") else None
        if exposure is None:
            log.warning("exposure_propensity table missing: popularity is not de-biased (weight 1 per positive)")
    cached: list = []
    try:
        with ctx.step("candidates: transform"):
            cands, info = build_candidates(ctx, events, items, users, exposure, cached)
        with ctx.step("candidates: load"):
            version = store.write(cands, "candidates", mode="overwrite", spec=CANDIDATES, overwrite_schema=True)
    finally:
        for df in cached:
            df.unpersist()
    n = store.row_count("candidates")
    ctx.log_rows("candidates", n)
    stats = (store.read("candidates").groupBy("source").count().collect())
    return {
        "rows_out": {"candidates": n},
        "version": version,
        "by_source": {r["source"]: int(r["count"]) for r in stats},
        "exposure_debiased": exposure is not None,
        "as_of": cut.isoformat() if cut is not None else None,
        **info,
    }
