"""Propensity stage: exposure and treatment propensities plus their diagnostics.

Extract events, feature tables (and mcar_events / ground_truth when present);
transform with the estimators in exposure.py / treatment.py; load
``exposure_propensity``, ``treatment_propensity`` and ``propensity_diagnostics``
(each overwritten atomically, so a rerun never duplicates) and print a summary.

Every learned propensity model is fitted only on the events the training set lets a model see
(:class:`FitScope`): under ``training_set.split: time`` the log before the training cutoff,
under ``given`` and ``random_user`` the log without any event of a held-out (valid/test) pair,
on feature tables built from those same events, and then scores every row, train, valid and
test. Logged propensities are passed through as before.

The adjustment set (which feature groups enter each model) is read from the causal
graph (``cfg.causal_graph``) when :mod:`causalrec.causal_graph` is available; else,
or when ``propensity.adjustment_set`` is set, that list / user+item features are used.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from causalrec.features.cold import float_array
from causalrec.features.common import cutoff_lit
from causalrec.propensity import diagnostics as D
from causalrec.propensity.exposure import (
    Universe,
    label_event_type,
    make_exposure_estimator,
    observed_pairs,
    sample_unobserved,
)
from causalrec.propensity.treatment import EstimatedTreatment, logged_treatment
from causalrec.schemas import EXPOSURE_PROPENSITY, PROPENSITY_DIAGNOSTICS, TREATMENT_PROPENSITY, conform
from causalrec.storage.stage_runs import RUN_KEY, new_run_id

log = logging.getLogger(__name__)

GROUP_COLUMNS = {"user_features": "uvec", "item_features": "ivec"}


def adjustment_set(cfg, treatment: str) -> tuple[list, str]:
    """Feature groups to adjust for when modelling ``treatment`` ("exposure" or "recommended")."""
    if cfg.propensity.adjustment_set:
        return list(cfg.propensity.adjustment_set), "config"
    from causalrec.causal_graph import adjustment_set as backdoor_set

    backdoor = backdoor_set(cfg, treatment, "outcome")
    groups = [g for g in backdoor if g in GROUP_COLUMNS]
    # the models take feature groups only: a back-door node with no feature columns cannot be adjusted for,
    # and the set without it may not block every back-door path, so say so rather than claim the criterion
    dropped = [g for g in backdoor if g not in GROUP_COLUMNS]
    if dropped:
        log.warning("propensity (%s): the causal graph's back-door set %s includes %s, which the propensity models "
                    "have no feature columns for; adjusting for %s only, which may leave a back-door path open",
                    treatment, backdoor, dropped, groups or ["user_features", "item_features"])
    note = f" without {', '.join(dropped)} (no feature columns)" if dropped else ""
    if groups:
        return groups, "causal_graph back-door criterion" + note
    return ["user_features", "item_features"], "default (user+item features)" + note


@dataclass
class ExposureResult:
    table: DataFrame  # observed + sampled unobserved pairs, scored by the chosen method
    diagnostics: list = field(default_factory=list)
    universe: Optional[Universe] = None
    scored: dict = field(default_factory=dict)  # method -> scored pairs (all methods diagnosed)
    cached: list = field(default_factory=list)  # DataFrames to unpersist once ``table`` is written


def _hash_fraction(cols, salt: str):
    return (F.abs(F.xxhash64(F.lit(salt), *cols)) % 10_000) / 10_000.0


@dataclass
class FitScope:
    """Which logged events a propensity model may learn from: those the training set's features may
    see (:func:`causalrec.training_set.feature_events`), by ``training_set.split``.

    * ``time``: events before the training cutoff. Train rows get weights learned from their own
      past, as in production, where the propensity model is fitted on the log so far and applied to
      what comes next.
    * ``given`` / ``random_user``: the log without any event of a held-out logged pair (a valid or
      test label, the click and purchase rows logged with it too).

    The fit is a function of those events alone: a pair observed only in the others may be drawn
    as one of the fit's sampled unobserved pairs (under ``time`` it was unobserved then; otherwise
    leaving it out would tell the fit which pairs are held out). In the written table it is that
    observation, scored by the model, not a second row.

    Valid/test rows get the fitted model's prediction rather than one refitted on them: that refit
    would learn from test rows (naive Bayes from their ratings, every method through features that
    count their labels), and the test metrics would no longer include the propensity model's error
    on unseen data, which a deployed model does have. Where the logging policy's own probabilities
    are logged (``logged``), every row uses them, so nothing is learned.
    """

    cutoff: Optional[dt.datetime] = None
    held_pairs: Optional[DataFrame] = None  # (user_id, item_id) of the held-out logged labels

    @property
    def restricted(self) -> bool:
        return self.cutoff is not None or self.held_pairs is not None

    def fit_events(self, events: DataFrame) -> DataFrame:
        """The rows of ``events`` a model may learn from (:meth:`mark`'s rule)."""
        return self.mark(events).where(F.col("_fit")).drop("_fit") if self.restricted else events

    def mark(self, df: DataFrame) -> DataFrame:
        """``df`` (user_id, item_id, event_time, ...) plus ``_fit``: may a model learn from this row."""
        if self.cutoff is not None:
            return df.withColumn("_fit", F.col("event_time") < cutoff_lit(self.cutoff))
        if self.held_pairs is not None:
            flag = self.held_pairs.select("user_id", "item_id", F.lit(False).alias("_fit"))
            return df.join(flag, ["user_id", "item_id"], "left").withColumn("_fit", F.coalesce("_fit", F.lit(True)))
        return df.withColumn("_fit", F.lit(True))

    def require_fit_rows(self, fit_rows: DataFrame, events: DataFrame, what: str) -> None:
        """Stop before fitting ``what`` when the time split leaves it nothing to learn from (``fit_rows``
        empty): with tied timestamps (Coat's one synthetic time) the cutoff is every event's time, and
        MLlib would fail later with an error that names none of this."""
        if self.cutoff is None or fit_rows.limit(1).count():
            return
        later = events.where(F.col("event_time") >= cutoff_lit(self.cutoff)).count()
        raise ValueError(
            f"propensity ({what}): training_set.split=time puts the training cutoff at {self.cutoff.isoformat()} "
            f"and nothing a model may learn from is before it ({later} events at or after it; tied timestamps, "
            f"such as one time for the whole log, leave no earlier events). Use training_set.split=given or "
            f"random_user, or training_set.valid_fraction / test_fraction that leave earlier events to fit on")

    def describe(self) -> Optional[str]:
        if self.cutoff is not None:
            return f"events before {self.cutoff.isoformat()}"
        return "events of train pairs only (valid/test pairs held out)" if self.held_pairs is not None else None


def fit_scope(events: DataFrame, cfg, mcar: Optional[DataFrame] = None) -> FitScope:
    """The :class:`FitScope` of ``cfg.training_set``, from the training set's own split of the same
    labelled events (:func:`causalrec.training_set.labelled_rows`), not a second rule that could drift."""
    from causalrec.training_set import NoHeldOutSplit, held_log_pairs, labelled_rows

    try:
        labelled, cutoff = labelled_rows(events, cfg, mcar, label_event_type(events, cfg.training_set.label_event_type))
    except NoHeldOutSplit:  # nothing is held out (the training set stage will say why it cannot split)
        return FitScope()
    if cfg.training_set.split == "time":
        return FitScope(cutoff=cutoff)
    return FitScope(held_pairs=held_log_pairs(labelled))


def with_vectors(df: DataFrame, user_features: DataFrame, item_features: Optional[DataFrame] = None,
                 cold: Optional[tuple] = None) -> DataFrame:
    """``df`` plus ``uvec`` (and ``ivec`` when ``item_features`` is given). A user or item the feature
    tables lack (first seen after a cutoff, or every event held out) keeps its propensity: it gets
    ``cold`` = (user vector, item vector), the tables' no-activity encoding as training examples give
    it (:meth:`causalrec.features.job.FeatureTables.cold_vectors`), or zeros where that is not known."""
    for j, (table, key, col) in enumerate(((user_features, "user_id", "uvec"), (item_features, "item_id", "ivec"))):
        if table is None:
            continue
        if cold is not None:
            default = float_array(cold[j])
        else:
            width = table.select(F.max(F.size("feature_vector"))).first()[0] or 0
            default = F.array_repeat(F.lit(0.0).cast("float"), width)
        vec = table.select(key, F.col("feature_vector").alias(col))
        df = df.join(vec, key, "left").withColumn(
            col, F.coalesce(col, default))
    return df


def mcar_for_propensity(mcar: DataFrame, cfg) -> DataFrame:
    """The MCAR ratings a propensity model may learn from: only the validation share.

    With ``training_set.mcar_valid_fraction`` > 0 the rest of the MCAR ratings are the test
    set, and a propensity model fitted on them (naive Bayes takes the MCAR rating marginal)
    would let test data into training. With no validation share all MCAR rows are used, as
    Schnabel et al. (2016) did on Yahoo! R3, and a warning says so.
    """
    from causalrec.training_set import is_mcar_validation_pair

    frac = float(cfg.training_set.mcar_valid_fraction)
    if frac > 0:
        mcar = mcar.where(is_mcar_validation_pair(frac))
    else:
        log.warning("propensity: the MCAR sample used for exposure propensities is also the test set "
                    "(set training_set.mcar_valid_fraction to hold a validation share apart)")
    return mcar.select("user_id", "item_id", "value")


def exposure_propensities(events: DataFrame, user_features: DataFrame, item_features: DataFrame, cfg,
                          mcar: Optional[DataFrame] = None, methods: Optional[list] = None,
                          feature_groups: tuple = ("user_features", "item_features"),
                          scope: FitScope = FitScope(), cold: Optional[tuple] = None) -> ExposureResult:
    """Fit each method on (1 - holdout_fraction) of the pairs; diagnose on the held-out pairs; score all.

    With a restricted ``scope`` (see :class:`FitScope`) the pairs fitted on, their sampled
    unobserved pairs and the held-out ones come from the events it lets a model learn from. The
    table then holds those pairs plus the pairs observed only in the other events (later, or
    valid/test), scored by the same model, so every labelled row has a propensity. A pair the
    fit observed keeps that value, so no estimate of a train row depends on a held-out event.
    """
    pc = cfg.propensity
    etype = label_event_type(events, cfg.training_set.label_event_type)
    obs = observed_pairs(scope.fit_events(events), etype)
    scope.require_fit_rows(obs, events, "exposure")  # before caching: a refusal leaves nothing cached
    obs = obs.cache()
    n_items = item_features.count()
    universe = Universe(obs.select("user_id").distinct().count(), n_items, obs.count())
    ratio = max(float(cfg.training_set.unobserved_per_observed), 1.0)
    neg = sample_unobserved(obs, item_features, n_items, ratio, cfg.project.seed)
    h = _hash_fraction([F.col("user_id"), F.col("item_id")], "exposure-holdout")
    later = neg_now = None
    if scope.restricted:
        later = observed_pairs(events, etype).join(obs.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
        # a sampled pair observed only in the other events is that observation in the table, not a second row
        neg_now = neg.join(later.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
    pairs = with_vectors(obs.unionByName(neg), user_features, item_features, cold).withColumn("_h", h).cache()
    table_pairs, cached = pairs, [pairs]
    if later is not None:
        table_pairs = with_vectors(obs.unionByName(later).unionByName(neg_now), user_features, item_features, cold)
        table_pairs = table_pairs.withColumn("_h", h).cache()
        cached.append(table_pairs)
    fit_part = pairs.where(F.col("_h") >= pc.holdout_fraction)
    mcar_vals = None
    if mcar is not None:
        mcar_vals = mcar_for_propensity(mcar.where(F.col("event_type") == etype), cfg)
    chosen = pc.exposure_method
    methods = list(methods) if methods is not None else [chosen] + [
        m for m in pc.compare_methods if m != chosen and (m != "naive_bayes" or mcar_vals is not None)]
    if chosen not in methods:
        methods.append(chosen)
    cols = [GROUP_COLUMNS[g] for g in feature_groups]
    rows, scored, table = [], {}, None
    for m in methods:
        if m == "naive_bayes" and mcar_vals is None:
            raise ValueError("propensity.exposure_method=naive_bayes needs an MCAR sample (mcar_events table)")
        # one fit on the non-held-out pairs: its held-out calibration is the calibration of the
        # propensities we write (no refit whose calibration would go unmeasured)
        est = make_exposure_estimator(m, pc)
        if hasattr(est, "feature_cols"):
            est.feature_cols = tuple(cols)
        est.fit(fit_part, universe, mcar_vals)
        est.fix_scale(pairs, universe)
        held = est.predict(pairs.where(F.col("_h") < pc.holdout_fraction)).drop("uvec", "ivec")
        sc = est.predict(table_pairs).drop("uvec", "ivec", "_h")
        scored[m] = sc
        rows += D.exposure_rows(m, held, sc.where(F.col("observed") == 1), pc.clip_min, pc.calibration_bins)
        if m == chosen:
            table = sc
    obs.unpersist()
    return ExposureResult(table=table, diagnostics=rows, universe=universe, scored=scored, cached=cached)


def _one_row_per_decision(has_decisions: bool):
    """The treatment model's examples, and the units its diagnostics count: one row per decision. A
    decision's click and purchase rows carry its flag too, and would weight clicked decisions two or three
    times (:mod:`causalrec.decisions`); a log with no decision rows keeps every row. Every row is scored."""
    from causalrec.decisions import DECISION_EVENT

    return (F.col("event_type") == DECISION_EVENT) if has_decisions else F.lit(True)


def treatment_versus_truth(treatment: DataFrame, events: DataFrame, truth: DataFrame) -> dict:
    """:func:`diagnostics.versus_truth` of the treatment propensities against the simulator's true ones,
    one row per decision (:func:`_one_row_per_decision`): the table scores every event, and a decision's
    click and purchase rows counted a clicked decision two or three times."""
    has_decisions = events.where(_one_row_per_decision(True)).limit(1).count() > 0
    units = events.where(_one_row_per_decision(has_decisions)).select("event_id")
    true = truth.select("user_id", "item_id", F.col("treatment_propensity").alias("_true"))
    return D.versus_truth(treatment.join(units, "event_id", "left_semi"), true, "treatment_propensity", "_true")


def treatment_propensities(events: DataFrame, user_features: DataFrame, item_features: DataFrame, cfg,
                           feature_groups: tuple = ("user_features", "item_features"),
                           scope: FitScope = FitScope(), cold: Optional[tuple] = None
                           ) -> tuple[Optional[DataFrame], list]:
    """Logged propensities unchanged when present (and method 'logged'); else MLlib LR/GBT fitted on
    (1 - holdout_fraction) of the events ``scope`` lets a model learn from, diagnosed on the rest of
    them, and scoring every event, clipped."""
    from causalrec.decisions import DECISION_EVENT

    pc = cfg.propensity
    is_decision = F.col("event_type") == DECISION_EVENT
    has = events.agg(F.count("recommended").alias("rec"), F.count("logged_propensity").alias("lp"),
                     F.countDistinct("recommended").alias("k"),
                     F.count(F.when(is_decision, F.col("recommended"))).alias("decisions")).collect()[0]
    if has["rec"] == 0:
        return None, []
    method = pc.treatment_method
    if method == "choice":
        return choice_propensities(events, user_features, cfg, scope, has["decisions"] > 0, cold)
    unit = _one_row_per_decision(has["decisions"] > 0)
    if method == "logged" and has["lp"] > 0:
        t = logged_treatment(events)
        rows = _treatment_rows("logged", None, logged_treatment(events.where(unit)), pc)
        return t, rows
    if method == "logged":
        if has["k"] < 2:
            log.info("treatment_method=logged but the events carry no logged propensity and every row is a "
                     "recommendation: estimating the slot choice probability (method choice)")
            return choice_propensities(events, user_features, cfg, scope, has["decisions"] > 0, cold)
        log.info("treatment_method=logged but the events carry no logged propensity: estimating with logistic")
        method = "logistic"
    df = with_vectors(events.where(F.col("recommended").isNotNull())
                      .select("event_id", "user_id", "item_id", "event_time",
                              F.col("recommended").cast("int").alias("treated"), unit.alias("_decision")),
                      user_features, item_features, cold)
    df = scope.mark(df.withColumn("_h", _hash_fraction([F.col("event_id")], "treatment-holdout")))
    df = df.withColumn("_fit", F.col("_fit") & F.col("_decision"))  # one example per decision
    scope.require_fit_rows(df.where(F.col("_fit")), events, f"treatment, {method}")
    cols = tuple(GROUP_COLUMNS[g] for g in feature_groups)
    model = EstimatedTreatment(method, pc.treatment_eps, pc.reg_param, pc.max_iter, cols, cfg.project.seed)
    model.fit(df.where((F.col("_h") >= pc.holdout_fraction) & F.col("_fit")))
    scored = model.predict(df)
    held = scored.where((F.col("_h") < pc.holdout_fraction) & F.col("_fit"))
    helpers = ("uvec", "ivec", "_h", "_fit", "_decision", "event_time")
    t = scored.drop(*helpers)
    return t, _treatment_rows(method, held, scored.where(F.col("_decision")).drop(*helpers), pc)


def choice_propensities(events: DataFrame, user_features: DataFrame, cfg, scope: FitScope = FitScope(),
                        has_decisions: bool = True, cold: Optional[tuple] = None) -> tuple[DataFrame, list]:
    """Slate logs (every row recommended): P(item chosen for its slot), fitted on (1 - holdout_fraction)
    of the rows ``scope`` lets a model learn from, diagnosed on the rest of them, scoring every row
    (see :mod:`causalrec.propensity.choice`); a group with none of those rows outside the holdout gets
    no model and its rows no propensity (warned). With a cutoff the time buckets span the rows before it,
    so later rows fall in the last bucket fitted: the policy as last seen. ``has_decisions``: the log has
    decision rows (:func:`_one_row_per_decision`), as :func:`treatment_propensities` counted."""
    from causalrec.propensity import choice as C

    pc = cfg.propensity
    rows = C.choice_rows(events, pc.choice_groups, pc.choice_time_buckets, span_before=scope.cutoff)
    if pc.choice_user_features:
        rows = with_vectors(rows, user_features, cold=cold)
    rows = scope.mark(rows.withColumn("_h", _hash_fraction([F.col("event_id")], "treatment-holdout")))
    # fit and diagnose on one row per decision (a clicked decision's click row is not another choice)
    rows = rows.withColumn("_fit", F.col("_fit") & _one_row_per_decision(has_decisions))
    scope.require_fit_rows(rows.where(F.col("_fit")), events, "treatment, choice")  # before caching, as above
    rows = rows.cache()
    catalogues = C.catalogues_of(rows)  # every item a group logged, held-out ones too: each needs a class
    # a model per group with rows to fit on: a may-learn-from row outside the diagnostic holdout
    train = F.col("_fit") & (F.col("_h") >= pc.holdout_fraction)
    per_group = rows.groupBy("choice_group").agg(F.max(F.col("_fit").cast("int")).alias("fit"),
                                                 F.max(train.cast("int")).alias("train")).collect()
    unseen = sorted(r["choice_group"] for r in per_group if not r["fit"])
    all_held = sorted(r["choice_group"] for r in per_group if r["fit"] and not r["train"])
    if unseen:
        log.warning("treatment propensity (choice): groups %s log nothing a model may learn from (%s), so "
                    "no model is fitted for them and their rows get no propensity", unseen, scope.describe())
    if all_held:
        log.warning("treatment propensity (choice): groups %s have rows to learn from only in the diagnostic "
                    "holdout (propensity.holdout_fraction=%g), so no model is fitted for them and their rows get "
                    "no propensity", all_held, pc.holdout_fraction)
    if catalogues and len(unseen) + len(all_held) == len(catalogues):
        rows.unpersist()
        raise ValueError(f"treatment propensity (choice): no choice group has a row to fit on outside the "
                         f"diagnostic holdout (propensity.holdout_fraction={pc.holdout_fraction}); the log is "
                         f"too small for the choice model")
    catalogues = {g: c for g, c in catalogues.items() if g not in unseen and g not in all_held}
    model = C.ItemChoiceTreatment(pc.choice_eps, tuple(float(r) for r in pc.choice_reg_grid), pc.max_iter * 4,
                                  pc.choice_time_buckets, pc.choice_user_features)
    model.fit(rows.where((F.col("_h") >= pc.holdout_fraction) & F.col("_fit")), catalogues,
              max_position=rows.agg(F.max("position")).first()[0])
    scored = model.predict(rows)
    held = scored.where((F.col("_h") < pc.holdout_fraction) & F.col("_fit")).withColumn("treated", F.lit(1)).cache()
    t = scored.select("event_id", "user_id", "item_id", F.lit(1).alias("treated"), "treatment_propensity",
                      "raw_propensity", "source")
    diag = []
    rel, ece = D.reliability(C.candidate_pairs(held), "p", "chosen", None, pc.calibration_bins)
    n_pairs = sum(r[1] for r in rel)
    mean_p = sum(r[1] * r[2] for r in rel) / n_pairs if n_pairs else 0.0
    diag.append(D._row("treatment", "choice", "ece", ece, n=n_pairs))
    diag.append(D._row("treatment", "choice", "ece_relative", ece / mean_p if mean_p else None, n=n_pairs))
    diag += [D._row("treatment", "choice", "reliability", bin=b, pred_mean=pm, obs_rate=o, n=w) for b, w, pm, o in rel]
    uw = C.uniform_weight_means(held)
    diag.append(D._row("treatment", "choice", "uniform_weight_mean", uw[None][0], n=uw[None][1]))
    for g in sorted(catalogues):
        if g in uw:
            diag.append(D._row("treatment", "choice", f"uniform_weight_mean:{g}", uw[g][0], n=uw[g][1]))
        if g in model.chosen_reg_:
            diag.append(D._row("treatment", "choice", f"reg_param:{g}", model.chosen_reg_[g][0]))
    if held.where(F.col("logged_propensity").isNotNull()).limit(1).count():
        vt = D.versus_truth(held, held.select("event_id", "logged_propensity"), "treatment_propensity",
                            "logged_propensity", keys=("event_id",), bins=pc.calibration_bins)
        diag += [D._row("treatment", "choice", f"vs_logged_{k}", vt[k], n=vt["n"])
                 for k in ("corr", "corr_log", "mae", "calibration_error")]
    diag += _treatment_rows("choice", None, held, pc, low=pc.choice_eps)
    held.unpersist()
    rows.unpersist()  # t recomputes from events when written; a long-lived session must not keep it
    return t, diag


def _treatment_rows(method: str, held: Optional[DataFrame], t: DataFrame, pc, low: Optional[float] = None) -> list:
    rows = []
    if held is not None:
        rel, ece = D.reliability(held, "treatment_propensity", "treated", None, pc.calibration_bins)
        rows.append(D._row("treatment", method, "ece", ece, n=sum(r[1] for r in rel)))
        rows += [D._row("treatment", method, "reliability", bin=b, pred_mean=pm, obs_rate=o, n=w) for b, w, pm, o in rel]
    # weights the estimators will use: 1/p for treated rows, 1/(1-p) for control rows
    wdf = t.withColumn("_pw", F.when(F.col("treated") == 1, F.col("treatment_propensity"))
                       .otherwise(1.0 - F.col("treatment_propensity")))
    wdf = wdf.withColumn("_raw", F.when(F.col("treated") == 1, F.col("raw_propensity")).otherwise(1.0 - F.col("raw_propensity")))
    if low is None:
        low = pc.treatment_eps if method != "logged" else 0.0
    ws = D.weight_stats(wdf, "_pw", "_raw", low, None if method == "logged" else 1.0 - low)
    for k in ("share_at_clip", "ess", "ess_ratio", "max_weight", "mean_propensity"):
        rows.append(D._row("treatment", method, k, ws[k], n=ws["n"]))
    ov = D.overlap(t, "treatment_propensity", "treated")
    for k in ("overlap_coefficient", "off_support_share"):
        if ov[k] is not None:
            rows.append(D._row("treatment", method, k, ov[k], n=ov["n_treated"] + ov["n_control"]))
    return rows


def run(ctx) -> dict:
    cfg, store, spark = ctx.cfg, ctx.store, ctx.spark
    cached = []
    with ctx.step("propensity: extract"):
        events = store.read("events")
        mcar = store.read("mcar_events") if store.has_rows("mcar_events") else None
        truth = store.read("ground_truth") if store.has_rows("ground_truth") else None
        ctx.log_rows("events", store.row_count("events"), "in")
        scope = fit_scope(events, cfg, mcar)
        if not scope.restricted:  # nothing held out: the features stage's tables are the ones to learn from
            from causalrec.features.job import stored_feature_tables

            ft = stored_feature_tables(store)  # None without recorded names: ids without a row then get zeros
            uf, itf = ((ft.users, ft.items) if ft is not None
                       else (store.read("user_features"), store.read("item_features")))
    if scope.restricted:
        with ctx.step("propensity: features from the events a model may see"):
            # the features stage's tables count the whole log (valid/test labels included); these are the
            # training set's, built by the same function from the same events at the same cutoff
            from causalrec.features.job import build_features

            ft = build_features(scope.fit_events(events), store.read("users"), store.read("items"), cfg,
                                cutoff=scope.cutoff)
            ft.users, ft.items = uf, itf = ft.users.cache(), ft.items.cache()
            cached += [uf, itf]
    # ids without a feature row (e.g. every event held out) get the tables' no-activity vector
    cold = ft.cold_vectors(cfg.features.smoothing_prior_strength) if ft is not None else None
    exp_groups, exp_src = adjustment_set(cfg, "exposure")
    trt_groups, trt_src = adjustment_set(cfg, "recommended")
    with ctx.step("propensity: exposure"):
        er = exposure_propensities(events, uf, itf, cfg, mcar, methods=None, feature_groups=tuple(exp_groups),
                                   scope=scope, cold=cold)
    with ctx.step("propensity: treatment"):
        tdf, trows = treatment_propensities(events, uf, itf, cfg, feature_groups=tuple(trt_groups), scope=scope,
                                            cold=cold)
    rows = er.diagnostics + trows
    if truth is not None:
        with ctx.step("propensity: versus ground truth"):
            for m, sc in er.scored.items():
                vt = D.versus_truth(sc, truth, "exposure_propensity", "exposure_propensity")
                rows += [D._row("exposure", m, f"truth_{k}", vt[k], n=vt["n"]) for k in ("corr", "corr_log", "mae", "calibration_error")]
            if tdf is not None:
                vt = treatment_versus_truth(tdf, events, truth)
                rows += [D._row("treatment", cfg.propensity.treatment_method, f"truth_{k}", vt[k], n=vt["n"])
                         for k in ("corr", "corr_log", "mae", "calibration_error")]
    with ctx.step("propensity: load"):
        fit_before = scope.cutoff.isoformat() if scope.cutoff is not None else None
        from causalrec.training_set import split_settings

        fit_on = {"fit_before": fit_before, "fit_on": scope.describe() or "all events",
                  "split_settings": split_settings(cfg)}
        run_id = new_run_id()  # in each table's commit: the training set refuses a failed run's mix
        store.write(er.table, "exposure_propensity", "overwrite", spec=EXPOSURE_PROPENSITY, overwrite_schema=True,
                    metadata={"adjustment_set": exp_groups, "adjustment_source": exp_src, **fit_on, RUN_KEY: run_id})
        if tdf is None:
            tdf = spark.createDataFrame([], TREATMENT_PROPENSITY.spark_schema())
        store.write(tdf, "treatment_propensity", "overwrite", spec=TREATMENT_PROPENSITY, overwrite_schema=True,
                    metadata={"adjustment_set": trt_groups, "adjustment_source": trt_src, **fit_on, RUN_KEY: run_id})
        now = dt.datetime.now(dt.timezone.utc)
        diag = spark.createDataFrame([dict(r, run_id=run_id, created_at=now) for r in rows] or [],
                                     PROPENSITY_DIAGNOSTICS.spark_schema())
        store.write(conform(diag, PROPENSITY_DIAGNOSTICS), "propensity_diagnostics", "overwrite",
                    spec=PROPENSITY_DIAGNOSTICS, overwrite_schema=True)
        for df in er.cached + cached:
            df.unpersist()
    out = {"exposure_propensity": store.row_count("exposure_propensity"),
           "treatment_propensity": store.row_count("treatment_propensity"),
           "propensity_diagnostics": len(rows), "exposure_method": cfg.propensity.exposure_method,
           "exposure_adjustment": exp_groups, "adjustment_source": exp_src, "run_id": run_id,
           **fit_on}
    for t in ("exposure_propensity", "treatment_propensity", "propensity_diagnostics"):
        ctx.log_rows(t, out[t] if isinstance(out[t], int) else 0)
    scalars = [r for r in rows if r["metric"] != "reliability" and r["value"] is not None]
    print(summary_text(scalars))
    out["metrics"] = {f"{r['propensity']}.{r['method']}.{r['metric']}": round(r["value"], 6) for r in scalars}
    return out


def summary_text(rows: list) -> str:
    lines = ["propensity diagnostics:"]
    for r in rows:
        lines.append(f"  {r['propensity']:<9} {r['method']:<12} {r['metric']:<22} {r['value']:.4g}")
    return "\n".join(lines)
