"""Fit the shift-aware trust parts of an existing bundle in place: calibration per condition (metadata
given or not), Mondrian conformal thresholds, the not-dermoscopy head and the refer rule's thresholds.

    dermlens trust fit --bundle DIR --manifest work/ham10000 [--external work/isic2017]

Runs the bundle's own ONNX graph (torch-free) on the prepared caches, so it takes minutes on 2 cores.
The OOD statistics, temperatures and CAM weights already in trust.npz are kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlens.bundle import TRUST, open_bundle, read_card, write_card
from dermlens.errors import RefitError  # noqa: F401 (re-exported)
from dermlens.infer.calibration import calibrate
from dermlens.infer.ood import not_dermoscopy_score
from dermlens.infer.state import TrustState
from dermlens.metadata import encode_metadata, encode_rows
from dermlens.metrics import auroc, balanced_accuracy, ece
from dermlens.preprocess import Preprocessing
from dermlens.trust import conformal, photo_views, scaling, selective
from dermlens.trust.outputs import trust_settings
from dermlens.trust.refer_point import Scored, fit_operating_point


@dataclass
class Rows:
    """Labelled manifest rows with their model-size images and metadata encodings."""

    frame: pd.DataFrame
    images: np.ndarray
    labels: np.ndarray
    meta: np.ndarray
    has_meta: np.ndarray


def has_metadata(frame: pd.DataFrame) -> np.ndarray:
    """True per row where any of age, sex, site is known (the 'meta' calibration condition)."""
    known = np.zeros(len(frame), bool)
    for col in ("age", "sex", "site"):
        if col in frame.columns:
            v = frame[col]
            known |= (v.notna() & (v.astype(str).str.strip() != "")).to_numpy()
    return known


def load_rows(
    manifest: str | Path, split: str, classes: tuple[str, ...], prep: Preprocessing, limit: int | None = None
) -> Rows:
    """Rows of `split` whose diagnosis is one of `classes`, images from the prepared cache."""
    from dermlens.data.cache import open_cache
    from dermlens.data.manifest import DataError, read_manifest

    df = read_manifest(manifest)
    idx = np.flatnonzero((df["split"] == split).to_numpy() & df["diagnosis"].isin(classes).to_numpy())
    if len(idx) == 0:
        raise RefitError(f"{manifest}: no rows of split {split!r} labelled with one of {list(classes)}")
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(0).choice(idx, int(limit), replace=False))
    sub = df.iloc[idx].reset_index(drop=True)
    try:
        images = np.ascontiguousarray(open_cache(manifest, prep)[idx])
    except (DataError, OSError, ValueError) as e:  # no cache for this preprocessing: decode instead
        from dermlens.preprocess import load_rgb

        print(f"note: {e}; decoding {len(idx)} images of {manifest} instead", file=sys.stderr)
        images = np.stack([prep.resize(load_rgb(p)) for p in sub["image_path"]])
    return Rows(
        frame=sub,
        images=images,
        labels=np.array([classes.index(d) for d in sub["diagnosis"]], np.int64),
        meta=encode_rows(list(sub["age"]), list(sub["sex"]), list(sub["site"])),
        has_meta=has_metadata(sub),
    )


def no_meta(n: int) -> np.ndarray:
    """Metadata rows with every field missing, as the runtime encodes an upload without metadata."""
    return np.repeat(encode_metadata()[None], n, axis=0)


class Runner:
    """The bundle's ONNX graph at its default precision (the one the Predictor serves)."""

    def __init__(self, bundle: Path, threads: int | None = None, precision: str | None = None) -> None:
        from dermlens.infer.session import PRECISIONS, OnnxModel, default_precision

        self.card, _ = open_bundle(bundle)  # refit only an intact bundle: the write re-seals it
        self.prep: Preprocessing = self.card.preprocessing
        served = default_precision(self.card.extra.get("default_precision"), Path(bundle))
        self.precision = (precision or served).lower()
        self.model = OnnxModel(Path(bundle) / PRECISIONS[self.precision], threads)

    def __call__(self, images: np.ndarray, meta: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.run_images(images, self.prep, meta, 32, feature_map=False)

    def views(self, images: np.ndarray) -> np.ndarray:
        """Synthetic model-size views through the one preprocessing, as an upload of them would go
        (e.g. colour constancy, when the model uses it, undoes part of a white-balance change)."""
        return np.stack([self.prep.resize(np.ascontiguousarray(v)) for v in images])


def _stack_conditions(rows: Rows, run: Runner, name: str) -> dict[str, np.ndarray]:
    """Logits of each image with its metadata and with none: 2N rows, strata '<name>/meta|no_meta'."""
    with_meta = run(rows.images, rows.meta)
    without = run(rows.images, no_meta(len(rows.labels)))
    n = len(rows.labels)
    groups = rows.frame["group_id"].astype(str).to_numpy() if "group_id" in rows.frame else np.arange(n)
    return {
        "logits": np.concatenate([with_meta["fine_logits"], without["fine_logits"]]),
        "labels": np.r_[rows.labels, rows.labels],
        "has_meta": np.r_[np.ones(n, bool), np.zeros(n, bool)],
        "groups": np.r_[groups, groups].astype(str),
        "strata": np.array([f"{name}/meta"] * n + [f"{name}/no_meta"] * n),
        "embedding": with_meta["embedding"],
        "meta_logits": with_meta["fine_logits"],
        "no_meta_logits": without["fine_logits"],
    }


def fit_calibration(
    ham: dict[str, np.ndarray], ext: dict[str, np.ndarray] | None, cfg: dict[str, Any]
) -> tuple[str, scaling.Params, dict[str, Any]]:
    """Choose the calibration method and fit set by cross-validation; refit the choice on all its rows."""
    parts = [ham] + ([ext] if ext is not None else [])
    cat = {
        k: np.concatenate([p[k] for p in parts]) for k in ("logits", "labels", "has_meta", "groups", "strata")
    }
    is_ext = np.r_[np.zeros(len(ham["labels"]), bool), np.ones(len(cat["labels"]) - len(ham["labels"]), bool)]
    share = float(cfg.get("external_weight", 0.5)) if ext is not None else 0.0
    weights = np.where(is_ext, share / max(is_ext.sum(), 1), (1 - share) / max((~is_ext).sum(), 1))
    weights = weights * len(weights)
    fit_sets = {"ham": ~is_ext} | ({"ham+external": np.ones_like(is_ext)} if ext is not None else {})
    candidates: dict[str, Callable[[], dict[str, float]]] = {}
    for method in cfg.get("methods", scaling.METHODS):
        for fs, mask in fit_sets.items():
            candidates[f"{method}|{fs}"] = lambda m=method, mk=mask: scaling.cross_validate(
                cat["logits"],
                cat["labels"],
                cat["has_meta"],
                weights,
                cat["groups"],
                cat["strata"],
                m,
                int(cfg.get("cv_folds", 5)),
                int(cfg.get("seed", 0)),
                fit_mask=mk,
            )
    strata = np.unique(ham["strata"])
    base = {
        str(s): balanced_accuracy(
            ham["logits"][ham["strata"] == s].argmax(1), ham["labels"][ham["strata"] == s]
        )
        for s in strata
    }
    drop = float(cfg.get("max_bal_acc_drop", 0.01))
    best, tables = scaling.choose(candidates, base, drop)
    method, fs = best.split("|")
    m = fit_sets[fs]
    params = scaling.fit_params(cat["logits"][m], cat["labels"][m], cat["has_meta"][m], weights[m], method)
    criterion = (
        "lowest worst-stratum CV ECE among candidates whose CV balanced accuracy on HAM10000 val stays "
        f"within {drop} of the uncalibrated model's"
    )
    return method, params, {"chosen": best, "cv_ece": tables, "base_bal_acc": base, "criterion": criterion}


def fit_not_dermoscopy(
    run: Runner, manifest: Path, classes: tuple[str, ...], val_emb: np.ndarray, cfg: dict[str, Any]
) -> tuple[np.ndarray, float, float, dict[str, Any]]:
    """The not-dermoscopy head from training images vs their clinical-like views; threshold on val."""
    n = int(cfg.get("train_images", 1000))
    seed = int(cfg.get("seed", 0))
    train = load_rows(manifest, "train", classes, run.prep, limit=n)
    zeros = no_meta(len(train.labels))
    jitter = train.images[: int(cfg.get("jitter_images", n // 2))]
    emb_in = np.concatenate(
        [
            run(train.images, zeros)["embedding"],
            run(run.views(photo_views.dermoscopy_jitter(jitter, seed + 1)), no_meta(len(jitter)))[
                "embedding"
            ],
        ]
    )
    emb_out = run(run.views(photo_views.clinical_views(train.images, seed)), zeros)["embedding"]
    w, b = photo_views.fit_head(emb_in, emb_out, float(cfg.get("C", 0.1)))
    val_scores = not_dermoscopy_score(val_emb, w, b)
    keep = float(cfg.get("keep_rate", 0.98))
    threshold = float(np.quantile(val_scores, keep, method="higher"))
    info = {
        "train_images": len(train.labels),
        "train_auroc": auroc(not_dermoscopy_score(emb_in, w, b), not_dermoscopy_score(emb_out, w, b)),
        "keep_rate_target": keep,
        "val_keep_rate": float((val_scores <= threshold).mean()),
    }
    return w, b, threshold, info


def refit_bundle(
    bundle: str | Path,
    manifest: str | Path,
    external: str | Path | None = None,
    cfg: dict[str, Any] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit and write the shift-aware trust parts into `bundle` (trust.npz + card.json); returns the report."""
    bundle, manifest = Path(bundle), Path(manifest)
    cfg = trust_settings(cfg)
    state = TrustState.load(bundle / TRUST)
    run = Runner(bundle, threads)
    classes = tuple(run.card.classes)
    val = load_rows(manifest, "val", classes, run.prep)
    ham = _stack_conditions(val, run, "ham")
    log(f"scored {len(val.labels)} val images with and without metadata ({run.precision})")
    ext = None
    if external is not None:
        split = str(cfg["shift"].get("external_split", "train"))
        limit = cfg["shift"].get("external_limit")
        ext_rows = load_rows(Path(external), split, classes, run.prep, None if limit is None else int(limit))
        ext = _stack_conditions(ext_rows, run, "external")
        log(f"scored {len(ext_rows.labels)} external {split} images with and without metadata")
    method, params, choice = fit_calibration(ham, ext, cfg["shift"])
    state.calibration_method, state.calibration = method, params
    log(
        f"calibration: {choice['chosen']} "
        f"(worst CV ECE {max(v for k, v in choice['cv_ece'][choice['chosen']].items() if ':' not in k):.3f})"
    )

    p_meta = calibrate(ham["meta_logits"], np.ones(len(val.labels), bool), params)
    p_none = calibrate(ham["no_meta_logits"], np.zeros(len(val.labels), bool), params)
    alpha = float(cfg["conformal"]["alpha"])
    state.conformal_alpha = alpha
    state.conformal_thresholds = {
        "meta": conformal.class_thresholds(p_meta, val.labels, alpha, len(classes)).tolist(),
        "no_meta": conformal.class_thresholds(p_none, val.labels, alpha, len(classes)).tolist(),
    }
    state.max_set_size = int(cfg["conformal"].get("max_set_size", 0))

    if "per_source" in state.info:  # trained on real photos by `dermlens trust fit-sources`: keep it
        nd_info = {"kept": "the photo-trained head of `dermlens trust fit-sources`"}
        log("not-dermoscopy head: kept the photo-trained one (refit it with `dermlens trust fit-sources`)")
    else:
        w, b, thr, nd_info = fit_not_dermoscopy(
            run, manifest, classes, ham["embedding"], cfg["not_dermoscopy"]
        )
        state.not_dermoscopy_weight, state.not_dermoscopy_bias = w.astype(np.float32), b
        state.not_dermoscopy_threshold = thr
        log(
            f"not-dermoscopy head: train AUROC {nd_info['train_auroc']:.3f}, "
            f"val keep {nd_info['val_keep_rate']:.3f}"
        )
    op_meta = str(cfg["refer"].get("condition", "no_meta")) == "meta"
    op_val = Scored(
        ham["meta_logits" if op_meta else "no_meta_logits"],
        ham["embedding"],
        np.full(len(val.labels), op_meta),
        val.labels,
        ham["groups"][: len(val.labels)],
    )
    fit_operating_point(state, op_val, float(cfg["refer"]["accept_rate"]))
    rule = f"accept_rate {cfg['refer']['accept_rate']} ({'meta' if op_meta else 'no_meta'})"

    decided = state.decide(ham["meta_logits"], ham["embedding"], np.ones(len(val.labels), bool))
    sets_none = state.prediction_sets(p_none, np.zeros(len(val.labels), bool))
    report = {
        "bundle_version": run.card.version,
        "precision": run.precision,
        "n_val": int(len(val.labels)),
        "n_external": 0 if ext is None else int(len(ext["labels"]) // 2),
        "calibration": {
            "method": method,
            **choice,
            "val_ece": {
                "meta": ece(p_meta, val.labels, int(cfg["calibration"]["ece_bins"])),
                "no_meta": ece(p_none, val.labels, int(cfg["calibration"]["ece_bins"])),
            },
        },
        "conformal": {
            "alpha": alpha,
            "n_cal_per_class": {c: int((val.labels == i).sum()) for i, c in enumerate(classes)},
            "val_meta": conformal.set_summary(decided["sets"], val.labels, classes),
            "val_no_meta": conformal.set_summary(sets_none, val.labels, classes),
        },
        "not_dermoscopy": nd_info,
    }
    refer = {
        "rule": rule,
        "min_confidence": state.min_confidence,
        "max_set_size": state.max_set_size,
        **selective.selective_summary(p_meta, val.labels, decided["refer"]),
        "val_rates": {
            k: float(np.mean(decided[k]))
            for k in ("ood", "not_dermoscopy", "low_confidence", "set_too_large", "refer")
        },
    }
    state.info = {**state.info, "refer": refer, "shift": report}  # the card's one refer figure: "refer"
    save_into_bundle(bundle, state)
    log(f"wrote {bundle / TRUST} and card.json")
    return {**report, "refer": refer}


def save_into_bundle(bundle: Path, state: TrustState) -> None:
    """Write trust.npz and update the card's trust sections; write_card re-seals the bundle."""
    state.save(bundle / TRUST)
    card = read_card(bundle)
    sections = state.card_sections()
    card.temperature, card.ood, card.refer = sections["temperature"], sections["ood"], sections["refer"]
    for key in ("calibration", "conformal", "not_dermoscopy"):
        if key in sections:
            card.extra[key] = sections[key]
    metrics = card.extra.setdefault("metrics", {})
    metrics["trust"] = state.info
    write_card(bundle, card)


__all__ = ["RefitError", "has_metadata", "load_rows", "refit_bundle", "save_into_bundle"]
