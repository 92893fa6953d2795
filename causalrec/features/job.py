"""Features stage: events + users + items -> user_features, item_features (as of features.cutoff).

Extract (read the Delta tables), transform (the pure functions in user.py/item.py),
load (overwrite each table in its own Delta commit; feature names, the cutoff ``as_of`` and the
run's id go into the commit metadata). Delta commits are atomic per table, not across the two: a
failed or concurrent second write leaves them from different runs, which :func:`stored_feature_tables`
detects and refuses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from causalrec.features.cold import cold_item_vector, cold_user_vector
from causalrec.features.common import cutoff_lit, resolve_cutoff
from causalrec.features.item import attribute_vocab, item_feature_names, item_features
from causalrec.features.user import user_feature_names, user_features
from causalrec.schemas import ITEM_FEATURES, USER_FEATURES, TableSpec, spark_type, validate_columns
from causalrec.storage.stage_runs import RUN_KEY, TablesOutOfStep, check_same_run, new_run_id

log = logging.getLogger(__name__)


@dataclass
class FeatureTables:
    users: DataFrame
    items: DataFrame
    user_names: list
    item_names: list
    cutoff: object

    def cold_vectors(self, prior_strength: float) -> tuple[list, list]:
        """(user, item) vectors for ids without a row: the tables' own no-activity encoding
        (:mod:`causalrec.features.cold`); ``prior_strength``: ``features.smoothing_prior_strength``."""
        return (cold_user_vector(self.user_names),
                cold_item_vector(self.items, self.item_names, prior_strength))


def build_features(events: DataFrame, users: DataFrame, items: DataFrame, cfg, cutoff=None) -> FeatureTables:
    """Both feature tables as of ``cutoff`` (default ``cfg.features.cutoff``, else after the last event)."""
    fc = cfg.features
    cut = resolve_cutoff(events, cutoff if cutoff is not None else fc.cutoff)
    event_types = list(cfg.data.event_types)
    u_vocab = attribute_vocab(users, fc.max_attribute_features)
    i_vocab = attribute_vocab(items, fc.max_attribute_features)
    uf = user_features(events, users, items, cut, event_types=event_types, windows_days=fc.windows_days,
                       history_length=fc.history_length, attribute_vocab=u_vocab)
    itf = item_features(events, items, cut, windows_days=fc.windows_days, prior_strength=fc.smoothing_prior_strength,
                        popularity_groups=fc.popularity_groups, attribute_vocab=i_vocab)
    uf = uf.withColumn("as_of", cutoff_lit(cut))
    itf = itf.withColumn("as_of", cutoff_lit(cut))
    return FeatureTables(
        conform_with_extras(uf, USER_FEATURES), conform_with_extras(itf, ITEM_FEATURES),
        user_feature_names(event_types, fc.windows_days, u_vocab), item_feature_names(fc.windows_days, i_vocab), cut,
    )


def conform_with_extras(df: DataFrame, spec: TableSpec) -> DataFrame:
    """Declared columns first (cast to their types), then the config-dependent count columns."""
    declared = [F.col(c.name).cast(spark_type(c.type)).alias(c.name) for c in spec.columns]
    extra = sorted(c for c in df.columns if c not in spec.names and c.startswith("n_"))
    out = df.select(*declared, *[F.col(c).cast("long").alias(c) for c in extra])
    validate_columns(out, spec, source=f"features stage ({spec.name})", allow_extra=True)
    return out


def run(ctx) -> dict:
    cfg, store = ctx.cfg, ctx.store
    with ctx.step("features: extract"):
        events, users, items = store.read("events"), store.read("users"), store.read("items")
        n_events = store.row_count("events")
        ctx.log_rows("events", n_events, "in")
    with ctx.step("features: transform"):
        ft = build_features(events, users, items, cfg)
    with ctx.step("features: load"):
        meta = {"as_of": ft.cutoff.isoformat(), RUN_KEY: new_run_id()}  # readers pair the tables by it
        store.write(ft.users, "user_features", "overwrite", overwrite_schema=True,
                    metadata={"feature_names": ft.user_names, **meta})
        store.write(ft.items, "item_features", "overwrite", overwrite_schema=True,
                    metadata={"feature_names": ft.item_names, **meta})
    n_u, n_i = store.row_count("user_features"), store.row_count("item_features")
    ctx.log_rows("user_features", n_u)
    ctx.log_rows("item_features", n_i)
    groups = {r["popularity_group"]: r["count"] for r in store.read("item_features").groupBy("popularity_group").count().collect()}
    return {"events_in": n_events, "user_features": n_u, "item_features": n_i, "as_of": ft.cutoff.isoformat(),
            "n_user_features": len(ft.user_names), "n_item_features": len(ft.item_names), "popularity_groups": groups}


def _feature_metadata(store, table: str) -> dict:
    """The causalrec metadata (feature_names, as_of) of the latest commit of a feature table that has it."""
    return next((m for m in store.commit_metadata(table, 5) if "feature_names" in m), {})


def feature_names(store, table: str) -> list:
    """The feature_vector names recorded in the latest commit of a feature table."""
    return list(_feature_metadata(store, table).get("feature_names", []))


class FeatureCutoffMismatch(TablesOutOfStep):
    """user_features and item_features were written at different cutoffs."""


def stored_feature_tables(store):
    """The features stage's tables as :class:`FeatureTables` (as of their recorded cutoff), or None.

    Serving reuses them instead of recomputing user and item features for every scoring run.
    None when a table is missing or its latest commit records no feature names or cutoff. The
    stage writes the two tables in two commits, so a failed or concurrent second write can leave
    them from different runs: that raises :class:`~causalrec.storage.stage_runs.TablesOutOfStep`
    (at different cutoffs, :class:`FeatureCutoffMismatch`) naming both, rather than serving user
    features of one run or cutoff next to item features of another.
    """
    if not (store.exists("user_features") and store.exists("item_features")):
        return None
    um, im = _feature_metadata(store, "user_features"), _feature_metadata(store, "item_features")
    if not um or not im or "as_of" not in um or "as_of" not in im:
        return None
    u_cut, i_cut = resolve_cutoff(None, um["as_of"]), resolve_cutoff(None, im["as_of"])
    if u_cut != i_cut:
        raise FeatureCutoffMismatch(
            f"user_features is as of {u_cut.isoformat()} but item_features is as of {i_cut.isoformat()} "
            "(the features stage writes them in two commits; the second failed or another run wrote in "
            "between): rerun the features stage (causalrec features) so both share one cutoff")
    check_same_run(store, ("user_features", "item_features"), "features")  # same cutoff, other settings
    return FeatureTables(store.read("user_features"), store.read("item_features"), list(um["feature_names"]),
                         list(im["feature_names"]), u_cut)
