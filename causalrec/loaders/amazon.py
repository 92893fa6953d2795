"""Amazon Review Data 2018 (Ni, Li, McAuley), Industrial and Scientific, UniSRec text format.

Files (``data.path`` = the ``amazon_scientific_unisrec/`` folder):

* ``Scientific.text``: header ``item_id:token  text:token_seq``, 4,385 items (ASIN, text)
* ``Scientific.item2index`` / ``Scientific.user2index``: ASIN / reviewer id -> index
* ``Scientific.{train,valid,test}.inter``: ``user_id:token  item_id_list:token_seq
  item_id:token`` (indices). Leave-one-out: for each of the 8,442 users, ``test`` holds
  the last item, ``valid`` the one before, and ``train`` one row per earlier prefix.

Mapping (decisions):

* Each user's full ordered sequence is rebuilt as: the history of the user's shortest
  train row, then the targets of the train rows in prefix order, then the valid target,
  then the test target; every row's history is checked to be the tail of the sequence
  before its target. (Histories are capped at 50 items, so the full sequence comes
  from the train rows.)
* One ``purchase`` event per sequence element (value 1.0), ``user_id`` = reviewer id,
  ``item_id`` = ASIN. Real times are not in the files; order-preserving synthetic times
  are used: element ``k`` of a user's sequence at :data:`AMAZON_START` + ``k`` hours.
* The given split is kept: ``context = {"split": "train"|"valid"|"test"}`` (the last
  element is ``test``, the one before ``valid``, the rest ``train``).
* event id ``amazon:<reviewer id>:<k>``.
* items: ``text`` from ``Scientific.text``; ``category`` = the first category phrase
  after the title is not reliably delimited, so it is left null; attributes null.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from causalrec.loaders import DataFileError, LoadedData, dimension_frame, events_frame, require_file

N_ITEMS = 4385
N_USERS = 8442
AMAZON_START = pd.Timestamp("2018-01-01T00:00:00Z")


def _read_tsv(path: Path, header: list, what: str) -> pd.DataFrame:
    require_file(path, what)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except Exception as exc:
        raise DataFileError(f"{path}: cannot be read as tab-separated text ({what}): {exc}") from None
    if list(df.columns) != header:
        raise DataFileError(f"{path}: header {list(df.columns)}, expected {header}")
    return df


def _read_map(path: Path, n: int, what: str) -> dict:
    require_file(path, f"{n} lines '<id>\\t<index>' ({what})")
    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["id", "idx"], dtype={"id": str, "idx": int})
    except Exception as exc:
        raise DataFileError(f"{path}: cannot be read as lines '<id>\\t<index>' ({what}): {exc}") from None
    if len(df) != n or sorted(df["idx"]) != list(range(n)):
        raise DataFileError(f"{path}: {len(df)} rows, expected {n} ids with indices 0..{n - 1}")
    return dict(zip(df["idx"], df["id"]))


def _sequences(train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame, root: Path) -> dict:
    """Rebuild each user's ordered sequence; every row's history must be the tail of what precedes it.

    The train file lists a user's prefixes longest first, so they are read in reverse
    file order; histories longer than 50 are truncated at the front, which is why the
    check compares tails.
    """
    seqs: dict = {}
    users = train["user_id:token"].to_numpy()
    hists = train["item_id_list:token_seq"].to_numpy()
    targets = train["item_id:token"].to_numpy()
    for pos in range(len(train) - 1, -1, -1):
        uid, h, t = users[pos], hists[pos].split(" "), targets[pos]
        s = seqs.get(uid)
        if s is None:
            s = seqs[uid] = list(h)
        elif s[-len(h):] != h:
            raise DataFileError(f"{root / 'Scientific.train.inter'}: row {pos + 1} (user {uid}) is not the next "
                                f"prefix of the user's sequence")
        s.append(t)
    for name, df in (("valid", valid), ("test", test)):
        for uid, hist, target in df.itertuples(index=False, name=None):
            h = hist.split(" ") if hist else []
            s = seqs.setdefault(uid, list(h))
            if h and s[-len(h):] != h:
                raise DataFileError(f"{root / f'Scientific.{name}.inter'}: user {uid}'s history does not extend "
                                    f"the sequence rebuilt from the earlier split")
            s.append(target)
    return seqs


def load_amazon(spark, path) -> LoadedData:
    root = Path(path)
    if not root.is_dir():
        raise DataFileError(f"Amazon folder {root} does not exist (data.path); expected Scientific.* files")
    hdr = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    train = _read_tsv(root / "Scientific.train.inter", hdr, "training prefixes")
    valid = _read_tsv(root / "Scientific.valid.inter", hdr, "validation rows, one per user")
    test = _read_tsv(root / "Scientific.test.inter", hdr, "test rows, one per user")
    for name, df in (("valid", valid), ("test", test)):
        if len(df) != N_USERS or df["user_id:token"].nunique() != N_USERS:
            raise DataFileError(f"{root / f'Scientific.{name}.inter'}: {len(df)} rows, expected one per user "
                                f"({N_USERS})")
    text = _read_tsv(root / "Scientific.text", ["item_id:token", "text:token_seq"], "item text")
    if len(text) != N_ITEMS or text["item_id:token"].nunique() != N_ITEMS:
        raise DataFileError(f"{root / 'Scientific.text'}: {len(text)} items, expected {N_ITEMS}")
    items_by_idx = _read_map(root / "Scientific.item2index", N_ITEMS, "item ASIN -> index")
    users_by_idx = _read_map(root / "Scientific.user2index", N_USERS, "reviewer id -> index")
    unknown = set(items_by_idx.values()) - set(text["item_id:token"])
    if unknown:
        raise DataFileError(f"{root / 'Scientific.text'}: no text for {len(unknown)} indexed items, e.g. "
                            f"{sorted(unknown)[:3]}")

    seqs = _sequences(train, valid, test, root)
    rows = {"event_id": [], "user_id": [], "item_id": [], "k": [], "split": []}
    for uid, seq in seqs.items():
        user = users_by_idx[int(uid)]
        n = len(seq)
        for k, item in enumerate(seq):
            rows["event_id"].append(f"amazon:{user}:{k}")
            rows["user_id"].append(user)
            rows["item_id"].append(items_by_idx[int(item)])
            rows["k"].append(k)
            rows["split"].append("test" if k == n - 1 else ("valid" if k == n - 2 else "train"))
    ev = pd.DataFrame(rows)
    ev["event_time"] = AMAZON_START + pd.to_timedelta(ev["k"], unit="h")
    ev["event_type"] = "purchase"
    ev["value"] = 1.0
    ev["context"] = '{"split": "' + ev["split"] + '"}'
    if (ev["split"] == "test").sum() != N_USERS or (ev["split"] == "valid").sum() != N_USERS:
        raise DataFileError(f"{root}: rebuilt sequences do not give one valid and one test item per user")
    items = pd.DataFrame({"item_id": text["item_id:token"], "text": text["text:token_seq"].str.strip()})
    users = pd.DataFrame({"user_id": [users_by_idx[i] for i in range(N_USERS)]})
    from causalrec.schemas import ITEMS, USERS

    return LoadedData(
        name="amazon",
        events=events_frame(spark, ev.drop(columns=["k", "split"])),
        users=dimension_frame(spark, users, USERS),
        items=dimension_frame(spark, items, ITEMS),
        sources={"events": str(root / "Scientific.{train,valid,test}.inter"), "items": str(root / "Scientific.text"),
                 "users": str(root / "Scientific.user2index")},
        # a user's sequence of n items gives n - 3 training prefixes (targets 1 .. n - 3), one valid and
        # one test row: n = its training rows + 3, independent of how the sequences were rebuilt
        expected={"items": N_ITEMS, "users": N_USERS, "events": len(train) + 3 * N_USERS},
    )
