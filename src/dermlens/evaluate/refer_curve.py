"""Risk-coverage of the refer rule per evaluated set: images the other flags (OOD, not dermoscopy, set too
large) refer stay referred, and the confidence threshold sweeps; risk = 1 - balanced accuracy of the accepted
images. The bundle's operating point (its min_confidence) is marked on each curve."""

from __future__ import annotations

import numpy as np

from dermlens.metrics import balanced_accuracy

OTHER_FLAGS = ("ood", "not_dermoscopy", "set_too_large")


def _point(conf, other, pred, truth, t: float) -> tuple[float, float | None]:
    """Coverage and risk (1 - BA of accepted) at confidence threshold t."""
    keep = ~other & (conf >= t)
    if not keep.any():
        return 0.0, None
    return float(keep.mean()), 1.0 - balanced_accuracy(pred[keep], truth[keep])


def refer_curve(arr: dict, truth: np.ndarray, min_confidence: float, prefix: str = "", n: int = 60) -> dict:
    """Coverage and risk of the refer rule over confidence thresholds, and at `min_confidence`."""
    probs = np.asarray(arr[f"{prefix}probs"], np.float64)
    truth = np.asarray(truth)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    other = np.zeros(len(conf), bool)
    for k in OTHER_FLAGS:
        if f"{prefix}{k}" in arr:
            other |= np.asarray(arr[f"{prefix}{k}"], bool)
    ts = (
        np.unique(np.r_[0.0, np.quantile(conf[~other], np.linspace(0, 0.98, n))]) if (~other).any() else [0.0]
    )
    pts = [_point(conf, other, pred, truth, float(t)) for t in ts]
    cov, risk = _point(conf, other, pred, truth, float(min_confidence))
    return {
        "coverage": [c for c, r in pts if r is not None],
        "risk": [r for c, r in pts if r is not None],
        "operating_point": {"min_confidence": float(min_confidence), "coverage": cov, "risk": risk},
    }


__all__ = ["refer_curve"]
