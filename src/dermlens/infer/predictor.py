"""The Predictor: a loaded model bundle (ONNX session + card + trust state) that scores images and applies
calibration, OOD, the refer rule, conformal sets, TTA and CAM. onnxruntime, numpy and Pillow; never torch.

`Predictor.load()` opens the packaged release bundle (or any bundle folder); `predict_arrays` scores a
batch of decoded images, `predict_file` / `predict_bytes` score one image for people and the API.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.bundle import TRUST, BundleError, ModelCard, check_graph, open_bundle, release_dir
from dermlens.data.taxonomy import FINE_NAMES
from dermlens.errors import UsageError
from dermlens.infer.calibration import softmax
from dermlens.infer.cam import cam, overlay_png
from dermlens.infer.prediction import Prediction
from dermlens.infer.prepare import encode_meta, meta_given, prepare
from dermlens.infer.refer import refer_message
from dermlens.infer.session import PRECISIONS, OnnxModel, card_precision, default_precision
from dermlens.infer.state import TrustState
from dermlens.infer.tta import VIEWS, view_logits
from dermlens.metadata import META_DIM
from dermlens.preprocess import DEFAULT_MAX_PIXELS, Preprocessing, load_rgb

CAM_MAX_SIDE = 600  # longest side of the CAM overlay PNG


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
        self, bundle_dir: Path, card: ModelCard, model: OnnxModel, trust: TrustState, precision: str
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
        self.tta_views: tuple[str, ...] = tuple(card.extra.get("tta_views") or VIEWS)
        self.max_batch = 32
        self.precision_note = ""  # why the precision is not the card's default, when it is not

    @classmethod
    def load(
        cls, bundle_dir: str | Path | None = None, precision: str | None = None, threads: int | None = None
    ) -> Predictor:
        """Open a bundle (None: the packaged release) at `precision` ('int8' | 'fp32'; None: the card's,
        fp32 instead of int8 on an x86 CPU without VNNI, where int8 loses accuracy)."""
        bundle = Path(bundle_dir) if bundle_dir is not None else release_dir()
        if not (bundle / "card.json").is_file():
            hint = (
                "the packaged release model is missing: reinstall dermlens or pass --model BUNDLE_DIR"
                if bundle_dir is None
                else "pass a folder written by `dermlens bundle export`"
            )
            raise BundleError(f"no model bundle at {bundle} ({hint})")
        card, _ = open_bundle(bundle)  # the integrity check `dermlens bundle verify` runs
        card_default = card_precision(card.extra.get("default_precision"))
        served = default_precision(card_default, bundle)  # fp32 where int8 loses accuracy
        switched = precision is None and served != card_default
        precision = (precision or served).lower()
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        if not (bundle / TRUST).is_file():
            raise BundleError(f"model bundle {bundle} has no {TRUST}")
        model = OnnxModel(bundle / PRECISIONS[precision], threads)
        check_graph(model.session, card, PRECISIONS[precision])
        predictor = cls(bundle, card, model, TrustState.load(bundle / TRUST), precision)
        if switched:
            predictor.precision_note = f"not {card_default}: int8 loses accuracy on an x86 CPU without VNNI"
        return predictor

    @property
    def version(self) -> str:
        return self.card.version

    # ---- batches ---------------------------------------------------------------------------------------
    def prepare(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded HxWx3 uint8 images, any size -> uint8 NxHxWx3 at the model size (shared Preprocessing)."""
        return prepare(self.prep, images)

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
        run = lambda v: self._forward(v, meta, feature_map=False)  # noqa: E731
        return view_logits(run, batch, self.tta_views, identity)

    def cams(self, feature_map: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
        """Class activation map [h, w] in 0..1 for each image's given class index."""
        if self.trust.cam_weight is None:
            raise BundleError(
                f"{self.bundle_dir / TRUST} has no cam_weight: CAM is unavailable for this model"
            )
        return [cam(f, self.trust.cam_weight, int(c)) for f, c in zip(feature_map, classes, strict=True)]

    # ---- one image ---------------------------------------------------------------------------------------
    def predict_image(
        self, rgb: np.ndarray, meta: dict[str, Any] | None = None, cam: bool = False, tta: bool | None = None
    ) -> Prediction:
        """One decoded RGB uint8 image -> Prediction (with a CAM overlay PNG when cam=True)."""
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
    ) -> Prediction:
        """Image `i` of a predict_arrays() result as a Prediction (size: the input's width, height)."""
        top = self.classes[int(r["top"][i])]
        nd = r["not_dermoscopy_score"]
        alpha = self.trust.conformal_alpha
        codes = list(r["refer_codes"][i])
        return Prediction(
            top_class=top,
            top_class_name=FINE_NAMES.get(top, top),
            confidence=float(r["confidence"][i]),
            fine={c: float(p) for c, p in zip(self.classes, r["probs"][i], strict=True)},
            coarse={c: float(p) for c, p in zip(self.coarse_classes, r["coarse_probs"][i], strict=True)},
            p_malignant=float(r["malignant"][i]),
            prediction_set=set_labels(
                None if r["prediction_sets"] is None else r["prediction_sets"][i : i + 1],
                r["probs"][i : i + 1],
                self.classes,
            )[0],
            set_coverage=None if r["prediction_sets"] is None or alpha is None else 1.0 - alpha,
            calibration_condition="meta" if r["has_meta"][i] else "no_meta",
            refer=bool(r["refer"][i]),
            refer_codes=codes,
            refer_reason=refer_message(codes),
            ood=bool(r["ood"][i]),
            ood_score=float(r["ood_score"][i]),
            not_dermoscopy=bool(r["not_dermoscopy"][i]),
            not_dermoscopy_score=None if nd is None else float(nd[i]),
            model_name=self.card.name,
            model_version=self.version,
            precision=self.precision,
            image_width=None if size is None else int(size[0]),
            image_height=None if size is None else int(size[1]),
            timing_ms=timing,
            cam_png=cam_png,
        )

    def cam_overlay(self, rgb: np.ndarray, heat: np.ndarray) -> bytes:
        """PNG of the heat map over the image, downscaled so the longest side is at most CAM_MAX_SIDE."""
        from PIL import Image

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
    ) -> Prediction:
        """Encoded image bytes (JPEG/PNG/BMP/TIFF/WebP) -> Prediction; raises ImageDecodeError."""
        t0 = time.perf_counter()
        rgb = load_rgb(data, max_pixels=max_pixels)
        decode = (time.perf_counter() - t0) * 1000.0
        res = self.predict_image(rgb, meta, cam)
        timing = {"decode": decode, **res.timing_ms, "total": (time.perf_counter() - t0) * 1000.0}
        return res.model_copy(update={"timing_ms": timing})

    def predict_file(
        self, path: str | Path, meta: dict[str, Any] | None = None, cam: bool = False
    ) -> Prediction:
        """An image file -> Prediction; raises ImageDecodeError naming the file."""
        t0 = time.perf_counter()
        rgb = load_rgb(path)
        decode = (time.perf_counter() - t0) * 1000.0
        res = self.predict_image(rgb, meta, cam)
        timing = {"decode": decode, **res.timing_ms, "total": (time.perf_counter() - t0) * 1000.0}
        return res.model_copy(update={"timing_ms": timing})

    def predict(
        self,
        image: str | Path | bytes | np.ndarray,
        age: float | None = None,
        sex: str | None = None,
        site: str | None = None,
        cam: bool = False,
    ) -> Prediction:
        """One image (a path, encoded bytes or an RGB uint8 array) with optional age, sex and body site."""
        meta = {"age": age, "sex": sex, "site": site}
        if isinstance(image, np.ndarray):
            return self.predict_image(image, meta, cam)
        if isinstance(image, bytes):
            return self.predict_bytes(image, meta, cam)
        return self.predict_file(image, meta, cam)
