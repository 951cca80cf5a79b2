"""Fit the refer operating point into a bundle on its val split (see dermlens.trust.refer_point):

dermlens trust operating-point --bundle DIR --manifest work/ham10000 [--accept-rate 0.86]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dermlens import config as configuration
from dermlens.bundle import TRUST
from dermlens.errors import OperatingPointError
from dermlens.infer.operating_point import val_refer_rate
from dermlens.infer.state import TrustState
from dermlens.trust.refer_point import Scored, fit_operating_point, point_summary, sweep, with_ci
from dermlens.trust.shift import Runner, load_rows, no_meta, save_into_bundle


def score_split(
    run: Any, manifest: Path, split: str, classes: tuple[str, ...], metadata: bool, limit: int | None = None
) -> Scored:
    """Score a manifest split with the bundle's graph, with the rows' metadata or with none."""
    rows = load_rows(manifest, split, classes, run.prep, limit)
    n = len(rows.labels)
    out = run(rows.images, rows.meta if metadata else no_meta(n))
    has_meta = rows.has_meta if metadata else np.zeros(n, bool)
    groups = rows.frame["group_id"].astype(str).to_numpy() if "group_id" in rows.frame else np.arange(n)
    return Scored(out["fine_logits"], out["embedding"], has_meta, rows.labels, groups)


def write_operating_point(
    bundle: str | Path,
    manifest: str | Path,
    accept_rate: float | None = None,
    cfg: dict[str, Any] | None = None,
    threads: int | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit the operating point on the val split into BUNDLE (trust.npz + card.json); returns the report."""
    bundle, manifest = Path(bundle), Path(manifest)
    refer_cfg = configuration.load("trust", layers=[("trust settings", cfg or {})])["refer"]
    accept = float(refer_cfg["accept_rate"] if accept_rate is None else accept_rate)
    if not 0.0 < accept <= 1.0:
        raise OperatingPointError(f"accept rate must be in (0, 1], not {accept}")
    metadata = str(refer_cfg.get("condition", "no_meta")) == "meta"
    state = TrustState.load(bundle / TRUST)
    run = Runner(bundle, threads)
    val = score_split(run, manifest, "val", tuple(run.card.classes), metadata, limit)
    cond = "with" if metadata else "without"
    log(f"scored {len(val.labels)} val images ({cond} metadata, {run.precision})")
    fit_operating_point(state, val, accept)
    summary = point_summary(state, val)
    report = {
        "bundle_version": run.card.version,
        "precision": run.precision,
        "condition": "meta" if metadata else "no_meta",
        "accept_rate": accept,
        "min_confidence": state.min_confidence,
        "other_flags_rate": state.refer_other_rate,
        "val_refer_rate_table": val_refer_rate(state),
        "val": summary,
        "val_sweep": sweep(state, val, [round(a, 2) for a in np.arange(0.80, 0.951, 0.01)]),
    }
    state.info = one_refer_figure(state.info, {k: v for k, v in report.items() if k != "val_sweep"})
    save_into_bundle(bundle, state)
    log(f"wrote {bundle / TRUST} and card.json: min_confidence {state.min_confidence:.4f}")
    return report


def measure_point(
    bundle: str | Path,
    manifest: str | Path,
    splits: tuple[str, ...] = ("val", "test"),
    metadata: bool = False,
    n_resamples: int = 1000,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Refer rate and balanced accuracy of the accepted images at the bundle's operating point, per split,
    with lesion-level 95% bootstrap CIs."""
    bundle = Path(bundle)
    state = TrustState.load(bundle / TRUST)
    run = Runner(bundle, threads)
    out: dict[str, Any] = {}
    for split in splits:
        s = score_split(run, Path(manifest), split, tuple(run.card.classes), metadata)
        out[split] = {**with_ci(state, s, n_resamples), "flags": point_summary(state, s)}
        log(f"{split}: refer rate {out[split]['refer_rate']['value']:.3f}")
    return {
        "bundle_version": run.card.version,
        "precision": run.precision,
        "metadata": "given" if metadata else "withheld",
        "accept_rate": state.accept_rate,
        "min_confidence": state.min_confidence,
        "ci": f"95% percentile, {n_resamples} lesion-level bootstrap resamples",
        **out,
    }


def one_refer_figure(info: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The card's trust record with the operating point as its one refer figure (`metrics.trust.refer`)."""
    kept = {k: v for k, v in info.items() if k not in ("refer", "operating_point")}
    if isinstance(kept.get("shift"), dict):
        kept["shift"] = {k: v for k, v in kept["shift"].items() if k != "refer"}
    return {**kept, "refer": {"rule": f"accept_rate {point['accept_rate']}", **point}}


__all__ = ["measure_point", "one_refer_figure", "score_split", "write_operating_point"]
