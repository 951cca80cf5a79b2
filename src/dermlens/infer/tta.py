"""Test-time augmentation: flips and 180-degree rotation (aspect kept), probabilities averaged. numpy only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "rot180")


def tta_views(batch: np.ndarray, views: tuple[str, ...] = VIEWS) -> list[np.ndarray]:
    """uint8 NHWC (or HWC) batch -> one contiguous array per view, same shape as the input."""
    x = np.asarray(batch)
    h_axis, w_axis = (0, 1) if x.ndim == 3 else (1, 2)
    ops = {
        "identity": lambda a: a,
        "hflip": lambda a: np.flip(a, axis=w_axis),
        "vflip": lambda a: np.flip(a, axis=h_axis),
        "rot180": lambda a: np.flip(a, axis=(h_axis, w_axis)),
    }
    unknown = [v for v in views if v not in ops]
    if unknown:
        raise ValueError(f"unknown TTA views {unknown}; choose from {VIEWS}")
    return [np.ascontiguousarray(ops[v](x)) for v in views]


def average_probs(probs: list[np.ndarray]) -> np.ndarray:
    """Mean of per-view probability arrays [N, C]."""
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probs]), axis=0)


def view_logits(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    batch: np.ndarray,
    views: tuple[str, ...] = VIEWS,
    identity: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fine and coarse logits [V, N, C] of the TTA views of a model-size uint8 batch; `run(view)` scores one
    view, and the identity view's outputs are reused when given."""
    outs = [
        identity if name == "identity" and identity is not None else run(view)
        for name, view in zip(views, tta_views(batch, views), strict=True)
    ]
    return np.stack([o["fine_logits"] for o in outs]), np.stack([o["coarse_logits"] for o in outs])
