"""Temperature scaling and calibration error. numpy at inference; scipy only inside fit_temperature."""

from __future__ import annotations

import numpy as np

from dermlens.extras import require


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable log-softmax of logits / T along the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities softmax(logits / T) along the last axis (float64)."""
    return np.exp(log_softmax(logits, temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer labels under softmax(logits / T)."""
    lp = log_softmax(logits, temperature)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T > 0 minimizing validation NLL (bounded 1-D search over log T)."""
    minimize_scalar = require("scipy.optimize", "evaluate").minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one labelled example")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(
        lambda s: nll(logits, labels, np.exp(s)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}
    )
    t = float(np.exp(res.x))
    # Never return something worse than no scaling at all.
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def mean_softmax(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """TTA probabilities: softmax(logits_v / T) averaged over views; view_logits [V, N, C] -> [N, C]."""
    return np.mean([softmax(z, temperature) for z in np.asarray(view_logits)], axis=0)


def fit_temperature_tta(
    view_logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The per-view temperature minimizing the NLL of the view-averaged probabilities (TTA calibration)."""
    minimize_scalar = require("scipy.optimize", "evaluate").minimize_scalar

    z = np.asarray(view_logits, dtype=np.float64)
    idx = (np.arange(z.shape[1]), np.asarray(labels, dtype=np.int64))

    def loss(s: float) -> float:
        return float(-np.log(np.maximum(mean_softmax(z, np.exp(s))[idx], 1e-300)).mean())

    res = minimize_scalar(loss, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(res.x))


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """Per-bin count, mean confidence and accuracy (for reliability diagrams)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    out: dict[str, list] = {"lower": [], "upper": [], "count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins):
        sel = bins == b
        out["lower"].append(b / n_bins)
        out["upper"].append((b + 1) / n_bins)
        out["count"].append(int(sel.sum()))
        out["confidence"].append(float(conf[sel].mean()) if sel.any() else None)
        out["accuracy"].append(float(correct[sel].mean()) if sel.any() else None)
    return out
