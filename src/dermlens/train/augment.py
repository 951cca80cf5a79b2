"""Augmentation (torchvision.transforms.v2 on uint8 3xHxW tensors) and the torch-side normalization
matching Preprocessing. configs/train.yaml `augment:` names every op and its strength."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from dermlens.errors import ConfigError
from dermlens.preprocess import Preprocessing
from dermlens.train.transforms import (
    RandomDownUp,
    RandomJpeg,
    RandomRotate90,
    RandomVignette,
    RandomZoom,
    RemoveField,
)


def _maybe(op: v2.Transform, p: float) -> v2.Transform | None:
    """`op` applied with probability p (None when p is 0)."""
    return v2.RandomApply([op], p=p) if p > 0 else None


def geometry_ops(prep: Preprocessing, cfg: dict) -> list:
    """Field removal, random resized crop, flips, rotation and zoom: uint8 images at the model size."""
    h, w = prep.height, prep.width
    ops: list = [
        _maybe(RemoveField(), float(cfg.get("unvignette") or 0.0)),
        v2.RandomResizedCrop(
            size=(h, w),
            scale=tuple(cfg.get("scale", (0.6, 1.0))),
            ratio=(w / h * 0.8, w / h * 1.25),
            antialias=True,
        ),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
    ]
    if h == w:
        ops.append(v2.RandomApply([RandomRotate90()], p=0.5))
    else:  # 90-degree turns change the aspect ratio: free rotations up to 30 degrees, black corners
        ops.append(v2.RandomApply([v2.RandomRotation(30, v2.InterpolationMode.BILINEAR, fill=0)], p=0.5))
    ops.append(_maybe(RandomZoom(tuple(cfg.get("zoom_range") or (0.7, 1.4))), float(cfg.get("zoom") or 0.0)))
    return ops


def photometric_ops(cfg: dict) -> list:
    """Vignette, colour jitter, blur, down-and-up sampling, JPEG re-compression and coarse dropout."""
    cj = float(cfg.get("color_jitter", 0.2))
    blur = [v2.GaussianBlur(k, sigma=(0.5, 3.0)) for k in (3, 5)]
    holes = [
        v2.Compose([v2.RandomErasing(1.0, (0.0025, 0.0225), (1 / 3, 3), value=0)] * n) for n in range(1, 5)
    ]
    quality = tuple(int(q) for q in (cfg.get("jpeg_quality") or (30, 95)))
    radius = tuple(float(r) for r in (cfg.get("vignette_radius") or (0.55, 0.95)))
    return [
        _maybe(RandomVignette(radius), float(cfg.get("vignette") or 0.0)),
        _maybe(v2.ColorJitter(cj, cj, cj, cj / 4), 0.8) if cj > 0 else None,
        _maybe(v2.RandomChoice(blur), float(cfg.get("blur") or 0.0)),
        _maybe(RandomDownUp(int(cfg.get("downsample_min") or 64)), float(cfg.get("downsample") or 0.0)),
        _maybe(RandomJpeg(quality), float(cfg.get("jpeg") or 0.0)),
        _maybe(v2.RandomChoice(holes), float(cfg.get("coarse_dropout") or 0.0)),
    ]


def train_transform(prep: Preprocessing, cfg: dict) -> v2.Compose:
    """Training augmentation: uint8 3xHxW tensor in, uint8 3x(height)x(width) tensor out. An out-of-range
    setting is a one-line ConfigError."""
    try:
        ops = geometry_ops(prep, cfg) + photometric_ops(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"augment: {e}") from None
    return v2.Compose([op for op in ops if op is not None])


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """Validation transform: only a resize if the cache differs from the model size."""
    return v2.Compose([v2.Resize((prep.height, prep.width), antialias=True)])


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
