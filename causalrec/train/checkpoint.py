"""Checkpoints that rebuild anywhere: safetensors weights + JSON model config and metadata.

Why not pickle: ``torch.load`` of an arbitrary pickle executes code; safetensors holds
tensors only and the optimizer state is read back with ``weights_only=True``. The
model config carries everything :func:`causalrec.models.build_model` needs; text
models also save the encoder's ``config.json`` and the tokenizer next to the
weights, so scoring needs neither the original encoder folder nor the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
META = "meta.json"
OPTIMIZER = "optimizer.pt"
ENCODER_CONFIG = "encoder_config.json"
TOKENIZER_DIR = "tokenizer"
ID_INDEX_VERSION = "id_index_version"  # meta.json: the id_index Delta version the rows were indexed with
FEATURE_NAMES = "feature_names"  # meta.json: the names of the ``features`` slots the model was trained with


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_checkpoint(directory, model: torch.nn.Module, model_config: dict, meta: dict,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> str:
    from safetensors.torch import save_model

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    save_model(model, str(d / WEIGHTS))
    mc = dict(model_config)
    if mc.get("model") == "two_tower" and hasattr(model, "text_match"):
        # record what was built, so load_checkpoint rebuilds the same parameters (strict load)
        mc["text_match"] = bool(model.text_match)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "config"):
        (d / ENCODER_CONFIG).write_text(json.dumps(encoder.config.to_dict(), default=str))
        tok_src = mc.get("tokenizer_path") or mc.get("encoder_path")
        if tok_src and os.path.isdir(tok_src):
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tok_src).save_pretrained(str(d / TOKENIZER_DIR))
    (d / MODEL_CONFIG).write_text(json.dumps(mc, indent=2, sort_keys=True, default=str))
    (d / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), d / OPTIMIZER)
    return str(d)


def load_checkpoint(directory, map_location: str = "cpu"):
    """``-> (model, model_config, meta)``: the model rebuilt from its config with the saved weights."""
    from causalrec.models import build_model

    d = Path(directory)
    for name in (WEIGHTS, MODEL_CONFIG):
        if not (d / name).is_file():
            raise FileNotFoundError(f"checkpoint {d} has no {name}; was it written by save_checkpoint?")
    mc = saved_model_config(d)
    meta = json.loads((d / META).read_text()) if (d / META).is_file() else {}
    build_cfg = dict(mc)
    if (d / ENCODER_CONFIG).is_file():
        # rebuild the architecture from the saved config; the weights below replace it all
        build_cfg["encoder_config"] = json.loads((d / ENCODER_CONFIG).read_text())
        build_cfg["random_init"] = True
    if (d / TOKENIZER_DIR).is_dir():
        mc["tokenizer_path"] = str(d / TOKENIZER_DIR)
    model = build_model(build_cfg)
    load_weights(model, d / WEIGHTS, device=map_location)
    model.eval()
    return model, mc, meta


# buffers newer than some checkpoints: a checkpoint without them keeps the built model's values
OPTIONAL_WEIGHTS = ("user_known", "item_known")


def load_weights(model: torch.nn.Module, path, device: str = "cpu") -> None:
    """Strict safetensors load, except that the known-id masks may be missing.

    Checkpoints saved before :func:`causalrec.models.mf.set_known_ids` existed have no masks;
    their model then keeps its own (all ids known: the lookups they were trained and scored with).
    """
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(path), strict=False, device=device)
    missing = sorted(k for k in missing if not k.endswith(OPTIONAL_WEIGHTS))
    if missing or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__} from {path}: "
                           f"missing keys {missing}, unexpected keys {sorted(unexpected)}")


def saved_model_config(directory) -> dict:
    """The checkpoint's model config, completed for checkpoints older than a config key.

    A two-tower saved before the text-match path existed has no ``text_match`` key and no
    ``text_scale`` weight, so it is rebuilt with the path off (the weights then load strictly).
    """
    mc = json.loads((Path(directory) / MODEL_CONFIG).read_text())
    if mc.get("model") == "two_tower":
        mc.setdefault("text_match", False)
    return mc


def architecture_of(directory, model_config: dict) -> dict:
    """``model_config`` with the architecture flags a saved checkpoint was built with (for resuming):
    resuming an old two-tower under a config that turns the text-match path on would fail the strict
    weight load, so the checkpoint's own setting wins. So does a text model's feature standardisation
    (its moments, or none): the weights learnt on those inputs, not on the moments of the data resumed on."""
    from causalrec.models import TEXT_MODELS
    from causalrec.models.feature_scaling import SCALING_KEYS

    if model_config.get("model") not in TEXT_MODELS or not (Path(directory) / MODEL_CONFIG).is_file():
        return model_config

    saved = saved_model_config(directory)
    out = {k: v for k, v in model_config.items() if k not in SCALING_KEYS}
    out.update({k: saved[k] for k in SCALING_KEYS if k in saved})
    if model_config["model"] == "two_tower":
        out["text_match"] = saved["text_match"]
    return out


def trained_id_index_version(directory) -> Optional[int]:
    """The ``id_index`` Delta version recorded in the checkpoint's meta.json; None for a checkpoint
    saved before the version was recorded (or outside the train stage)."""
    meta = Path(str(directory)) / META
    if not meta.is_file():
        return None
    v = json.loads(meta.read_text()).get(ID_INDEX_VERSION)
    return None if v is None else int(v)


def trained_feature_names(directory) -> Optional[list]:
    """The ``features`` layout (slot names in order, :func:`causalrec.training_set.feature_layout`) recorded in
    the checkpoint's meta.json; None for a checkpoint saved before the layout was recorded (or outside the
    train stage). Scoring and evaluation map served vectors onto it by name."""
    meta = Path(str(directory)) / META
    if not meta.is_file():
        return None
    names = json.loads(meta.read_text()).get(FEATURE_NAMES)
    return None if names is None else [str(n) for n in names]


def load_optimizer_state(directory, optimizer: torch.optim.Optimizer) -> bool:
    p = Path(directory) / OPTIMIZER
    if not p.is_file():
        return False
    optimizer.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    return True
