"""Calibration per condition of use: probabilities = softmax(logits * w + b) with (w, b) chosen by the
condition known at inference (metadata given or not). Fitting (scipy); applying is dermlens.infer.calibration.

Methods: ``temperature`` (one T for every condition), ``condition_temperature`` (one T per condition) and
``vector`` (vector scaling per condition: a weight and a bias per class, Guo et al. 2017).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dermlens.extras import require
from dermlens.infer.calibration import Params, calibrate
from dermlens.metrics import balanced_accuracy, ece

CONDITIONS: tuple[str, ...] = ("meta", "no_meta")  # metadata given (any of age/sex/site) / none given
METHODS: tuple[str, ...] = ("temperature", "condition_temperature", "vector")


def _nll(z: np.ndarray, y: np.ndarray, wt: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted mean NLL of labels y under softmax(z) and its gradient with respect to z."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    logp = z - np.log(s)
    rows = np.arange(len(y))
    loss = -(wt * logp[rows, y]).sum() / wt.sum()
    g = e / s
    g[rows, y] -= 1.0
    return float(loss), g * (wt / wt.sum())[:, None]


def fit_condition(
    logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, kind: str, l2: float = 1e-3
) -> dict[str, list[float]]:
    """Fit one condition's (w, b): a temperature (kind 'temperature') or vector scaling ('vector')."""
    minimize = require("scipy.optimize", "evaluate").minimize

    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.int64)
    wt = np.asarray(weights, np.float64)
    c = x.shape[1]
    if kind == "temperature":

        def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
            a = np.exp(theta[0])
            loss, g = _nll(x * a, y, wt)
            return loss, np.array([(g * x).sum() * a])

        res = minimize(f, np.zeros(1), jac=True, method="L-BFGS-B", bounds=[(np.log(0.05), np.log(20.0))])
        return {"w": [float(np.exp(res.x[0]))] * c, "b": [0.0] * c}
    if kind != "vector":
        raise ValueError(f"unknown calibration kind {kind!r}")
    t = fit_condition(x, y, wt, "temperature")["w"][0]

    def fv(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:c], theta[c:]
        loss, g = _nll(x * w + b, y, wt)
        reg = l2 * (((w - t) ** 2).sum() + (b**2).sum())
        grad = np.concatenate([(g * x).sum(axis=0) + 2 * l2 * (w - t), g.sum(axis=0) + 2 * l2 * b])
        return loss + reg, grad

    res = minimize(fv, np.r_[np.full(c, t), np.zeros(c)], jac=True, method="L-BFGS-B")
    return {"w": [float(v) for v in res.x[:c]], "b": [float(v) for v in res.x[c:]]}


def fit_params(
    logits: np.ndarray, labels: np.ndarray, has_meta: np.ndarray, weights: np.ndarray, method: str
) -> Params:
    """Parameters of `method` for both conditions from pooled calibration rows."""
    has_meta = np.asarray(has_meta, bool)
    if method == "temperature":
        p = fit_condition(logits, labels, weights, "temperature")
        return {"meta": p, "no_meta": dict(p)}
    kind = "temperature" if method == "condition_temperature" else "vector"
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    out: Params = {}
    for cond, sel in (("meta", has_meta), ("no_meta", ~has_meta)):
        if not sel.any():
            raise ValueError(f"no calibration rows for condition {cond!r}")
        out[cond] = fit_condition(logits[sel], labels[sel], weights[sel], kind)
    return out


def cross_validate(
    logits: np.ndarray,
    labels: np.ndarray,
    has_meta: np.ndarray,
    weights: np.ndarray,
    groups: np.ndarray,
    strata: np.ndarray,
    method: str,
    folds: int = 5,
    seed: int = 0,
    ece_bins: int = 15,
    fit_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Out-of-fold ECE per stratum (e.g. 'ham/meta', 'isic2017/no_meta') of `method`, folds by group.

    Rows outside `fit_mask` are never fitted on (they are scored only): the fit set of a candidate."""
    rng = np.random.default_rng(seed)
    uniq, gidx = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    fold_of = rng.permutation(len(uniq)) % folds
    fold = fold_of[gidx]
    fit_mask = np.ones(len(labels), bool) if fit_mask is None else np.asarray(fit_mask, bool)
    probs = np.empty(np.shape(logits))
    for k in range(folds):
        train = (fold != k) & fit_mask
        params = fit_params(logits[train], labels[train], has_meta[train], weights[train], method)
        test = fold == k
        probs[test] = calibrate(logits[test], has_meta[test], params)
    out = {}
    for s in np.unique(strata):
        sel = strata == s
        out[str(s)] = ece(probs[sel], labels[sel], ece_bins)
        out[f"bal_acc:{s}"] = balanced_accuracy(probs[sel].argmax(1), labels[sel])
    return out


def choose(
    candidates: dict[str, Callable[[], dict[str, float]]],
    base_bal_acc: dict[str, float] | None = None,
    max_bal_acc_drop: float = 0.01,
) -> tuple[str, dict[str, dict[str, float]]]:
    """The candidate whose worst out-of-fold ECE over strata is lowest, among those whose out-of-fold
    balanced accuracy stays within `max_bal_acc_drop` of `base_bal_acc` (uncalibrated argmax) in every
    stratum given there; returns it and every table."""
    tables = {name: fn() for name, fn in candidates.items()}

    def eces(n: str) -> list[float]:
        return [v for k, v in tables[n].items() if not k.startswith("bal_acc:")]

    def keeps_accuracy(n: str) -> bool:
        base = base_bal_acc or {}
        return all(tables[n][f"bal_acc:{s}"] >= b - max_bal_acc_drop for s, b in base.items())

    allowed = [n for n in tables if keeps_accuracy(n)] or list(tables)
    best = min(allowed, key=lambda n: (max(eces(n)), np.mean(eces(n))))
    return best, tables


__all__ = ["CONDITIONS", "METHODS", "Params", "choose", "cross_validate", "fit_params"]
