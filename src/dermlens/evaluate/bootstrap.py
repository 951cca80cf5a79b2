"""Cluster bootstrap: resample lesions (groups) with replacement, recompute every metric, take percentiles.

Images of one lesion are not independent evidence, so resampling images would understate uncertainty.
A resample draws G lesions out of G with replacement (a multinomial count per lesion); each image then
weighs as many times as its lesion was drawn, and ``metrics.compute`` evaluates all resamples at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermlens.metrics import CHUNK_ELEMENTS

MetricFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates and percentile intervals; every array has the metric's own shape (no B axis)."""

    point: dict[str, np.ndarray]
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    n_valid: dict[str, np.ndarray]
    n_resamples: int
    n_groups: int
    seed: int
    level: float
    unit: str


def group_indices(groups: Sequence | np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Map group ids to 0..G-1; with no ids, or a missing (NaN/empty) id, an image is its own group."""
    if groups is None:
        return np.arange(n), n
    s = pd.Series(list(groups), dtype=object)
    if len(s) != n:
        raise ValueError(f"{len(s)} group ids for {n} images")
    missing = s.isna() | (s.astype(str).str.strip() == "")
    keys = s.astype(str).where(~missing, "\0image:" + pd.Series(np.arange(n).astype(str)))
    codes, uniques = pd.factorize(keys)
    return codes.astype(np.int64), len(uniques)


def resample_weights(group_idx: np.ndarray, n_groups: int, n_resamples: int, rng: np.random.Generator):
    """[n_resamples, N] image weights: how many times each image's group was drawn."""
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)
    return counts[:, group_idx].astype(np.float64)


def bootstrap(
    metric_fn: MetricFn,
    n_images: int,
    groups: Sequence | np.ndarray | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Evaluate ``metric_fn`` (weights [B, N] -> {name: [B, ...]}) at W=1 and on cluster resamples."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    group_idx, n_groups = group_indices(groups, n_images)
    point = {k: v[0] for k, v in metric_fn(np.ones((1, n_images))).items()}
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_ELEMENTS // max(n_images, 1))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for start in range(0, n_resamples, chunk):
        w = resample_weights(group_idx, n_groups, min(chunk, n_resamples - start), rng)
        for k, v in metric_fn(w).items():
            parts[k].append(v)
    alpha = (1.0 - level) / 2 * 100
    low, high, n_valid = {}, {}, {}
    for k, chunks in parts.items():
        samples = np.concatenate(chunks, axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: metric never defined
            low[k], high[k] = np.nanpercentile(samples, [alpha, 100 - alpha], axis=0)
        n_valid[k] = (~np.isnan(samples)).sum(axis=0)
    unit = "image" if groups is None else "lesion"
    return BootstrapResult(point, low, high, n_valid, n_resamples, n_groups, seed, level, unit)
