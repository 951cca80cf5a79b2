"""fit_trust(): temperatures, OOD statistics + thresholds and the refer threshold fitted from model outputs
into a TrustState (dermlens.infer.state, which applies them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dermlens import config as configuration
from dermlens.data.taxonomy import COARSE_CLASSES, FINE_CODES, coarse_label
from dermlens.infer.calibration import softmax
from dermlens.infer.ood import METHODS, l2_normalize
from dermlens.infer.state import TrustState
from dermlens.metrics import ece
from dermlens.trust import ood, selective
from dermlens.trust.calibration import fit_temperature, fit_temperature_tta, nll
from dermlens.trust.refer_point import store_table


def trust_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """configs/trust.yaml <- a YAML file <- `key=value` overrides (the one config loader)."""
    return configuration.load("trust", path, list(overrides or []))


def coarse_from_fine(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Benign/malignant index (COARSE_CLASSES order) for fine class indices in taxonomy order."""
    classes = FINE_CODES[:n_classes]
    malignant = np.array([COARSE_CLASSES.index(coarse_label(c)) for c in classes])
    return malignant[np.asarray(labels, dtype=np.int64)]


def trust_settings(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """configs/trust.yaml with `cfg` (sections, partial) merged on top and checked."""
    return configuration.load("trust", layers=[("trust settings", cfg or {})])


def fit_tta(
    state: TrustState, val: dict[str, np.ndarray], bounds: tuple[float, float] = (0.05, 20.0)
) -> None:
    """Fit the TTA temperatures in place from val["fine_logits_views"] / ["coarse_logits_views"] [V, N, C]."""
    labels = np.asarray(val["labels"], dtype=np.int64)
    if val.get("fine_logits_views") is not None:
        state.temperature_fine_tta = fit_temperature_tta(val["fine_logits_views"], labels, bounds)
    if val.get("coarse_logits_views") is not None:
        views = np.asarray(val["coarse_logits_views"])
        clab = val.get("coarse_labels")
        clab = coarse_from_fine(labels, np.asarray(val["fine_logits"]).shape[1]) if clab is None else clab
        state.temperature_coarse_tta = fit_temperature_tta(views, clab, bounds)


def fit_trust(
    val: dict[str, np.ndarray],
    train_embeddings: np.ndarray | None,
    train_labels: np.ndarray | None,
    cfg: dict[str, Any] | None = None,
    cam_weight: np.ndarray | None = None,
) -> TrustState:
    """Fit temperatures, OOD statistics + thresholds and the refer threshold from model outputs.

    val: fine_logits [N,C], coarse_logits [N,2], embedding [N,D], labels [N] (fine class index), optional
    coarse_labels [N] (else derived from fine labels in taxonomy order); train_*: embeddings for the
    class means / kNN bank (falls back to val when None). cfg overrides trust.yaml sections.
    Optional fine_logits_views / coarse_logits_views [V,N,C] (logits of the TTA views, identity first)
    also fit the TTA temperatures (TrustState.tta_probs); without them TTA reuses the single-view T.
    """
    cfg = trust_settings(cfg)
    c_cal, c_ood = cfg["calibration"], cfg["ood"]
    bounds = tuple(c_cal.get("bounds", (0.05, 20.0)))
    fine, labels = np.asarray(val["fine_logits"]), np.asarray(val["labels"], dtype=np.int64)
    n_classes = fine.shape[1]
    t_fine = fit_temperature(fine, labels, bounds)
    t_coarse = 1.0
    info: dict[str, Any] = {"n_val": len(labels)}
    if val.get("coarse_logits") is not None:
        coarse = np.asarray(val["coarse_logits"])
        clab = np.asarray(
            val["coarse_labels"]
            if val.get("coarse_labels") is not None
            else coarse_from_fine(labels, n_classes),
            dtype=np.int64,
        )
        t_coarse = fit_temperature(coarse, clab, bounds)
        info["coarse"] = {"nll_before": nll(coarse, clab), "nll_after": nll(coarse, clab, t_coarse)}
    bins = int(c_cal["ece_bins"])
    info["fine"] = {
        "nll_before": nll(fine, labels),
        "nll_after": nll(fine, labels, t_fine),
        "ece_before": ece(softmax(fine), labels, bins),
        "ece_after": ece(softmax(fine, t_fine), labels, bins),
    }
    state = TrustState(
        temperature_fine=t_fine,
        temperature_coarse=t_coarse,
        normalize=bool(c_ood["normalize"]),
        knn_k=int(c_ood["knn_k"]),
        keep_target=float(c_ood["keep_rate"]),
        info=info,
    )
    emb = val.get("embedding")
    if emb is not None:
        fit_emb, fit_lab = (train_embeddings, train_labels) if train_embeddings is not None else (emb, labels)
        fit_emb = np.asarray(fit_emb, dtype=np.float64)
        means, inv_cov, alpha = ood.fit_gaussian(
            fit_emb, np.asarray(fit_lab), n_classes, c_ood["shrinkage"], state.normalize
        )
        state.class_means, state.inv_covariance = means, inv_cov
        rng = np.random.default_rng(int(c_ood.get("seed", 0)))
        m = min(int(c_ood["knn_bank"]), len(fit_emb))
        state.knn_bank = l2_normalize(fit_emb[np.sort(rng.choice(len(fit_emb), m, replace=False))])
        info["ood_fit"] = {
            "source": "train" if train_embeddings is not None else "val",
            "n": len(fit_emb),
            "shrinkage": alpha,
            "knn_bank": m,
        }
    methods = [mt for mt in METHODS if emb is not None or mt in ("msp", "energy")]
    keep = state.keep_target
    for mt in methods:
        scores = state.score(mt, fine, emb)
        state.thresholds[mt] = ood.threshold_for_keep(scores, keep)
    method = c_ood["method"] if c_ood["method"] in state.thresholds else "msp"
    state.ood_method, state.ood_threshold = method, state.thresholds[method]
    val_scores = state.score(method, fine, emb)
    state.val_keep_rate = float((val_scores <= state.ood_threshold).mean())
    probs = softmax(fine, t_fine)
    ood_flag = val_scores > state.ood_threshold
    store_table(state, probs.max(axis=1), ood_flag, float(cfg["refer"]["accept_rate"]))
    refer = state.decide(fine, emb)["refer"]  # the one refer rule (trust/shift.py refits its other parts)
    info["refer"] = {"rule": "accept_rate", **selective.selective_summary(probs, labels, refer)}
    fit_tta(state, val, bounds)
    if cam_weight is not None:
        state.cam_weight = np.asarray(cam_weight, dtype=np.float32)
    return state
