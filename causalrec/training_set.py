"""Training-set stage: labels + point-in-time features + propensities -> ``training_examples``.

Extract events (and mcar_events), users, items, exposure_propensity, treatment_propensity;
transform: assign splits, build features from the events a model may see, join;
load ``id_index`` and ``training_examples`` (partitioned by split,
``training_set.files_per_split`` files per split so Ray Train shards evenly).

Splits (``training_set.split``):

* ``given``: the data set's own split. Coat: the MNAR ratings are train, with a random
  ``valid_fraction`` slice as valid; the MCAR ratings are test (``is_mcar``), except a
  hashed ``mcar_valid_fraction`` of them that is valid: an unbiased validation slice, which
  ``train.valid_metric: auto`` then selects models on. Data whose events carry
  ``context.split`` (Amazon's leave-one-out) keep it.
* ``time``: the last ``test_fraction`` of labelled events by time are test, the
  ``valid_fraction`` before them valid; features are computed as of the train end.
* ``random_user``: users are hashed into test / valid / train.

Leakage guards: features (counts, rating means, history, co-occurrence) never see a
valid/test label: for the time split they are built only from events before the train
end; otherwise without any event of a valid/test pair (:func:`feature_events`: a held-out
impression's click row is its label too). A train row's own label is left out of its
user's and item's label statistics (:func:`leave_own_label_out`; impression labels: its whole
exposure out of their counts and rates, the user's top-attribute share and the item's popularity
rank, :func:`own_exposure_counts`) and its item out of the user's history
(:func:`own_item_out_of_history`). A (user, item) pair that is in test is never in train or
valid, and under ``random_user`` a held-out user has no train rows. Observed=0 rows are the
propensity stage's sampled unobserved pairs (train only), carrying their exposure propensity,
for doubly-robust joint learning.
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from causalrec.features.cold import COLD_ITEM_VECTOR, cold_item_frame, cold_user_vector, float_array
from causalrec.features.common import cutoff_lit
from causalrec.features.common import item_tokens  # noqa: F401  (re-exported for callers)
from causalrec.features.job import build_features
from causalrec.features.pair import PAIR_FEATURE_NAMES, item_cooccurrence, pair_features
from causalrec.features.user import user_attribute_counts, user_history, user_item_counts
from causalrec.propensity.exposure import label_event_type
from causalrec.config import SPLIT_SETTINGS
from causalrec.schemas import ID_INDEX, TRAINING_EXAMPLES, conform

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def _frac(*cols, salt: str):
    return (F.abs(F.xxhash64(F.lit(salt), *cols)) % 100_000) / 100_000.0


def is_mcar_validation_pair(fraction: float):
    """True for the hashed share of MCAR (user, item) pairs that validate rather than test.

    One rule for every stage: the propensity stage may learn from these pairs (e.g. the rating
    marginal of naive-Bayes propensities) exactly because they are never tested on.
    """
    return _frac(F.col("user_id"), F.col("item_id"), salt="mcar_valid") < F.lit(float(fraction))


def outcome_expr(event_type: str, threshold: float):
    if event_type == "rating":
        return (F.col("value") >= F.lit(threshold)).cast("double")
    if event_type in ("impression", "click"):
        return (F.coalesce(F.col("value"), F.lit(0.0)) > 0).cast("double")
    return F.lit(1.0)  # purchase / add_to_cart / view: the event itself is the outcome


def random_user_split(ts):
    """A user's split under ``random_user``: one hash of the user id decides every row of theirs."""
    f = _frac(F.col("user_id"), salt="random_user")
    return F.when(f < ts.test_fraction, "test").when(f < ts.test_fraction + ts.valid_fraction, "valid").otherwise("train")


class NoHeldOutSplit(ValueError):
    """``split: given`` on data that gives no split: no label is held out, so no training set can be built."""


def assign_splits(labelled: DataFrame, cfg, has_mcar: bool) -> tuple[DataFrame, object]:
    """``labelled`` plus ``split``; returns (df, feature cutoff or None)."""
    ts = cfg.training_set
    if ts.split == "given":
        given = F.get_json_object(F.col("context"), "$.split")
        has_given = labelled.where(given.isin("valid", "test")).limit(1).count() > 0
        if has_given:
            return labelled.withColumn("split", F.when(given.isin(*SPLITS), given).otherwise("train")), None
        if not has_mcar:
            raise NoHeldOutSplit("training_set.split=given: the events carry no context.split and there is no "
                             "mcar_events table to use as test; use split=time or random_user")
        split = F.when(_frac(F.col("event_id"), salt="valid") < ts.valid_fraction, "valid").otherwise("train")
        return labelled.withColumn("split", split), None
    if ts.split == "time":
        t = F.col("event_time").cast("double")
        q = labelled.select(t.alias("t")).approxQuantile("t", [1 - ts.test_fraction - ts.valid_fraction,
                                                               1 - ts.test_fraction], 0.0001)
        b_valid, b_test = q
        split = F.when(t >= b_test, "test").when(t >= b_valid, "valid").otherwise("train")
        import datetime as dt

        cutoff = dt.datetime.fromtimestamp(b_valid, tz=dt.timezone.utc)
        return labelled.withColumn("split", split), cutoff
    if ts.split == "random_user":
        return labelled.withColumn("split", random_user_split(ts)), None
    raise ValueError(f"training_set.split: unknown {ts.split!r}; expected given, time or random_user")


def labelled_rows(events: DataFrame, cfg, mcar: DataFrame | None = None, etype: str | None = None):
    """(every label row with ``split`` and ``is_mcar``, the feature cutoff or None).

    The one definition of which labels are train, valid and test, shared by the training set and
    the propensity stage (which must not learn from the held-out ones either). MCAR rows: a hashed
    share validates (unbiased model selection), the rest tests. A pair that is tested on (or
    validated on at random exposure) is never trained or validated on otherwise.
    """
    ts = cfg.training_set
    etype = etype or label_event_type(events, ts.label_event_type)
    labelled, cutoff = assign_splits(events.where(F.col("event_type") == etype), cfg, mcar is not None)
    labelled = labelled.withColumn("is_mcar", F.lit(False))
    if mcar is not None:
        mcar_split = F.when(is_mcar_validation_pair(ts.mcar_valid_fraction), "valid").otherwise("test")
        m = mcar.where(F.col("event_type") == etype).withColumn("split", mcar_split).withColumn("is_mcar", F.lit(True))
        labelled = labelled.unionByName(m)
    held = (F.col("split") == "test") | F.col("is_mcar")
    held_pairs = labelled.where(held).select("user_id", "item_id").distinct()
    labelled = labelled.where(held).unionByName(
        labelled.where(~held).join(held_pairs, ["user_id", "item_id"], "left_anti"))
    return labelled, cutoff


def split_settings(cfg) -> dict:
    """The ``training_set`` settings that decide which labels are held out (and so what a model may see)."""
    return {k: getattr(cfg.training_set, k) for k in SPLIT_SETTINGS}


def check_propensity_split(store, cfg) -> None:
    """Refuse propensities fitted under other split settings than this training set's.

    The propensity stage learns only from the events this split lets a model see
    (:class:`causalrec.propensity.job.FitScope`); under another split its models may have learned
    from this run's valid/test rows, and their weights would go into the training set unnoticed
    (``causalrec run`` reruns the stage when the settings change; a stage run on its own does not).
    Both tables the training set reads are checked: the stage writes them in separate commits, so a
    run that failed between them leaves one fitted under other settings than the other. Each table's
    settings are those of its newest commit that records them (a later commit without causalrec
    metadata, such as a compaction or a plain append, fitted nothing). Tables written before the
    settings were recorded pass. With the same settings, the two must still come from one run
    (:func:`causalrec.storage.stage_runs.check_same_run`): a failed run's new exposure propensities
    next to the last run's treatment propensities would join to none of this run's events.
    """
    from causalrec.storage.stage_runs import check_same_run

    want = split_settings(cfg)
    for name in ("exposure_propensity", "treatment_propensity"):
        if not store.exists(name):
            continue
        recorded = next((m["split_settings"] for m in store.commit_metadata(name) if "split_settings" in m), None)
        if recorded is None or recorded == want:
            continue
        diff = {k: (recorded.get(k), want[k]) for k in want if recorded.get(k) != want[k]}
        raise ValueError(
            f"{name} ({store.path(name)}) was fitted under other training_set "
            f"settings than this run's: " + ", ".join(f"training_set.{k}: fitted {a!r}, now {b!r}"
                                                     for k, (a, b) in diff.items())
            + ". Rerun the propensity stage with these settings first (e.g. `causalrec run <config> --until "
              "training_set`), so its models learn nothing this split holds out")
    check_same_run(store, ("exposure_propensity", "treatment_propensity"), "propensity")


def feature_events(events: DataFrame, labelled: DataFrame, split: str) -> DataFrame:
    """The events features may be built from, given ``labelled`` with its splits.

    ``time``: the cutoff already drops every valid/test label and whatever followed it, and a
    held-out pair's earlier events are the past a model is served with; only the label rows
    are removed here. Otherwise there is no time order to lean on, so every event of a
    valid/test (user, item) pair of the log goes: the click and purchase rows logged with a
    held-out impression would put its outcome into the user's history and the item's counts.
    Under ``random_user`` that is every event of a held-out user on a pair they are tested on.
    MCAR rows come from their own table, so the logged history of MCAR pairs stays (Coat's
    self-selected ratings are the past its random test ratings are predicted from).
    """
    if split == "time":
        return events.join(labelled.where(F.col("split") != "train").select("event_id"), "event_id", "left_anti")
    return events.join(held_log_pairs(labelled), ["user_id", "item_id"], "left_anti")


def held_log_pairs(labelled: DataFrame) -> DataFrame:
    """(user_id, item_id) of the logged (not MCAR) valid/test labels."""
    return labelled.where((F.col("split") != "train") & ~F.col("is_mcar")).select("user_id", "item_id").distinct()


def _loo_rate(rate: str, trials: str, own, k: float, own_trials=1.0):
    """A :func:`~causalrec.features.item.smoothed_rate` (s + k*m) / (n + k) with ``own_trials`` trials of
    ``own`` successes taken out: (rate * (n + k) - own) / (n - own_trials + k); 0 where that is undefined,
    as in the vector."""
    n = F.col(trials).cast("double")
    den = n - own_trials + F.lit(k)
    return F.when(den > 0, (F.col(rate) * (n + F.lit(k)) - own) / den).otherwise(F.lit(0.0))


USER_BASE_COUNTS = ("n_events", "n_interactions", "n_rated", "n_distinct_items")
ITEM_BASE_COUNTS = ("n_exposures", "n_interactions", "n_clicks", "n_purchases", "n_ratings", "n_users")


def _count_slots(names) -> list[str]:
    """The count columns behind a feature vector's ``log1p_n_*`` slots (raw counts, log1p in the vector)."""
    return [n[len("log1p_"):] for n in names if n.startswith("log1p_n_")]


def loo_columns(ft=None):
    """(user columns, item columns) of the feature tables that :func:`leave_own_label_out` reads:
    the label statistics and, given ``ft``, the raw count behind every ``log1p_n_*`` slot."""
    user = [F.col("n_rated").alias("_lu_n"), F.col("rating_mean").alias("_lu_mean"), F.col("rating_var").alias("_lu_var")]
    item = [F.col("n_ratings").alias("_li_n"), F.col("rating_mean").alias("_li_rm"),
            F.col("n_exposures").alias("_li_e"), F.col("click_rate").alias("_li_cr"), F.col("purchase_rate").alias("_li_pr")]
    if ft is not None:  # one struct each: dozens of aliases blow up Spark's constraint propagation
        user.append(F.struct(*[F.col(c) for c in _count_slots(ft.user_names)]).alias("_lu_c"))
        item.append(F.struct(*[F.col(c) for c in _count_slots(ft.item_names)]).alias("_li_c"))
    return tuple(user), tuple(item)


def own_exposure_counts(events: DataFrame, cutoff, event_types, windows_days, items: DataFrame | None = None,
                        item_features: DataFrame | None = None) -> DataFrame:
    """(example_id, ``_own_counts`` struct of ``u_<c>``, ``i_<c>``): per impression among ``events`` before ``cutoff``, how much
    its exposure adds to each user count ``c`` and item count ``c`` of the feature tables.

    An exposure is the impression and its follow-up rows: the pair's other rows from it up to the pair's
    next impression (the simulator's click 5 s and purchase 60 s later; OBD writes none, its click is the
    impression's value), which is how :func:`~causalrec.features.item.item_activity` counts one exposure.
    Sums (events, clicks, interactions, windowed counts: each row where it falls relative to the cutoff)
    lose exactly the exposure's rows. Per-pair terms use the pair's totals: an item's ``n_users`` and a
    user's ``n_distinct_items`` drop by one only when the pair has no other row; ``n_clicks`` counts
    max(clicked impressions, click rows) per pair; ``n_exposures`` counts a pair's impressions, or its rows
    once none is left. ``example_id`` is the impression's event id.

    Given ``items``, the struct also holds ``u_loo_top_attribute_share`` (:func:`_loo_top_attribute_share`);
    given ``item_features`` (the item feature table of these events and cutoff), ``i_loo_popularity_pct``
    (:func:`_loo_popularity_pct`): not what the exposure adds but the feature's value without it.
    """
    from causalrec.features.common import events_before, is_interaction, safe_name
    from causalrec.features.user import activity_columns

    c = cutoff_lit(cutoff)
    ev = events_before(events, cutoff)
    is_imp = F.col("event_type") == "impression"
    one = lambda cond: F.when(cond, 1).otherwise(0)  # noqa: E731
    in_w = {int(w): F.col("event_time") >= c - F.expr(f"INTERVAL {int(w)} DAYS") for w in windows_days}
    row = {"rows": F.lit(1), "imps": one(is_imp), "clicked_imps": one(is_imp & (F.coalesce(F.col("value"), F.lit(0.0)) > 0)),
           "click_rows": one(F.col("event_type") == "click"), "inter": one(is_interaction()),
           "purchases": one(F.col("event_type") == "purchase"),
           "ratings": one((F.col("event_type") == "rating") & F.col("value").isNotNull())}
    for w, cond in in_w.items():
        row.update({f"rows_{w}": one(cond), f"imps_{w}": one(cond & is_imp), f"inter_{w}": one(cond & is_interaction())})
    for t in event_types:
        row[f"n_{safe_name(t)}"] = one(F.col("event_type") == t)
        for w, cond in in_w.items():
            row[f"n_{safe_name(t)}_{w}d"] = one(cond & (F.col("event_type") == t))
    # impressions first at equal times, so a follow-up logged in the same second still follows its impression
    order = Window.partitionBy("user_id", "item_id").orderBy("event_time", (~is_imp).cast("int"), "event_id")
    exposure = F.last(F.when(is_imp, F.col("event_id")), ignorenulls=True).over(
        order.rowsBetween(Window.unboundedPreceding, Window.currentRow))
    tagged = ev.select("user_id", "item_id", exposure.alias("example_id"), *[v.alias(k) for k, v in row.items()])
    pair_keys = ["rows", "imps", "clicked_imps", "click_rows"] + [f"{k}_{w}" for w in in_w for k in ("rows", "imps")]
    pair = tagged.groupBy("user_id", "item_id").agg(*[F.sum(k).alias(f"_p_{k}") for k in pair_keys])
    own = (tagged.where(F.col("example_id").isNotNull()).groupBy("user_id", "item_id", "example_id")
           .agg(*[F.sum(k).alias(k) for k in row]).join(pair, ["user_id", "item_id"]))
    o, p = F.col, lambda k: F.col(f"_p_{k}")
    alone = (p("rows") == o("rows")).cast("int")  # the exposure is all the pair has
    left_imps = p("imps") - o("imps")
    clicks = F.greatest(p("clicked_imps"), p("click_rows")) - F.greatest(
        p("clicked_imps") - o("clicked_imps"), p("click_rows") - o("click_rows"))
    user = {"n_events": o("rows"), "n_interactions": o("inter"), "n_rated": o("ratings"), "n_distinct_items": alone}
    user.update({n: o(n) for n in activity_columns(event_types, windows_days)})
    item = {"n_exposures": p("imps") - F.when(left_imps > 0, left_imps).otherwise(p("rows") - o("rows")),
            "n_interactions": o("inter"), "n_clicks": clicks, "n_purchases": o("purchases"), "n_ratings": o("ratings"),
            "n_users": alone}
    for w in in_w:
        item[f"n_exposures_{w}d"] = p(f"imps_{w}") - F.when(left_imps > 0, p(f"imps_{w}") - o(f"imps_{w}")).otherwise(
            p(f"rows_{w}") - o(f"rows_{w}"))
        item[f"n_interactions_{w}d"] = o(f"inter_{w}")
    # one struct, not dozens of aliases of the same few sums: those send Spark's constraint propagation
    # through every combination once the table is joined to the examples
    fields = [v.cast("double").alias(f"u_{k}") for k, v in user.items()] + [
        v.cast("double").alias(f"i_{k}") for k, v in item.items()]
    if items is not None:
        own = _loo_top_attribute_share(own, events, items, cutoff, o("inter"))
        fields.append(F.col("_loo_tas").cast("double").alias("u_loo_top_attribute_share"))
    if item_features is not None:
        own = _loo_popularity_pct(own, item_features, o("inter"), item["n_exposures"])
        fields.append(F.col("_loo_pct").cast("double").alias("i_loo_popularity_pct"))
    return own.select("example_id", F.struct(*fields).alias("_own_counts"))


def _loo_top_attribute_share(own: DataFrame, events: DataFrame, items: DataFrame, cutoff, own_inter) -> DataFrame:
    """``own`` (user_id, item_id per exposure) plus ``_loo_tas``: the user's ``top_attribute_share`` without the
    exposure's ``own_inter`` interaction rows.

    :func:`~causalrec.features.user.user_top_attributes` divides the largest n_ut (the user's interactions
    with items carrying token t) by n_u (all their interactions). The exposure's interactions are in n_u and
    in n_ut of every token of its item, so without them the share is max_t(n_ut - own * [t of the item]) /
    (n_u - own), and the top token may change (ties are harmless: only the count is used). An item has at
    most M tokens, so that max is over the user's M + 1 largest tokens: one of them is not the item's and
    bounds every token left out. 0 where nothing is left, as the vector has it for a user without tokens.
    """
    toks = item_tokens(items).groupBy("item_id").agg(F.collect_set("token").alias("_toks"))
    m = toks.agg(F.coalesce(F.max(F.size("_toks")), F.lit(0)).alias("_m"))
    w = Window.partitionBy("user_id").orderBy(F.col("n_ut").desc(), F.col("token"))
    top = (user_attribute_counts(events, items, cutoff).withColumn("_r", F.row_number().over(w))
           .crossJoin(F.broadcast(m)).where(F.col("_r") <= F.col("_m") + 1)
           .groupBy("user_id").agg(F.collect_list(F.struct("token", "n_ut")).alias("_top"), F.max("n_u").alias("_n_u")))
    own = own.join(top, "user_id", "left").join(toks, "item_id", "left")
    k = own_inter.cast("long")
    item_toks = F.coalesce(F.col("_toks"), F.array().cast("array<string>"))
    top_left = F.aggregate(F.coalesce(F.col("_top"), F.array().cast(top.schema["_top"].dataType)), F.lit(0).cast("long"),
                           lambda acc, s: F.greatest(acc, s["n_ut"] - k * F.array_contains(item_toks, s["token"]).cast("long")))
    n_left = F.col("_n_u") - k
    share = F.when(F.col("_top").isNotNull() & (n_left > 0), top_left / n_left).otherwise(F.lit(0.0))
    return own.withColumn("_loo_tas", share).drop("_top", "_n_u", "_toks")


def _loo_popularity_pct(own: DataFrame, item_features: DataFrame, d_inter, d_exp) -> DataFrame:
    """``own`` (item_id per exposure) plus ``_loo_pct``: the item's ``popularity_pct`` without the exposure's
    ``d_inter`` interactions and ``d_exp`` exposures.

    :func:`~causalrec.features.item.item_features` ranks items by (n_interactions desc, n_exposures desc,
    item_id), rank 1 first, and divides by the number of items. The other items keep their counts, so the
    item's new rank is 1 + the items other than itself ahead of its reduced counts: one sort of the item
    table with one query point per (item, reduced counts), each counting the item rows before it (the item's
    own row, with its full counts, comes out of that count when it is ahead).
    """
    base = item_features.select("item_id", F.col("n_interactions").cast("long").alias("_ni"),
                                F.col("n_exposures").cast("long").alias("_ne"))
    own = own.join(base, "item_id", "left").withColumn("_qi", F.col("_ni") - d_inter.cast("long")) \
        .withColumn("_qe", F.col("_ne") - d_exp.cast("long"))
    q = own.where(F.col("_ni").isNotNull()).select("item_id", "_qi", "_qe", F.col("_ni").alias("_oi"),
                                                   F.col("_ne").alias("_oe")).distinct()
    pts = base.select("item_id", F.col("_ni").alias("_qi"), F.col("_ne").alias("_qe"), F.lit(None).cast("long").alias("_oi"),
                      F.lit(None).cast("long").alias("_oe"), F.lit(0).alias("_q"))
    pts = pts.unionByName(q.withColumn("_q", F.lit(1)))
    # item rows before query rows at equal keys: the only such item row is the query's own item
    order = Window.orderBy(F.col("_qi").desc(), F.col("_qe").desc(), F.col("item_id"), F.col("_q"))
    pts = pts.withColumn("_ahead", F.sum(1 - F.col("_q")).over(order.rowsBetween(Window.unboundedPreceding,
                                                                                 Window.currentRow)))
    pts = pts.withColumn("_n", F.sum(1 - F.col("_q")).over(Window.partitionBy()))
    self_ahead = ((F.col("_oi") > F.col("_qi")) | ((F.col("_oi") == F.col("_qi")) & (F.col("_oe") >= F.col("_qe")))).cast("long")
    pct = pts.where(F.col("_q") == 1).select("item_id", "_qi", "_qe",
                                             ((F.col("_ahead") - self_ahead + 1) / F.col("_n")).alias("_loo_pct"))
    return own.join(pct, ["item_id", "_qi", "_qe"], "left").drop("_ni", "_ne", "_qi", "_qe")


def leave_own_label_out(ex: DataFrame, ft, etype: str, prior_strength: float, own) -> DataFrame:
    """``features`` of the rows where ``own`` holds with the user's and item's label statistics
    recomputed without the row's own label.

    A train row's label event is among the events its features come from, so its user's rating
    mean/variance and its item's smoothed rating mean (rating labels) contain the value it is
    trained to predict; valid/test rows and served candidates never see theirs. The feature
    tables' exact aggregates (:func:`loo_columns`, carried on ``ex``) less the row's contribution
    give the leave-one-out value in the same slot: feature names and width are unchanged. The
    global rate the item statistics shrink toward keeps the label (a 1/N share of it).

    Impression labels: the row's whole exposure (:func:`own_exposure_counts`, carried on ``ex`` as
    ``_own_counts``) comes out of every ``log1p_n_*`` count slot of its user and item (its click is in the
    user's click and interaction counts and the item's ``n_clicks``: n_clicks = 1 exactly when the
    label is 1 for an item shown once) and of the item's smoothed click and purchase rates; ``n_distinct_items``
    is an exact count, so it loses exactly 0 or 1. Where ``_own_counts`` carries them, the user's
    ``top_attribute_share`` and the item's ``popularity_pct`` are replaced by their values without the
    exposure (:func:`_loo_top_attribute_share`, :func:`_loo_popularity_pct`): the own click is in the top
    token's count and the item's interaction count, and can change which token is top and the item's rank.
    Left in: the user's ``recency_years`` (the exposure's time, not its outcome, at a seconds' scale). The
    pair features already leave the row's item out of the user's profile.
    """
    nu, un, itn = len(ft.user_names), ft.user_names, ft.item_names
    k = float(prior_strength)
    slots, own_value = {}, F.col("label")
    if etype == "rating":
        r = F.col("label")
        n, m, v = F.col("_lu_n").cast("double"), F.col("_lu_mean"), F.col("_lu_var")
        n1 = n - F.lit(1.0)
        mean = F.when(n1 > 0, (n * m - r) / n1).otherwise(F.lit(0.0))
        var = F.when(n1 > 0, F.greatest((n * (v + m * m) - r * r) / n1 - mean * mean, F.lit(0.0))).otherwise(F.lit(0.0))
        slots = {un.index("rating_mean"): mean, un.index("rating_var"): var,
                 nu + itn.index("rating_mean"): _loo_rate("_li_rm", "_li_n", r, k)}
    elif etype == "impression":
        o = lambda c: F.col("_own_counts")[c]  # noqa: E731
        own_value = F.col("_own_counts")  # null where the exposure is not among the feature events
        d_exp = o("i_n_exposures")
        slots = {nu + itn.index("click_rate"): _loo_rate("_li_cr", "_li_e", o("i_n_clicks"), k, d_exp),
                 nu + itn.index("purchase_rate"): _loo_rate("_li_pr", "_li_e", o("i_n_purchases"), k, d_exp)}
        for base, names, side in ((0, un, "u"), (nu, itn, "i")):
            for c in _count_slots(names):
                left = F.greatest(F.col(f"_l{side}_c")[c].cast("double") - o(f"{side}_{c}"), F.lit(0.0))
                slots[base + names.index(f"log1p_{c}")] = F.log1p(left)
        fields = ex.schema["_own_counts"].dataType.names
        for pos, f in ((un.index("top_attribute_share") if "top_attribute_share" in un else None, "u_loo_top_attribute_share"),
                       (nu + itn.index("popularity_pct") if "popularity_pct" in itn else None, "i_loo_popularity_pct")):
            if pos is not None and f in fields:
                slots[pos] = F.coalesce(o(f), F.element_at(F.col("features"), pos + 1).cast("double"))
    stats = [c for c in ex.columns if c.startswith(("_lu_", "_li_", "_own_counts"))]
    if not slots:
        return ex.drop(*stats)
    own = own & own_value.isNotNull()
    # the array rebuilt from slices and the new slots: flat, where a CASE per element over dozens of slots
    # inside a lambda sends the optimizer out of memory
    feats, parts, start = F.col("features"), [], 0
    for pos in sorted(slots):
        if pos > start:
            parts.append(F.slice(feats, start + 1, pos - start))
        parts.append(F.array(slots[pos].cast("float")))
        start = pos + 1
    parts.append(F.slice(feats, start + 1, F.size(feats) - F.lit(start)))
    return ex.withColumn("features", F.when(own, F.concat(*parts)).otherwise(feats)).drop(*stats)


def own_item_out_of_history(hist):
    """The user's history (structs with ``item_idx``) without the row's own item where ``_own`` holds.

    A train row's own label event is among the feature events, so its item is in its user's
    recent items exactly when it was interacted with (clicked, rated): a label proxy that a
    served candidate never carries (consumed items are excluded or already in the past), so
    it is taken out of that row's history and its "Recently" text, as the pair features
    leave the item out.
    """
    return F.when(F.col("_own"), F.filter(hist, lambda s: ~s["item_idx"].eqNullSafe(F.col("item_idx")))).otherwise(hist)


def indexed_history(user_features: DataFrame, iidx: DataFrame, item_text: DataFrame) -> DataFrame:
    """(user_id, ``_hist``): each user's ``history_item_ids`` (most recent first) as sorted structs
    (pos, item_idx, t = the item's text, else its id); an item without an index (new since the model was
    trained) has a null item_idx: :func:`with_history_columns` names it in the "Recently" text, where a
    text model can read it, and leaves it out of the id history, which has no embedding row for it.

    ``iidx``: (item_id, item_idx); ``item_text``: (item_id, text). Users, not examples or candidates,
    are exploded. The training set and scoring both build histories here, then
    :func:`with_history_columns`, so a model is served the history layout it was trained on.
    """
    users_hist = user_features.select("user_id", F.posexplode("history_item_ids").alias("pos", "item_id"))
    users_hist = users_hist.join(iidx, "item_id", "left").join(
        item_text.select("item_id", F.col("text").alias("_it")), "item_id", "left")
    return users_hist.groupBy("user_id").agg(F.sort_array(F.collect_list(
        F.struct("pos", "item_idx", F.coalesce("_it", "item_id").alias("t")))).alias("_hist"))


def with_history_columns(df: DataFrame, user_text, leave_own_item_out: bool = False,
                         history_length: int | None = None) -> DataFrame:
    """``df`` (with :func:`indexed_history`'s ``_hist``, null for users without one) plus ``history_item_idx`` and
    ``user_text``: the ``user_text`` column, then "Recently: " and the texts of the five most recent items.

    ``leave_own_item_out``: training rows flagged ``_own`` lose their own item (:func:`own_item_out_of_history`).
    Serving never does: a candidate is scored with the user's whole recent history.
    ``history_length``: the history is cut to that many items *after* the own item is left out, so a train
    row and a served candidate both see the user's ``history_length`` most recent distinct items other than
    the pair's own (the training set passes histories one item longer for this). The id history holds the
    indexed items only (the ``history_length`` most recent of them); the text, every item.
    """
    hist = F.coalesce("_hist", F.array().cast(df.schema["_hist"].dataType))
    if leave_own_item_out:
        hist = own_item_out_of_history(hist)
    ids = F.filter(hist, lambda s: s["item_idx"].isNotNull())
    if history_length is not None:
        hist, ids = F.slice(hist, 1, int(history_length)), F.slice(ids, 1, int(history_length))
    df = df.withColumn("history_item_idx", F.transform(ids, lambda s: s["item_idx"]))
    recent = F.slice(F.transform(hist, lambda s: s["t"]), 1, 5)
    df = df.withColumn("user_text", F.concat_ws(
        ". ", user_text, F.when(F.size(recent) > 0, F.concat(F.lit("Recently: "), F.array_join(recent, "; ")))))
    return df.drop("_hist")


def build_id_index(spark, users: DataFrame, items: DataFrame, *event_frames: DataFrame) -> DataFrame:
    """(kind, id, idx): dense 0-based indices in id order (zipWithIndex: no single-partition window)."""
    def index(kind, ids):
        rdd = ids.distinct().orderBy("id").rdd.zipWithIndex().map(lambda r: (kind, r[0][0], int(r[1])))
        return spark.createDataFrame(rdd, ID_INDEX.spark_schema())

    uids = users.select(F.col("user_id").alias("id"))
    iids = items.select(F.col("item_id").alias("id"))
    for ev in event_frames:
        uids = uids.unionByName(ev.select(F.col("user_id").alias("id")))
        iids = iids.unionByName(ev.select(F.col("item_id").alias("id")))
    return index("user", uids).unionByName(index("item", iids))


def with_feature_vectors(pairs: DataFrame, ft, events: DataFrame, items: DataFrame, cfg,
                         user_cols=(), item_cols=()) -> DataFrame:
    """``pairs`` (user_id, item_id, ...) plus ``features`` = user vector ++ item vector ++ pair vector.

    Everything is as of ``ft.cutoff`` and comes from ``events`` the caller allows (training:
    train-split events only; scoring: all events). Training examples and scoring candidates
    both go through here, so a model is served the feature layout it was trained on.
    ``user_cols``/``item_cols``: further columns of ``ft.users``/``ft.items`` to carry along
    in the same joins. Users or items without a feature row get the tables' no-activity vector
    (:mod:`causalrec.features.cold`), the same in training and serving.
    """
    cut = ft.cutoff
    # the user feature table already holds each user's recent items as of the cutoff: no second pass over events
    hist = ft.users.select("user_id", "history_item_ids")
    pf = pair_features(pairs, attr_counts=user_attribute_counts(events, items, cut),
                       ui_counts=user_item_counts(events, cut), items=items, history=hist,
                       cooc=item_cooccurrence(hist))
    cold_item = cold_item_frame(ft.items, ft.item_names, cfg.features.smoothing_prior_strength)
    uf = ft.users.select("user_id", F.col("feature_vector").alias("_uv"), *user_cols)
    itf = ft.items.select("item_id", F.col("feature_vector").alias("_iv"), *item_cols)
    out = (pairs.join(uf, "user_id", "left").join(itf, "item_id", "left")
           .join(pf.select("user_id", "item_id", "pair_vector"), ["user_id", "item_id"], "left")
           .crossJoin(F.broadcast(cold_item)))
    out = out.withColumn("features", F.concat(F.coalesce("_uv", float_array(cold_user_vector(ft.user_names))),
                                              F.coalesce("_iv", COLD_ITEM_VECTOR),
                                              F.coalesce("pair_vector", float_array([0.0] * len(PAIR_FEATURE_NAMES)))))
    return out.drop("_uv", "_iv", "pair_vector", COLD_ITEM_VECTOR)


def build_training_examples(events: DataFrame, users: DataFrame, items: DataFrame, exposure: DataFrame,
                            treatment: DataFrame | None, id_index: DataFrame, cfg,
                            mcar: DataFrame | None = None, return_layout: bool = False):
    """The ``training_examples`` rows; ``return_layout``: ``(rows, feature_layout)``, the names of the
    ``features`` slots (:func:`feature_layout`), which :func:`run` records in the table's commit."""
    ts = cfg.training_set
    etype = label_event_type(events, ts.label_event_type)
    labelled, cutoff = labelled_rows(events, cfg, mcar, etype)

    # features only from what training may see
    feat_events = feature_events(events, labelled, ts.split)
    ft = build_features(feat_events, users, items, cfg, cutoff=cutoff)

    obs = labelled.select(
        F.col("event_id").alias("example_id"), "split", "user_id", "item_id", F.lit(1).alias("observed"),
        F.col("value").alias("label"), outcome_expr(etype, ts.positive_threshold).alias("outcome"),
        F.col("recommended").cast("int").alias("treated"), "is_mcar", "event_time", "event_id", "logged_propensity",
    )
    exp_obs = exposure.where(F.col("observed") == 1).select("user_id", "item_id", F.col("exposure_propensity").alias("_pe"))
    obs = obs.join(exp_obs, ["user_id", "item_id"], "left").withColumn(
        # MCAR rows: the random design's own probability; logged rows: the model's
        "exposure_propensity",
        F.when(F.col("is_mcar"), F.coalesce(F.col("logged_propensity"), F.col("_pe"), F.lit(1.0)))
        .otherwise(F.coalesce(F.col("_pe"), F.lit(cfg.propensity.clip_min))),
    ).drop("_pe", "logged_propensity")
    if treatment is not None:
        obs = obs.join(treatment.select("event_id", F.col("treatment_propensity")), "event_id", "left")
    else:
        obs = obs.withColumn("treatment_propensity", F.lit(None).cast("double"))
    obs = obs.drop("event_id").withColumn("sample_weight", F.lit(1.0))
    # whose own label event is among the feature events (and so must be left out of its features)
    own = (F.col("split") == "train") & ~F.col("is_mcar") & (F.col("event_time") < cutoff_lit(ft.cutoff))
    if ts.split != "time":
        obs = obs.join(held_log_pairs(labelled).withColumn("_held_pair", F.lit(True)), ["user_id", "item_id"], "left")
        own = own & F.col("_held_pair").isNull()
    obs = obs.withColumn("_own", F.coalesce(own, F.lit(False))).drop("_held_pair")

    ratio = float(ts.unobserved_per_observed)
    fit_ratio = max(ratio, 1.0)
    unobs = exposure.where(F.col("observed") == 0)
    if ratio < fit_ratio:
        unobs = unobs.where(_frac(F.col("user_id"), F.col("item_id"), salt="unobs") < ratio / fit_ratio)
    non_train_pairs = labelled.where(F.col("split") != "train").select("user_id", "item_id").distinct()
    unobs = unobs.join(non_train_pairs, ["user_id", "item_id"], "left_anti")
    if ts.split == "random_user":  # a held-out user has no train rows, observed or not
        unobs = unobs.where(random_user_split(ts) == "train")
    unobs = unobs.select(
        F.concat(F.lit("unobs:"), F.col("user_id"), F.lit(":"), F.col("item_id")).alias("example_id"),
        F.lit("train").alias("split"), "user_id", "item_id", F.lit(0).alias("observed"),
        F.lit(None).cast("double").alias("label"), F.lit(None).cast("double").alias("outcome"),
        F.lit(None).cast("int").alias("treated"), F.lit(False).alias("is_mcar"),
        F.lit(None).cast("timestamp").alias("event_time"), "exposure_propensity",
        # the pairs the sample stands for, thinned by ratio / fit_ratio above
        (F.coalesce(F.col("weight"), F.lit(1.0)) * F.lit(fit_ratio / ratio if ratio > 0 else 1.0)).alias("sample_weight"),
        F.lit(None).cast("double").alias("treatment_propensity"), F.lit(False).alias("_own"),
    )
    ex = obs.unionByName(unobs if ratio > 0 else unobs.limit(0))

    # features: user vector ++ item vector ++ pair vector, all as of the cutoff
    loo_user, loo_item = loo_columns(ft)
    if etype == "impression":  # what each train row's own exposure adds to the counts
        own_counts = own_exposure_counts(feat_events, ft.cutoff, list(cfg.data.event_types), cfg.features.windows_days,
                                         items=items, item_features=ft.items)
        ex = ex.join(own_counts, "example_id", "left")
    ex = with_feature_vectors(ex, ft, feat_events, items, cfg,
                              user_cols=("history_item_ids", F.col("text").alias("_utext"), *loo_user),
                              item_cols=(F.col("text").alias("item_text"), *loo_item))
    ex = leave_own_label_out(ex, ft, etype, cfg.features.smoothing_prior_strength, F.col("_own"))

    uidx = id_index.where(F.col("kind") == "user").select(F.col("id").alias("user_id"), F.col("idx").alias("user_idx"))
    iidx = id_index.where(F.col("kind") == "item").select(F.col("id").alias("item_id"), F.col("idx").alias("item_idx"))
    ex = ex.join(uidx, "user_id").join(iidx, "item_id")

    # history as dense indices and as text, per user: the distinct recent items (user_history, as the
    # features stage builds them for serving) one longer than history_length, so a train row that leaves
    # its own item out still has history_length items, as a served candidate has
    hl = int(cfg.features.history_length)
    hist = user_history(feat_events, ft.cutoff, hl + 1)
    ex = ex.join(indexed_history(hist, iidx, ft.items), "user_id", "left")
    ex = with_history_columns(ex, F.col("_utext"), leave_own_item_out=True, history_length=hl).drop("_own")
    ex = conform(ex, TRAINING_EXAMPLES)
    return (ex, feature_layout(ft)) if return_layout else ex


FEATURE_NAMES = "feature_names"  # training_examples commit metadata: the names of the ``features`` slots, in order


def feature_layout(ft) -> list[str]:
    """The names of :func:`with_feature_vectors`' ``features`` slots, in order: ``user:<name>`` for the
    user vector, ``item:<name>`` for the item vector, ``pair:<name>`` for the pair vector.

    The attribute one-hots come from the users/items tables as they are when features are built, so a
    new attribute token moves every later slot: training records this list (training_examples commit,
    then each checkpoint's meta.json) and scoring maps served vectors onto it by name
    (:func:`align_features`).
    """
    return ([f"user:{n}" for n in ft.user_names] + [f"item:{n}" for n in ft.item_names]
            + [f"pair:{n}" for n in PAIR_FEATURE_NAMES])


def recorded_feature_names(commit_metadata) -> list[str] | None:
    """The ``features`` layout ``training_examples`` were built with (:func:`feature_layout`), from the table's
    causalrec commit metadata, newest first; None for a table written before the layout was recorded."""
    v = newest_recorded(commit_metadata, FEATURE_NAMES)
    return None if v is None else [str(n) for n in v]


def newest_recorded(commit_metadata, key: str):
    """``key``'s value in the newest commit metadata (newest first) that records it; None when none does
    (a later commit that records nothing, e.g. a compaction, changes no rows)."""
    return next((m[key] for m in commit_metadata if m.get(key) is not None), None)


def feature_index(served: list, trained: list) -> list[int]:
    """For each trained slot, its position in the ``served`` layout, -1 where the served layout lacks it."""
    pos = {}
    for i, n in enumerate(served):
        pos.setdefault(n, i)
    return [pos.get(n, -1) for n in trained]


def align_features(df: DataFrame, served: list, trained: list, col: str = "features", what: str = "scoring",
                   model: str = "the model") -> DataFrame:
    """``df`` with its ``col`` vectors (in the ``served`` layout) rearranged into the ``trained`` layout, by name.

    A slot the model was trained with that the served layout lacks (an attribute token no longer in the
    users/items tables) is 0, as for an absent attribute; served slots the model never saw (new tokens) are
    dropped. One Spark expression over a precomputed index array; a no-op when the layouts are the same.
    """
    served, trained = list(served), list(trained)
    if served == trained:
        return df
    idx = feature_index(served, trained)
    missing = [n for n, i in zip(trained, idx) if i < 0]
    new = sorted(set(served) - set(trained))
    log.warning("%s: the feature layout differs from the one %s was trained with (%d slots served, %d trained): "
                "mapping by name; %d trained slot(s) absent now are 0 (%s), %d new slot(s) dropped (%s)", what, model,
                len(served), len(trained), len(missing), ", ".join(missing[:5]) + ("..." if len(missing) > 5 else ""),
                len(new), ", ".join(new[:5]) + ("..." if len(new) > 5 else ""))
    zero = F.lit(0.0).cast("float")
    mapped = F.transform(F.array(*[F.lit(int(i)) for i in idx]).cast("array<int>"),
                         lambda i: F.when(i >= 0, F.coalesce(F.get(F.col(col), i).cast("float"), zero)).otherwise(zero))
    return df.withColumn(col, F.when(F.col(col).isNull(), F.lit(None).cast("array<float>")).otherwise(mapped))


ID_INDEX_VERSION = "id_index_version"  # training_examples commit metadata: the id_index version its rows use


def recorded_id_index_version(commit_metadata) -> int | None:
    """The ``id_index`` version ``training_examples``' rows were indexed with, as :func:`run` records it in
    the commit that writes them; ``commit_metadata``: the table's causalrec commit metadata, newest first
    (``DeltaStore.commit_metadata``). The newest commit that records one counts (a later compaction
    re-indexes nothing). None for a table written before the version was recorded.

    Why not the current ``id_index`` version: the stage writes ``id_index`` and ``training_examples`` in two
    commits, so a run that failed between them leaves an ``id_index`` one version ahead of the rows.
    """
    v = newest_recorded(commit_metadata, ID_INDEX_VERSION)
    return None if v is None else int(v)


def files_layout(df: DataFrame, files_per_split: int) -> DataFrame:
    """Exactly one shuffle partition per (split, bucket), so the writer makes ``files_per_split`` files per split.

    ``repartition(n, key)`` sends a row to pmod(murmur3(key), n); we pick, once on the
    driver, one int key per target partition (a tiny Spark job over candidate ints), so
    no two (split, bucket) groups share a task and no task writes two files of one split.
    Within a file the rows are in a hash order of ``example_id``: a function of the rows, not of the
    plan that produced them (join strategies, AQE's runtime choices, the cluster's partitioning), so
    training reads the same batches from the same examples on a laptop and on a cluster.
    """
    n = len(SPLITS) * files_per_split
    spark = df.sparkSession
    cand = spark.range(0, 64 * n).select(F.col("id").cast("int").alias("k"))
    cand = cand.select("k", F.pmod(F.hash("k"), F.lit(n)).alias("p")).groupBy("p").agg(F.min("k").alias("k")).collect()
    key_of = {int(r["p"]): int(r["k"]) for r in cand}
    if len(key_of) < n:
        raise RuntimeError(f"files_layout: could not find {n} distinct partition keys")
    keys = [key_of[p] for p in range(n)]
    combo = F.array_position(F.array(*[F.lit(s) for s in SPLITS]), F.col("split")).cast("int") - 1
    combo = combo * files_per_split + F.pmod(F.xxhash64(F.col("example_id")), F.lit(files_per_split)).cast("int")
    key = F.element_at(F.array(*[F.lit(k) for k in keys]), combo + 1)
    return (df.withColumn("_pkey", key.cast("int")).repartition(n, "_pkey")
            .sortWithinPartitions(F.xxhash64("example_id"), "example_id").drop("_pkey"))


def run(ctx) -> dict:
    cfg, store, spark = ctx.cfg, ctx.store, ctx.spark
    with ctx.step("training_set: extract"):
        check_propensity_split(store, cfg)
        events, users, items = store.read("events"), store.read("users"), store.read("items")
        mcar = store.read("mcar_events") if store.has_rows("mcar_events") else None
        exposure = store.read("exposure_propensity")
        treatment = store.read("treatment_propensity") if store.exists("treatment_propensity") else None
        for t in ("events", "mcar_events", "exposure_propensity", "treatment_propensity"):
            if store.exists(t):
                ctx.log_rows(t, store.row_count(t), "in")
    with ctx.step("training_set: id_index"):
        frames = [events] + ([mcar] if mcar is not None else [])
        idx_version = store.write(build_id_index(spark, users, items, *frames), "id_index", "overwrite",
                                  spec=ID_INDEX, overwrite_schema=True)
        if idx_version is None:
            idx_version = store.version("id_index")
        # exactly the version just written (not whatever is current when Spark reads it), which the
        # training_examples commit records
        id_index = store.read("id_index", version=idx_version)
        ctx.log_rows("id_index", store.row_count("id_index", idx_version))
    with ctx.step("training_set: build + load"):
        ex, layout = build_training_examples(events, users, items, exposure, treatment, id_index, cfg, mcar,
                                             return_layout=True)
        # the id map and the feature layout the rows use: train copies both into its checkpoints' meta.json
        store.write(files_layout(ex, cfg.training_set.files_per_split), "training_examples", "overwrite",
                    spec=TRAINING_EXAMPLES, overwrite_schema=True, rows_per_file=1 << 40,
                    metadata={ID_INDEX_VERSION: int(idx_version), FEATURE_NAMES: layout})
    counts = {r["split"]: r["count"] for r in store.read("training_examples").groupBy("split").count().collect()}
    for s, n in sorted(counts.items()):
        ctx.log_rows(f"training_examples[{s}]", n)
    return {"training_examples": counts, "split": cfg.training_set.split,
            "files_per_split": cfg.training_set.files_per_split, "id_index": store.row_count("id_index", idx_version),
            "id_index_version": int(idx_version)}
