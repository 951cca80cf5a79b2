"""Drift tests of a window of prediction records against the model's reference outputs (scipy.stats).

Per signal one test and one effect size: class mix (chi-square; total variation distance), confidence and
OOD score (two-sample Kolmogorov-Smirnov; PSI), refer rate (two-proportion z-test; absolute difference).
An alert fires when p < alpha and the effect reaches its configured minimum.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from dermlens.extras import require
from dermlens.monitor.reference import Reference, monitor_config

RECORD_COLUMNS = ("created_at", "model_version", "top_class", "confidence", "ood_score", "refer")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass
class SignalResult:
    """One signal's test on the window."""

    signal: str
    test: str
    statistic: float
    p_value: float
    effect_name: str
    effect: float
    min_effect: float
    alert: bool
    window: str
    reference: str


@dataclass
class DriftSummary:
    """The tests of one window; `alert` if any signal alerts."""

    model_name: str
    model_version: str
    n_window: int
    n_reference: int
    window_start: str | None
    window_end: str | None
    alpha: float
    results: list[SignalResult] = field(default_factory=list)
    note: str | None = None

    @property
    def alert(self) -> bool:
        return any(r.alert for r in self.results)

    @property
    def alerts(self) -> list[str]:
        return [r.signal for r in self.results if r.alert]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alert": self.alert, "alerts": self.alerts}


def parse_time(value: str | None, now: datetime | None = None) -> datetime | None:
    """ISO 8601 time (UTC if no zone) or a span back from now: '30m', '24h', '7d', '2w'."""
    if value is None or not str(value).strip():
        return None
    m = _RELATIVE.match(value)
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"time {value!r} is neither ISO 8601 nor a span like 30m, 24h, 7d") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def records_frame(store: Any, model_version: str | None = None) -> pd.DataFrame:
    """Every record (of `model_version`, if given) as a table, oldest first."""
    rows = [
        {c: getattr(r, c) for c in RECORD_COLUMNS}
        for r in store.iter_records()
        if model_version is None or r.model_version == model_version
    ]
    df = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    df["confidence"] = pd.to_numeric(df["confidence"], errors="coerce")
    df["ood_score"] = pd.to_numeric(df["ood_score"], errors="coerce")
    df["refer"] = df["refer"].astype(bool)
    return df.sort_values("created_at", kind="stable").reset_index(drop=True)


def select_window(
    df: pd.DataFrame, since: datetime | None = None, until: datetime | None = None, last: int | None = None
) -> pd.DataFrame:
    """Records in [since, until); with neither bound, the most recent `last` (default from config)."""
    out = df
    if since is not None:
        out = out[out["created_at"] >= pd.Timestamp(since)]
    if until is not None:
        out = out[out["created_at"] < pd.Timestamp(until)]
    if since is None and until is None:
        out = out.tail(int(last or monitor_config()["window"]["last"]))
    elif last:
        out = out.tail(int(last))
    return out


def psi(window: np.ndarray, reference: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (open-ended outer bins)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(
        reference
    )
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1) / len(window)
    r, w = np.clip(r, 1e-4, None), np.clip(w, 1e-4, None)
    return float(np.sum((w - r) * np.log(w / r)))


def _top_shares(classes: list[str], shares: np.ndarray) -> str:
    ranked = sorted(zip(classes, shares, strict=True), key=lambda t: -t[1])[:3]
    return ", ".join(f"{c} {x:.0%}" for c, x in ranked)


def _quartiles(v: np.ndarray) -> str:
    q1, q2, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return f"median {q2:.4g} (IQR {q1:.4g}-{q3:.4g})"


def class_mix(window_top: list[str], ref: Reference, min_effect: float, min_expected: float, alpha: float):
    """Chi-square goodness of fit of the window's class counts to the reference shares."""
    chisquare = require("scipy.stats", "monitor").chisquare

    classes = list(ref.classes)
    counts = np.array([sum(t == c for t in window_top) for c in classes], dtype=float)
    n = counts.sum()
    ref_counts = np.array([ref.top.count(c) for c in classes], dtype=float)
    shares = (ref_counts + 0.5) / (ref_counts.sum() + 0.5 * len(classes))  # no empty reference cell
    expected = shares * n
    small = expected < min_expected
    if small.sum() > 1 or (small.any() and not small.all()):
        obs = np.append(counts[~small], counts[small].sum())
        exp = np.append(expected[~small], expected[small].sum())
    else:
        obs, exp = counts, expected
    stat, p = chisquare(obs, exp) if len(obs) > 1 else (0.0, 1.0)
    tvd = 0.5 * float(np.abs(counts / max(n, 1) - ref_counts / ref_counts.sum()).sum())
    return SignalResult(
        "class_mix",
        "chi-square",
        float(stat),
        float(p),
        "total variation",
        tvd,
        min_effect,
        bool(p < alpha and tvd >= min_effect),
        _top_shares(classes, counts / max(n, 1)),
        _top_shares(classes, ref_counts / ref_counts.sum()),
    )


def distribution(
    name: str, window: np.ndarray, reference: np.ndarray, min_effect: float, alpha: float, bins: int
):
    """Two-sample Kolmogorov-Smirnov test with PSI as the effect size."""
    ks_2samp = require("scipy.stats", "monitor").ks_2samp

    window, reference = window[np.isfinite(window)], reference[np.isfinite(reference)]
    res = ks_2samp(window, reference)
    effect = psi(window, reference, bins)
    return SignalResult(
        name,
        "Kolmogorov-Smirnov",
        float(res.statistic),
        float(res.pvalue),
        "PSI",
        effect,
        min_effect,
        bool(res.pvalue < alpha and effect >= min_effect),
        _quartiles(window),
        _quartiles(reference),
    )


def refer_rate(window: np.ndarray, reference: np.ndarray, min_effect: float, alpha: float) -> SignalResult:
    """Two-proportion z-test of the window's refer rate against the reference's."""
    norm = require("scipy.stats", "monitor").norm

    n1, n2 = len(window), len(reference)
    p1, p2 = float(np.mean(window)), float(np.mean(reference))
    pooled = (window.sum() + reference.sum()) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (p1 - p2) / se if se > 0 else 0.0
    p = float(2 * norm.sf(abs(z))) if se > 0 else 1.0
    diff = abs(p1 - p2)
    return SignalResult(
        "refer_rate",
        "two-proportion z",
        float(z),
        p,
        "absolute difference",
        diff,
        min_effect,
        bool(p < alpha and diff >= min_effect),
        f"{p1:.1%} of {n1}",
        f"{p2:.1%} of {n2}",
    )


def compare(window: pd.DataFrame, ref: Reference, cfg: dict | None = None) -> DriftSummary:
    """Run every signal's test on the window (none when it has fewer than min_records)."""
    cfg = cfg or monitor_config()
    alpha, sig = float(cfg["alpha"]), cfg["signals"]
    times = window["created_at"]
    summary = DriftSummary(
        ref.model_name,
        ref.model_version,
        len(window),
        ref.n,
        times.min().isoformat() if len(window) else None,
        times.max().isoformat() if len(window) else None,
        alpha,
    )
    need = int(cfg["window"]["min_records"])
    if len(window) < need:
        summary.note = f"{len(window)} record(s) in the window, fewer than min_records={need}: nothing tested"
        return summary
    bins = int(cfg["psi_bins"])
    summary.results = [
        class_mix(
            list(window["top_class"]),
            ref,
            float(sig["class_mix"]["min_effect"]),
            float(sig["class_mix"]["min_expected"]),
            alpha,
        ),
        distribution(
            "confidence",
            window["confidence"].to_numpy(float),
            np.asarray(ref.confidence, float),
            float(sig["confidence"]["min_effect"]),
            alpha,
            bins,
        ),
        distribution(
            "ood_score",
            window["ood_score"].to_numpy(float),
            np.asarray(ref.ood_score, float),
            float(sig["ood_score"]["min_effect"]),
            alpha,
            bins,
        ),
        refer_rate(
            window["refer"].to_numpy(bool),
            np.asarray(ref.refer, bool),
            float(sig["refer_rate"]["min_effect"]),
            alpha,
        ),
    ]
    return summary
