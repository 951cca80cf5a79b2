"""Field performance: the model's served predictions scored against confirmed diagnoses (outcomes).

Balanced accuracy, melanoma sensitivity and specificity (argmax decision), top-label ECE and the refer
rate, each with a bootstrap interval that resamples image hashes (the lesion proxy: one image sent twice is
one lesion). Confirmed cases are the lesions someone chose to biopsy or follow, so they are not a random
sample of what the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dermlens import config as configuration
from dermlens.evaluate.bootstrap import bootstrap
from dermlens.metrics import EvalData, calibration_metrics, decision_metrics

BIAS_NOTE = (
    "Confirmed cases are biased towards what was biopsied or followed up: they are not a random sample "
    "of the lesions the model saw, so these figures describe the confirmed cases only."
)
METRICS = ("balanced_accuracy", "mel_sensitivity", "mel_specificity", "ece", "refer_rate")


def field_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The `field` section of configs/monitor.yaml."""
    return configuration.load("monitor", overrides=list(overrides))["field"]


def case_arrays(cases: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Probabilities [N, C] and truth indices [N] of the cases whose diagnosis is one of `classes`."""
    kept = cases[cases["diagnosis"].isin(list(classes))].reset_index(drop=True)
    probs = np.array([[float(f.get(c, 0.0)) for c in classes] for f in kept["fine"]], dtype=np.float64)
    truth = np.array([list(classes).index(d) for d in kept["diagnosis"]], dtype=np.int64)
    return probs.reshape(len(kept), len(classes)), truth, kept


def _metric_fn(data: EvalData, refer: np.ndarray, ece_bins: int):
    mel = data.classes.index("mel") if "mel" in data.classes else None

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        d = decision_metrics(data, w)
        out = {
            "balanced_accuracy": d["balanced_accuracy"],
            "ece": calibration_metrics(data.probs, data.truth, w, ece_bins)["ece"],
            "refer_rate": (w @ refer) / w.sum(axis=1),
        }
        if mel is not None:
            out["mel_sensitivity"] = d["sensitivity"][:, mel]
            out["mel_specificity"] = d["specificity"][:, mel]
        return out

    return fn


def field_performance(
    cases: pd.DataFrame, classes: Sequence[str], cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Field performance of confirmed cases (records + outcomes) with lesion-grouped bootstrap intervals."""
    cfg = cfg or field_config()
    probs, truth, kept = case_arrays(cases, classes)
    out: dict[str, Any] = {
        "n_confirmed": int(len(cases)),
        "n_scored": int(len(kept)),
        "n_outside_classes": int(len(cases) - len(kept)),
        "methods": {str(k): int(v) for k, v in cases["method"].value_counts().items()},
        "confirmed_from": str(cases["confirmed_on"].min()) if len(cases) else None,
        "confirmed_to": str(cases["confirmed_on"].max()) if len(cases) else None,
        "min_cases": int(cfg["min_cases"]),
        "note": BIAS_NOTE,
        "metrics": {},
    }
    if len(kept) < cfg["min_cases"]:
        out["status"] = (
            f"{len(kept)} confirmed case(s) of the model's classes; metrics need {cfg['min_cases']}"
        )
        return out
    data = EvalData.build(probs, truth, tuple(classes))
    refer = kept["refer"].to_numpy(dtype=np.float64)
    res = bootstrap(
        _metric_fn(data, refer, int(cfg["ece_bins"])),
        len(kept),
        kept["image_sha256"].tolist(),
        n_resamples=int(cfg["n_resamples"]),
        seed=int(cfg["seed"]),
        level=float(cfg["ci_level"]),
    )
    out["status"] = "ok"
    out["n_lesions"] = int(res.n_groups)
    out["ci_level"] = res.level
    out["metrics"] = {
        k: {"value": _num(res.point[k]), "low": _num(res.low[k]), "high": _num(res.high[k])}
        for k in METRICS
        if k in res.point
    }
    return out


def _num(x: Any) -> float | None:
    v = float(x)
    return None if np.isnan(v) else v
