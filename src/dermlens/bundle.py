"""Model bundles: a folder with card.json, ONNX graphs, trust statistics and torch weights. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dermlens.errors import BundleError  # noqa: F401 (re-exported)
from dermlens.preprocess import Preprocessing

CARD = "card.json"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
TRUST = "trust.npz"
TORCH_WEIGHTS = "model.pt"
SCHEMA_VERSION = 2  # 1: no schema_version in the card; 2: + lineage, metadata_encoding (written by export)
V2_KEYS = ("lineage", "metadata_encoding", "metrics", "export")


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


def read_card(bundle: Path) -> ModelCard:
    """Load card.json from a bundle folder, with a clear error if it is missing."""
    path = Path(bundle) / CARD
    if not path.is_file():
        raise BundleError(f"no model card at {path}: is {bundle} a dermlens model bundle?")
    return ModelCard.from_dict(json.loads(path.read_text()))


def card_sha256(bundle: Path) -> str:
    """SHA-256 of the bundle's card.json (which records the hashes of the bundle's files): the model's id."""
    import hashlib

    path = Path(bundle) / CARD
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the model card ({e.strerror})") from e


def write_card(bundle: Path, card: ModelCard) -> Path:
    """Write card.json into a bundle folder."""
    Path(bundle).mkdir(parents=True, exist_ok=True)
    path = Path(bundle) / CARD
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return path


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
    """Store an evaluation of this bundle's model (checked by model_version) under card.metrics[name]."""
    card = read_card(bundle)
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


def verify_bundle(bundle: Path) -> list[str]:
    """Check card, file hashes and that each ONNX graph maps the card's input shapes to its outputs."""
    import hashlib

    import numpy as np
    import onnxruntime as ort

    from dermlens.metadata import META_DIM

    card = read_card(bundle)
    lines = [f"card: {card.name} {card.version}", check_schema(card)]
    recorded = card.extra.get("export", {}).get("files", {})
    for fname, digest in recorded.items():
        path = Path(bundle) / fname
        if not path.is_file():
            raise BundleError(f"{path} is listed in the card but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BundleError(f"{path} does not match the sha256 recorded in the card")
        lines.append(f"hash ok: {fname}")
    p = card.preprocessing
    feeds = {
        "image": np.zeros((2, 3, p.height, p.width), np.float32),
        "meta": np.zeros((2, META_DIM), np.float32),
    }
    for fname in (ONNX_FP32, ONNX_INT8):
        if not (Path(bundle) / fname).is_file():
            continue
        sess = ort.InferenceSession(str(Path(bundle) / fname), providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
        if outs["fine_logits"].shape != (2, len(card.classes)) or outs["coarse_logits"].shape != (2, 2):
            raise BundleError(f"{fname}: output shapes do not match the card's {len(card.classes)} classes")
        lines.append(f"runs: {fname} -> fine_logits {outs['fine_logits'].shape}")
    return lines
