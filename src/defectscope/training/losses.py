"""Losses for imbalanced defect classes: class-weighted cross-entropy (default) and focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """w_c = (n / (k * n_c)) ** power: a balanced dataset gets all ones; absent classes get 0."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    return weights


class FocalLoss(nn.Module):
    """Lin et al. 2017: down-weights easy examples by (1 - p_t)^gamma; ``weight`` acts as alpha per class."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            alpha = self.weight[target]
            return (alpha * loss).sum() / alpha.sum().clamp_min(1e-12)
        return loss.mean()


def make_loss(kind: str, weight: torch.Tensor | None, gamma: float = 2.0, label_smoothing: float = 0.0) -> nn.Module:
    if kind == "focal":
        return FocalLoss(gamma, weight)
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; use ce or focal")
