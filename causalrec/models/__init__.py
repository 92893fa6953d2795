"""Recommender models, chosen by a plain ``model_config`` dict.

Every model's ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]`` returns
``relevance`` (predicted rating, or click/purchase probability) and ``logit``;
with ``uplift=True`` also ``y1``, ``y0`` and ``uplift = y1 - y0``; with
``imputation=True`` (DR joint learning) also ``imputation``. Inputs come from
:class:`causalrec.models.featurize.Featurizer` built on the same config.

``model_config`` keys: ``model`` (mf | two_tower | cross_encoder), ``task``
(rating | click), ``n_users``, ``n_items``, ``dim``, ``n_features``, ``uplift``,
``imputation``, ``global_bias``; text models also ``encoder_path``,
``max_seq_len``, ``history_len``, ``freeze_layers``, ``id_dropout``,
``random_init``, ``encoder_config``, ``tokenizer_path``, ``feature_mean`` / ``feature_std``
(:mod:`causalrec.models.feature_scaling`); the two-tower also
``text_match`` and ``text_match_init`` (:class:`causalrec.models.text.TwoTower`).
"""
from __future__ import annotations

from torch import nn

MODEL_TYPES = ("mf", "two_tower", "cross_encoder")
TEXT_MODELS = ("two_tower", "cross_encoder")


def build_model(model_config: dict) -> nn.Module:
    """Build an untrained model from its config (the same call rebuilds it from a checkpoint)."""
    kind = model_config.get("model")
    for key in ("n_users", "n_items"):
        if key not in model_config:
            raise ValueError(f"model_config is missing {key!r} (needed to size the id embeddings)")
    if kind == "mf":
        from causalrec.models.mf import MF

        return MF(
            int(model_config["n_users"]), int(model_config["n_items"]), int(model_config.get("dim", 32)),
            task=model_config.get("task", "rating"), uplift=bool(model_config.get("uplift")),
            global_bias=float(model_config.get("global_bias", 0.0)),
            imputation=bool(model_config.get("imputation")),
        )
    if kind == "two_tower":
        from causalrec.models.text import TwoTower

        return TwoTower(model_config)
    if kind == "cross_encoder":
        from causalrec.models.text import CrossEncoder

        return CrossEncoder(model_config)
    raise ValueError(f"model_config['model'] = {kind!r}; expected one of {MODEL_TYPES}")


__all__ = ["build_model", "MODEL_TYPES", "TEXT_MODELS"]
