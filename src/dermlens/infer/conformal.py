"""Applying conformal prediction sets (thresholds fitted by dermlens.trust.conformal). numpy only."""

from __future__ import annotations

import numpy as np


def prediction_sets(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Boolean membership [N, C]: class c is in the set when 1 - p_c <= q_c; the top class always is."""
    probs = np.asarray(probs, dtype=np.float64)
    sets = (1.0 - probs) <= np.asarray(thresholds, dtype=np.float64)[None, :] + 1e-12
    sets[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return sets


__all__ = ["prediction_sets"]
