"""Standardised numeric features: every ``features`` slot as a z-score under the train split's moments.

Why: the vector mixes log1p counts (about 3, and nearly the same for every user on Coat), rates in
[0, 1] and attribute one-hots, and on a data set with one event type several count slots are
copies of each other (Coat: events = interactions = ratings = distinct items). Fed raw to a linear
layer trained with Adam, which moves every weight by about the learning rate per step whatever
its input's scale, k copies of a slot near 3 move the projection by about 3 k lr per step, all in
one direction: a large shared bias the weight decay barely holds. On Coat the text model's
validation error then swung from epoch to epoch, and one more exact copy of a count (the exact
``n_distinct_items``) cost 0.05 MSE. Centred and scaled, a constant slot is 0 and every slot moves
the projection on the same scale.

The moments are of what the model is fed (:func:`~causalrec.models.featurize.feature_matrix`: nulls
as zeros, vectors padded or cut to the trained width) over the train split. Each data block gives
its count, mean and sum of squared deviations, and the driver combines them (the pairwise update of
Chan, Golub & LeVeque 1979), so nothing event-scale reaches it. They travel in the model config
(``feature_mean``, ``feature_std``), hence in every checkpoint's ``model_config.json``, and scoring applies
the same transform to served vectors. z-scores are clipped at +-``MAX_Z``: an attribute on 1 train row in
10,000 would otherwise enter at z = 100, and so would a served count a little off a slot that barely
varied in training, each on a weight that training barely moved.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

# below this the slot is treated as constant: it is centred (to 0) but not divided
MIN_STD = 1e-6
# z-scores beyond this are clipped (a value 10 standard deviations out is rare or drifted, not informative)
MAX_Z = 10.0
# the model-config keys that hold the moments
SCALING_KEYS = ("feature_mean", "feature_std")


def batch_moments(features: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(count, mean, m2)`` of a (rows, width) block; ``m2`` the sum of squared deviations per slot."""
    x = np.asarray(features, dtype=np.float64)
    if x.shape[0] == 0:
        return 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.mean(axis=0)
    return int(x.shape[0]), mean, ((x - mean) ** 2).sum(axis=0)


def combine_moments(parts: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """The blocks' moments merged pairwise (Chan, Golub & LeVeque 1979): exact, and stable where sum/sum-of-squares is not."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in parts:
        nb = int(nb)
        if nb == 0:
            continue
        mb, m2b = np.asarray(mb, dtype=np.float64), np.asarray(m2b, dtype=np.float64)
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta * delta * (n * nb / total)
        n = total
    return n, mean, m2


def scaling_from_moments(n: int, mean: Optional[np.ndarray], m2: Optional[np.ndarray], width: int) -> dict:
    """The model-config entries (``feature_mean``, ``feature_std``; population std, 1.0 for a constant
    slot) of the merged moments; empty when there were no rows to take them from."""
    if n == 0 or mean is None:
        return {}
    if len(mean) != width:
        raise ValueError(f"feature moments have {len(mean)} slots for a model with {width} features")
    std = np.sqrt(np.maximum(m2 / n, 0.0))
    std = np.where(std > MIN_STD, std, 1.0)
    return dict(zip(SCALING_KEYS, ([float(v) for v in mean], [float(v) for v in std])))


def frame_feature_scaling(frame, width: int) -> dict:
    """:func:`scaling_from_moments` of a pandas frame's ``features`` column (the Coat results script)."""
    from causalrec.models.featurize import feature_matrix

    return scaling_from_moments(*batch_moments(feature_matrix(frame["features"].tolist(), width)), width)


def dataset_feature_scaling(ds, width: int) -> dict:
    """:func:`scaling_from_moments` of a Ray Dataset's ``features`` column: one row of moments per block,
    merged on the driver."""
    from causalrec.models.featurize import feature_matrix

    def block_moments(batch):
        n, mean, m2 = batch_moments(feature_matrix(batch["features"].tolist(), width))
        return {"n": np.array([n], dtype=np.int64), "mean": mean[None, :], "m2": m2[None, :]}

    rows = ds.select_columns(["features"]).map_batches(block_moments, batch_format="pandas", batch_size=None).take_all()
    # blocks may arrive in any order: merged in a fixed one, the moments are the same to the last bit on every run
    rows.sort(key=lambda r: (int(r["n"]), np.asarray(r["mean"], dtype=np.float64).tobytes()))
    return scaling_from_moments(*combine_moments((r["n"], r["mean"], r["m2"]) for r in rows), width)


class FeatureStandardizer(nn.Module):
    """``(features - mean) / std``, clipped at +-``MAX_Z``, with the train split's moments, kept as non-persistent buffers: they
    follow the module to its device, and come from the model config, not from the saved weights (so
    checkpoints written before standardisation load unchanged, and without it)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, mc: dict, width: int) -> Optional["FeatureStandardizer"]:
        """The standardiser ``mc`` records, None when it records none (unscaled features)."""
        mean, std = (mc.get(k) for k in SCALING_KEYS)
        if mean is None or std is None:
            return None
        if len(mean) != width or len(std) != width:
            raise ValueError(f"model config: feature_mean/feature_std have {len(mean)}/{len(std)} slots for "
                             f"n_features={width}")
        return cls(mean, std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # in float32 even in a model cast to bf16 (the moments' digits matter more than the matmul's)
        z = (features.float() - self.mean.float()) / self.std.float()
        return z.clamp(-MAX_Z, MAX_Z)
