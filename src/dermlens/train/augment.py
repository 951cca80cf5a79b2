"""Augmentation (albumentations on uint8 HxWx3) and the torch-side normalization matching Preprocessing."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from dermlens.preprocess import Preprocessing


def train_transform(prep: Preprocessing, cfg: dict) -> A.Compose:
    """Training augmentation producing uint8 images of the model's (height, width)."""
    h, w = prep.height, prep.width
    ops: list = [
        A.RandomResizedCrop(
            size=(h, w), scale=tuple(cfg.get("scale", (0.6, 1.0))), ratio=(w / h * 0.8, w / h * 1.25)
        ),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
    ]
    if h == w:
        ops.append(A.RandomRotate90(p=0.5))
    else:  # 90-degree turns change the aspect ratio: rotate by 180 instead, plus small free rotations
        ops.append(A.Affine(rotate=(-30, 30), p=0.5, border_mode=0))
    cj = float(cfg.get("color_jitter", 0.2))
    if cj > 0:
        ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=cj / 4, p=0.8))
    if cfg.get("blur", 0.0):
        ops.append(A.GaussianBlur(blur_limit=(3, 5), p=float(cfg["blur"])))
    if cfg.get("coarse_dropout", 0.0):
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.15),
                hole_width_range=(0.05, 0.15),
                p=float(cfg["coarse_dropout"]),
            )
        )
    return A.Compose(ops)


def eval_transform(prep: Preprocessing) -> A.Compose:
    """Validation transform: only a resize if the cache differs from the model size."""
    return A.Compose([A.Resize(prep.height, prep.width)])


class TorchNormalize(torch.nn.Module):
    """uint8 NCHW batch -> float normalized exactly like Preprocessing.normalize ((x/255 - mean) / std)."""

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


def to_chw(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
