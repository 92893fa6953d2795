"""Output heads shared by every backbone.

Why one module: MF, the two-tower and the cross-encoder all reduce a (user, item)
pair to a vector ``h``; what we predict from it (a rating, a click probability, or
the pair of potential outcomes whose difference is the causal effect of
recommending) is independent of how ``h`` was built. Each head returns both the
raw score (``*_logit``, what the losses use) and the prediction on the outcome's
scale (``relevance``, ``y1``, ``y0``).
"""
from __future__ import annotations

import torch
from torch import nn


def _to_scale(logit: torch.Tensor, task: str) -> torch.Tensor:
    """Rating: the regression output itself. Click/purchase: a probability."""
    return torch.sigmoid(logit) if task == "click" else logit


class RelevanceHead(nn.Module):
    """Rating regression (``task="rating"``) or click/purchase probability (``task="click"``).

    ``logit = w . h + offset`` where ``offset`` carries the backbone's additive biases
    (MF's user/item/global bias). With ``w`` initialised to ones on MF this is exactly
    the classic dot product ``u . i + b_u + b_i + mu``.
    """

    def __init__(self, dim: int, task: str = "rating", init_ones: bool = False):
        super().__init__()
        if task not in ("rating", "click"):
            raise ValueError(f"task must be 'rating' or 'click', got {task!r}")
        self.task = task
        self.proj = nn.Linear(dim, 1, bias=False)
        if init_ones:
            nn.init.ones_(self.proj.weight)

    def forward(self, h: torch.Tensor, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logit = self.proj(h).squeeze(-1)
        if offset is not None:
            logit = logit + offset
        logit = logit.float()
        return {"logit": logit, "relevance": _to_scale(logit, self.task)}


class UpliftHeads(nn.Module):
    """Two heads: outcome if recommended (``y1``) and if not (``y0``); ``uplift = y1 - y0``.

    Trained with inverse treatment-propensity weights
    (:class:`causalrec.train.objectives.UpliftIPW`) so that each head estimates its
    potential outcome over the whole population, not only over the pairs the logging
    policy happened to treat; their difference is then the per-pair causal effect.
    """

    def __init__(self, dim: int, task: str = "click"):
        super().__init__()
        self.task = task
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.y1 = nn.Linear(dim, 1)
        self.y0 = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.body(h)
        l1 = self.y1(z).squeeze(-1)
        l0 = self.y0(z).squeeze(-1)
        if offset is not None:
            l1, l0 = l1 + offset, l0 + offset
        l1, l0 = l1.float(), l0.float()
        y1, y0 = _to_scale(l1, self.task), _to_scale(l0, self.task)
        return {"y1_logit": l1, "y0_logit": l0, "y1": y1, "y0": y0, "uplift": y1 - y0}


class Heads(nn.Module):
    """Relevance head plus, when configured, the uplift head pair."""

    def __init__(self, dim: int, task: str, uplift: bool, init_ones: bool = False):
        super().__init__()
        self.relevance = RelevanceHead(dim, task, init_ones=init_ones)
        self.uplift = UpliftHeads(dim, task) if uplift else None

    def forward(self, h: torch.Tensor, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.relevance(h, offset)
        if self.uplift is not None:
            out.update(self.uplift(h, offset))
        return out
