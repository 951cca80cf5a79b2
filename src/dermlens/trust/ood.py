"""Fitting out-of-distribution statistics (class means, shrunk precision, thresholds) and AUROC."""

from __future__ import annotations

import numpy as np

from dermlens.infer.ood import METHODS, l2_normalize


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity for centred rows x [n, p] toward a scaled identity."""
    n, p = x.shape
    x2 = x**2
    trace_mean = x2.sum() / (n * p)
    beta_ = float(np.sum(x2.T @ x2)) / n
    delta_ = float(np.sum((x.T @ x) ** 2)) / n**2
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2.0 * trace_mean * x2.sum() / n + p * trace_mean**2) / p
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else float(beta / delta)


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
    alpha = ledoit_wolf_shrinkage(resid) if shrinkage == "auto" else float(shrinkage)
    cov = resid.T @ resid / len(resid)
    mu = np.trace(cov) / cov.shape[0]
    cov = (1 - alpha) * cov + alpha * mu * np.eye(cov.shape[0])
    w, v = np.linalg.eigh(cov)
    precision = (v / np.maximum(w, 1e-12 * w.max())) @ v.T
    means[~present] = np.inf  # absent classes never win the min distance
    return means, precision, alpha


def threshold_for_keep(val_scores: np.ndarray, keep: float = 0.95) -> float:
    """Score threshold keeping the fraction `keep` of in-distribution validation images (score <= t)."""
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), keep, method="higher"))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling out (positive, higher score) from in; ties count one half."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    r_out = ranks[len(a) :].sum()
    return float((r_out - len(b) * (len(b) + 1) / 2.0) / (len(a) * len(b)))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD images accepted when the threshold keeps `tpr` of in-distribution images."""
    t = threshold_for_keep(in_scores, tpr)
    return float((np.asarray(out_scores) <= t).mean())


__all__ = ["METHODS", "auroc", "fit_gaussian", "fpr_at_tpr", "ledoit_wolf_shrinkage", "threshold_for_keep"]
