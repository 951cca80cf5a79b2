"""Fitting class-conditional (Mondrian) split-conformal prediction sets. numpy only (applying them:
dermlens.infer.conformal).

Nonconformity of label c for an image is 1 - p_c (the "LAC" score of Sadinle et al. 2019, which gives the
smallest sets on average). For each class c the threshold q_c is the ceil((n_c + 1)(1 - alpha))-th smallest
score among the n_c calibration images whose true class is c (Vovk's Mondrian conformal predictor), so
for an exchangeable new image of class c, P(c in set) >= 1 - alpha holds for every class on its own, not
only on average. A class with too few calibration images (n_c < 1/alpha - 1) gets q_c = inf: it is always
in the set. The top class is always added, so a set is never empty (this can only raise coverage).
"""

from __future__ import annotations

import math

import numpy as np


def class_thresholds(probs: np.ndarray, labels: np.ndarray, alpha: float, n_classes: int) -> np.ndarray:
    """Per-class score thresholds q_c [C] from calibration probabilities [N, C] and true labels [N]."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    q = np.full(n_classes, np.inf)
    for c in range(n_classes):
        scores = np.sort(1.0 - probs[labels == c, c])
        k = math.ceil((len(scores) + 1) * (1.0 - alpha))
        if 0 < k <= len(scores):
            q[c] = scores[k - 1]
    return q


def coverage_tolerance(n_cal: int, alpha: float, n_test: int, z: float = 3.0) -> float:
    """z standard deviations of empirical test coverage around its expectation for a conformal threshold
    fitted on n_cal images: the Beta(n_cal + 1 - l, l) spread of the true coverage, l = floor((n_cal + 1)
    alpha) (Vovk 2012; Angelopoulos & Bates 2021), plus the binomial spread of n_test test images."""
    l_ = math.floor((n_cal + 1) * alpha)
    if l_ < 1:
        return 1.0  # the threshold is infinite: coverage is 1 and any deviation is impossible
    a, b = n_cal + 1 - l_, l_
    mean = a / (a + b)
    var_beta = a * b / ((a + b) ** 2 * (a + b + 1))
    var_test = mean * (1 - mean) / max(n_test, 1)
    return float(z * math.sqrt(var_beta + var_test))


def expected_coverage(n_cal: int, alpha: float) -> float:
    """Mean true coverage of a split-conformal threshold from n_cal calibration images (1 if q = inf)."""
    l_ = math.floor((n_cal + 1) * alpha)
    return 1.0 if l_ < 1 else (n_cal + 1 - l_) / (n_cal + 1)


def set_summary(sets: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Empirical coverage and mean set size, overall and per true class (plain floats and counts)."""
    sets = np.asarray(sets, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    per = {}
    for i, c in enumerate(classes):
        sel = labels == i
        if sel.any():
            per[c] = {
                "n": int(sel.sum()),
                "coverage": float(covered[sel].mean()),
                "mean_set_size": float(size[sel].mean()),
            }
    return {
        "n": int(len(labels)),
        "coverage": float(covered.mean()) if len(labels) else float("nan"),
        "mean_set_size": float(size.mean()) if len(labels) else float("nan"),
        "singleton_rate": float((size == 1).mean()) if len(labels) else float("nan"),
        "per_class": per,
    }


__all__ = ["class_thresholds", "coverage_tolerance", "expected_coverage", "set_summary"]
