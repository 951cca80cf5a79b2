"""Class activation maps from the ONNX `feature_map` output and the fine head's image weights.

numpy + Pillow at inference; scipy only in dilated_fraction (measurement).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dermlens.extras import require


def cam(feature_map: np.ndarray, weight: np.ndarray, class_index: int) -> np.ndarray:
    """CAM_c = ReLU(sum_d W[c, d] * F[d]) scaled to 0..1; feature_map [D, h, w], weight [C, D] -> [h, w]."""
    f = np.asarray(feature_map, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)[int(class_index)]
    if f.ndim != 3 or w.shape[0] != f.shape[0]:
        raise ValueError(
            f"feature_map {f.shape} and weight row {w.shape} do not fit (need [D,h,w] and [C,D])"
        )
    heat = np.maximum(np.tensordot(w, f, axes=(0, 0)), 0.0)
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32)


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [h, w] map to size (H, W) via Pillow, clipped to 0..1."""
    h, w = int(size[0]), int(size[1])
    img = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    return np.clip(np.asarray(img.resize((w, h), Image.Resampling.BILINEAR)), 0.0, 1.0)


def jet(heat: np.ndarray) -> np.ndarray:
    """Jet-like colormap: 0..1 map [H, W] -> uint8 RGB [H, W, 3] (blue - cyan - yellow - red)."""
    v = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Alpha-blend the colour-mapped heat (upsampled to the image) over an RGB uint8 image."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if heat.shape != rgb.shape[:2]:
        heat = upsample(heat, rgb.shape[:2])
    # weight the blend by heat so cold regions keep the original image visible
    a = (alpha * np.sqrt(np.clip(heat, 0.0, 1.0)))[..., None].astype(np.float32)
    out = (1.0 - a) * rgb.astype(np.float32) + a * jet(heat).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def overlay_png(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes of the CAM overlay, at the size of `rgb`."""
    buf = io.BytesIO()
    Image.fromarray(overlay(rgb, heat, alpha)).save(buf, format="PNG")
    return buf.getvalue()


def heat_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of total heat inside the lesion mask (heat upsampled to the mask's size); NaN if no heat."""
    m = np.asarray(mask) > 0
    if heat.shape != m.shape:
        heat = upsample(heat, m.shape)
    total = float(heat.sum())
    return float(heat[m].sum() / total) if total > 0 else float("nan")


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tolerance_px: float = 15.0) -> bool:
    """Pointing game: the heat's argmax lies inside the mask or within `tolerance_px` (mask pixels) of it."""
    m = np.asarray(mask) > 0
    if heat.shape != m.shape:
        heat = upsample(heat, m.shape)
    if not m.any():
        return False
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if m[y, x]:
        return True
    ys, xs = np.nonzero(m)
    return bool(np.min((ys - y) ** 2 + (xs - x) ** 2) <= tolerance_px**2)


def dilated_fraction(mask: np.ndarray, tolerance_px: float = 15.0) -> float:
    """Share of pixels within `tolerance_px` of the mask: the hit rate of a random pointer."""
    distance_transform_edt = require("scipy.ndimage", "evaluate").distance_transform_edt

    m = np.asarray(mask) > 0
    if not m.any():
        return 0.0
    return float((distance_transform_edt(~m) <= tolerance_px).mean())
