"""Model bundles: a folder with card.json, ONNX graphs, trust statistics and torch weights. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from dermlens.errors import BundleError  # noqa: F401 (re-exported)
from dermlens.integrity import (
    MANIFEST,  # noqa: F401 (re-exported)
    check_manifest,
    inside,
    manifest_digest,
    sha256_file,
    write_manifest,
)
from dermlens.preprocess import Preprocessing

CARD = "card.json"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
TRUST = "trust.npz"
TORCH_WEIGHTS = "model.pt"
SCHEMA_VERSION = 2  # 1: no schema_version in the card; 2: + lineage, metadata_encoding (written by export)
V2_KEYS = ("lineage", "metadata_encoding", "metrics", "export")
MONITOR_REFERENCE = "monitor_reference.json"
REQUIRED = (CARD, TRUST)  # a sealed bundle lists these; the others may be left out of a copy
OPTIONAL = (ONNX_FP32, ONNX_INT8, TORCH_WEIGHTS, MONITOR_REFERENCE)


def release_dir() -> Path:
    """The release bundle that ships inside the package."""
    return Path(str(resources.files("dermlens") / "models" / "release"))


@dataclass
class ModelCard:
    """What a model is, how to feed it and how far to trust it; serialized as card.json."""

    name: str
    version: str
    architecture: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    uses_metadata: bool = False
    coarse_classes: tuple[str, ...] = ("benign", "malignant")
    temperature: dict[str, float] = field(default_factory=lambda: {"fine": 1.0, "coarse": 1.0})
    ood: dict[str, Any] = field(default_factory=dict)
    refer: dict[str, Any] = field(default_factory=dict)
    tta: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION  # a card read without one is version 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        known = {
            "name",
            "version",
            "architecture",
            "classes",
            "preprocessing",
            "uses_metadata",
            "coarse_classes",
            "temperature",
            "ood",
            "refer",
            "tta",
            "schema_version",
        }
        return cls(
            name=d["name"],
            version=d["version"],
            architecture=d["architecture"],
            classes=tuple(d["classes"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            uses_metadata=bool(d.get("uses_metadata", False)),
            coarse_classes=tuple(d.get("coarse_classes", ("benign", "malignant"))),
            temperature=dict(d.get("temperature", {"fine": 1.0, "coarse": 1.0})),
            ood=dict(d.get("ood", {})),
            refer=dict(d.get("refer", {})),
            tta=bool(d.get("tta", False)),
            extra={k: v for k, v in d.items() if k not in known},
            schema_version=int(d.get("schema_version", 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "classes": list(self.classes),
            "coarse_classes": list(self.coarse_classes),
            "preprocessing": self.preprocessing.to_dict(),
            "uses_metadata": self.uses_metadata,
            "temperature": self.temperature,
            "ood": self.ood,
            "refer": self.refer,
            "tta": self.tta,
            **self.extra,
        }


class _Preprocessing(BaseModel):
    """The fields a card's preprocessing must have, with their ranges."""

    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    resample: str
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]
    color_constancy: str | None = None
    fit: Literal["squash", "crop", "pad", "pad_mean"] | None = None

    @field_validator("resample")
    @classmethod
    def _known_filter(cls, v: str) -> str:
        if v.upper() not in Image.Resampling.__members__:
            raise ValueError(f"unknown resampling filter {v!r}")
        return v


class _Card(BaseModel):
    """The shape of card.json that the runtime relies on (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: str
    architecture: str
    classes: list[str] = Field(min_length=2)
    coarse_classes: list[str] = Field(default=["benign", "malignant"], min_length=2, max_length=2)
    preprocessing: _Preprocessing
    uses_metadata: bool = False
    temperature: dict[str, float] = {}
    ood: dict[str, Any] = {}
    refer: dict[str, Any] = {}
    tta: bool = False
    schema_version: int = 1


def parse_card(text: bytes | str, where: str | Path = CARD) -> ModelCard:
    """A ModelCard from card.json text; anything that is not a card (null, a list, nesting too deep, wrong
    types, duplicate classes, no malignant coarse class) is a one-line BundleError."""
    try:
        raw = json.loads(text)
    except RecursionError:
        raise BundleError(f"{where} is nested too deeply to be a model card") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{where} is {type(raw).__name__}, not a model card (a JSON object)")
    try:
        _Card.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "card"
        raise BundleError(f"{where} is not a usable model card: {loc}: {err['msg']}") from None
    try:
        card = ModelCard.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{where} is not a usable model card: {e}") from None
    if len(set(card.classes)) != len(card.classes) or "malignant" not in card.coarse_classes:
        raise BundleError(f"{where}: classes repeat or coarse_classes lack 'malignant'")
    return card


def read_card(bundle: Path) -> ModelCard:
    """Load card.json from a bundle folder (not its integrity: `open_bundle` checks that first)."""
    path = Path(bundle) / CARD
    if not path.is_file():
        raise BundleError(f"no model card at {path}: is {bundle} a dermlens model bundle?")
    return parse_card(path.read_bytes(), path)


def card_sha256(bundle: Path) -> str:
    """SHA-256 of the bundle's card.json: the model's identity in what it writes (e.g. the DICOM SR)."""
    import hashlib

    path = Path(bundle) / CARD
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the model card ({e.strerror})") from e


def _write_card_json(bundle: Path, card: ModelCard) -> Path:
    path = Path(bundle) / CARD
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return path


def write_card(bundle: Path, card: ModelCard) -> Path:
    """Write card.json into a bundle folder and re-seal the bundle."""
    Path(bundle).mkdir(parents=True, exist_ok=True)
    path = _write_card_json(bundle, card)
    seal(bundle)
    return path


def seal(bundle: Path) -> Path:
    """Record the SHA-256 of every bundle file, card.json included, in MANIFEST.sha256; a card's older
    hash list (export.files) is checked, then folded into the manifest. Every writer of a bundle calls it."""
    bundle = Path(bundle)
    card = read_card(bundle)
    export = card.extra.get("export")
    legacy = export.get("files") if isinstance(export, dict) else None
    if legacy is not None:
        if not isinstance(legacy, dict):
            raise BundleError(f"{bundle / CARD}: export.files is not a file -> sha256 table: not sealing it")
        for name, digest in legacy.items():
            path = inside(bundle, str(name))
            if path.exists() and sha256_file(path) != digest:
                raise BundleError(f"{path} does not match the sha256 recorded in the card: not sealing it")
        del card.extra["export"]["files"]
        _write_card_json(bundle, card)
    return write_manifest(bundle)


def check_files(bundle: Path) -> list[str]:
    """Every bundle file is listed in MANIFEST.sha256, inside the bundle and unchanged; one line each."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"no model bundle at {bundle}")
    lines = check_manifest(bundle, REQUIRED, OPTIONAL)
    return [*lines, f"bundle digest: sha256:{manifest_digest(bundle)}"]


def open_bundle(bundle: Path) -> tuple[ModelCard, list[str]]:
    """The integrity check that `verify`, `serve` and `predict` share: files as sealed, a usable card of
    a schema this dermlens reads. Returns the card and one line per check."""
    lines = check_files(bundle)
    card = read_card(bundle)
    return card, [f"card: {card.name} {card.version}", check_schema(card), *lines]


def _value(node: Any) -> float | None:
    """A metric's point estimate, whether stored bare or as {value, ci_low, ci_high}."""
    if isinstance(node, dict):
        node = node.get("value", node.get("point"))
    return float(node) if isinstance(node, int | float) else None


def summarize_results(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluate metrics.json or an external.json."""
    keys = {
        "balanced_accuracy": ("balanced_accuracy",),
        "macro_auc": ("macro_auc",),
        "ece": ("ece",),
        "melanoma_auc": ("melanoma_auc",),
        "three_class_balanced_accuracy": ("three_class", "balanced_accuracy"),
    }
    out = {}
    for name, path in keys.items():
        node: Any = results.get("overall", results) if len(path) == 1 and "overall" in results else results
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if (v := _value(node)) is not None:
            out[name] = v
    return out


def record_metrics(bundle: Path, name: str, results: dict[str, Any]) -> dict[str, float]:
    """Store an evaluation of this bundle's model (checked by model_version) under card.metrics[name]; the
    bundle must be intact, and is re-sealed."""
    card, _ = open_bundle(bundle)
    version = results.get("model_version") or results.get("provenance", {}).get("model_version")
    if version != card.version:
        raise ValueError(f"results are for model {version!r}, the bundle is {card.version!r}")
    summary = summarize_results(results)
    if not summary:
        raise ValueError("no known metric (balanced_accuracy, macro_auc, melanoma_auc, ...) in the results")
    provenance = results.get("provenance", {})
    metrics = dict(card.extra.get("metrics", {}))
    metrics[name] = {
        "summary": summary,
        "metadata": results.get("metadata", provenance.get("metadata")),
        "split": results.get("split", provenance.get("split")),
        "machine": results.get("machine", provenance.get("machine")),
        "full": results,
    }
    card.extra["metrics"] = metrics
    write_card(bundle, card)
    return summary


def check_schema(card: ModelCard) -> str:
    """One line on the card's format; a card newer than this dermlens or missing its v2 keys is an error."""
    v = card.schema_version
    if v > SCHEMA_VERSION:
        raise BundleError(
            f"card schema {v} is newer than this dermlens reads ({SCHEMA_VERSION}): upgrade dermlens"
        )
    if v == 1:
        return "schema 1 (older format without schema_version; `dermlens bundle export` writes schema 2)"
    missing = [k for k in V2_KEYS if k not in card.extra]
    if missing:
        raise BundleError(f"card schema {v} lacks {', '.join(missing)}")
    return f"schema {v}"


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's error types (they share no base class but Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    return (s.Fail, s.InvalidProtobuf, s.InvalidGraph, s.InvalidArgument, s.NoSuchFile, s.NoModel,
            s.NotImplemented, s.RuntimeException, s.EPFail, RuntimeError, ValueError)  # fmt: skip


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_session(path: Path, options: Any = None) -> Any:
    """An onnxruntime CPU session of a bundle graph; a graph onnxruntime cannot load is a BundleError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ort_errors() as e:
        raise BundleError(f"{path} is not a usable ONNX graph: {_first_line(e)}") from None


def check_graph(session: Any, card: ModelCard, name: str) -> str:
    """Run a graph once on zeros of the card's input size; its outputs must fit the card's classes."""
    import numpy as np

    from dermlens.metadata import META_DIM

    p = card.preprocessing
    inputs = {i.name for i in session.get_inputs()}
    feeds = {"image": np.zeros((2, 3, p.height, p.width), np.float32)}
    if "meta" in inputs:
        feeds["meta"] = np.zeros((2, META_DIM), np.float32)
    outputs = [o.name for o in session.get_outputs()]
    if "image" not in inputs or not {"fine_logits", "coarse_logits"} <= set(outputs):
        raise BundleError(f"{name}: lacks the input `image` or the outputs fine_logits, coarse_logits")
    try:
        outs = dict(zip(outputs, session.run(outputs, feeds), strict=True))
    except ort_errors() as e:
        raise BundleError(f"{name} does not run on the card's input size: {_first_line(e)}") from None
    fine, coarse = outs["fine_logits"].shape, outs["coarse_logits"].shape
    if fine != (2, len(card.classes)) or coarse != (2, len(card.coarse_classes)):
        raise BundleError(f"{name}: output shapes do not match the card's {len(card.classes)} classes")
    return f"runs: {name} -> fine_logits {fine}"


def verify_bundle(bundle: Path) -> list[str]:
    """Integrity (open_bundle), then each ONNX graph maps the card's input size to its classes."""
    card, lines = open_bundle(bundle)
    graphs = [n for n in (ONNX_FP32, ONNX_INT8) if (Path(bundle) / n).is_file()]
    if not graphs:
        raise BundleError(f"{bundle} has neither {ONNX_FP32} nor {ONNX_INT8}")
    return [*lines, *(check_graph(load_session(Path(bundle) / n), card, n) for n in graphs)]
