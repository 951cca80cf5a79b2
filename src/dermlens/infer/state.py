"""TrustState: everything a prediction's confidence needs (temperatures, per-condition calibration, OOD
statistics and thresholds, conformal thresholds, not-dermoscopy head, refer thresholds, CAM weights), read
from and written to trust.npz, and applied to model outputs. numpy only; fitting is dermlens.trust."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.errors import BundleError
from dermlens.infer.calibration import calibrate, mean_softmax, softmax
from dermlens.infer.conformal import prediction_sets
from dermlens.infer.ood import (
    METHODS,
    energy_score,
    knn_score,
    mahalanobis_score,
    mahalanobis_terms,
    msp_score,
    not_dermoscopy_score,
)
from dermlens.infer.refer import RULE, refer_codes

STATE_VERSION = 1
# trust.npz names written by older bundles -> today's field names
_OLD_NAMES = {
    "clinical_weight": "not_dermoscopy_weight",
    "clinical_bias": "not_dermoscopy_bias",
    "clinical_threshold": "not_dermoscopy_threshold",
}


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
    inv_covariance: np.ndarray | None = None  # [D, D] Mahalanobis matrix (trust.npz: precision_triu)
    knn_bank: np.ndarray | None = None  # [M, D] float16
    cam_weight: np.ndarray | None = None  # [C, D]
    info: dict[str, Any] = field(default_factory=dict)  # fit provenance and validation figures
    # ---- calibration per condition, conformal sets, not-dermoscopy head (trust.refit) ----------------
    calibration_method: str = "temperature"
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # condition -> {w, b}
    conformal_alpha: float | None = None
    conformal_thresholds: dict[str, list[float]] = field(default_factory=dict)  # condition -> q_c [C]
    not_dermoscopy_weight: np.ndarray | None = None  # [D] not-dermoscopy logistic head on the L2 embedding
    not_dermoscopy_bias: float = 0.0
    not_dermoscopy_threshold: float = float("inf")
    max_set_size: int = 0  # refer when the prediction set has at least this many classes (0 = never)
    # ---- refer operating point (trust.operating_point; applied by infer.operating_point) -------------
    refer_quantiles: np.ndarray | None = None  # [101] val top-prob quantiles of images no other flag refers
    refer_other_rate: float = 0.0  # val share referred by the other flags (OOD, not dermoscopy, set size)
    accept_rate: float | None = None  # the packaged operating point: val share accepted by all four flags

    _ARRAYS = (
        "class_means",
        "inv_covariance",
        "knn_bank",
        "cam_weight",
        "not_dermoscopy_weight",
        "refer_quantiles",
    )

    # ---- scoring -------------------------------------------------------------------------------------
    def score(self, method: str, fine_logits: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        """OOD score of one method (higher = more out-of-distribution)."""
        if method == "msp":
            return msp_score(fine_logits, self.temperature_fine)
        if method == "energy":
            return energy_score(fine_logits, 1.0)
        if embedding is None:
            raise ValueError(f"OOD method {method!r} needs the model's embedding output")
        if method == "mahalanobis":
            if self.class_means is None or self.inv_covariance is None:
                raise ValueError("this TrustState has no Mahalanobis statistics")
            return mahalanobis_score(
                embedding, self.class_means, self.inv_covariance, self.normalize, self._mahalanobis_terms
            )
        if method == "knn":
            if self.knn_bank is None:
                raise ValueError("this TrustState has no kNN bank")
            return knn_score(embedding, self.knn_bank, self.knn_k)
        raise ValueError(f"unknown OOD method {method!r}; choose from {METHODS}")

    @cached_property
    def _mahalanobis_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Constants of the Mahalanobis score, computed once per loaded state."""
        return mahalanobis_terms(self.class_means, self.inv_covariance)

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
        n = len(fine_logits)
        cond = np.ones(n, bool) if has_meta is None else np.asarray(has_meta, bool)
        return calibrate(fine_logits, cond, self.calibration)

    def prediction_sets(self, probs: np.ndarray, has_meta: np.ndarray | None = None) -> np.ndarray | None:
        """Conformal prediction sets [N, C] bool (Mondrian, coverage 1 - alpha), or None if not fitted."""
        if not self.conformal_thresholds:
            return None
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
        if self.not_dermoscopy_weight is None or embedding is None:
            return None
        return not_dermoscopy_score(embedding, self.not_dermoscopy_weight, self.not_dermoscopy_bias)

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
            "not_dermoscopy": np.zeros(n, bool) if nd is None else nd > self.not_dermoscopy_threshold,
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
            "refer_codes": refer_codes(flags),
        }

    def ood_score(self, fine_logits: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        """Score of the default method."""
        return self.score(self.ood_method, fine_logits, embedding)

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
                "not_dermoscopy_threshold": self.not_dermoscopy_threshold
                if np.isfinite(self.not_dermoscopy_threshold)
                else None,
                "rule": RULE,
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
        if self.not_dermoscopy_weight is not None:
            out["not_dermoscopy"] = {
                "head": "logistic regression on the L2-normalized embedding",
                "threshold": self.not_dermoscopy_threshold,
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
        if "inv_covariance" in arrays:  # symmetric: store the upper triangle only (half the file)
            p = arrays.pop("inv_covariance")
            arrays["precision_triu"] = p[np.triu_indices(p.shape[0])]
        with open(path, "wb") as fh:
            np.savez_compressed(fh, header=np.array(json.dumps(header, default=float)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrustState:
        """Read trust.npz written by save() (older key names too); an unreadable file is a BundleError."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {
                    _OLD_NAMES.get(k, k): np.array(z[k])
                    for k in z.files
                    if _OLD_NAMES.get(k, k) in cls._ARRAYS
                }
                if "precision_triu" in z.files:
                    arrays["inv_covariance"] = _unpack_symmetric(np.array(z["precision_triu"]))
            header.pop("version", None)
            header = {_OLD_NAMES.get(k, k): v for k, v in header.items()}
            known = {k: v for k, v in header.items() if k in cls.__dataclass_fields__}
            return cls(**known, **arrays)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            raise BundleError(f"{path} is not a readable trust file: {str(e)[:200]}") from None


def _unpack_symmetric(triu: np.ndarray) -> np.ndarray:
    """Rebuild a symmetric [D, D] matrix from its packed upper triangle (row-major, diagonal included)."""
    d = int(round((np.sqrt(8 * len(triu) + 1) - 1) / 2))
    m = np.zeros((d, d), dtype=triu.dtype)
    m[np.triu_indices(d)] = triu
    return m + np.triu(m, 1).T
