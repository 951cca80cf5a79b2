"""Selective prediction: the `refer` rule (out of distribution or unsure) and risk-coverage curves."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dermlens.trust.fit import TrustState


# Machine-readable refer reasons, in the order they are reported, with the plain-words explanation.
REFER_MESSAGES: dict[str, str] = {
    "ood": "the image does not look like the dermoscopic lesion images the model learned from "
    "(out of distribution)",
    "not_dermoscopy": "the image looks like an ordinary clinical or phone photo, not a dermoscopy image; "
    "the model is only meant for dermoscopy",
    "low_confidence": "the model is not confident enough in its top diagnosis (low confidence)",
    "set_too_large": "too many diagnoses remain plausible: the prediction set is too large",
}
RULE = (
    "refer if ood_score > ood.threshold, or not_dermoscopy_score > not_dermoscopy_threshold, "
    "or p_max < min_confidence, or |prediction set| >= max_set_size (max_set_size 0: never)"
)


def refer_codes(flags: dict[str, np.ndarray]) -> list[list[str]]:
    """Reason codes per image (keys of REFER_MESSAGES whose flag is set), [] when not referred."""
    n = len(next(iter(flags.values()))) if flags else 0
    out: list[list[str]] = [[] for _ in range(n)]
    for code in REFER_MESSAGES:
        if code in flags:
            for i in np.flatnonzero(np.asarray(flags[code], bool)):
                out[i].append(code)
    return out


def refer_message(codes: list[str]) -> str | None:
    """The reasons in plain words, joined; None when there is none."""
    return "; ".join(REFER_MESSAGES[c] for c in codes) or None


def refer_decision(probs: np.ndarray, ood_score: np.ndarray, state: TrustState) -> np.ndarray:
    """True where the image should go to a clinician: OOD score above threshold or top probability too low."""
    conf = np.asarray(probs, dtype=np.float64).max(axis=1)
    ood = np.asarray(ood_score, dtype=np.float64) > state.ood_threshold
    return ood | (conf < state.min_confidence)


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Coverage and error rate when answering the most confident k images, k = 1..N; plus AURC."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    wrong = (probs.argmax(axis=1) != np.asarray(labels)).astype(np.float64)
    order = np.argsort(-conf, kind="mergesort")
    k = np.arange(1, len(conf) + 1)
    coverage = k / len(conf)
    risk = np.cumsum(wrong[order]) / k
    return coverage, risk, float(risk.mean())


def confidence_for_coverage(probs: np.ndarray, coverage: float) -> float:
    """Minimum top probability that answers the fraction `coverage` of the (validation) images."""
    conf = np.sort(np.asarray(probs, dtype=np.float64).max(axis=1))[::-1]
    if coverage >= 1 or len(conf) == 0:
        return 0.0
    return float(conf[max(1, int(np.ceil(coverage * len(conf) - 1e-9))) - 1])


def confidence_for_risk(probs: np.ndarray, labels: np.ndarray, risk: float) -> float:
    """Lowest top-probability threshold whose answered (validation) images have error rate <= `risk`."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    coverage, r, _ = risk_coverage(probs, labels)
    ok = np.nonzero(r <= risk)[0]
    if len(ok) == 0:
        return 1.0 + 1e-9  # refer everything: the target risk is out of reach
    k = ok.max()
    return float(np.sort(conf)[::-1][k])


def selective_summary(probs: np.ndarray, labels: np.ndarray, refer: np.ndarray) -> dict[str, float]:
    """Coverage and accuracy on answered images versus all images."""
    labels = np.asarray(labels)
    correct = np.asarray(probs).argmax(axis=1) == labels
    keep = ~np.asarray(refer, dtype=bool)
    return {
        "coverage": float(keep.mean()),
        "accuracy_all": float(correct.mean()),
        "accuracy_answered": float(correct[keep].mean()) if keep.any() else float("nan"),
    }
