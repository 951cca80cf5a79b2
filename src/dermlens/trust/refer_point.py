"""The refer operating point from model outputs: the val share accepted by all four refer flags together
(configs/trust.yaml `refer.accept_rate`) -> min_confidence, plus the val confidence quantiles that let users
choose another refer rate at run time (dermlens.infer.operating_point); and its measurement with CIs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dermlens.infer.operating_point import min_confidence_for
from dermlens.infer.state import TrustState
from dermlens.metrics import balanced_accuracy

QUANTILES = 101  # levels 0, 0.01, ..., 1 of the val top probability
OTHER_FLAGS = ("ood", "not_dermoscopy", "set_too_large")


@dataclasses.dataclass
class Scored:
    """Model outputs of one labelled split under one metadata condition."""

    logits: np.ndarray
    embedding: np.ndarray
    has_meta: np.ndarray
    labels: np.ndarray
    groups: np.ndarray


def other_flags(state: TrustState, s: Scored) -> tuple[np.ndarray, np.ndarray]:
    """Top probability and 'referred by a flag other than low confidence' per image."""
    d = dataclasses.replace(state, min_confidence=0.0).decide(s.logits, s.embedding, s.has_meta)
    other = np.zeros(len(s.labels), bool)
    for k in OTHER_FLAGS:
        other |= np.asarray(d[k], bool)
    return d["probs"].max(axis=1), other


def fit_operating_point(state: TrustState, val: Scored, accept_rate: float) -> None:
    """Store the val quantile table and set min_confidence so `accept_rate` of val images is accepted."""
    store_table(state, *other_flags(state, val), accept_rate)


def store_table(state: TrustState, conf: np.ndarray, other: np.ndarray, accept_rate: float) -> None:
    """Quantiles of the top probability `conf` where no `other` flag refers; the threshold for accept_rate."""
    kept = conf[~other] if (~other).any() else np.array([0.0])
    state.refer_quantiles = np.quantile(kept, np.linspace(0.0, 1.0, QUANTILES)).astype(np.float32)
    state.refer_other_rate = float(other.mean())
    state.accept_rate = float(accept_rate)
    state.min_confidence = min_confidence_for(state, 1.0 - float(accept_rate))


def point_summary(state: TrustState, s: Scored) -> dict[str, float | None]:
    """Refer rate, each flag's rate and balanced accuracy of the accepted images at the state's threshold."""
    d = state.decide(s.logits, s.embedding, s.has_meta)
    keep = ~np.asarray(d["refer"], bool)
    pred = d["probs"].argmax(axis=1)
    return {
        "refer_rate": float(1.0 - keep.mean()),
        **{f"{k}_rate": float(np.mean(d[k])) for k in (*OTHER_FLAGS, "low_confidence")},
        "balanced_accuracy_accepted": balanced_accuracy(pred[keep], s.labels[keep]) if keep.any() else None,
        "balanced_accuracy_all": balanced_accuracy(pred, s.labels),
    }


def sweep(state: TrustState, s: Scored, accept_rates: list[float]) -> list[dict[str, Any]]:
    """point_summary at each accept rate (the val table decides each threshold)."""
    rows = []
    for a in accept_rates:
        st = dataclasses.replace(state, min_confidence=min_confidence_for(state, 1.0 - a))
        rows.append({"accept_rate": a, "min_confidence": st.min_confidence, **point_summary(st, s)})
    return rows


def with_ci(state: TrustState, s: Scored, n_resamples: int, seed: int = 0) -> dict[str, Any]:
    """Refer rate and balanced accuracy of the accepted images with lesion-level 95% bootstrap CIs."""
    from dermlens.evaluate.bootstrap import bootstrap
    from dermlens.metrics import EvalData, decision_metrics

    d = state.decide(s.logits, s.embedding, s.has_meta)
    refer = np.asarray(d["refer"], np.float64)
    classes = tuple(str(i) for i in range(s.logits.shape[1]))
    data = EvalData.build(d["probs"], s.labels, classes)

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "refer_rate": (w @ refer) / w.sum(axis=1),
            "balanced_accuracy_accepted": decision_metrics(data, w * (1.0 - refer))["balanced_accuracy"],
        }

    res = bootstrap(fn, len(s.labels), s.groups, n_resamples=n_resamples, seed=seed)
    return {
        "n_images": int(len(s.labels)),
        "n_lesions": int(res.n_groups),
        **{
            k: {"value": float(res.point[k]), "ci_low": float(res.low[k]), "ci_high": float(res.high[k])}
            for k in res.point
        },
    }


__all__ = ["Scored", "fit_operating_point", "point_summary", "store_table", "sweep", "with_ci"]
