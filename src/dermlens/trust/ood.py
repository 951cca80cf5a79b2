"""Out-of-distribution scores (higher = MORE out-of-distribution), their fitting and AUROC. numpy only."""

from __future__ import annotations

import numpy as np

from dermlens.trust.calibration import log_softmax, softmax

METHODS: tuple[str, ...] = ("msp", "energy", "mahalanobis", "knn")


def msp_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017)."""
    return -softmax(logits, temperature).max(axis=1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy -T * logsumexp(logits / T) (Liu et al. 2020)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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


def mahalanobis_terms(means: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-model constants of the Mahalanobis score: finite class means, means @ precision, m P m."""
    m = np.asarray(means, dtype=np.float64)
    m = m[np.isfinite(m).all(axis=1)]
    mp = m @ precision
    return m, mp, (mp * m).sum(axis=1)


def mahalanobis_score(
    embedding: np.ndarray,
    means: np.ndarray,
    precision: np.ndarray,
    normalize: bool = True,
    terms: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Minimum over classes of the squared Mahalanobis distance (Lee et al. 2018), tied covariance.

    Pass ``terms`` from :func:`mahalanobis_terms` to skip recomputing the per-model constants."""
    x = l2_normalize(embedding) if normalize else np.asarray(embedding, dtype=np.float64)
    _, mp, mpm = terms if terms is not None else mahalanobis_terms(means, precision)
    d = ((x @ precision) * x).sum(axis=1)[:, None] - 2.0 * x @ mp.T + mpm[None, :]
    return d.min(axis=1)


def knn_score(embedding: np.ndarray, bank: np.ndarray, k: int = 10) -> np.ndarray:
    """One minus the cosine similarity to the k-th nearest in-distribution embedding (Sun et al. 2022)."""
    sims = l2_normalize(embedding) @ l2_normalize(bank).T
    k = int(min(max(k, 1), sims.shape[1]))
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return 1.0 - kth


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


__all__ = [
    "METHODS",
    "auroc",
    "energy_score",
    "fit_gaussian",
    "fpr_at_tpr",
    "knn_score",
    "l2_normalize",
    "ledoit_wolf_shrinkage",
    "log_softmax",
    "mahalanobis_score",
    "mahalanobis_terms",
    "msp_score",
    "threshold_for_keep",
]
