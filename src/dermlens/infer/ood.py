"""Out-of-distribution and not-dermoscopy scores (higher = MORE out-of-distribution). numpy only."""

from __future__ import annotations

import numpy as np

from dermlens.infer.calibration import softmax

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


def not_dermoscopy_score(embedding: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """Not-dermoscopy logit for embeddings [N, D] (higher = more like a clinical photo)."""
    return l2_normalize(embedding) @ np.asarray(w, np.float64) + float(b)


__all__ = [
    "METHODS",
    "energy_score",
    "knn_score",
    "l2_normalize",
    "mahalanobis_score",
    "mahalanobis_terms",
    "msp_score",
    "not_dermoscopy_score",
]
