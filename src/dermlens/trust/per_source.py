"""Trust fitted on the pooled val splits of every dermoscopy source (HAM10000, ISIC 2017, BCN thumbnails)
and the not-dermoscopy head fitted on real photos; the figures of each source's test split.

    dermlens trust fit-sources --bundle DIR            (writes trust.npz + card.json)
    dermlens trust measure-sources --out docs/results/trust_per_source.json
    dermlens trust measure-not-dermoscopy --out docs/results/not_dermoscopy.json

Every source goes through the bundle's own ONNX graph at its served precision (torch-free); the outputs
are cached in work/trust_cache, so a second run takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.bundle import TRUST
from dermlens.errors import RefitError
from dermlens.infer.calibration import calibrate
from dermlens.infer.state import TrustState
from dermlens.metrics import ece
from dermlens.settings import work_dir
from dermlens.trust import conformal
from dermlens.trust import not_dermoscopy as nd
from dermlens.trust.outputs import trust_settings
from dermlens.trust.shift import Runner, fit_calibration, save_into_bundle
from dermlens.trust.sources import Scored, load_source

Log = Callable[[str], None]
PHOTOS = "pad_ufes20"


@dataclass
class Data:
    """Scored rows per source and role: the photo source and the dermoscopy sources."""

    photos: dict[str, Scored] = field(default_factory=dict)
    derm: dict[str, dict[str, Scored]] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where scored sources are cached (git-ignored work/)."""
    return work_dir() / "trust_cache"


def load_data(
    run: Runner, cfg: dict[str, Any], roles: tuple[str, ...], log: Log, limit: int | None = None
) -> Data:
    """Score (or read from the cache) the given roles of the photos and of every dermoscopy source;
    `limit` caps every role (tests); train roles of dermoscopy sources are capped by the config."""
    ndc = cfg["not_dermoscopy"]
    photos = nd.photo_dir(ndc)
    if photos is None:
        raise RefitError(
            f"{ndc['photos']['dir']} is not prepared: run `dermlens data prepare --dataset pad_ufes20 "
            f"--root DATA/pad_ufes20 --out {ndc['photos']['dir']}`"
        )
    data = Data()
    for role in roles:
        data.photos[role] = load_source(run, {"dir": photos}, PHOTOS, role, limit, cache_dir(), log)
        for name, spec in cfg["sources"].items():
            cap = int(ndc["train_per_source"]) if role == "train" else None
            cap = min(c for c in (cap, limit) if c is not None) if (cap or limit) else None
            data.derm.setdefault(name, {})[role] = load_source(run, spec, name, role, cap, cache_dir(), log)
    return data


# ---- fitting ---------------------------------------------------------------------------------------------
def _stack(s: Scored, classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Labelled rows of a source with and without metadata (2N rows), strata '<source>/meta|no_meta'."""
    labels = s.labels(classes)
    keep = labels >= 0
    n = int(keep.sum())
    groups = s.groups()[keep]
    return {
        "logits": np.concatenate([s.logits_meta[keep], s.logits_none[keep]]),
        "labels": np.r_[labels[keep], labels[keep]],
        "has_meta": np.r_[np.ones(n, bool), np.zeros(n, bool)],
        "groups": np.r_[groups, groups].astype(str),
        "strata": np.array([f"{s.name.split('-')[0]}/meta"] * n + [f"{s.name.split('-')[0]}/no_meta"] * n),
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def source_thresholds(
    probs: np.ndarray, labels: np.ndarray, source: np.ndarray, n_classes: int, cfg: dict[str, Any]
) -> np.ndarray:
    """Mondrian thresholds of the pooled rows; with `across_sources: max`, each class's threshold is also
    raised to every source's own (where it has >= min_class_images of the class), so each source's val
    coverage reaches 1 - alpha per class without knowing the source at run time."""
    alpha = float(cfg["alpha"])
    q = conformal.class_thresholds(probs, labels, alpha, n_classes)
    if cfg.get("across_sources", "pooled") != "max":
        return q
    for s in np.unique(source):
        sel = source == s
        own = conformal.class_thresholds(probs[sel], labels[sel], alpha, n_classes)
        enough = np.bincount(labels[sel], minlength=n_classes) >= int(cfg.get("min_class_images", 20))
        q = np.where(enough, np.maximum(q, own), q)
    return q


def fit_pooled(
    state: TrustState, vals: dict[str, Scored], classes: tuple[str, ...], cfg: dict
) -> dict[str, Any]:
    """Calibration (method chosen by grouped CV, worst source stratum) and Mondrian conformal thresholds on
    the pooled val rows of every source; sets them on `state` (`trust operating-point` then sets the refer
    threshold, which depends on every flag)."""
    stacks = {k: _stack(v, classes) for k, v in vals.items()}
    first, *others = list(stacks)
    ext = _concat([stacks[k] for k in others]) if others else None
    method, params, choice = fit_calibration(stacks[first], ext, cfg["shift"])
    state.calibration_method, state.calibration = method, params
    pooled = _concat(list(stacks.values()))
    meta = pooled["has_meta"]
    p_meta = calibrate(pooled["logits"][meta], np.ones(int(meta.sum()), bool), params)
    p_none = calibrate(pooled["logits"][~meta], np.zeros(int((~meta).sum()), bool), params)
    labels = pooled["labels"][meta]
    alpha = float(cfg["conformal"]["alpha"])
    state.conformal_alpha = alpha
    source = pooled["strata"][meta]
    state.conformal_thresholds = {
        "meta": source_thresholds(p_meta, labels, source, len(classes), cfg["conformal"]).tolist(),
        "no_meta": source_thresholds(p_none, labels, source, len(classes), cfg["conformal"]).tolist(),
    }
    state.max_set_size = int(cfg["conformal"].get("max_set_size", 0))
    bins = int(cfg["calibration"]["ece_bins"])
    return {
        "fit_on": {k: int(len(v["labels"]) // 2) for k, v in stacks.items()},
        "calibration": {
            "method": method,
            **choice,
            "val_ece_pooled": {"meta": ece(p_meta, labels, bins), "no_meta": ece(p_none, labels, bins)},
        },
        "conformal": {
            "alpha": alpha,
            "n_cal_per_class": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        },
    }


def fit_photo_head(run: Runner, data: Data, cfg: dict[str, Any], log: Log) -> tuple[nd.Head, dict[str, Any]]:
    """Both head variants on the train roles, threshold and choice on the val roles."""
    ndc = cfg["not_dermoscopy"]
    derm_train = np.concatenate([d["train"].embedding for d in data.derm.values()])
    derm_val = {k: d["val"].embedding for k, d in data.derm.items()}
    first = next(iter(data.derm.values()))["train"]
    n_syn = min(int(ndc["synthetic_views"]), len(first.frame))
    synthetic = (
        nd.synthetic_views(run, first, n_syn, int(ndc["seed"]), cache_dir())
        if n_syn
        else np.zeros((0, derm_train.shape[1]))
    )
    chosen, heads, info = nd.compare_variants(
        data.photos["train"].embedding, derm_train, synthetic, data.photos["val"].embedding, derm_val, ndc
    )
    for name, f in info["val"].items():
        nd.log_head(log, name, f)
    info["train"] = {
        "photos": int(len(data.photos["train"].frame)),
        **{k: int(len(d["train"].frame)) for k, d in data.derm.items()},
    }
    info["rule"] = heads[chosen].rule
    return heads[chosen], info


def fit_sources(
    bundle: str | Path, cfg: dict | None = None, threads: int | None = None, log: Log = print
) -> dict:
    """Fit the pooled trust and the photo-trained not-dermoscopy head into `bundle` (trust.npz + card)."""
    bundle = Path(bundle)
    cfg = trust_settings(cfg)
    run = Runner(bundle, threads)
    classes = tuple(run.card.classes)
    data = load_data(run, cfg, ("train", "val"), log)
    state = TrustState.load(bundle / TRUST)
    report: dict[str, Any] = {"bundle_version": run.card.version, "precision": run.precision}
    report.update(fit_pooled(state, {k: d["val"] for k, d in data.derm.items()}, classes, cfg))
    head, report["not_dermoscopy"] = fit_photo_head(run, data, cfg, log)
    state.not_dermoscopy_weight, state.not_dermoscopy_bias = head.weight, head.bias
    state.not_dermoscopy_threshold = head.threshold
    state.info = {**state.info, "per_source": report}
    save_into_bundle(bundle, state)
    log(f"wrote {bundle / TRUST} and card.json")
    return report


__all__ = ["Data", "cache_dir", "fit_photo_head", "fit_pooled", "fit_sources", "load_data"]
