"""Imbalance losses: CE, weighted CE, focal, label smoothing, logit adjustment (Menon et al. 2021)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "weighted_ce", "focal", "label_smoothing", "logit_adjust")


def class_weights(counts: np.ndarray, power: float = 1.0) -> torch.Tensor:
    """(1/count)^power, normalized so the sample-weighted mean is 1."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = (1.0 / c) ** power
    w = w * c.sum() / (w * c).sum()
    return torch.tensor(w, dtype=torch.float32)


class ImbalanceLoss(nn.Module):
    """One configurable classification loss over integer targets or soft (mixed) class probabilities."""

    def __init__(
        self,
        name: str,
        counts: np.ndarray,
        weight_power: float = 1.0,
        gamma: float = 2.0,
        smoothing: float = 0.1,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
        self.name, self.gamma, self.smoothing = name, gamma, smoothing
        weight = class_weights(counts, weight_power) if name == "weighted_ce" else None
        self.register_buffer("weight", weight)
        prior = np.maximum(np.asarray(counts, np.float64), 1.0)
        self.register_buffer(
            "log_prior", torch.tensor(tau * np.log(prior / prior.sum()), dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float() if target.is_floating_point() else target
        if self.name == "weighted_ce" and target.is_floating_point():  # weighted mean, as for hard labels
            w = target * self.weight
            return -(w * F.log_softmax(logits, dim=1)).sum() / w.sum()
        if self.name == "weighted_ce":
            return F.cross_entropy(logits, target, weight=self.weight)
        if self.name == "label_smoothing":
            return F.cross_entropy(logits, target, label_smoothing=self.smoothing)
        if self.name == "logit_adjust":
            return F.cross_entropy(logits + self.log_prior, target)
        if self.name == "focal":
            logp = F.log_softmax(logits, dim=1)
            soft = target if target.is_floating_point() else F.one_hot(target, logits.shape[1]).float()
            return (-(soft * (1 - logp.exp()) ** self.gamma * logp).sum(1)).mean()
        return F.cross_entropy(logits, target)


def build_loss(cfg: dict, counts: np.ndarray) -> ImbalanceLoss:
    """The loss named in the `loss:` config section."""
    return ImbalanceLoss(
        cfg.get("name", "ce"),
        counts,
        weight_power=float(cfg.get("weight_power", 1.0)),
        gamma=float(cfg.get("focal_gamma", 2.0)),
        smoothing=float(cfg.get("smoothing", 0.1)),
        tau=float(cfg.get("tau", 1.0)),
    )
