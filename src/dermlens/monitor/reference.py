"""The model's reference outputs for monitoring: what the bundle predicts on its validation split.

Stored in the bundle as `monitor_reference.json` (written by `dermlens bundle export`, or for an existing
bundle by `dermlens monitor reference`): per validation image the predicted class, calibrated confidence, OOD
score and refer decision, from the same runtime (and precision) the server uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from dermlens import config as configuration
from dermlens.errors import MissingReference  # noqa: F401 (re-exported)

REFERENCE_FILE = "monitor_reference.json"


@cache
def monitor_config() -> dict:
    """Settings from configs/monitor.yaml."""
    return configuration.load("monitor")


@dataclass
class Reference:
    """Per-image outputs of one model on its validation split."""

    model_name: str
    model_version: str
    precision: str
    classes: list[str]
    top: list[str]
    confidence: list[float]
    ood_score: list[float]
    refer: list[bool]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.top)

    def class_shares(self) -> np.ndarray:
        """Share of each class (model order) among the reference predictions."""
        counts = np.array([self.top.count(c) for c in self.classes], dtype=float)
        return counts / max(1.0, counts.sum())

    def save(self, bundle: Path) -> Path:
        """Write monitor_reference.json into the bundle and re-seal it."""
        from dermlens.bundle import seal

        path = Path(bundle) / REFERENCE_FILE
        path.write_text(json.dumps(asdict(self), separators=(",", ":")) + "\n")
        seal(bundle)
        return path

    @classmethod
    def load(cls, bundle: Path) -> Reference:
        path = Path(bundle) / REFERENCE_FILE
        if not path.is_file():
            raise MissingReference(
                f"no {REFERENCE_FILE} in {bundle}: run `dermlens monitor reference --manifest DIR` "
                "(or re-export the bundle)"
            )
        ref = cls(**json.loads(path.read_text()))
        card = Path(bundle) / "card.json"
        version = json.loads(card.read_text()).get("version") if card.is_file() else ref.model_version
        if version != ref.model_version:
            raise MissingReference(
                f"{path} is for model {ref.model_version}, the bundle is {version}: run "
                "`dermlens monitor reference --manifest DIR` for this model"
            )
        return ref


def _decode(paths: Any, rows: np.ndarray, predictor: Any) -> np.ndarray:
    from dermlens.preprocess import load_rgb

    return np.stack([predictor.prep.resize(load_rgb(paths.iloc[i])) for i in rows])


def build_reference(
    predictor: Any, manifest_dir: Path, split: str = "val", batch_size: int = 64
) -> Reference:
    """Score the manifest's `split` (from its image cache) with the runtime Predictor."""
    from dermlens.data.cache import open_cache
    from dermlens.data.manifest import DataError, manifest_hash, read_manifest

    df = read_manifest(manifest_dir)
    rows = np.flatnonzero(df["split"].to_numpy() == split)
    if not len(rows):
        raise DataError(f"{manifest_dir} has no {split!r} rows")
    try:
        images = open_cache(manifest_dir, predictor.prep)
    except DataError:  # no current cache: decode the split's images (a few seconds per thousand)
        images = _decode(df["image_path"], rows, predictor)
        rows = np.arange(len(rows))
    sub = df.iloc[np.flatnonzero(df["split"].to_numpy() == split)]
    meta = [
        {"age": a, "sex": s, "site": g} for a, s, g in zip(sub["age"], sub["sex"], sub["site"], strict=True)
    ]
    top, conf, ood, refer = [], [], [], []
    for s in range(0, len(rows), batch_size):
        r = predictor.predict_arrays(
            np.asarray(images[rows[s : s + batch_size]]), meta[s : s + batch_size], prepared=True
        )
        top += [predictor.classes[i] for i in r["top"]]
        conf += [round(float(v), 6) for v in r["confidence"]]
        ood += [round(float(v), 4) for v in r["ood_score"]]
        refer += [bool(v) for v in r["refer"]]
    return Reference(
        model_name=predictor.card.name,
        model_version=predictor.version,
        precision=predictor.precision,
        classes=list(predictor.classes),
        top=top,
        confidence=conf,
        ood_score=ood,
        refer=refer,
        source={
            "manifest": str(Path(manifest_dir).resolve()),
            "manifest_hash": manifest_hash(df),
            "split": split,
            "n": len(rows),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
