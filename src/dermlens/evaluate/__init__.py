"""Evaluation: ISIC metrics with lesion-level bootstrap intervals, ISIC CSV I/O and the HTML report.

``evaluate_arrays`` turns probabilities and truth into the JSON-ready result written as metrics.json;
``report.write_outputs`` writes that file and report.html. Needs numpy/pandas; plots need matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dermlens import DISCLAIMER, __version__
from dermlens import config as configuration
from dermlens.data.taxonomy import FINE_NAMES
from dermlens.evaluate.bootstrap import BootstrapResult, bootstrap
from dermlens.metrics import (
    EvalData,
    MetricSettings,
    calibration_metrics,
    compute,
    decision_metrics,
    reliability_bins,
)

# Scalar metrics shown first (CLI table, report headline), in this order, when present.
HEADLINE = (
    "balanced_accuracy",
    "macro_auc",
    "macro_auc_sens_80",
    "malignant_auc",
    "mel_sens_at_spec_80",
    "mel_sens_at_spec_90",
    "mel_sens_at_spec_95",
    "ece",
    "brier",
    "aurc",
)
# The remaining scalar metrics, in report order (anything else follows alphabetically).
SECONDARY = (
    "accuracy",
    "macro_f1",
    "macro_ap",
    "malignant_ap",
    "malignant_sens_at_spec_80",
    "malignant_sens_at_spec_90",
    "malignant_sens_at_spec_95",
    "ece_uncalibrated",
    "brier_uncalibrated",
    "refer_rate",
    "balanced_accuracy_not_referred",
)
PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auc", "auc_sens_80", "ap")
ISIC_PER_CLASS = ("accuracy", "sensitivity", "specificity", "dice", "ppv", "npv")


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings from configs/evaluate.yaml (see the comments there)."""

    n_resamples: int = 1000
    seed: int = 0
    ci_level: float = 0.95
    ece_bins: int = 15
    specificity_levels: tuple[float, ...] = (0.80, 0.90, 0.95)
    gallery_size: int = 12
    row_sum_tolerance: float = 0.01
    batch_size: int = 32
    subgroup_age_edges: tuple[float, ...] = (30, 45, 60, 75)
    subgroup_specificity: float = 0.80
    subgroup_min_images: int = 30
    subgroup_min_melanomas: int = 10
    subgroup_alpha: float = 0.05

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: object) -> EvaluateConfig:
        """configs/evaluate.yaml <- the YAML at ``path`` <- keyword overrides that are not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        boot = set(configuration.packaged("evaluate")["bootstrap"])
        layer = {"bootstrap": {k: v for k, v in given.items() if k in boot}}
        layer.update({k: v for k, v in given.items() if k not in boot})
        values = _flat(configuration.load("evaluate", path, layers=[("command-line options", layer)]))
        for key in ("specificity_levels", "subgroup_age_edges"):
            values[key] = tuple(float(x) for x in values[key])
        return cls(**values)

    @property
    def metric_settings(self) -> MetricSettings:
        return MetricSettings(specificity_levels=self.specificity_levels, ece_bins=self.ece_bins)


def _flat(d: dict) -> dict:
    """Settings with the ``bootstrap:`` block flattened into top-level keys."""
    d = dict(d)
    return {**(d.pop("bootstrap", None) or {}), **d}


def _metric_fn(
    data: EvalData,
    settings: MetricSettings,
    probs_uncalibrated: np.ndarray | None,
    refer: np.ndarray | None,
):
    """The weights -> metrics function bootstrapped by ``evaluate_arrays``."""

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        out = compute(data, w, settings)
        if probs_uncalibrated is not None:
            cal = calibration_metrics(probs_uncalibrated, data.truth, w, settings.ece_bins)
            out.update({f"{k}_uncalibrated": cal[k] for k in ("ece", "brier")})
        if refer is not None:
            out["refer_rate"] = (w @ refer) / w.sum(axis=1)
            kept = decision_metrics(data, w * (1.0 - refer))
            out["balanced_accuracy_not_referred"] = kept["balanced_accuracy"]
        return out

    return fn


def _interval(res: BootstrapResult, key: str, index: tuple = ()) -> dict:
    def num(x: np.ndarray) -> float | None:
        v = float(np.asarray(x)[index])
        return None if np.isnan(v) else v

    return {
        "value": num(res.point[key]),
        "ci_low": num(res.low[key]),
        "ci_high": num(res.high[key]),
        "n_valid": int(np.asarray(res.n_valid[key])[index]),
    }


def evaluate_arrays(
    probs: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[str],
    *,
    groups: Sequence | np.ndarray | None = None,
    malignant_prob: np.ndarray | None = None,
    probs_uncalibrated: np.ndarray | None = None,
    refer: np.ndarray | None = None,
    config: EvaluateConfig | None = None,
) -> dict:
    """All metrics with cluster-bootstrap CIs as a JSON-serializable dict (the content of metrics.json)."""
    cfg = config or EvaluateConfig.load()
    data = EvalData.build(probs, truth, classes, malignant_prob)
    uncal = None if probs_uncalibrated is None else np.asarray(probs_uncalibrated, np.float64)
    if uncal is not None and uncal.shape != data.probs.shape:
        raise ValueError(f"uncalibrated probs {uncal.shape} do not match probs {data.probs.shape}")
    ref = None if refer is None else np.asarray(refer, np.float64)
    settings = cfg.metric_settings
    fn = _metric_fn(data, settings, uncal, ref)
    res = bootstrap(
        fn, len(data.truth), groups, n_resamples=cfg.n_resamples, seed=cfg.seed, level=cfg.ci_level
    )
    per_image = {"confusion_matrix", "n_undecided", *PER_CLASS}
    per_image |= {f"isic_{m}" for m in ISIC_PER_CLASS}
    scalars = [k for k in res.point if k not in per_image]
    known = HEADLINE + SECONDARY
    ordered = [k for k in known if k in scalars] + sorted(k for k in scalars if k not in known)
    n_true = np.bincount(data.truth, minlength=len(data.classes))
    return json_safe(
        {
            "dermlens_version": __version__,
            "disclaimer": DISCLAIMER,
            "classes": list(data.classes),
            "class_names": {c: FINE_NAMES.get(c, c) for c in data.classes},
            "n_images": int(len(data.truth)),
            "n_lesions": int(res.n_groups),
            "n_undecided": int(res.point["n_undecided"]),
            "class_counts": {c: int(n) for c, n in zip(data.classes, n_true, strict=True)},
            "bootstrap": {
                "n_resamples": res.n_resamples,
                "seed": res.seed,
                "ci_level": res.level,
                "unit": res.unit,
                "method": f"percentile interval, {res.unit}-level (cluster) bootstrap",
            },
            "settings": {
                **asdict(settings),
                "specificity_levels": list(settings.specificity_levels),
                "ece_binning": f"{settings.ece_bins} equal-width bins (k/n, (k+1)/n] on top-class confidence",
                "decision_rule": "argmax; a tied maximum is 'undecided' and counts as an error (ISIC rule)",
                "isic_threshold": 0.5,
            },
            "overall": {k: _interval(res, k) for k in ordered},
            "per_class": {
                c: {"n": int(n_true[i]), **{m: _interval(res, m, (i,)) for m in PER_CLASS}}
                for i, c in enumerate(data.classes)
            },
            "isic_per_class": {
                c: {m: _interval(res, f"isic_{m}", (i,)) for m in ISIC_PER_CLASS}
                for i, c in enumerate(data.classes)
            },
            "confusion_matrix": {
                "truth_rows": list(data.classes),
                "predicted_columns": list(data.classes),
                "counts": np.rint(res.point["confusion_matrix"]).astype(int).tolist(),
            },
            "reliability": {
                "calibrated": reliability_bins(data.probs, data.truth, settings.ece_bins),
                "uncalibrated": None
                if uncal is None
                else reliability_bins(uncal, data.truth, settings.ece_bins),
            },
        }
    )


def json_safe(obj: object) -> object:
    """Recursively replace NaN/inf floats by None and numpy scalars by Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


__all__ = ["EvaluateConfig", "HEADLINE", "evaluate_arrays", "json_safe"]
