"""Selective prediction: what answering only the accepted images does to coverage and accuracy."""

from __future__ import annotations

import numpy as np


def selective_summary(probs: np.ndarray, labels: np.ndarray, refer: np.ndarray) -> dict[str, float]:
    """Coverage and accuracy on answered images versus all images."""
    labels = np.asarray(labels)
    correct = np.asarray(probs).argmax(axis=1) == labels
    keep = ~np.asarray(refer, dtype=bool)
    return {
        "coverage": float(keep.mean()),
        "accuracy_all": float(correct.mean()),
        "accuracy_answered": float(correct[keep].mean()) if keep.any() else float("nan"),
    }
