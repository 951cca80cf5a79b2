"""Ensemble of DermNets as ONE network with DermNet's interface, so it exports to one ONNX graph.

forward_all(image, meta) -> (fine_logits, coarse_logits, embedding, feature_map), like a single model:
- combine "mean_prob": log of the mean member probability (softmax of it IS the mean probability);
- "mean_logit": mean member logit;
- "stack": a linear meta-learner over the members' log-probabilities (members of one group averaged
  first), i.e. a fitted multinomial logistic regression folded into the graph.
features "mean" averages the members' feature maps (members fine-tuned from the same ImageNet weights
keep their channels aligned; the OOD statistics stay single-model sized); "concat" stacks them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dermlens.model.network import DermNet, build_network

COMBINES: tuple[str, ...] = ("mean_prob", "mean_logit", "stack")
FEATURES: tuple[str, ...] = ("mean", "concat")


class EnsembleNet(nn.Module):
    """Members + a fixed combiner; `groups[i]` is member i's group (stacking weighs groups, not members)."""

    def __init__(
        self,
        members: list[DermNet],
        combine: str = "mean_prob",
        features: str = "mean",
        groups: list[int] | None = None,
        n_coarse: int = 2,
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"ensemble combine must be one of {COMBINES}, not {combine!r}")
        if features not in FEATURES:
            raise ValueError(f"ensemble features must be one of {FEATURES}, not {features!r}")
        if not members:
            raise ValueError("an ensemble needs at least one member")
        dims = {m.num_features for m in members}
        if features == "mean" and len(dims) > 1:
            raise ValueError(f"features 'mean' needs members of one feature width, got {sorted(dims)}")
        self.members = nn.ModuleList(members)
        self.combine, self.features = combine, features
        self.groups = list(groups) if groups is not None else [0] * len(members)
        self.n_groups = max(self.groups) + 1
        n_fine = members[0].head.fine.out_features
        self.arch = "ensemble"
        self.num_features = sum(dims) if features == "concat" else dims.pop()
        self.same_grid = len({_reduction(m) for m in members}) == 1
        self.register_buffer("stack_fine_w", torch.zeros(n_fine, self.n_groups * n_fine))
        self.register_buffer("stack_fine_b", torch.zeros(n_fine))
        self.register_buffer("stack_coarse_w", torch.zeros(n_coarse, self.n_groups * n_coarse))
        self.register_buffer("stack_coarse_b", torch.zeros(n_coarse))

    @property
    def uses_metadata(self) -> bool:
        return any(m.uses_metadata for m in self.members)

    def set_stacker(self, head: str, weight: Any, bias: Any) -> None:
        """Install fitted meta-learner weights [C, G*C] and bias [C] for head 'fine' or 'coarse'."""
        w, b = getattr(self, f"stack_{head}_w"), getattr(self, f"stack_{head}_b")
        w.copy_(torch.as_tensor(weight, dtype=w.dtype).reshape(w.shape))
        b.copy_(torch.as_tensor(bias, dtype=b.dtype).reshape(b.shape))

    def group_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Member logits [K, N, C] -> per-group log mean probability, concatenated [N, G*C]."""
        logp = F.log_softmax(logits.float(), dim=-1)
        parts = []
        for g in range(self.n_groups):
            idx = [i for i, gi in enumerate(self.groups) if gi == g]
            parts.append(torch.logsumexp(logp[idx], dim=0) - math.log(len(idx)))
        return torch.cat(parts, dim=1)

    def _combine(self, logits: torch.Tensor, head: str) -> torch.Tensor:
        if self.combine == "mean_logit":
            return logits.float().mean(dim=0)
        if self.combine == "mean_prob":
            return torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=0) - math.log(len(self.members))
        w, b = getattr(self, f"stack_{head}_w"), getattr(self, f"stack_{head}_b")
        return self.group_log_probs(logits) @ w.t() + b

    def _features(self, fmaps: list[torch.Tensor]) -> torch.Tensor:
        if not self.same_grid:  # backbones of different strides: resample onto the first member's grid
            size = fmaps[0].shape[-2:]
            fmaps = [fmaps[0]] + [F.interpolate(f, size=size, mode="bilinear") for f in fmaps[1:]]
        return torch.cat(fmaps, dim=1) if self.features == "concat" else torch.stack(fmaps).mean(dim=0)

    def forward_all(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fine_logits, coarse_logits, embedding, feature_map) of the combined members."""
        outs = [m.forward_all(image, meta if m.uses_metadata else None) for m in self.members]
        fine = self._combine(torch.stack([o[0] for o in outs]), "fine")
        coarse = self._combine(torch.stack([o[1] for o in outs]), "coarse")
        fmap = self._features([o[3] for o in outs])
        return fine, coarse, fmap.float().mean(dim=(2, 3)), fmap

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fine, coarse, _, _ = self.forward_all(image, meta)
        return fine, coarse

    def member_weights(self) -> list[torch.Tensor]:
        """Each member's linear weight [C, D_i] from its image features to the ensemble's fine logits.

        Exact for mean_logit; for mean_prob and stack it linearizes the softmax (good enough for CAM).
        """
        k, n = len(self.members), self.stack_fine_b.numel()
        out = []
        for i, m in enumerate(self.members):
            w = m.cam_weight()
            if self.combine == "stack":
                g = self.groups[i]
                size = self.groups.count(g)
                w = self.stack_fine_w[:, g * n : (g + 1) * n] @ w / size
            else:
                w = w / k
            out.append(w)
        return out

    def cam_weight(self) -> torch.Tensor:
        """CAM weight [C, D] matching feature_map: CAM_c = sum_d W[c, d] * feature_map[d]."""
        ws = self.member_weights()
        if self.features == "concat":
            return torch.cat(ws, dim=1)
        return torch.stack(ws).sum(dim=0) if self.features == "mean" else ws[0]

    def spec(self) -> dict[str, Any]:
        """The `model:` description stored in checkpoints and cards (rebuilt by build_ensemble)."""
        return {
            "arch": "ensemble",
            "ensemble": {
                "combine": self.combine,
                "features": self.features,
                "groups": list(self.groups),
                "members": [dict(getattr(m, "model_cfg", {"arch": m.arch})) for m in self.members],
            },
        }


def _reduction(net: DermNet) -> int:
    """Total stride of a member's last feature map (32 for EfficientNets)."""
    info = getattr(net.backbone, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info is not None else 32
    except (TypeError, KeyError, IndexError):
        return 32


def describe(spec: dict[str, Any]) -> str:
    """A short architecture string, e.g. 'ensemble(3x tf_efficientnet_lite0, mean_prob)'."""
    e = spec["ensemble"]
    archs: dict[str, int] = {}
    for m in e["members"]:
        archs[str(m.get("arch"))] = archs.get(str(m.get("arch")), 0) + 1
    parts = ", ".join(f"{n}x {a}" for a, n in archs.items())
    return f"ensemble({parts}, {e['combine']})"


def build_ensemble(model_cfg: dict[str, Any], n_fine: int) -> EnsembleNet:
    """An EnsembleNet with randomly initialised members from a spec() dict (weights loaded afterwards)."""
    e = model_cfg["ensemble"]
    members = []
    for mc in e["members"]:
        net = build_network({**mc, "init": "random"}, n_fine)
        net.model_cfg = dict(mc)
        members.append(net)
    return EnsembleNet(members, e["combine"], e.get("features", "mean"), e.get("groups"))


def is_ensemble(model_cfg: dict[str, Any]) -> bool:
    return "ensemble" in model_cfg
