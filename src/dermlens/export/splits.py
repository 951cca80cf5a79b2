"""One split of the prepared data (cached images, labels, encoded metadata) for export and trust fitting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermlens.data.taxonomy import UNKNOWN
from dermlens.export import ExportError
from dermlens.metadata import encode_rows
from dermlens.preprocess import Preprocessing


@dataclass
class SplitImages:
    """One split of the prepared data: cached uint8 images, fine labels, encoded metadata."""

    images: np.ndarray
    labels: np.ndarray
    meta: np.ndarray
    image_ids: np.ndarray


def load_split(
    data_dir: str | Path,
    split: str,
    classes: tuple[str, ...],
    prep: Preprocessing,
    limit: int | None = None,
    seed: int = 0,
) -> SplitImages:
    """Rows of `split` with a known diagnosis, in manifest order (a seeded random subset if `limit`)."""
    from dermlens.data.cache import open_cache
    from dermlens.data.manifest import read_manifest

    df = read_manifest(data_dir)
    cache = open_cache(data_dir, prep)
    rows = np.flatnonzero((df["split"].to_numpy() == split) & (df["diagnosis"].to_numpy() != UNKNOWN))
    if len(rows) == 0:
        raise ExportError(f"the manifest in {data_dir} has no labelled {split!r} rows")
    if limit and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, int(limit), replace=False))
    sub = df.iloc[rows]
    unknown = sorted(set(sub["diagnosis"]) - set(classes))
    if unknown:
        raise ExportError(
            f"{split} split has diagnoses {unknown} outside the model's classes {list(classes)}"
        )
    return SplitImages(
        images=np.asarray(cache[rows]),
        labels=np.array([classes.index(d) for d in sub["diagnosis"]], dtype=np.int64),
        meta=encode_rows(sub["age"].tolist(), sub["sex"].tolist(), sub["site"].tolist()),
        image_ids=sub["image_id"].astype(str).to_numpy(),
    )
