"""Fitting temperature scaling (scipy); calibration error is dermlens.metrics.ece."""

from __future__ import annotations

import numpy as np

from dermlens.extras import require
from dermlens.infer.calibration import log_softmax, mean_softmax


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
