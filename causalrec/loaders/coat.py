"""Coat (Schnabel et al., ICML 2016, "Recommendations as Treatments: Debiasing Learning and Evaluation").

Files (``data.path`` = the ``coat/`` folder):

* ``train.ascii``  290 x 300 matrix, 0 = no rating, 1..5 = a *self-selected* rating
  (missing-not-at-random; 24 per user, 6,960 in all)  -> ``events``
* ``test.ascii``   290 x 300 matrix of ratings on 16 items per user drawn uniformly
  at random (missing-completely-at-random; 4,640 in all)  -> ``mcar_events``
* ``propensities.ascii`` the authors' learned observation propensities (290 x 300),
  kept in each train event's ``context`` as ``authors_propensity`` for comparison
* ``user_item_features/{user,item}_features.ascii`` one-hot features (14 / 33 columns)
  with ``*_features_map.txt`` naming each column ``group:value``  -> ``users``/``items``

Conventions chosen here (other stages rely on them):

* ids are ``"u<row>"`` and ``"i<column>"`` with 0-based matrix indices (``u0``..``u289``,
  ``i0``..``i299``): strings, so they never collide with dense embedding indices.
* Coat has no timestamps. Every rating gets the same synthetic time
  :data:`COAT_EVENT_TIME` (2016-01-01T00:00:00Z); the given train/test split is the
  only order there is, and it is kept as two tables (and ``context.split``).
* event ids are ``coat:train:u<row>:i<col>`` / ``coat:test:u<row>:i<col>``, so
  re-ingesting the same files produces the same ids and is a no-op.
* train events: ``policy = "self_selected"``, ``recommended`` and ``logged_propensity``
  null (users chose what to rate; the exposure propensity is the propensity stage's
  job). test events: ``policy = "uniform_random"``, ``logged_propensity = 16/300``
  (each item's chance to be one of the user's 16 random items), ``recommended = True``.
* user/item ``attributes`` are the map's tokens (``gender:women``, ``jackettype:bomber``),
  item ``category`` is the jacket type, item ``text`` is composed from the attributes
  ("women's bomber jacket, black"), user ``segment`` is the gender token's value.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from causalrec.loaders import DataFileError, LoadedData, dimension_frame, events_frame, require_file

N_USERS = 290
N_ITEMS = 300
N_TRAIN = 6960
N_TEST = 4640
TEST_PER_USER = 16
COAT_EVENT_TIME = pd.Timestamp("2016-01-01T00:00:00Z")

USER_GROUPS = ("gender", "age", "location", "fashioninterest")
ITEM_GROUPS = ("gender", "jackettype", "color", "onfrontpage")


def _read_matrix(path: Path, shape: tuple, what: str, dtype=float) -> np.ndarray:
    require_file(path, what)
    try:
        m = np.loadtxt(path, dtype=dtype, ndmin=2)
    except ValueError as exc:
        raise DataFileError(f"{path}: not a whitespace-separated numeric matrix ({what}): {exc}") from None
    if m.shape != shape:
        raise DataFileError(f"{path}: has shape {m.shape[0]}x{m.shape[1]}, expected {shape[0]}x{shape[1]} ({what})")
    return m


def _read_map(path: Path, n: int, groups: tuple) -> list:
    require_file(path, f"{n} lines 'group:value', one per feature column")
    tokens = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(tokens) != n:
        raise DataFileError(f"{path}: has {len(tokens)} feature names, expected {n}")
    for t in tokens:
        if ":" not in t or t.split(":", 1)[0] not in groups:
            raise DataFileError(f"{path}: feature name {t!r} is not 'group:value' with group in {groups}")
    return tokens


def _one_hot_tokens(m: np.ndarray, tokens: list, groups: tuple, path: Path) -> list:
    """Per row: one token per group; a row must set exactly one column of each group."""
    if not np.isin(m, (0, 1)).all():
        raise DataFileError(f"{path}: one-hot features must be 0/1")
    group_of = np.array([t.split(":", 1)[0] for t in tokens])
    out = []
    for r, row in enumerate(m):
        chosen = [tokens[j] for j in np.flatnonzero(row)]
        for g in groups:
            k = int(row[group_of == g].sum())
            if k != 1:
                raise DataFileError(f"{path}: row {r} sets {k} columns of group {g!r}, expected exactly 1")
        out.append(chosen)
    return out


def _value(tokens: list, group: str) -> str:
    for t in tokens:
        g, v = t.split(":", 1)
        if g == group:
            return v
    raise KeyError(group)


def item_text(tokens: list) -> str:
    """e.g. "women's bomber jacket, black" (+ ", on the front page")."""
    gender = _value(tokens, "gender")
    jt = _value(tokens, "jackettype")
    color = _value(tokens, "color")
    color_txt = "other colour" if color == "other" else ("multicoloured" if color == "multi" else color)
    kind = "jacket" if jt == "other" else f"{jt} jacket"
    text = f"{gender}'s {kind}, {color_txt}"
    if _value(tokens, "onfrontpage") == "yes":
        text += ", on the front page"
    return text


def user_text(tokens: list) -> str:
    """e.g. "woman, age 20-30, lives in an urban area, very interested in fashion"."""
    gender = {"men": "man", "women": "woman"}.get(_value(tokens, "gender"), _value(tokens, "gender"))
    age = _value(tokens, "age")
    age_txt = f"age {age}"
    loc = _value(tokens, "location")
    article = "an" if loc[:1] in "aeiou" else "a"
    fi = _value(tokens, "fashioninterest")
    fi_txt = {"very": "very interested in fashion", "moderately": "moderately interested in fashion",
              "not at all": "not interested in fashion"}.get(fi, f"fashion interest {fi}")
    return f"{gender}, {age_txt}, lives in {article} {loc} area, {fi_txt}"


def _ratings_to_events(m: np.ndarray, split: str, propensities) -> pd.DataFrame:
    us, its = np.nonzero(m)
    vals = m[us, its]
    if not np.isin(vals, (1, 2, 3, 4, 5)).all():
        bad = vals[~np.isin(vals, (1, 2, 3, 4, 5))][0]
        raise DataFileError(f"coat {split}.ascii holds rating {bad}, expected 0 (none) or 1..5")
    n = len(us)
    if split == "train":
        ctx = [json.dumps({"split": "train", "authors_propensity": float(propensities[u, i])})
               for u, i in zip(us, its)]
        policy, recommended, prop = "self_selected", None, None
    else:
        ctx = [json.dumps({"split": "test"})] * n
        policy, recommended, prop = "uniform_random", True, TEST_PER_USER / N_ITEMS
    return pd.DataFrame({
        "event_id": [f"coat:{split}:u{u}:i{i}" for u, i in zip(us, its)],
        "user_id": [f"u{u}" for u in us],
        "item_id": [f"i{i}" for i in its],
        "event_time": pd.Series([COAT_EVENT_TIME] * n, dtype="datetime64[ns, UTC]"),
        "event_type": "rating",
        "value": vals.astype(float),
        "position": pd.Series([None] * n, dtype="object"),
        "recommended": pd.Series([recommended] * n, dtype="object"),
        "logged_propensity": pd.Series([prop] * n, dtype="float64"),
        "policy": policy,
        "session_id": None,
        "context": ctx,
    })


def load_coat(spark, path) -> LoadedData:
    root = Path(path)
    if not root.is_dir():
        raise DataFileError(f"Coat folder {root} does not exist (data.path); expected train.ascii, test.ascii, ...")
    shape = (N_USERS, N_ITEMS)
    train = _read_matrix(root / "train.ascii", shape, "290x300 MNAR ratings 0..5")
    test = _read_matrix(root / "test.ascii", shape, "290x300 MCAR ratings 0..5")
    prop = _read_matrix(root / "propensities.ascii", shape, "290x300 learned propensities")
    if (train > 0).sum() != N_TRAIN:
        raise DataFileError(f"{root / 'train.ascii'}: {int((train > 0).sum())} ratings, expected {N_TRAIN}")
    if (test > 0).sum() != N_TEST:
        raise DataFileError(f"{root / 'test.ascii'}: {int((test > 0).sum())} ratings, expected {N_TEST}")
    feat = root / "user_item_features"
    uf_path, if_path = feat / "user_features.ascii", feat / "item_features.ascii"
    u_tokens_map = _read_map(feat / "user_features_map.txt", 14, USER_GROUPS)
    i_tokens_map = _read_map(feat / "item_features_map.txt", 33, ITEM_GROUPS)
    uf = _read_matrix(uf_path, (N_USERS, 14), "290x14 one-hot user features", dtype=int)
    itf = _read_matrix(if_path, (N_ITEMS, 33), "300x33 one-hot item features", dtype=int)
    u_tokens = _one_hot_tokens(uf, u_tokens_map, USER_GROUPS, uf_path)
    i_tokens = _one_hot_tokens(itf, i_tokens_map, ITEM_GROUPS, if_path)

    users = pd.DataFrame({
        "user_id": [f"u{u}" for u in range(N_USERS)],
        "attributes": u_tokens,
        "text": [user_text(t) for t in u_tokens],
        "segment": [_value(t, "gender") for t in u_tokens],
    })
    items = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(N_ITEMS)],
        "attributes": i_tokens,
        "category": [_value(t, "jackettype") for t in i_tokens],
        "text": [item_text(t) for t in i_tokens],
        "price": None,
    })
    from causalrec.schemas import ITEMS, USERS

    return LoadedData(
        name="coat",
        events=events_frame(spark, _ratings_to_events(train, "train", prop)),
        mcar_events=events_frame(spark, _ratings_to_events(test, "test", prop)),
        users=dimension_frame(spark, users, USERS),
        items=dimension_frame(spark, items, ITEMS),
        sources={
            "events": str(root / "train.ascii"),
            "mcar_events": str(root / "test.ascii"),
            "users": str(uf_path),
            "items": str(if_path),
        },
        expected={"events": N_TRAIN, "mcar_events": N_TEST, "users": N_USERS, "items": N_ITEMS},
    )
