"""Applying calibration: (tempered) softmax, TTA averaging and per-condition scaling. numpy only."""

from __future__ import annotations

import numpy as np

Params = dict[str, dict[str, list[float]]]  # condition -> {"w": [C], "b": [C]}


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable log-softmax of logits / T along the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities softmax(logits / T) along the last axis (float64)."""
    return np.exp(log_softmax(logits, temperature))


def mean_softmax(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """TTA probabilities: softmax(logits_v / T) averaged over views; view_logits [V, N, C] -> [N, C]."""
    return np.mean([softmax(z, temperature) for z in np.asarray(view_logits)], axis=0)


def apply(logits: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """softmax(logits * w + b) along the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64) * np.asarray(w, np.float64) + np.asarray(b, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibrate(logits: np.ndarray, has_meta: np.ndarray, params: Params) -> np.ndarray:
    """Calibrated probabilities [N, C], each row with the parameters of its own condition."""
    logits = np.asarray(logits, dtype=np.float64)
    has_meta = np.asarray(has_meta, dtype=bool)
    out = np.empty_like(logits)
    for cond, sel in (("meta", has_meta), ("no_meta", ~has_meta)):
        if sel.any():
            p = params.get(cond) or params["meta"]
            out[sel] = apply(logits[sel], np.asarray(p["w"]), np.asarray(p["b"]))
    return out


__all__ = ["Params", "apply", "calibrate", "log_softmax", "mean_softmax", "softmax"]
