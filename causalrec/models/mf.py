"""Matrix factorisation: the fast path and the debiasing benchmark's reference model.

``score(u, i) = p_u . q_i + b_u + b_i + mu`` (Koren et al. 2009). Row ``n_users``
(``n_items``) of each table is the *unknown* row that ids unseen in training
(index -1 from the featurizer) map to, so scoring never indexes out of range;
for MF an unknown id scores from the biases it has (the global bias).
"""
from __future__ import annotations

import torch
from torch import nn

from causalrec.models.heads import Heads


class IdEmbeddings(nn.Module):
    """User and item embeddings + biases with one extra 'unknown' row each."""

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

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor):
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
