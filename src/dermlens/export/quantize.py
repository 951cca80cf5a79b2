"""Static int8 quantization of the fp32 graph, calibrated on training images, with the fall-back search that
keeps more early layers in fp32 until validation balanced accuracy is within `max_drop` of fp32."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.export.splits import SplitImages
from dermlens.infer.calibration import softmax
from dermlens.infer.session import OnnxModel
from dermlens.metrics import classification_metrics
from dermlens.preprocess import Preprocessing


def calibration_reader(images: np.ndarray, meta: np.ndarray, prep: Preprocessing, batch_size: int = 10):
    """An onnxruntime CalibrationDataReader over uint8 NxHxWx3 images (normalized like training).

    Every batch has the same size (a remainder is dropped): histogram calibrators stack batches.
    """
    from onnxruntime.quantization import CalibrationDataReader

    stop = len(images) - len(images) % batch_size if len(images) >= batch_size else len(images)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= stop:
                return None
            s, self.start = self.start, min(self.start + batch_size, stop)
            return {"image": prep.normalize(np.asarray(images[s : self.start])), "meta": meta[s : self.start]}

        def rewind(self) -> None:
            self.start = 0

    return _Reader()


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    images: np.ndarray,
    meta: np.ndarray,
    prep: Preprocessing,
    cfg: dict[str, Any],
) -> Path:
    """Static int8 quantization (activations uint8, weights int8) calibrated on the given training images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[str(cfg.get("format", "qdq")).lower()]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[str(cfg.get("calibrate_method", "minmax")).lower()]
    exclude = [str(e) for e in cfg.get("exclude") or []]  # op types, node names, or name prefixes ending in /
    with tempfile.TemporaryDirectory(prefix="dermlens-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        names = [n.name for n in graph.node if _excluded(n.name, n.op_type, exclude)]
        inputs = {i.name for i in graph.input}
        reader = calibration_reader(images, meta, prep)
        if "meta" not in inputs:
            reader = _DropMeta(reader)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer warns once per int64 shape tensor of the padding math
        try:
            quantize_static(
                str(pre),
                str(out_path),
                reader,
                quant_format=fmt,
                per_channel=bool(cfg.get("per_channel", True)),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=names,
                extra_options={"CalibTensorRangeSymmetric": False, **(cfg.get("extra_options") or {})},
            )
        finally:
            root.setLevel(level)
    _restore_meta_input(Path(out_path), fp32_path)
    return Path(out_path)


def _excluded(name: str, op_type: str, patterns: list[str]) -> bool:
    """A node matches an op type (Gemm), its exact name, or a name prefix ending in '/' (/head/)."""
    return any(op_type == p or name == p or (p.endswith("/") and name.startswith(p)) for p in patterns)


def quantize_checked(
    fp32_path: Path,
    out_path: Path,
    calibration: tuple[np.ndarray, np.ndarray],
    val: SplitImages,
    prep: Preprocessing,
    cfg: dict[str, Any],
    fp32_bal_acc: float,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Quantize with cfg['exclude'], then with each cumulative cfg['fallbacks'] exclusion (more layers kept
    in fp32) until val balanced accuracy is within cfg['max_drop'] of fp32; keeps the first that is (else
    the closest). Returns the int8 val outputs and what was tried."""
    base = list(cfg.get("exclude") or [])
    candidates = [base]
    for extra in cfg.get("fallbacks") or []:
        candidates.append(candidates[-1] + list(extra))
    tried, best = [], None
    for exclude in candidates:
        quantize_int8(fp32_path, out_path, *calibration, prep, {**cfg, "exclude": exclude})
        outs = OnnxModel(out_path).run_images(val.images, prep, val.meta)
        n = outs["fine_logits"].shape[1]
        bal = classification_metrics(softmax(outs["fine_logits"]), val.labels, n)["bal_acc"]
        tried.append({"exclude": exclude, "bal_acc": bal, "size_bytes": out_path.stat().st_size})
        log(f"int8 excluding {exclude}: val balanced accuracy {bal:.4f} (fp32 {fp32_bal_acc:.4f})")
        if best is None or abs(bal - fp32_bal_acc) < abs(best[1] - fp32_bal_acc):
            best = (exclude, bal, out_path.read_bytes(), outs)
        if abs(bal - fp32_bal_acc) <= float(cfg.get("max_drop", 0.01)):
            break
    assert best is not None
    if best[0] is not tried[-1]["exclude"]:  # an earlier candidate was closer: restore it
        out_path.write_bytes(best[2])
    return best[3], {"exclude": best[0], "tried": tried}


class _DropMeta:
    """Wraps a calibration reader for graphs whose optimizer removed the unused `meta` input."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = self.reader.get_next()
        return None if feed is None else {"image": feed["image"]}

    def rewind(self) -> None:
        self.reader.rewind()


def _restore_meta_input(path: Path, reference: str | Path) -> None:
    """Keep the `meta` input declared (as in the fp32 graph) if quantization dropped it."""
    import onnx

    model = onnx.load(str(path))
    if "meta" in {i.name for i in model.graph.input}:
        return
    ref = next(i for i in onnx.load(str(reference)).graph.input if i.name == "meta")
    model.graph.input.append(ref)
    onnx.save(model, str(path))
