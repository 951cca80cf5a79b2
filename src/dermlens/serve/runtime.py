"""Torch-free inference: a model bundle's ONNX graph under onnxruntime, plus the trust layer (numpy).

`Predictor.load()` opens the packaged release bundle (or any bundle folder); `predict_arrays` scores a
batch of decoded images, `predict_file` / `predict_bytes` score one image for people and the API.
Imports onnxruntime, numpy and Pillow only; never torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.bundle import ONNX_FP32, ONNX_INT8, TRUST, BundleError, ModelCard, read_card, release_dir
from dermlens.metadata import META_DIM, encode_metadata, missing_vector
from dermlens.preprocess import DEFAULT_MAX_PIXELS, Preprocessing, load_rgb

OUTPUTS: tuple[str, ...] = ("fine_logits", "coarse_logits", "embedding", "feature_map")
PRECISIONS: dict[str, str] = {"fp32": ONNX_FP32, "int8": ONNX_INT8}
CAM_MAX_SIDE = 600  # longest side of the CAM overlay PNG


def cpu_count() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, spin: bool = False):
    """onnxruntime options: all graph optimizations, `threads` intra-op threads (default: every core).

    Spin-waiting threads are off by default: they win a little on an idle machine but slow everything
    down when decoding threads or other processes share the cores.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or cpu_count())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


class OnnxModel:
    """One ONNX graph with inputs `image` (+ `meta`) and the four dermlens outputs."""

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = False) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"no ONNX model at {self.path}")
        self.session = ort.InferenceSession(
            str(self.path), session_options(threads, spin), providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = [o for o in OUTPUTS if o not in self.outputs]
        if "image" not in self.inputs or missing:
            raise BundleError(f"{self.path} lacks the dermlens input `image` or outputs {missing}")

    def run(
        self, x: np.ndarray, meta: np.ndarray | None = None, feature_map: bool = True
    ) -> dict[str, np.ndarray]:
        """Normalized float32 [N,3,H,W] (+ meta [N,META_DIM]) -> the model outputs by name."""
        feeds: dict[str, np.ndarray] = {"image": np.ascontiguousarray(x, dtype=np.float32)}
        if "meta" in self.inputs:
            m = np.zeros((len(x), META_DIM), np.float32) if meta is None else meta
            feeds["meta"] = np.ascontiguousarray(m, dtype=np.float32)
        names = list(OUTPUTS if feature_map else OUTPUTS[:3])
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def run_images(
        self,
        images: np.ndarray,
        prep: Preprocessing,
        meta: np.ndarray | None = None,
        batch_size: int = 32,
        feature_map: bool = False,
    ) -> dict[str, np.ndarray]:
        """uint8 NxHxWx3 images already at the model size (e.g. the data cache) -> concatenated outputs."""
        parts: list[dict[str, np.ndarray]] = []
        for s in range(0, len(images), batch_size):
            x = prep.normalize(np.asarray(images[s : s + batch_size]))
            m = None if meta is None else meta[s : s + batch_size]
            parts.append(self.run(x, m, feature_map))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def encode_meta(meta: list[dict[str, Any] | None] | None, n: int) -> np.ndarray:
    """Patient metadata dicts (age, sex, site; any missing) -> float32 [n, META_DIM]."""
    if meta is None:
        return np.stack([encode_metadata() for _ in range(n)]) if n else np.zeros((0, META_DIM), np.float32)
    if len(meta) != n:
        raise ValueError(f"got {len(meta)} metadata rows for {n} images")
    return np.stack([encode_metadata(**_meta_fields(m)) for m in meta]).astype(np.float32)


def meta_given(meta: list[dict[str, Any] | None] | None, n: int) -> np.ndarray:
    """Per image: True when any of age, sex, site was given (selects the 'meta' calibration condition)."""
    if meta is None:
        return np.zeros(n, bool)
    none = missing_vector()  # the one metadata encoding decides: NaN, blanks and unknown values are missing
    return np.array([not np.array_equal(encode_metadata(**_meta_fields(m)), none) for m in meta], bool)


def _meta_fields(m: dict[str, Any] | None) -> dict[str, Any]:
    m = m or {}
    return {"age": m.get("age"), "sex": m.get("sex"), "site": m.get("site")}


@dataclass
class PredictResult:
    """One image's prediction, ready for JSON (bytes aside)."""

    fine: dict[str, float]
    coarse: dict[str, float]
    top: str
    confidence: float
    p_malignant: float
    ood_score: float
    ood: bool
    refer: bool
    refer_reason: str | None
    model_version: str
    precision: str
    timing_ms: dict[str, float] = field(default_factory=dict)
    refer_codes: list[str] = field(default_factory=list)  # machine-readable: ood, not_dermoscopy, ...
    prediction_set: list[str] | None = None  # conformal set, most probable first; None if not fitted
    set_coverage: float | None = None  # the set's target coverage (1 - alpha)
    not_dermoscopy: bool = False
    not_dermoscopy_score: float | None = None
    calibration_condition: str = "meta"  # "meta" (age/sex/site given) or "no_meta"
    image_size: tuple[int, int] | None = None  # (width, height) of the decoded input
    cam_png: bytes | None = None

    def to_dict(self, include_cam: bool = False) -> dict[str, Any]:
        """Plain dict; the CAM PNG only when asked (it is binary)."""
        d = asdict(self)
        if not include_cam:
            d.pop("cam_png")
        return d


def refer_reasons(
    ood: np.ndarray, low_confidence: np.ndarray, codes: list[list[str]] | None = None
) -> list[str | None]:
    """Plain-words reason per image for the refer flag (from the reason codes when given), None when not
    referred."""
    from dermlens.trust.selective import refer_message

    if codes is None:
        flags = {"ood": np.asarray(ood, bool), "low_confidence": np.asarray(low_confidence, bool)}
        codes = [[k for k, f in flags.items() if f[i]] for i in range(len(flags["ood"]))]
    return [refer_message(c) for c in codes]


def set_labels(
    sets: np.ndarray | None, probs: np.ndarray, classes: tuple[str, ...]
) -> list[list[str] | None]:
    """Class codes of each image's prediction set, most probable first (None per image without sets)."""
    if sets is None:
        return [None] * len(probs)
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
    return [[classes[j] for j in row if s[j]] for row, s in zip(order, np.asarray(sets, bool), strict=True)]


class Predictor:
    """A loaded model bundle: ONNX session + card + trust state. Thread-safe for concurrent predictions."""

    def __init__(
        self, bundle_dir: Path, card: ModelCard, model: OnnxModel, trust: Any, precision: str
    ) -> None:
        self.bundle_dir, self.card, self.model, self.trust, self.precision = (
            bundle_dir,
            card,
            model,
            trust,
            precision,
        )
        self.prep: Preprocessing = card.preprocessing
        self.classes: tuple[str, ...] = tuple(card.classes)
        self.coarse_classes: tuple[str, ...] = tuple(card.coarse_classes)
        self.malignant_index = self.coarse_classes.index("malignant")
        self.tta_views: tuple[str, ...] = tuple(
            card.extra.get("tta_views") or ("identity", "hflip", "vflip", "rot180")
        )
        self.max_batch = 32

    @classmethod
    def load(
        cls, bundle_dir: str | Path | None = None, precision: str | None = None, threads: int | None = None
    ) -> Predictor:
        """Open a bundle (None: the packaged release) at `precision` ('int8' | 'fp32'; None: the card's)."""
        from dermlens.trust.fit import TrustState

        bundle = Path(bundle_dir) if bundle_dir is not None else release_dir()
        if not (bundle / "card.json").is_file():
            hint = (
                "the packaged release model is missing: reinstall dermlens or pass --model BUNDLE_DIR"
                if bundle_dir is None
                else "pass a folder written by `dermlens export`"
            )
            raise BundleError(f"no model bundle at {bundle} ({hint})")
        card = read_card(bundle)
        precision = (precision or card.extra.get("default_precision") or "int8").lower()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        if not (bundle / TRUST).is_file():
            raise BundleError(f"model bundle {bundle} has no {TRUST}")
        model = OnnxModel(bundle / PRECISIONS[precision], threads)
        return cls(bundle, card, model, TrustState.load(bundle / TRUST), precision)

    @property
    def version(self) -> str:
        return self.card.version

    # ---- batches ---------------------------------------------------------------------------------------
    def prepare(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded HxWx3 uint8 images, any size -> uint8 NxHxWx3 at the model size (shared Preprocessing)."""
        h, w = self.prep.height, self.prep.width
        if not images:
            return np.zeros((0, h, w, 3), np.uint8)
        return np.stack([self.prep.resize(np.asarray(im, dtype=np.uint8)) for im in images])

    def _forward(self, batch: np.ndarray, meta: np.ndarray, feature_map: bool) -> dict[str, np.ndarray]:
        parts = [
            self.model.run(
                self.prep.normalize(batch[s : s + self.max_batch]), meta[s : s + self.max_batch], feature_map
            )
            for s in range(0, len(batch), self.max_batch)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict_arrays(
        self,
        images: list[np.ndarray] | np.ndarray,
        meta: list[dict[str, Any] | None] | None = None,
        cam: bool = False,
        tta: bool | None = None,
        prepared: bool = False,
    ) -> dict[str, Any]:
        """Score decoded RGB uint8 HxWx3 images of any size (meta: dicts of age/sex/site, or None);
        prepared=True: the images are already model input (e.g. a cache built with the bundle's
        preprocessing), so resizing and colour constancy are not applied again.

        Returns numpy arrays: probs [N,C] (calibrated for the image's condition: metadata given or not),
        probs_uncalibrated, coarse_probs [N,2], malignant [N] (calibrated coarse head), top [N] class index,
        confidence [N], ood_score [N] (higher = less like dermoscopy), not_dermoscopy_score [N] (or None),
        prediction_sets [N,C] bool (conformal; None if the bundle has none), the refer flags ood,
        not_dermoscopy, low_confidence, set_too_large and refer [N] bool, refer_codes (list of reason
        codes per image), has_meta [N], embedding [N,D]; plus cam (list of [h,w] heat maps in 0..1 for
        the top class) when cam=True. tta=None follows the card.
        """
        from dermlens.trust.calibration import softmax

        batch = np.asarray(images, dtype=np.uint8) if prepared else self.prepare(list(images))
        n, tta = len(batch), self.card.tta if tta is None else tta
        if n == 0:
            raise ValueError("predict_arrays needs at least one image")
        m = encode_meta(meta, n) if self.card.uses_metadata else np.zeros((n, META_DIM), np.float32)
        has_meta = meta_given(meta, n)
        out = self._forward(batch, m, feature_map=cam)
        state = self.trust
        coarse, tta_probs = softmax(out["coarse_logits"], state.temperature_coarse), None
        if tta:  # average calibrated probabilities over the views with the TTA temperatures
            fine_v, coarse_v = self.view_logits(batch, m, out)
            tta_probs, coarse = state.tta_probs(fine_v, "fine"), state.tta_probs(coarse_v, "coarse")
        d = state.decide(out["fine_logits"], out["embedding"], has_meta, probs=tta_probs)
        probs = d["probs"]
        conf = probs.max(axis=1)
        result: dict[str, Any] = {
            "probs": probs,
            "probs_uncalibrated": softmax(out["fine_logits"]),
            "coarse_probs": coarse,
            "malignant": coarse[:, self.malignant_index],
            "top": probs.argmax(axis=1),
            "confidence": conf,
            "ood_score": d["ood_score"],
            "ood": d["ood"],
            "not_dermoscopy_score": d["not_dermoscopy_score"],
            "not_dermoscopy": d["not_dermoscopy"],
            "low_confidence": d["low_confidence"],
            "set_too_large": d["set_too_large"],
            "prediction_sets": d["sets"],
            "refer": d["refer"],
            "refer_codes": d["refer_codes"],
            "has_meta": has_meta,
            "embedding": out["embedding"],
        }
        if cam:
            result["cam"] = self.cams(out["feature_map"], result["top"])
        return result

    def view_logits(
        self, batch: np.ndarray, meta: np.ndarray, identity: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fine and coarse logits [V, N, C] of the TTA views (identity first) of a model-size batch."""
        from dermlens.trust.tta import tta_views

        outs = []
        for name, view in zip(self.tta_views, tta_views(batch, self.tta_views), strict=True):
            reuse = name == "identity" and identity is not None
            outs.append(identity if reuse else self._forward(view, meta, feature_map=False))
        return np.stack([o["fine_logits"] for o in outs]), np.stack([o["coarse_logits"] for o in outs])

    def cams(self, feature_map: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
        """Class activation map [h, w] in 0..1 for each image's given class index."""
        from dermlens.trust.cam import cam

        if self.trust.cam_weight is None:
            raise BundleError(
                f"{self.bundle_dir / TRUST} has no cam_weight: CAM is unavailable for this model"
            )
        return [cam(f, self.trust.cam_weight, int(c)) for f, c in zip(feature_map, classes, strict=True)]

    # ---- one image ---------------------------------------------------------------------------------------
    def predict_image(
        self, rgb: np.ndarray, meta: dict[str, Any] | None = None, cam: bool = False, tta: bool | None = None
    ) -> PredictResult:
        """One decoded RGB uint8 image -> PredictResult (with a CAM overlay PNG when cam=True)."""
        t0 = time.perf_counter()
        r = self.predict_arrays([rgb], [meta], cam=cam, tta=tta)
        t1 = time.perf_counter()
        cam_png = self.cam_overlay(rgb, r["cam"][0]) if cam else None
        timing = {"model": (t1 - t0) * 1000.0}
        if cam:
            timing["cam"] = (time.perf_counter() - t1) * 1000.0
        return self.result_at(r, 0, (int(rgb.shape[1]), int(rgb.shape[0])), timing, cam_png)

    def result_at(
        self,
        r: dict[str, Any],
        i: int,
        size: tuple[int, int] | None,
        timing: dict[str, float],
        cam_png: bytes | None = None,
    ) -> PredictResult:
        """Image `i` of a predict_arrays() result as a PredictResult (size: the input's width, height)."""
        top = int(r["top"][i])
        nd = r["not_dermoscopy_score"]
        alpha = self.trust.conformal_alpha
        return PredictResult(
            fine={c: float(p) for c, p in zip(self.classes, r["probs"][i], strict=True)},
            coarse={c: float(p) for c, p in zip(self.coarse_classes, r["coarse_probs"][i], strict=True)},
            top=self.classes[top],
            confidence=float(r["confidence"][i]),
            p_malignant=float(r["malignant"][i]),
            ood_score=float(r["ood_score"][i]),
            ood=bool(r["ood"][i]),
            refer=bool(r["refer"][i]),
            refer_reason=refer_reasons(
                r["ood"][i : i + 1], r["low_confidence"][i : i + 1], r["refer_codes"][i : i + 1]
            )[0],
            model_version=self.version,
            precision=self.precision,
            timing_ms=timing,
            refer_codes=list(r["refer_codes"][i]),
            prediction_set=set_labels(r["prediction_sets"], r["probs"], self.classes)[i],
            set_coverage=None if r["prediction_sets"] is None or alpha is None else 1.0 - alpha,
            not_dermoscopy=bool(r["not_dermoscopy"][i]),
            not_dermoscopy_score=None if nd is None else float(nd[i]),
            calibration_condition="meta" if r["has_meta"][i] else "no_meta",
            image_size=size,
            cam_png=cam_png,
        )

    def cam_overlay(self, rgb: np.ndarray, heat: np.ndarray) -> bytes:
        """PNG of the heat map over the image, downscaled so the longest side is at most CAM_MAX_SIDE."""
        from PIL import Image

        from dermlens.trust.cam import overlay_png

        h, w = rgb.shape[:2]
        scale = min(1.0, CAM_MAX_SIDE / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        return overlay_png(rgb, heat)

    def predict_bytes(
        self,
        data: bytes,
        meta: dict[str, Any] | None = None,
        cam: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> PredictResult:
        """Encoded image bytes (JPEG/PNG/BMP/TIFF/WebP) -> PredictResult; raises ImageDecodeError."""
        t0 = time.perf_counter()
        rgb = load_rgb(data, max_pixels=max_pixels)
        decode = (time.perf_counter() - t0) * 1000.0
        res = self.predict_image(rgb, meta, cam)
        res.timing_ms = {"decode": decode, **res.timing_ms, "total": (time.perf_counter() - t0) * 1000.0}
        return res

    def predict_file(
        self, path: str | Path, meta: dict[str, Any] | None = None, cam: bool = False
    ) -> PredictResult:
        """An image file -> PredictResult; raises ImageDecodeError naming the file."""
        t0 = time.perf_counter()
        rgb = load_rgb(path)
        decode = (time.perf_counter() - t0) * 1000.0
        res = self.predict_image(rgb, meta, cam)
        res.timing_ms = {"decode": decode, **res.timing_ms, "total": (time.perf_counter() - t0) * 1000.0}
        return res
