"""Fitting out-of-distribution statistics (class means, Ledoit-Wolf shrunk precision via scikit-learn,
thresholds)."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf, empirical_covariance, shrunk_covariance

from dermlens.infer.ood import METHODS, l2_normalize


def fit_gaussian(
    embedding: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    shrinkage: float | str = "auto",
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means [C, D] and tied precision [D, D] (covariance shrunk toward identity); returns shrinkage."""
    x = l2_normalize(embedding) if normalize else np.asarray(embedding, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    means = np.zeros((n_classes, x.shape[1]))
    for c in range(n_classes):
        sel = labels == c
        means[c] = x[sel].mean(axis=0) if sel.any() else np.nan
    present = ~np.isnan(means[:, 0])
    resid = x - means[labels]
    if shrinkage == "auto":  # Ledoit-Wolf intensity of the class-centred residuals (scikit-learn)
        lw = LedoitWolf(assume_centered=True, store_precision=False).fit(resid)
        cov, alpha = lw.covariance_, float(lw.shrinkage_)
    else:
        alpha = float(shrinkage)
        cov = shrunk_covariance(empirical_covariance(resid, assume_centered=True), alpha)
    w, v = np.linalg.eigh(cov)
    precision = (v / np.maximum(w, 1e-12 * w.max())) @ v.T
    means[~present] = np.inf  # absent classes never win the min distance
    return means, precision, alpha


def threshold_for_keep(val_scores: np.ndarray, keep: float = 0.95) -> float:
    """Score threshold keeping the fraction `keep` of in-distribution validation images (score <= t)."""
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), keep, method="higher"))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD images accepted when the threshold keeps `tpr` of in-distribution images."""
    t = threshold_for_keep(in_scores, tpr)
    return float((np.asarray(out_scores) <= t).mean())


__all__ = ["METHODS", "fit_gaussian", "fpr_at_tpr", "threshold_for_keep"]
