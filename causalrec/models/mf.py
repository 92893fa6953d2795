"""Matrix factorisation: the fast path and the debiasing benchmark's reference model.

``score(u, i) = p_u . q_i + b_u + b_i + mu`` (Koren et al. 2009). Row ``n_users``
(``n_items``) of each table is the *unknown* row that ids unseen in training
(index -1 from the featurizer) map to, so scoring never indexes out of range;
for MF an unknown id scores from the biases it has (the global bias).

An id can have a row and still be unseen in training: the rows are sized by ``id_index``
(the whole catalogue, and ids that occur only in valid/test), so some rows never get a
gradient and keep their random start. :func:`set_known_ids` marks which rows training
reaches (``user_known`` / ``item_known``, saved with the weights); every lookup sends
the others to the unknown row, which text models train by id dropout.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from causalrec.models.heads import Heads


class IdEmbeddings(nn.Module):
    """User and item embeddings + biases with one extra 'unknown' row each.

    ``user_known`` / ``item_known`` (bool, one per row, all True until :func:`set_known_ids`):
    rows that are False are looked up as the unknown row, so an id training never reached
    is scored like an unseen one instead of from its untrained random row.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.1):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim)
        self.user_bias = nn.Embedding(n_users + 1, 1)
        self.item_bias = nn.Embedding(n_items + 1, 1)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        # the unknown rows start neutral
        with torch.no_grad():
            self.user.weight[n_users].zero_()
            self.item.weight[n_items].zero_()
        self.register_buffer("user_known", torch.ones(n_users + 1, dtype=torch.bool))
        self.register_buffer("item_known", torch.ones(n_items + 1, dtype=torch.bool))

    def set_known(self, user_known, item_known) -> None:
        """Mark the rows training reaches (bool per id, length n_users / n_items); the unknown row stays known."""
        for buf, known in ((self.user_known, user_known), (self.item_known, item_known)):
            # a copy: the mask may come from a read-only buffer (Ray's object store), which torch warns about
            known = torch.tensor(np.asarray(known, dtype=bool)).flatten()
            if known.numel() != buf.numel() - 1:
                raise ValueError(f"known-id mask has {known.numel()} entries for {buf.numel() - 1} ids")
            buf[:-1] = known.to(buf.device)
            buf[-1] = True

    def user_rows(self, user_idx: torch.Tensor) -> torch.Tensor:
        return user_idx.masked_fill(~self.user_known[user_idx], self.n_users)

    def item_rows(self, item_idx: torch.Tensor) -> torch.Tensor:
        return item_idx.masked_fill(~self.item_known[item_idx], self.n_items)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor):
        user_idx, item_idx = self.user_rows(user_idx), self.item_rows(item_idx)
        u, i = self.user(user_idx), self.item(item_idx)
        bias = self.user_bias(user_idx).squeeze(-1) + self.item_bias(item_idx).squeeze(-1)
        return u, i, bias


class MF(nn.Module):
    """Biased MF with pluggable heads (relevance; optional uplift pair)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 32, task: str = "rating",
                 uplift: bool = False, global_bias: float = 0.0, imputation: bool = False):
        super().__init__()
        self.ids = IdEmbeddings(n_users, n_items, dim)
        self.global_bias = nn.Parameter(torch.tensor(float(global_bias)))
        self.heads = Heads(dim, task, uplift, init_ones=True)
        self.imputation = (ImputationMF(n_users, n_items, max(4, dim // 2), task, global_bias)
                           if imputation else None)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u, i, bias = self.ids(batch["user_idx"], batch["item_idx"])
        out = self.heads(u * i, bias + self.global_bias)
        if self.imputation is not None:
            out.update(self.imputation(batch))
        return out


class ImputationMF(nn.Module):
    """The DR joint-learning imputation model (Wang et al. 2019): predicts the label itself.

    Its prediction ``g(u, i)`` stands in for the unobserved label, so the imputed
    error of the prediction model is ``loss(pred, g)``; kept small and separate from
    the prediction model so it can be trained on its own objective.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 16, task: str = "rating",
                 global_bias: float = 0.0):
        super().__init__()
        self.task = task
        self.ids = IdEmbeddings(n_users, n_items, dim)
        self.global_bias = nn.Parameter(torch.tensor(float(global_bias)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u, i, bias = self.ids(batch["user_idx"], batch["item_idx"])
        logit = ((u * i).sum(-1) + bias + self.global_bias).float()
        value = torch.sigmoid(logit) if self.task == "click" else logit
        return {"imputation_logit": logit, "imputation": value}


def set_known_ids(model: nn.Module, known: Optional[dict]) -> None:
    """Mark the ids training reaches on every id table of ``model`` (None: leave all known).

    ``known``: ``user`` / ``item`` bool masks for the prediction model and, when its own
    objective trains it on fewer rows (DR-JL's imputation model sees observed rows only),
    ``imputation_user`` / ``imputation_item``.
    """
    if not known:
        return
    model.ids.set_known(known["user"], known["item"])
    imputation = getattr(model, "imputation", None)
    if imputation is not None:
        imputation.ids.set_known(known.get("imputation_user", known["user"]),
                                 known.get("imputation_item", known["item"]))


def constant_buffer_names(model: nn.Module) -> list[str]:
    """The buffers constant while training, so DDP need not broadcast them: the known-id masks and a text
    model's feature moments (:class:`causalrec.models.feature_scaling.FeatureStandardizer`)."""
    return [name for name, _ in model.named_buffers()
            if name.endswith(("user_known", "item_known", "feature_scale.mean", "feature_scale.std"))]
