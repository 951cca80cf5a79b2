"""Selective prediction: fitting the refer rule's confidence threshold (risk-coverage from
dermlens.metrics)."""

from __future__ import annotations

import numpy as np

from dermlens.metrics import risk_coverage


def confidence_for_coverage(probs: np.ndarray, coverage: float) -> float:
    """Minimum top probability that answers the fraction `coverage` of the (validation) images."""
    conf = np.sort(np.asarray(probs, dtype=np.float64).max(axis=1))[::-1]
    if coverage >= 1 or len(conf) == 0:
        return 0.0
    return float(conf[max(1, int(np.ceil(coverage * len(conf) - 1e-9))) - 1])


def confidence_for_risk(probs: np.ndarray, labels: np.ndarray, risk: float) -> float:
    """Lowest top-probability threshold whose answered (validation) images have error rate <= `risk`."""
    probs = np.asarray(probs, dtype=np.float64)
    _, r = risk_coverage(probs, np.asarray(labels, np.int64))  # one point per distinct confidence
    ok = np.nonzero(r <= risk)[0]
    if len(ok) == 0:
        return 1.0 + 1e-9  # refer everything: the target risk is out of reach
    return float(np.unique(probs.max(axis=1))[::-1][ok.max()])


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
