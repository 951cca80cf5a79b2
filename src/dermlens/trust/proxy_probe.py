"""Measure the "not dermoscopy" refusal on a visible PROXY probe (there is no clinical photo set here):
held-out test images turned into clinical-like views (another seed than the head was trained with), the
scikit-image photos and crops, versus the in-distribution test split and a real external dermoscopy set.

Also a leave-one-family-out check: the head trained on one geometry family only, scored on the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.bundle import TRUST
from dermlens.infer.ood import not_dermoscopy_score
from dermlens.infer.state import TrustState
from dermlens.metrics import auroc
from dermlens.settings import cpu_name
from dermlens.trust import photo_views, probes
from dermlens.trust.outputs import trust_settings
from dermlens.trust.shift import Runner, load_rows, no_meta

PROBE_SEED = 777  # views of the probe: never the head's training seed


def _rates(state: TrustState, out: dict[str, np.ndarray]) -> dict[str, Any]:
    d = state.decide(out["fine_logits"], out["embedding"], None)
    return {
        "n": int(len(out["fine_logits"])),
        "refused_not_dermoscopy": float(d["not_dermoscopy"].mean()),
        "refused_ood": float(d["ood"].mean()),
        "refused_either": float((d["not_dermoscopy"] | d["ood"]).mean()),
        "referred_any_reason": float(d["refer"].mean()),
        "nd_score": d["not_dermoscopy_score"],
        "ood_score": d["ood_score"],
    }


def measure_not_dermoscopy(
    bundle: str | Path,
    manifest: str | Path,
    external: str | Path | None = None,
    lofo_train: int = 300,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The proxy-probe figures as a JSON-ready dict."""
    bundle = Path(bundle)
    state = TrustState.load(bundle / TRUST)
    if state.not_dermoscopy_weight is None:
        raise ValueError(f"{bundle} has no not-dermoscopy head: run `dermlens trust fit` first")
    run = Runner(bundle, threads)
    classes = tuple(run.card.classes)
    test = load_rows(manifest, "test", classes, run.prep)
    test_out = run(test.images, test.meta)
    test_none = run(test.images, no_meta(len(test.labels)))
    ind = _rates(state, test_out)
    log(f"scored {ind['n']} in-distribution test images")
    probe: dict[str, np.ndarray] = {
        f"test_{fam}": run.views(photo_views.clinical_views(test.images, PROBE_SEED + i, fam))
        for i, fam in enumerate(photo_views.FAMILIES)
    }
    probe.update(probes.probe_sets(run.prep, ("skimage_photos", "skimage_crops")))
    sets: dict[str, Any] = {}
    nd_scores: dict[str, np.ndarray] = {}
    embeddings: dict[str, np.ndarray] = {}
    for name, imgs in probe.items():
        out = run(imgs, no_meta(len(imgs)))
        r = _rates(state, out)
        nd_scores[name], embeddings[name] = r["nd_score"], out["embedding"]
        sets[name] = {
            "n": r["n"],
            "auroc_not_dermoscopy": auroc(ind["nd_score"], r["nd_score"]),
            "auroc_ood_mahalanobis": auroc(ind["ood_score"], r["ood_score"]),
            "refused_not_dermoscopy": r["refused_not_dermoscopy"],
            "refused_ood": r["refused_ood"],
            "refused_either": r["refused_either"],
        }
        log(f"probe {name}: AUROC {sets[name]['auroc_not_dermoscopy']:.3f}")
    near = [k for k in sets if k.startswith("test_")]
    nd_near = np.concatenate([nd_scores[k] for k in near])
    result: dict[str, Any] = {
        "model_version": run.card.version,
        "precision": run.precision,
        "cpu": cpu_name(),
        "proxy_note": "PROXY probe: synthetic clinical-like views of held-out HAM10000 test images and "
        "scikit-image photos; no real clinical photographs were available, so real-world separation is "
        "unmeasured.",
        "in_distribution_test": {k: v for k, v in ind.items() if not k.endswith("_score")},
        "near_ood_auroc_not_dermoscopy": auroc(ind["nd_score"], nd_near),
        "probe_sets": sets,
        "threshold": state.not_dermoscopy_threshold,
    }
    result["ham_test"] = trust_figures(state, test, {"meta": test_out, "no_meta": test_none}, classes)
    if external is not None:
        ext = load_rows(external, "test", classes, run.prep)
        ext_out = run(ext.images, ext.meta)
        r = _rates(state, ext_out)
        result["external_dermoscopy_test"] = {k: v for k, v in r.items() if not k.endswith("_score")}
        result["external_test"] = trust_figures(state, ext, {"no_meta": ext_out}, classes)
        log(f"external test: {r['refused_not_dermoscopy']:.3f} refused as not dermoscopy")
    views = {fam: embeddings[f"test_{fam}"] for fam in photo_views.FAMILIES}
    result["leave_one_family_out"] = _lofo(run, manifest, classes, test_out["embedding"], views, lofo_train)
    return result


def trust_figures(state: TrustState, rows: Any, outs: dict[str, dict], classes: tuple[str, ...]) -> dict:
    """ECE, conformal coverage and set size (overall, per class) per condition with lesion-level CIs, the
    refer-reason rates, and the subgroup audit of the 'meta' condition (same functions as evaluate)."""
    from dermlens.evaluate import EvaluateConfig
    from dermlens.evaluate.audit import coverage_with_ci, ece_with_ci, subgroup_audit

    cfg = EvaluateConfig.load()
    groups = rows.frame["group_id"].astype(str).tolist() if "group_id" in rows.frame.columns else None
    out: dict[str, Any] = {"n_images": int(len(rows.labels))}
    for cond, o in outs.items():
        has_meta = np.full(len(rows.labels), cond == "meta") & (rows.has_meta if cond == "meta" else True)
        d = state.decide(o["fine_logits"], o["embedding"], has_meta)
        out[cond] = {
            "calibration": ece_with_ci(d["probs"], rows.labels, groups, cfg),
            "conformal": coverage_with_ci(d["sets"], rows.labels, classes, groups, cfg),
            "refer_reasons": {
                k: float(np.mean(d[k]))
                for k in ("ood", "not_dermoscopy", "low_confidence", "set_too_large", "refer")
            },
        }
        if cond == "meta":
            out["subgroups"] = subgroup_audit(
                rows.frame, d["probs"], rows.labels, classes, d["refer"], groups, cfg
            )
    return out


def _lofo(
    run: Runner,
    manifest: str | Path,
    classes: tuple[str, ...],
    test_in: np.ndarray,
    test_emb: dict[str, np.ndarray],
    n: int,
) -> dict[str, Any]:
    """Head trained on one family's views only, AUROC on the held-out test views of every family
    (test embeddings: the in-distribution test images and their probe views, already computed)."""
    cfg = trust_settings(None)["not_dermoscopy"]
    train = load_rows(manifest, "train", classes, run.prep, limit=n)
    z = no_meta(len(train.labels))
    emb_in = run(train.images, z)["embedding"]
    out = {}
    for i, fam in enumerate(photo_views.FAMILIES):
        emb_out = run(run.views(photo_views.clinical_views(train.images, 100 + i, fam)), z)["embedding"]
        w, b = photo_views.fit_head(emb_in, emb_out, float(cfg.get("C", 0.1)))
        s_in = not_dermoscopy_score(test_in, w, b)
        out[f"trained_on_{fam}"] = {
            f"auroc_{other}": auroc(s_in, not_dermoscopy_score(test_emb[other], w, b))
            for other in photo_views.FAMILIES
        }
    out["train_images"] = int(len(train.labels))
    return out


__all__ = ["cpu_name", "measure_not_dermoscopy"]
