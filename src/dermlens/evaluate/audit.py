"""Trust tables for the evaluation report: ECE per condition of use, conformal coverage and set sizes,
and the subgroup audit (sex, age band, body site). Every interval is a lesion-level cluster bootstrap.

Subgroup flags: for each group and metric, the bootstrap distribution of (group - rest of the images),
both computed from the same lesion resample, gives a two-sided p-value 2 * min(P(d <= 0), P(d >= 0));
Holm's step-down correction over every (group, metric) test keeps the family-wise error rate at alpha.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dermlens.evaluate.bootstrap import bootstrap
from dermlens.metrics import (
    EvalData,
    MetricSettings,
    calibration_metrics,
    decision_metrics,
    ranking_metrics,
)

SUBGROUP_METRICS: tuple[str, ...] = ("balanced_accuracy", "mel_sensitivity", "ece", "refer_rate")


def _iv(res, key: str) -> dict:
    def num(d: dict) -> float | None:
        v = float(np.asarray(d[key]))
        return None if np.isnan(v) else v

    return {"value": num(res.point), "ci_low": num(res.low), "ci_high": num(res.high)}


def ece_with_ci(probs: np.ndarray, truth: np.ndarray, groups: Sequence | None, cfg) -> dict:
    """Top-label ECE with a lesion-level bootstrap CI, plus accuracy and the image/lesion counts."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth, np.int64)

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        cal = calibration_metrics(probs, truth, w, cfg.ece_bins)
        correct = (probs.argmax(1) == truth).astype(float)
        return {"ece": cal["ece"], "accuracy": (w @ correct) / w.sum(axis=1)}

    res = bootstrap(fn, len(truth), groups, n_resamples=cfg.n_resamples, seed=cfg.seed, level=cfg.ci_level)
    return {
        "n_images": int(len(truth)),
        "n_lesions": int(res.n_groups),
        **{k: _iv(res, k) for k in res.point},
    }


def coverage_with_ci(
    sets: np.ndarray, truth: np.ndarray, classes: Sequence[str], groups: Sequence | None, cfg
) -> dict:
    """Empirical coverage and mean set size of prediction sets [N, C], overall and per true class, CIs."""
    sets, truth = np.asarray(sets, bool), np.asarray(truth, np.int64)
    covered = sets[np.arange(len(truth)), truth].astype(float)
    size = sets.sum(axis=1).astype(float)
    onehot = np.eye(len(classes))[truth]

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        n_c = w @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "coverage": (w @ covered) / w.sum(axis=1),
                "mean_set_size": (w @ size) / w.sum(axis=1),
                "class_coverage": (w @ (onehot * covered[:, None])) / n_c,
                "class_set_size": (w @ (onehot * size[:, None])) / n_c,
            }

    res = bootstrap(fn, len(truth), groups, n_resamples=cfg.n_resamples, seed=cfg.seed, level=cfg.ci_level)

    def at(key: str, i: int) -> dict:
        def num(d: dict) -> float | None:
            v = float(d[key][i])
            return None if np.isnan(v) else v

        return {"value": num(res.point), "ci_low": num(res.low), "ci_high": num(res.high)}

    counts = onehot.sum(axis=0)
    return {
        "n_images": int(len(truth)),
        "coverage": _iv(res, "coverage"),
        "mean_set_size": _iv(res, "mean_set_size"),
        "singleton_rate": float((size == 1).mean()) if len(size) else None,
        "per_class": {
            c: {
                "n": int(counts[i]),
                "coverage": at("class_coverage", i),
                "mean_set_size": at("class_set_size", i),
            }
            for i, c in enumerate(classes)
            if counts[i] > 0
        },
    }


def age_band(age: object, edges: Sequence[float]) -> str:
    """'<30', '30-44', ..., '>=75' for the configured edges; 'unknown' when missing."""
    try:
        a = float(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "unknown"
    if not np.isfinite(a):
        return "unknown"
    edges = list(edges)
    if a < edges[0]:
        return f"<{edges[0]:g}"
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if lo <= a < hi:
            return f"{lo:g}-{hi - 1:g}"
    return f">={edges[-1]:g}"


def subgroup_labels(frame: pd.DataFrame, age_edges: Sequence[float]) -> dict[str, np.ndarray]:
    """Group label per image for each attribute: sex, age band, body site ('unknown' when missing)."""

    def text(col: str) -> np.ndarray:
        if col not in frame.columns:
            return np.full(len(frame), "unknown", dtype=object)
        v = frame[col]
        ok = v.notna() & (v.astype(str).str.strip() != "")
        return np.where(ok, v.astype(str), "unknown").astype(object)

    ages = frame["age"] if "age" in frame.columns else pd.Series([None] * len(frame))
    return {
        "sex": text("sex"),
        "age_band": np.array([age_band(a, age_edges) for a in ages], dtype=object),
        "site": text("site"),
    }


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvalues, np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _group_metrics(data: EvalData, refer: np.ndarray, w: np.ndarray, settings: MetricSettings) -> dict:
    """The four audit metrics [B] for image weights w [B, N] (zero outside the group)."""
    out = {
        "balanced_accuracy": decision_metrics(data, w)["balanced_accuracy"],
        "ece": calibration_metrics(data.probs, data.truth, w, settings.ece_bins)["ece"],
        "refer_rate": (w @ refer) / np.where(w.sum(axis=1) > 0, w.sum(axis=1), np.nan),
    }
    if "mel" in data.classes:
        k = data.classes.index("mel")
        r = ranking_metrics(data.probs[:, k], data.truth == k, w, settings)
        out["mel_sensitivity"] = r[f"sens_at_spec_{round(settings.specificity_levels[0] * 100)}"]
    return out


def subgroup_audit(
    frame: pd.DataFrame,
    probs: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[str],
    refer: np.ndarray | None,
    groups: Sequence | None,
    cfg,
    labels: dict[str, np.ndarray] | None = None,
) -> dict:
    """BA, melanoma sensitivity at a fixed specificity, ECE and refer rate per sex / age band / site (or
    the attributes of `labels`: name -> group per image), with lesion-level CIs, group sizes and
    Holm-corrected flags for groups that differ from the rest."""
    data = EvalData.build(probs, truth, classes)
    ref = np.zeros(len(truth)) if refer is None else np.asarray(refer, np.float64)
    settings = MetricSettings(specificity_levels=(cfg.subgroup_specificity,), ece_bins=cfg.ece_bins)
    labels = subgroup_labels(frame, cfg.subgroup_age_edges) if labels is None else labels
    masks: list[tuple[str, str, np.ndarray]] = []
    for attr, lab in labels.items():
        for g in sorted(set(lab), key=lambda x: (x == "unknown", x)):
            masks.append((attr, g, (lab == g).astype(np.float64)))

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for j, (_, _, m) in enumerate(masks):
            ing = _group_metrics(data, ref, w * m, settings)
            rest = _group_metrics(data, ref, w * (1 - m), settings)
            for k, v in ing.items():
                out[f"{j}|{k}"] = v
                out[f"{j}|{k}|diff"] = v - rest[k]
        return out

    from dermlens.evaluate.bootstrap import group_indices, resample_weights

    point = {k: float(v[0]) for k, v in fn(np.ones((1, len(truth)))).items()}
    gidx, n_groups = group_indices(groups, len(truth))
    rng = np.random.default_rng(cfg.seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    chunk = 200
    for start in range(0, cfg.n_resamples, chunk):
        w = resample_weights(gidx, n_groups, min(chunk, cfg.n_resamples - start), rng)
        for k, v in fn(w).items():
            draws[k].append(v)
    samples = {k: np.concatenate(v) for k, v in draws.items()}
    lo_q, hi_q = (1 - cfg.ci_level) / 2 * 100, (1 + cfg.ci_level) / 2 * 100
    rows, tests = [], []
    mel = list(classes).index("mel") if "mel" in classes else None
    for j, (attr, g, m) in enumerate(masks):
        sel = m > 0
        n_img = int(sel.sum())
        row = {
            "attribute": attr,
            "group": g,
            "n_images": n_img,
            "n_lesions": int(len(set(np.asarray(gidx)[sel]))),
            "n_melanoma": int((np.asarray(truth)[sel] == mel).sum()) if mel is not None else 0,
            "tested": n_img >= cfg.subgroup_min_images and n_img < len(truth),
            "metrics": {},
        }
        n_mel_rest = int((np.asarray(truth) == mel).sum()) - row["n_melanoma"] if mel is not None else 0
        for k in SUBGROUP_METRICS:
            key = f"{j}|{k}"
            if key not in point:
                continue
            tested = row["tested"] and (
                k != "mel_sensitivity" or min(row["n_melanoma"], n_mel_rest) >= cfg.subgroup_min_melanomas
            )
            s, d = samples[key], samples[f"{key}|diff"]
            with np.errstate(invalid="ignore"):
                ci = np.nanpercentile(s, [lo_q, hi_q]) if np.isfinite(s).any() else [np.nan, np.nan]
            dd = d[np.isfinite(d)]
            p = float(min(1.0, 2 * min((dd <= 0).mean(), (dd >= 0).mean()))) if len(dd) else float("nan")
            row["metrics"][k] = {
                "value": _num(point[key]),
                "ci_low": _num(ci[0]),
                "ci_high": _num(ci[1]),
                "diff_vs_rest": _num(point[f"{key}|diff"]),
                "p_value": _num(p) if tested else None,
            }
            if tested and np.isfinite(p):
                tests.append((len(rows), k, p))
        rows.append(row)
    adjusted = holm([t[2] for t in tests])
    for (ri, k, _), pa in zip(tests, adjusted, strict=True):
        rows[ri]["metrics"][k]["p_holm"] = float(pa)
        rows[ri]["metrics"][k]["flag"] = bool(pa < cfg.subgroup_alpha)
    return {
        "specificity": cfg.subgroup_specificity,
        "min_images": cfg.subgroup_min_images,
        "min_melanomas": cfg.subgroup_min_melanomas,
        "alpha": cfg.subgroup_alpha,
        "n_tests": len(tests),
        "test": "lesion-level bootstrap of (group - rest), two-sided percentile p-value; Holm correction "
        "over all group x metric tests (family-wise error rate alpha)",
        "rows": rows,
        "flagged": [
            f"{r['attribute']}={r['group']}: {k}"
            for r in rows
            for k, v in r["metrics"].items()
            if v.get("flag")
        ],
    }


def _num(x: float) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


__all__ = ["age_band", "coverage_with_ci", "ece_with_ci", "holm", "subgroup_audit", "subgroup_labels"]
