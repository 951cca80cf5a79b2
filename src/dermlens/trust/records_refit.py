"""Refit from confirmed outcomes: temperatures and conformal thresholds of a bundle, refitted on the served
probabilities of confirmed cases, written as a NEW bundle with a new version and a card saying where
the refit came from. Logits are not stored, so a temperature T' is fitted on the log-probabilities and
composed with the bundle's calibration (softmax(log p / T') = softmax(z / (T T')), or per-condition
w / T', b / T'); the conformal thresholds are then refitted on the recalibrated probabilities.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.bundle import TRUST, read_card, write_card
from dermlens.data.taxonomy import MALIGNANT
from dermlens.errors import RefitError
from dermlens.infer.calibration import softmax
from dermlens.infer.state import TrustState
from dermlens.trust.calibration import fit_temperature
from dermlens.trust.conformal import class_thresholds
from dermlens.trust.shift import save_into_bundle

# Files not carried into the refitted bundle: the monitoring reference holds the old calibration's outputs.
NOT_COPIED = ("monitor_reference.json",)
EPS = 1e-12


@dataclass(frozen=True)
class ConfirmedArrays:
    """Confirmed cases of one model version: stored fine probs [N, C], P(malignant) [N], truth [N]."""

    probs: np.ndarray
    p_malignant: np.ndarray
    labels: np.ndarray


def check_enough(labels: np.ndarray, classes: tuple[str, ...], cfg: dict[str, Any]) -> list[int]:
    """Classes (indices) with enough cases to refit; RefitError saying how many there are and are needed."""
    need, per, n_cls = int(cfg["min_cases"]), int(cfg["min_per_class"]), int(cfg["min_classes"])
    counts = np.bincount(labels, minlength=len(classes))
    enough = [i for i, n in enumerate(counts) if n >= per]
    if len(labels) < need or len(enough) < n_cls:
        have = ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=True) if n)
        raise RefitError(
            f"refit from records needs {need} confirmed cases of the model's classes with {per} or more in "
            f"at least {n_cls} classes; there are {len(labels)} ({have or 'none'})"
        )
    return enough


def refit_version(version: str) -> str:
    """The refitted bundle's version: +refit.1 (or .refit.1 after an existing local part), then .2, ..."""
    m = re.search(r"refit\.(\d+)$", version)
    if m:
        return f"{version[: m.start()]}refit.{int(m.group(1)) + 1}"
    return f"{version}{'.' if '+' in version else '+'}refit.1"


def _temperature(p: np.ndarray, labels: np.ndarray, bounds: tuple[float, float]) -> float:
    return fit_temperature(np.log(np.clip(p, EPS, 1.0)), labels, bounds)


def refit_state(
    state: TrustState, cases: ConfirmedArrays, classes: tuple[str, ...], cfg: dict[str, Any]
) -> tuple[TrustState, dict[str, Any]]:
    """The state with composed temperatures and refitted conformal thresholds, and what changed."""
    enough = check_enough(cases.labels, classes, cfg["from_records"])
    bounds = tuple(cfg["calibration"]["bounds"])
    t_fine = _temperature(cases.probs, cases.labels, bounds)
    malignant = np.array([classes[i] in MALIGNANT for i in cases.labels], dtype=np.int64)
    pm = np.clip(cases.p_malignant, EPS, 1 - EPS)
    t_coarse = _temperature(np.stack([1 - pm, pm], axis=1), malignant, bounds)
    state.temperature_fine *= t_fine
    state.temperature_coarse *= t_coarse
    state.calibration = {
        cond: {"w": [w / t_fine for w in p["w"]], "b": [b / t_fine for b in p["b"]]}
        for cond, p in state.calibration.items()
    }
    alpha = float(state.conformal_alpha or cfg["conformal"]["alpha"])
    new_probs = softmax(np.log(np.clip(cases.probs, EPS, 1.0)), t_fine)
    q_new = class_thresholds(new_probs, cases.labels, alpha, len(classes))
    for cond in state.conformal_thresholds or {"meta": [float("inf")] * len(classes)}:
        q = list(state.conformal_thresholds.get(cond, [float("inf")] * len(classes)))
        for i in enough:
            q[i] = float(q_new[i])
        state.conformal_thresholds[cond] = q
    state.conformal_alpha = alpha
    changed = {
        "temperature_scale_fine": t_fine,
        "temperature_scale_coarse": t_coarse,
        "conformal_alpha": alpha,
        "conformal_refitted_classes": [classes[i] for i in enough],
        "cases_per_class": {c: int((cases.labels == i).sum()) for i, c in enumerate(classes)},
    }
    return state, changed


def refit_from_records(
    bundle: Path, out: Path, cases: ConfirmedArrays, provenance: dict[str, Any], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Write OUT: BUNDLE with a refitted trust.npz, a new version and the refit's source in its card."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RefitError(f"{out} exists and is not an empty folder: choose a new one for the refitted bundle")
    card = read_card(bundle)
    classes = tuple(card.classes)
    state, changed = refit_state(TrustState.load(bundle / TRUST), cases, classes, cfg)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(*NOT_COPIED), dirs_exist_ok=True)
    refit = {
        "from": "records",
        **provenance,
        "n_cases": int(len(cases.labels)),
        "source_version": card.version,
        "refitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **changed,
    }
    state.info = {**state.info, "refit_from_records": refit}
    save_into_bundle(out, state)
    new = read_card(out)
    new.version = refit_version(card.version)
    new.extra["refit"] = refit
    write_card(out, new)
    return {**refit, "version": new.version, "bundle": str(out)}
