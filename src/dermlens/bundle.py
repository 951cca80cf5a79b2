"""Model bundles: a folder with card.json, ONNX graphs, trust statistics and torch weights. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dermlens.preprocess import Preprocessing

CARD = "card.json"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
TRUST = "trust.npz"
TORCH_WEIGHTS = "model.pt"


class BundleError(FileNotFoundError):
    """A model bundle that is missing or incomplete (names the path)."""


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
        )

    def to_dict(self) -> dict[str, Any]:
        return {
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


def write_card(bundle: Path, card: ModelCard) -> Path:
    """Write card.json into a bundle folder."""
    Path(bundle).mkdir(parents=True, exist_ok=True)
    path = Path(bundle) / CARD
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return path
