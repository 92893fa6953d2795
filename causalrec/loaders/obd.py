"""Open Bandit Dataset, small sample (Saito et al., NeurIPS 2021 Datasets and Benchmarks; ZOZOTOWN).

Files (``data.path`` = the ``obd/`` folder): ``<policy>/<campaign>/<campaign>.csv`` with
10,000 logged impressions each (``timestamp, item_id, position, click,
propensity_score``, four hashed ``user_feature_*`` columns and one
``user-item_affinity_<j>`` column per item) and ``<policy>/<campaign>/item_context.csv``
(one row per item: ``item_feature_0`` numeric, ``item_feature_1..3`` hashed).
Policies ``random`` and ``bts`` (Bernoulli Thompson Sampling) x campaigns ``all`` (80
items), ``men`` (34), ``women`` (46).

Mapping to the contract (decisions, read from the data):

* one ``impression`` event per logged row: ``value`` = click (0/1), ``position`` (1..3),
  ``recommended = True`` (the policy chose the item), ``logged_propensity`` =
  ``propensity_score``, ``policy`` = ``random`` / ``bts``; event id
  ``obd:<policy>:<campaign>:<row>``.
* item ids are per-campaign indices (item 0 of ``men`` is not item 0 of ``all``: the
  catalogues have different sizes and features), so they are namespaced:
  ``obd:<campaign>:<item index>``.
* ``user_id`` = ``obd:u:`` + the first 16 hex digits of sha1 over the four hashed user
  feature values: the data set has no user id, and equal features are the closest
  thing to the same user.
* ``context`` JSON: ``campaign``, ``user_features`` (name -> hash) and ``affinity``
  (the row's user-item affinity vector, in item order).
* items: attributes ``campaign:<c>``, ``item_feature_1..3:<hash>`` and
  ``item_feature_0:<value>``; ``category`` = ``item_feature_1``. The hashed features
  differ between the two policies' copies of ``item_context.csv`` (different salts,
  same ``item_feature_0``); the first configured policy's copy is used.
* users: attributes ``user_feature_<k>:<hash>``; ``segment`` = ``user_feature_0``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from causalrec.loaders import DataFileError, LoadedData, dimension_frame, events_frame, require_file

ROWS_PER_LOG = 10_000
N_ITEMS = {"all": 80, "men": 34, "women": 46}
POLICIES = ("random", "bts")
USER_FEATURES = [f"user_feature_{k}" for k in range(4)]


def user_id_of(values) -> str:
    return "obd:u:" + hashlib.sha1("|".join(str(v) for v in values).encode()).hexdigest()[:16]


def _read_log(path: Path, campaign: str) -> pd.DataFrame:
    n_items = N_ITEMS[campaign]
    require_file(path, f"{ROWS_PER_LOG} logged impressions of campaign {campaign!r}")
    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as exc:
        raise DataFileError(f"{path}: cannot be read as CSV: {exc}") from None
    need = ["timestamp", "item_id", "position", "click", "propensity_score", *USER_FEATURES,
            *[f"user-item_affinity_{j}" for j in range(n_items)]]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if len(df) != ROWS_PER_LOG:
        raise DataFileError(f"{path}: has {len(df)} rows, expected {ROWS_PER_LOG}")
    if not df["item_id"].between(0, n_items - 1).all():
        raise DataFileError(f"{path}: item_id outside 0..{n_items - 1}")
    if not df["position"].isin([1, 2, 3]).all():
        raise DataFileError(f"{path}: position outside 1..3")
    if not df["click"].isin([0, 1]).all():
        raise DataFileError(f"{path}: click must be 0/1")
    p = df["propensity_score"]
    if not ((p > 0) & (p <= 1)).all():
        raise DataFileError(f"{path}: propensity_score outside (0, 1]")
    return df


def _read_items(path: Path, campaign: str) -> pd.DataFrame:
    require_file(path, f"{N_ITEMS[campaign]} item rows with item_feature_0..3")
    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as exc:
        raise DataFileError(f"{path}: cannot be read as CSV: {exc}") from None
    need = ["item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {missing}")
    if len(df) != N_ITEMS[campaign] or sorted(df["item_id"]) != list(range(N_ITEMS[campaign])):
        raise DataFileError(f"{path}: has {len(df)} items, expected item ids 0..{N_ITEMS[campaign] - 1}")
    return df


def load_obd(spark, path, campaigns=("all", "men", "women"), policies=POLICIES) -> LoadedData:
    root = Path(path)
    if not root.is_dir():
        raise DataFileError(f"OBD folder {root} does not exist (data.path); expected random/ and bts/ folders")
    for c in campaigns:
        if c not in N_ITEMS:
            raise DataFileError(f"data.obd_campaigns: unknown campaign {c!r}; expected {list(N_ITEMS)}")
    for p in policies:
        if p not in POLICIES:
            raise DataFileError(f"data.obd_policies: unknown policy {p!r}; expected {list(POLICIES)}")
    ev_parts, users, item_rows = [], {}, []
    for campaign in campaigns:
        n_items = N_ITEMS[campaign]
        aff_cols = [f"user-item_affinity_{j}" for j in range(n_items)]
        for policy in policies:
            f = root / policy / campaign / f"{campaign}.csv"
            df = _read_log(f, campaign)
            uids = [user_id_of(v) for v in df[USER_FEATURES].itertuples(index=False, name=None)]
            for uid, vals in zip(uids, df[USER_FEATURES].itertuples(index=False, name=None)):
                users.setdefault(uid, vals)
            aff = df[aff_cols].to_numpy(dtype=float)
            ctx = [json.dumps({"campaign": campaign, "user_features": dict(zip(USER_FEATURES, map(str, uf))),
                               "affinity": [round(float(a), 6) for a in row]})
                   for uf, row in zip(df[USER_FEATURES].itertuples(index=False, name=None), aff)]
            ev_parts.append(pd.DataFrame({
                "event_id": [f"obd:{policy}:{campaign}:{r}" for r in df.index],
                "user_id": uids,
                "item_id": [f"obd:{campaign}:{i}" for i in df["item_id"]],
                "event_time": pd.to_datetime(df["timestamp"], utc=True).dt.tz_convert("UTC"),
                "event_type": "impression",
                "value": df["click"].astype(float).to_numpy(),
                "position": df["position"].astype("int32").to_numpy(),
                "recommended": True,
                "logged_propensity": df["propensity_score"].astype(float).to_numpy(),
                "policy": policy,
                "context": ctx,
            }))
        items = _read_items(root / policies[0] / campaign / "item_context.csv", campaign)
        for r in items.itertuples(index=False):
            item_rows.append({
                "item_id": f"obd:{campaign}:{r.item_id}",
                "attributes": [f"campaign:{campaign}", f"item_feature_0:{r.item_feature_0:.4f}",
                               f"item_feature_1:{r.item_feature_1}", f"item_feature_2:{r.item_feature_2}",
                               f"item_feature_3:{r.item_feature_3}"],
                "category": str(r.item_feature_1),
                "text": None,
                "price": None,
            })
    events = pd.concat(ev_parts, ignore_index=True)
    events["position"] = events["position"].astype(object)
    users_df = pd.DataFrame({
        "user_id": list(users),
        "attributes": [[f"{k}:{v}" for k, v in zip(USER_FEATURES, vals)] for vals in users.values()],
        "text": None,
        "segment": [str(vals[0]) for vals in users.values()],
    })
    from causalrec.schemas import ITEMS, USERS

    n_logs = len(campaigns) * len(policies)
    return LoadedData(
        name="obd",
        events=events_frame(spark, events),
        users=dimension_frame(spark, users_df, USERS),
        items=dimension_frame(spark, pd.DataFrame(item_rows), ITEMS),
        sources={"events": str(root), "users": str(root), "items": str(root)},
        expected={"events": ROWS_PER_LOG * n_logs, "items": sum(N_ITEMS[c] for c in campaigns)},
    )
