"""Two-level classifier: timm backbone -> GAP -> concat(image, metadata MLP) -> fine and coarse heads."""

from __future__ import annotations

import timm
import torch
from torch import nn

from dermlens.metadata import META_DIM
from dermlens.model.weights import init_backbone


class FusionHead(nn.Module):
    """Fine and coarse linear heads over concat(pooled image features, metadata MLP features)."""

    def __init__(
        self,
        img_dim: int,
        n_fine: int,
        metadata: bool,
        meta_hidden: int = 32,
        dropout: float = 0.2,
        n_coarse: int = 2,
    ) -> None:
        super().__init__()
        self.img_dim, self.metadata = img_dim, metadata
        self.meta_mlp = (
            nn.Sequential(
                nn.Linear(META_DIM, meta_hidden), nn.SiLU(), nn.Linear(meta_hidden, meta_hidden), nn.SiLU()
            )
            if metadata
            else None
        )
        width = img_dim + (meta_hidden if metadata else 0)
        self.dropout = nn.Dropout(dropout)
        self.fine = nn.Linear(width, n_fine)
        self.coarse = nn.Linear(width, n_coarse)

    def forward(
        self, emb: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image features [N, D] (+ meta [N, META_DIM]) -> (fine_logits, coarse_logits)."""
        z = emb
        if self.meta_mlp is not None:
            if meta is None:
                raise ValueError("this model uses metadata: pass meta [N, META_DIM]")
            z = torch.cat([emb, self.meta_mlp(meta.to(emb.dtype))], dim=1)
        z = self.dropout(z)
        return self.fine(z), self.coarse(z)

    def cam_weight(self) -> torch.Tensor:
        """Image part of the fine head's weight, [C, D]: CAM_c = sum_d W[c, d] * feature_map[d]."""
        return self.fine.weight[:, : self.img_dim]


class DermNet(nn.Module):
    """Backbone + FusionHead; forward(image, meta) -> (fine_logits, coarse_logits)."""

    def __init__(
        self,
        arch: str = "tf_efficientnet_lite0",
        n_fine: int = 7,
        metadata: bool = False,
        init: str = "imagenet",
        meta_hidden: int = 32,
        dropout: float = 0.2,
        drop_path: float = 0.0,
        weights_package: str | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = timm.create_model(
            arch, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path
        )
        self.init_note = init_backbone(self.backbone, arch, init, weights_package)
        self.num_features = int(self.backbone.num_features)
        self.head = FusionHead(self.num_features, n_fine, metadata, meta_hidden, dropout)

    @property
    def uses_metadata(self) -> bool:
        return self.head.metadata

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map [N, D, h, w]."""
        return self.backbone.forward_features(image)

    def embedding(self, image: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled image features [N, D]."""
        return self.feature_map(image).mean(dim=(2, 3))

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.embedding(image), meta)

    def forward_all(
        self, image: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fine_logits, coarse_logits, embedding, feature_map) in one pass, for export and val outputs."""
        fmap = self.feature_map(image)
        emb = fmap.float().mean(dim=(2, 3))
        fine, coarse = self.head(emb, meta)
        return fine, coarse, emb, fmap

    def cam_weight(self) -> torch.Tensor:
        return self.head.cam_weight()

    def freeze_stages(self, n_blocks: int) -> None:
        """Freeze the stem and the first n_blocks stages (n_blocks < 0 freezes the whole backbone)."""
        blocks = getattr(self.backbone, "blocks", None)
        for p in self.backbone.parameters():
            p.requires_grad = True
        if n_blocks == 0:
            return
        if n_blocks < 0 or blocks is None:
            for p in self.backbone.parameters():
                p.requires_grad = False
            return
        stem = [m for n, m in self.backbone.named_children() if n in ("conv_stem", "bn1")]
        for m in [*stem, *list(blocks)[:n_blocks]]:
            for p in m.parameters():
                p.requires_grad = False


def build_network(model_cfg: dict, n_fine: int) -> DermNet:
    """Build a DermNet from the `model:` config section."""
    return DermNet(
        arch=model_cfg.get("arch", "tf_efficientnet_lite0"),
        n_fine=n_fine,
        metadata=bool(model_cfg.get("metadata", False)),
        init=str(model_cfg.get("init", "imagenet")),
        meta_hidden=int(model_cfg.get("meta_hidden", 32)),
        dropout=float(model_cfg.get("dropout", 0.2)),
        drop_path=float(model_cfg.get("drop_path", 0.0)),
        weights_package=model_cfg.get("weights_package"),
    )
