"""Rows of ``training_examples`` (or candidates to score) -> model input tensors.

Why one class for training and scoring: the mapping of ids to embedding rows,
the padding of history and features and the tokenisation must be identical in
both, or a model scores different inputs from the ones it learned on.

Ids that are -1 (unseen in training), null, or beyond the trained vocabulary map
to the *unknown* row (``n_users`` / ``n_items``); text models still get the text.
Target columns (label, outcome, observed, propensities, treated, is_mcar) are
passed through as float tensors when present, so the same batch feeds the loss.
"""
from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import torch

TARGET_COLUMNS = ("label", "outcome", "observed", "exposure_propensity", "sample_weight", "treated",
                  "treatment_propensity", "is_mcar")

_TOKENIZERS = threading.local()


def _tokenizer(path: str):
    """One tokenizer per thread: Ray's collate runs in a thread pool and fast tokenizers are not re-entrant."""
    cache = getattr(_TOKENIZERS, "cache", None)
    if cache is None:
        cache = _TOKENIZERS.cache = {}
    if path not in cache:
        from transformers import AutoTokenizer

        cache[path] = AutoTokenizer.from_pretrained(path)
    return cache[path]


def _ids(values, n: int) -> torch.Tensor:
    a = pd.to_numeric(pd.Series(values), errors="coerce").fillna(-1).to_numpy(dtype=np.int64, copy=True)
    a[(a < 0) | (a >= n)] = n
    return torch.from_numpy(a)


def _ragged(values, width: int, dtype, fill) -> np.ndarray:
    """List column -> (rows, width) array, truncated/padded with ``fill``; nulls become all-``fill``.

    Truncation keeps the first ``width`` values: feature vectors keep their leading slots, and histories,
    which the pipeline stores most recent first (``user_features.history_item_ids``), keep their most recent
    items (a checkpoint's ``history_len`` may be shorter than the served ``features.history_length``).
    """
    out = np.full((len(values), width), fill, dtype=dtype)
    if width == 0:
        return out
    for r, v in enumerate(values):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            continue
        # nulls inside a list (pd.NA / None from Arrow) count as missing values
        arr = np.asarray([fill if (x is None or x is pd.NA) else x for x in v], dtype=dtype)
        if arr.size:
            arr = arr[:width]
            out[r, : arr.size] = arr
    return out


def _texts(batch: pd.DataFrame, col: str) -> list[str]:
    if col not in batch.columns:
        return [""] * len(batch)
    return ["" if (t is None or (isinstance(t, float) and np.isnan(t))) else str(t) for t in batch[col].tolist()]


def feature_matrix(values, width: int) -> np.ndarray:
    """A ``features`` list column as the model is fed it: (rows, width) float32, nulls and NaNs as 0,
    vectors padded or cut to ``width`` (also what :mod:`causalrec.models.feature_scaling` takes moments of)."""
    return np.nan_to_num(_ragged(values, width, np.float32, 0.0))


class Featurizer:
    """``Featurizer(model_config)(pandas_batch) -> dict[str, Tensor]``."""

    def __init__(self, model_config: dict):
        self.mc = dict(model_config)
        self.kind = self.mc.get("model", "mf")
        self.n_users = int(self.mc["n_users"])
        self.n_items = int(self.mc["n_items"])
        self.n_features = int(self.mc.get("n_features", 0))
        self.history_len = int(self.mc.get("history_len", 0)) if self.kind == "two_tower" else 0
        self.max_seq_len = int(self.mc.get("max_seq_len", 64))
        self.tokenizer_path = self.mc.get("tokenizer_path") or self.mc.get("encoder_path")
        if self.kind in ("two_tower", "cross_encoder") and not self.tokenizer_path:
            raise ValueError("a text model's config needs 'tokenizer_path' or 'encoder_path'")

    def _tokens(self, first: list[str], second: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask, padded to ``max_seq_len``; each distinct text (pair) is tokenized once per batch.

        Catalogue rows repeat the same item and user texts; with fixed-length padding a text's
        encoding does not depend on the rest of the batch, so the unique texts are tokenized
        and their rows gathered back in order.
        """
        tok = _tokenizer(self.tokenizer_path)
        keys = first if second is None else list(zip(first, second))
        codes, uniq = pd.factorize(pd.Series(keys, dtype=object), sort=False)
        if second is None:
            enc = tok(list(uniq), max_length=self.max_seq_len, truncation=True, padding="max_length",
                      return_tensors="pt")
        else:
            enc = tok([a for a, _ in uniq], [b for _, b in uniq], max_length=self.max_seq_len, truncation=True,
                      padding="max_length", return_tensors="pt")
        rows = torch.from_numpy(codes.astype(np.int64))
        return enc["input_ids"][rows], enc["attention_mask"][rows]

    def __call__(self, batch: pd.DataFrame) -> dict[str, torch.Tensor]:
        if not isinstance(batch, pd.DataFrame):
            batch = pd.DataFrame(dict(batch))
        for col in ("user_idx", "item_idx"):
            if col not in batch.columns:
                raise KeyError(f"Featurizer: batch has no column {col!r} (columns: {list(batch.columns)})")
        out: dict[str, torch.Tensor] = {
            "user_idx": _ids(batch["user_idx"].to_numpy(), self.n_users),
            "item_idx": _ids(batch["item_idx"].to_numpy(), self.n_items),
        }
        if self.n_features:
            col = batch["features"].tolist() if "features" in batch.columns else [None] * len(batch)
            out["features"] = torch.from_numpy(feature_matrix(col, self.n_features))
        if self.history_len:
            col = batch["history_item_idx"].tolist() if "history_item_idx" in batch.columns else [None] * len(batch)
            h = _ragged(col, self.history_len, np.int64, -1)
            h[h >= self.n_items] = -1
            out["history_item_idx"] = torch.from_numpy(h)
        if self.kind == "two_tower":
            out["user_input_ids"], out["user_attention_mask"] = self._tokens(_texts(batch, "user_text"))
            out["item_input_ids"], out["item_attention_mask"] = self._tokens(_texts(batch, "item_text"))
        elif self.kind == "cross_encoder":
            out["pair_input_ids"], out["pair_attention_mask"] = self._tokens(
                _texts(batch, "user_text"), _texts(batch, "item_text"))
        for col in TARGET_COLUMNS:
            if col in batch.columns:
                v = pd.to_numeric(batch[col].astype("float64", errors="ignore"), errors="coerce")
                out[col] = torch.from_numpy(v.to_numpy(dtype=np.float32, na_value=np.nan))
        return out
