"""The ONNX session of a bundle's graph under onnxruntime (CPU), with the dermlens input/output contract."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dermlens.bundle import ONNX_FP32, ONNX_INT8, BundleError, load_session
from dermlens.metadata import META_DIM
from dermlens.preprocess import Preprocessing

OUTPUTS: tuple[str, ...] = ("fine_logits", "coarse_logits", "embedding", "feature_map")
PRECISIONS: dict[str, str] = {"fp32": ONNX_FP32, "int8": ONNX_INT8}


def int8_exact() -> bool:
    """False on x86 CPUs without VNNI: there onnxruntime's u8s8 int8 kernels can saturate and lose accuracy
    (measured: the packaged ensemble's val BA 0.720 in int8 against 0.782 on a VNNI CPU)."""
    from dermlens.settings import machine

    m = machine()
    return bool(m["int8_vnni"] or not m["x86"])


def card_precision(card_default: str | None) -> str:
    """The precision a card records as its default (int8 when it records none)."""
    return str(card_default or "int8").lower()


def default_precision(card_default: str | None, bundle: Path | None = None) -> str:
    """The bundle's default precision, except int8 on a CPU where it loses accuracy: then fp32, when the
    bundle (if given) has the fp32 graph."""
    precision = card_precision(card_default)
    has_fp32 = bundle is None or (Path(bundle) / ONNX_FP32).is_file()
    return "fp32" if precision == "int8" and not int8_exact() and has_fp32 else precision


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
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"no ONNX model at {self.path}")
        self.session = load_session(self.path, session_options(threads, spin))
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
