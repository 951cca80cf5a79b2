"""Model inputs of the runtime: images resized to the bundle's size and patient metadata encoded, through
the one preprocessing (dermlens.preprocess) and the one metadata encoding (dermlens.metadata)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dermlens.metadata import META_DIM, encode_metadata, missing_vector
from dermlens.preprocess import Preprocessing


def prepare(prep: Preprocessing, images: list[np.ndarray]) -> np.ndarray:
    """Decoded HxWx3 uint8 images, any size -> uint8 NxHxWx3 at the model size (shared Preprocessing)."""
    if not images:
        return np.zeros((0, prep.height, prep.width, 3), np.uint8)
    return np.stack([prep.resize(np.asarray(im, dtype=np.uint8)) for im in images])


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
