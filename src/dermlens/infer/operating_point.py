"""The refer operating point at run time: a requested refer rate -> the min_confidence threshold, through the
val confidence quantiles stored in trust.npz, and the val refer rate of a threshold in plain words."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from dermlens.errors import OperatingPointError
from dermlens.infer.state import TrustState


def _table(state: TrustState) -> np.ndarray:
    """The stored quantile table, or a one-line error naming the command that writes it."""
    if state.refer_quantiles is None:
        raise OperatingPointError(
            "this model bundle has no refer-rate table; write one with "
            "`dermlens trust operating-point --bundle DIR --manifest PREPARED_HAM`"
        )
    return np.asarray(state.refer_quantiles, np.float64)


def min_confidence_for(state: TrustState, refer_rate: float) -> float:
    """Top-probability threshold at which about `refer_rate` of validation images are referred by the
    four flags together (rates below the other flags' share refer only what those flag)."""
    if not 0.0 <= float(refer_rate) <= 1.0:
        raise OperatingPointError(f"refer rate must be between 0 and 1, not {refer_rate}")
    table, other = _table(state), float(state.refer_other_rate)
    if refer_rate >= 1.0:
        return float(np.nextafter(1.0, 2.0))
    q = max(0.0, (float(refer_rate) - other) / max(1.0 - other, 1e-12))
    if q <= 0.0:
        return 0.0
    return float(np.interp(q, np.linspace(0.0, 1.0, len(table)), table))


def val_refer_rate(state: TrustState, min_confidence: float | None = None) -> float | None:
    """Share of validation images the four flags refer at `min_confidence` (default: the state's), or None
    without a table."""
    if state.refer_quantiles is None:
        return None
    t = state.min_confidence if min_confidence is None else float(min_confidence)
    table = np.asarray(state.refer_quantiles, np.float64)
    below = 0.0 if t <= table[0] else float(np.interp(t, table, np.linspace(0.0, 1.0, len(table))))
    other = float(state.refer_other_rate)
    return other + (1.0 - other) * below


def with_refer_rate(state: TrustState, refer_rate: float | None) -> TrustState:
    """A copy of `state` whose min_confidence refers about `refer_rate` of val images (None: unchanged)."""
    if refer_rate is None:
        return state
    return dataclasses.replace(state, min_confidence=min_confidence_for(state, refer_rate))


def at_refer_rate(predictor: Any, refer_rate: float | None) -> Any:
    """A Predictor whose refer threshold refers about `refer_rate` of val images: a shallow copy (the given
    one may be shared), or the given one when None."""
    if refer_rate is None:
        return predictor
    moved = copy.copy(predictor)
    moved.trust = with_refer_rate(predictor.trust, refer_rate)
    return moved


def refer_words(rate: float | None) -> str | None:
    """'refers about 1 in 5 images like these' for a refer rate (None when unknown)."""
    if rate is None or not np.isfinite(rate):
        return None
    if rate <= 0.005:
        return "refers almost no images like these"
    if rate >= 0.995:
        return "refers every image like these"
    if rate > 0.5:
        return f"refers about {round(rate * 10)} in 10 images like these"
    return f"refers about 1 in {max(2, round(1.0 / rate))} images like these"


def describe(state: TrustState) -> dict:
    """The operating point for /model and the page: threshold, val refer rate and the words."""
    rate = val_refer_rate(state)
    return {
        "min_confidence": float(state.min_confidence),
        "val_refer_rate": rate,
        "packaged_accept_rate": state.accept_rate,
        "words": refer_words(rate),
    }


__all__ = [
    "at_refer_rate",
    "describe",
    "min_confidence_for",
    "refer_words",
    "val_refer_rate",
    "with_refer_rate",
]
