"""TrustState (everything a prediction's confidence needs: temperatures, OOD statistics, refer threshold,
CAM weights) and fit_trust(), the one call the export step makes. Loading and applying need numpy only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dermlens import config as configuration
from dermlens.data.taxonomy import COARSE_CLASSES, FINE_CODES, coarse_label
from dermlens.trust import ood, selective
from dermlens.trust.calibration import ece, fit_temperature, fit_temperature_tta, mean_softmax, nll, softmax

STATE_VERSION = 1


def trust_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """configs/trust.yaml <- a YAML file <- `key=value` overrides (the one config loader)."""
    return configuration.load("trust", path, list(overrides or []))


@dataclass
class TrustState:
    """Fitted trust statistics; saved as trust.npz beside the ONNX model."""

    temperature_fine: float = 1.0
    temperature_coarse: float = 1.0
    temperature_fine_tta: float | None = None  # per-view T when probabilities are averaged over TTA views
    temperature_coarse_tta: float | None = None
    ood_method: str = "msp"
    ood_threshold: float = float("inf")
    thresholds: dict[str, float] = field(default_factory=dict)  # per score method, same keep rate
    val_keep_rate: float = 1.0
    keep_target: float = 0.95
    min_confidence: float = 0.0
    normalize: bool = True
    knn_k: int = 10
    class_means: np.ndarray | None = None  # [C, D]
    precision: np.ndarray | None = None  # [D, D]
    knn_bank: np.ndarray | None = None  # [M, D] float16
    cam_weight: np.ndarray | None = None  # [C, D]
    info: dict[str, Any] = field(default_factory=dict)  # fit provenance and validation figures
    # ---- calibration per condition, conformal sets, not-dermoscopy head (trust.refit) ----------------
    calibration_method: str = "temperature"
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # condition -> {w, b}
    conformal_alpha: float | None = None
    conformal_thresholds: dict[str, list[float]] = field(default_factory=dict)  # condition -> q_c [C]
    clinical_weight: np.ndarray | None = None  # [D] not-dermoscopy logistic head on the L2 embedding
    clinical_bias: float = 0.0
    clinical_threshold: float = float("inf")
    max_set_size: int = 0  # refer when the prediction set has at least this many classes (0 = never)

    _ARRAYS = ("class_means", "precision", "knn_bank", "cam_weight", "clinical_weight")

    # ---- scoring -------------------------------------------------------------------------------------
    def score(self, method: str, fine_logits: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        """OOD score of one method (higher = more out-of-distribution)."""
        if method == "msp":
            return ood.msp_score(fine_logits, self.temperature_fine)
        if method == "energy":
            return ood.energy_score(fine_logits, 1.0)
        if embedding is None:
            raise ValueError(f"OOD method {method!r} needs the model's embedding output")
        if method == "mahalanobis":
            if self.class_means is None or self.precision is None:
                raise ValueError("this TrustState has no Mahalanobis statistics")
            return ood.mahalanobis_score(
                embedding, self.class_means, self.precision, self.normalize, self._mahalanobis_terms
            )
        if method == "knn":
            if self.knn_bank is None:
                raise ValueError("this TrustState has no kNN bank")
            return ood.knn_score(embedding, self.knn_bank, self.knn_k)
        raise ValueError(f"unknown OOD method {method!r}; choose from {ood.METHODS}")

    @cached_property
    def _mahalanobis_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Constants of the Mahalanobis score, computed once per loaded state."""
        return ood.mahalanobis_terms(self.class_means, self.precision)

    def tta_probs(self, view_logits: np.ndarray, head: str = "fine") -> np.ndarray:
        """Average of calibrated per-view probabilities, view_logits [V, N, C], with the TTA temperature."""
        t = self.temperature_fine_tta if head == "fine" else self.temperature_coarse_tta
        if t is None:
            t = self.temperature_fine if head == "fine" else self.temperature_coarse
        return mean_softmax(view_logits, t)

    def calibrated(self, fine_logits: np.ndarray, has_meta: np.ndarray | None = None) -> np.ndarray:
        """Calibrated fine probabilities, each image with its condition's parameters (metadata given or
        not); the single fine temperature when no per-condition calibration was fitted."""
        if not self.calibration:
            return softmax(fine_logits, self.temperature_fine)
        from dermlens.trust.scaling import calibrate

        n = len(fine_logits)
        cond = np.ones(n, bool) if has_meta is None else np.asarray(has_meta, bool)
        return calibrate(fine_logits, cond, self.calibration)

    def prediction_sets(self, probs: np.ndarray, has_meta: np.ndarray | None = None) -> np.ndarray | None:
        """Conformal prediction sets [N, C] bool (Mondrian, coverage 1 - alpha), or None if not fitted."""
        if not self.conformal_thresholds:
            return None
        from dermlens.trust.conformal import prediction_sets

        probs = np.asarray(probs, dtype=np.float64)
        cond = np.ones(len(probs), bool) if has_meta is None else np.asarray(has_meta, bool)
        out = np.zeros(probs.shape, bool)
        for name, sel in (("meta", cond), ("no_meta", ~cond)):
            if sel.any():
                q = self.conformal_thresholds.get(name) or self.conformal_thresholds["meta"]
                out[sel] = prediction_sets(probs[sel], np.asarray(q))
        return out

    def not_dermoscopy_score(self, embedding: np.ndarray | None) -> np.ndarray | None:
        """Logit of the not-dermoscopy head (higher = more like a clinical photo), None if not fitted."""
        if self.clinical_weight is None or embedding is None:
            return None
        from dermlens.trust.clinical import score

        return score(embedding, self.clinical_weight, self.clinical_bias)

    def decide(
        self,
        fine_logits: np.ndarray,
        embedding: np.ndarray | None = None,
        has_meta: np.ndarray | None = None,
        probs: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Everything the refer rule uses for a batch: calibrated probs, prediction sets, the four flags
        (OOD, not dermoscopy, low confidence, set too large), refer and the reason codes per image.
        `probs` overrides the calibrated probabilities (e.g. TTA-averaged ones)."""
        probs = self.calibrated(fine_logits, has_meta) if probs is None else np.asarray(probs, np.float64)
        score = self.ood_score(fine_logits, embedding)
        sets = self.prediction_sets(probs, has_meta)
        nd = self.not_dermoscopy_score(embedding)
        n = len(probs)
        flags = {
            "ood": score > self.ood_threshold,
            "not_dermoscopy": np.zeros(n, bool) if nd is None else nd > self.clinical_threshold,
            "low_confidence": probs.max(axis=1) < self.min_confidence,
            "set_too_large": np.zeros(n, bool)
            if sets is None or self.max_set_size <= 0
            else sets.sum(axis=1) >= self.max_set_size,
        }
        refer = np.zeros(n, bool)
        for f in flags.values():
            refer |= f
        return {
            "probs": probs,
            "ood_score": score,
            "not_dermoscopy_score": nd,
            "sets": sets,
            **flags,
            "refer": refer,
            "refer_codes": selective.refer_codes(flags),
        }

    def ood_score(self, fine_logits: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        """Score of the default method."""
        return self.score(self.ood_method, fine_logits, embedding)

    def assess(
        self,
        fine_logits: np.ndarray,
        coarse_logits: np.ndarray | None = None,
        embedding: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Calibrated probabilities, OOD score/flag and the refer decision for a batch of model outputs."""
        probs = softmax(fine_logits, self.temperature_fine)
        out: dict[str, np.ndarray] = {"probs": probs}
        if coarse_logits is not None:
            out["coarse_probs"] = softmax(coarse_logits, self.temperature_coarse)
        score = self.ood_score(fine_logits, embedding)
        out["ood_score"] = score
        out["ood"] = score > self.ood_threshold
        out["low_confidence"] = probs.max(axis=1) < self.min_confidence
        out["refer"] = selective.refer_decision(probs, score, self)
        return out

    # ---- card + file ---------------------------------------------------------------------------------
    def card_fields(self) -> dict[str, Any]:
        """The card.json `ood` section: method, threshold, val_keep_rate (plus per-method thresholds)."""
        return {
            "method": self.ood_method,
            "threshold": self.ood_threshold,
            "val_keep_rate": self.val_keep_rate,
            "keep_target": self.keep_target,
            "higher_is_ood": True,
            "thresholds": dict(self.thresholds),
        }

    def card_sections(self) -> dict[str, Any]:
        """All card.json sections the trust layer owns: temperature, ood, refer."""
        return {
            "temperature": {
                "fine": self.temperature_fine,
                "coarse": self.temperature_coarse,
                **({"fine_tta": self.temperature_fine_tta} if self.temperature_fine_tta else {}),
                **({"coarse_tta": self.temperature_coarse_tta} if self.temperature_coarse_tta else {}),
            },
            "ood": self.card_fields(),
            "refer": {
                "min_confidence": self.min_confidence,
                "max_set_size": self.max_set_size,
                "not_dermoscopy_threshold": self.clinical_threshold
                if np.isfinite(self.clinical_threshold)
                else None,
                "rule": selective.RULE,
            },
            **self.shift_sections(),
        }

    def shift_sections(self) -> dict[str, Any]:
        """card.json sections of the per-condition calibration, conformal sets and not-dermoscopy head."""
        out: dict[str, Any] = {}
        if self.calibration:
            out["calibration"] = {"method": self.calibration_method, "conditions": self.calibration}
        if self.conformal_thresholds:
            out["conformal"] = {
                "alpha": self.conformal_alpha,
                "coverage": None if self.conformal_alpha is None else 1.0 - self.conformal_alpha,
                "score": "1 - p_class (LAC), Mondrian by true class, split-conformal on validation",
                "thresholds": self.conformal_thresholds,
            }
        if self.clinical_weight is not None:
            out["not_dermoscopy"] = {
                "head": "logistic regression on the L2-normalized embedding",
                "threshold": self.clinical_threshold,
            }
        return out

    def save(self, path: str | Path) -> Path:
        """Write trust.npz (arrays + a JSON header); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [f.name for f in fields(self) if f.name not in self._ARRAYS]
        header = {k: getattr(self, k) for k in names}
        header["version"] = STATE_VERSION
        arrays = {k: getattr(self, k) for k in self._ARRAYS if getattr(self, k) is not None}
        arrays = {
            k: (v.astype(np.float16) if k == "knn_bank" else v.astype(np.float32)) for k, v in arrays.items()
        }
        if "precision" in arrays:  # symmetric: store the upper triangle only (half the file)
            p = arrays.pop("precision")
            arrays["precision_triu"] = p[np.triu_indices(p.shape[0])]
        with open(path, "wb") as fh:
            np.savez_compressed(fh, header=np.array(json.dumps(header, default=float)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrustState:
        """Read trust.npz written by save()."""
        with np.load(Path(path), allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {k: np.array(z[k]) for k in cls._ARRAYS if k in z.files}
            if "precision_triu" in z.files:
                arrays["precision"] = _unpack_symmetric(np.array(z["precision_triu"]))
        header.pop("version", None)
        known = {k: v for k, v in header.items() if k in cls.__dataclass_fields__}
        return cls(**known, **arrays)


def _unpack_symmetric(triu: np.ndarray) -> np.ndarray:
    """Rebuild a symmetric [D, D] matrix from its packed upper triangle (row-major, diagonal included)."""
    d = int(round((np.sqrt(8 * len(triu) + 1) - 1) / 2))
    m = np.zeros((d, d), dtype=triu.dtype)
    m[np.triu_indices(d)] = triu
    return m + np.triu(m, 1).T


def coarse_from_fine(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Benign/malignant index (COARSE_CLASSES order) for fine class indices in taxonomy order."""
    classes = FINE_CODES[:n_classes]
    malignant = np.array([COARSE_CLASSES.index(coarse_label(c)) for c in classes])
    return malignant[np.asarray(labels, dtype=np.int64)]


def _cfg(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """configs/trust.yaml with `cfg` (sections, partial) merged on top and checked."""
    return configuration.load("trust", layers=[("trust settings", cfg or {})])


def _min_confidence(probs: np.ndarray, labels: np.ndarray, refer_cfg: dict[str, Any]) -> tuple[float, str]:
    """Refer threshold on calibrated top probability, chosen on validation as configured."""
    if refer_cfg.get("min_confidence") is not None:
        return float(refer_cfg["min_confidence"]), "fixed"
    if refer_cfg.get("target_risk") is not None:
        return selective.confidence_for_risk(probs, labels, float(refer_cfg["target_risk"])), "target_risk"
    cov = refer_cfg.get("target_coverage")
    if cov is not None:
        return selective.confidence_for_coverage(probs, float(cov)), "target_coverage"
    return 0.0, "none"


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
    cfg = _cfg(cfg)
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
        means, precision, alpha = ood.fit_gaussian(
            fit_emb, np.asarray(fit_lab), n_classes, c_ood["shrinkage"], state.normalize
        )
        state.class_means, state.precision = means, precision
        rng = np.random.default_rng(int(c_ood.get("seed", 0)))
        m = min(int(c_ood["knn_bank"]), len(fit_emb))
        state.knn_bank = ood.l2_normalize(fit_emb[np.sort(rng.choice(len(fit_emb), m, replace=False))])
        info["ood_fit"] = {
            "source": "train" if train_embeddings is not None else "val",
            "n": len(fit_emb),
            "shrinkage": alpha,
            "knn_bank": m,
        }
    methods = [mt for mt in ood.METHODS if emb is not None or mt in ("msp", "energy")]
    keep = state.keep_target
    for mt in methods:
        scores = state.score(mt, fine, emb)
        state.thresholds[mt] = ood.threshold_for_keep(scores, keep)
    method = c_ood["method"] if c_ood["method"] in state.thresholds else "msp"
    state.ood_method, state.ood_threshold = method, state.thresholds[method]
    val_scores = state.score(method, fine, emb)
    state.val_keep_rate = float((val_scores <= state.ood_threshold).mean())
    probs = softmax(fine, t_fine)
    state.min_confidence, rule = _min_confidence(probs, labels, cfg["refer"])
    refer = selective.refer_decision(probs, val_scores, state)
    info["refer"] = {"rule": rule, **selective.selective_summary(probs, labels, refer)}
    fit_tta(state, val, bounds)
    if cam_weight is not None:
        state.cam_weight = np.asarray(cam_weight, dtype=np.float32)
    return state
