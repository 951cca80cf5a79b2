"""Measuring class activation maps against lesion masks (pointing game, heat inside the mask).

numpy + Pillow; scipy only in dilated_fraction.
"""

from __future__ import annotations

import numpy as np

from dermlens.extras import require
from dermlens.infer.cam import upsample


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
