"""The trust block of metrics.json (model mode): calibration and conformal coverage per metadata condition,
refer reasons and the subgroup audit, on the evaluated split and optionally an external set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermlens.evaluate.audit import coverage_with_ci, ece_with_ci, subgroup_audit
from dermlens.evaluate.refer_curve import refer_curve
from dermlens.evaluate.sources import EvalInputs, external_rows, predict_rows
from dermlens.settings import cpu_name

EXTERNAL_NOTE = (
    "External labels mapped to the model's classes (ISIC 2017: melanoma -> mel, seborrheic "
    "keratosis -> bkl, nevus -> nv); rows with another or an unknown label are left out."
)


def condition_tables(name: str, arr: dict, truth, classes, groups, cfg) -> tuple[dict, dict]:
    """ECE and conformal coverage of one evaluated set, with metadata and without (lesion-level CIs)."""
    ece, cov = {}, {}
    for prefix in ("", "nometa_"):
        if f"{prefix}probs" not in arr:
            continue
        given = prefix == "" and bool(np.asarray(arr.get("has_meta", [True])).any())
        cond = "meta" if given else "no_meta"
        if f"{name}/{cond}" in ece:
            continue  # no image had metadata: both passes are the 'no_meta' condition
        ece[f"{name}/{cond}"] = ece_with_ci(arr[f"{prefix}probs"], truth, groups, cfg)
        sets = arr.get(f"{prefix}prediction_sets")
        if sets is not None:
            cov[f"{name}/{cond}"] = coverage_with_ci(sets, truth, classes, groups, cfg)
    return ece, cov


def refer_curves(name: str, arr: dict, truth, min_confidence: float) -> dict:
    """Risk-coverage of the refer rule for each condition scored (metadata given / withheld)."""
    out = {}
    for prefix in ("", "nometa_"):
        if f"{prefix}probs" in arr:
            given = prefix == "" and bool(np.asarray(arr.get("has_meta", [True])).any())
            out.setdefault(
                f"{name}/{'meta' if given else 'no_meta'}", refer_curve(arr, truth, min_confidence, prefix)
            )
    return out


def refer_table(arr: dict) -> dict:
    """Share of images flagged by each refer reason, and referred at all."""
    keys = ("ood", "not_dermoscopy", "low_confidence", "set_too_large", "refer")
    return {k: float(np.mean(arr[k])) for k in keys if k in arr}


def _add_external(block: dict, inputs: EvalInputs, external: Path, external_split: str, cfg) -> None:
    """Score the external manifest split per condition and add it to the trust block."""
    classes = inputs.classes
    ext = external_rows(external, external_split, classes)
    ext_arr = predict_rows(inputs.predictor, ext, cfg.batch_size, no_meta=True)
    truth = np.array([classes.index(c) for c in ext["diagnosis"]])
    ext_name = f"{ext['dataset'].iloc[0] if 'dataset' in ext.columns else external.name}/{external_split}"
    e2, c2 = condition_tables(ext_name, ext_arr, truth, classes, None, cfg)
    block["calibration_conditions"].update(e2)
    block["conformal"].update(c2)
    cond = "meta" if ext_arr["has_meta"].any() else "no_meta"
    block["refer_reasons"][f"{ext_name}/{cond}"] = refer_table(ext_arr)
    block["refer_curves"].update(
        refer_curves(ext_name, ext_arr, truth, inputs.predictor.trust.min_confidence)
    )
    block["external_note"] = EXTERNAL_NOTE


def trust_block(inputs: EvalInputs, split_name: str, external: Path | None, external_split: str, cfg) -> dict:
    """Calibration per condition, conformal coverage / set sizes, refer reasons and the subgroup audit."""
    arr, classes = inputs.arrays, inputs.classes
    frame = inputs.frame
    name = f"{frame['dataset'].iloc[0] if 'dataset' in frame.columns else 'manifest'}/{split_name}"
    ece, cov = condition_tables(name, arr, inputs.truth, classes, inputs.groups, cfg)
    block: dict = {
        "model_version": inputs.predictor.card.version,
        "precision": inputs.predictor.precision,
        "cpu": cpu_name(),
        "calibration_conditions": ece,
        "conformal": cov,
        "conformal_alpha": getattr(inputs.predictor.trust, "conformal_alpha", None),
        "refer_reasons": {f"{name}/{'meta' if arr['has_meta'].any() else 'no_meta'}": refer_table(arr)},
        "refer_curves": refer_curves(name, arr, inputs.truth, inputs.predictor.trust.min_confidence),
        "subgroups": subgroup_audit(
            inputs.frame, arr["probs"], inputs.truth, classes, arr.get("refer"), inputs.groups, cfg
        ),
    }
    if external is not None:
        _add_external(block, inputs, external, external_split, cfg)
    return block
