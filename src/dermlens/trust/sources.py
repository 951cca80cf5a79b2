"""Image sources scored once by the bundle's own ONNX graph and cached: the rows of one role (train, val,
test) of a prepared folder, with their embeddings and fine logits with and without metadata.

Each image goes through the bundle's one Preprocessing from its file, as an upload would (84 px BCN
thumbnails are upsampled like any small upload). Cache: work/trust_cache/*.npz, keyed by bundle version,
precision, manifest hash and the rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlens.errors import RefitError
from dermlens.metadata import encode_rows
from dermlens.preprocess import load_rgb
from dermlens.trust.shift import Runner, has_metadata, no_meta

ROLES = ("train", "val", "test")
CHUNK = 256  # images decoded and scored at a time


@dataclass
class Scored:
    """One role of one source: its manifest rows and the model's outputs on them."""

    name: str
    frame: pd.DataFrame
    embedding: np.ndarray  # [N, D]
    logits_meta: np.ndarray  # [N, C] fine logits with the row's metadata
    logits_none: np.ndarray  # [N, C] fine logits without metadata ([N, 0] for rows scored image-only)

    def labels(self, classes: tuple[str, ...]) -> np.ndarray:
        """Class index per row, -1 where the diagnosis is not one of `classes`."""
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index.get(str(d), -1) for d in self.frame["diagnosis"]], np.int64)

    def groups(self) -> np.ndarray:
        """Split group per row (lesion, or patient where the source links them)."""
        return self.frame["group_id"].astype(str).to_numpy()

    def has_meta(self) -> np.ndarray:
        """True per row where the manifest knows any of age, sex, site."""
        return has_metadata(self.frame)


def role_rows(df: pd.DataFrame, role: str, held_out: float = 0.0, seed: int = 42) -> pd.DataFrame:
    """The rows of `role`; with `held_out`, that seeded share of train rows (the external hold-out that
    training left out, `dermlens data holdout`) moves from train to val."""
    from dermlens.data.splits import holdout_rows

    if role not in ROLES:
        raise RefitError(f"unknown role {role!r}; choose from {ROLES}")
    split = df["split"].astype(str).copy()
    if held_out > 0:
        split.loc[holdout_rows(df, held_out, seed)] = "val"
    return df[split.to_numpy() == role]


def select(
    manifest: str | Path, role: str, limit: int | None = None, held_out: float = 0.0, seed: int = 0
) -> pd.DataFrame:
    """Rows of `role` in a prepared folder; a seeded random `limit` of them when given."""
    from dermlens.data.manifest import read_manifest

    rows = role_rows(read_manifest(manifest), role, held_out)
    if rows.empty:
        raise RefitError(f"{manifest}: no rows of role {role!r}")
    if limit is not None and len(rows) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), int(limit), replace=False))
        rows = rows.iloc[pick]
    return rows.reset_index(drop=True)


def row_key(run: Runner, rows: pd.DataFrame) -> str:
    """Cache key of the model's outputs on `rows` (bundle version, precision, preprocessing, files)."""
    ids = "\n".join(rows["image_path"].astype(str))
    text = f"{run.card.version}|{run.precision}|{run.prep.to_dict()}|{ids}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _score(run: Runner, rows: pd.DataFrame, both: bool, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Decode, resize and score the rows in chunks: embedding and logits with metadata, and (`both`)
    logits without metadata."""
    parts: dict[str, list[np.ndarray]] = {"embedding": [], "logits_meta": [], "logits_none": []}
    meta = encode_rows(list(rows["age"]), list(rows["sex"]), list(rows["site"]))
    for start in range(0, len(rows), CHUNK):
        paths = rows["image_path"].iloc[start : start + CHUNK]
        images = np.stack([run.prep.resize(load_rgb(p)) for p in paths])
        with_meta = run(images, meta[start : start + CHUNK])
        none = run(images, no_meta(len(images)))["fine_logits"] if both else np.zeros((len(images), 0))
        parts["embedding"].append(with_meta["embedding"])
        parts["logits_meta"].append(with_meta["fine_logits"])
        parts["logits_none"].append(none)
        log(f"  scored {min(start + CHUNK, len(rows))}/{len(rows)}")
    return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}


def score_rows(
    run: Runner,
    rows: pd.DataFrame,
    name: str,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    both: bool = True,
) -> Scored:
    """The model's outputs on `rows` (`both`: also without metadata), cached in `cache_dir` when given."""
    key = row_key(run, rows) + ("" if both else "-image")
    path = None if cache_dir is None else Path(cache_dir) / f"{name}-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            arrays = {k: np.array(z[k]) for k in z.files}
    else:
        log(f"scoring {len(rows)} images of {name} ({run.precision})")
        arrays = _score(run, rows, both, log)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **arrays)
    return Scored(name, rows, arrays["embedding"], arrays["logits_meta"], arrays["logits_none"])


def load_source(
    run: Runner,
    spec: dict[str, Any],
    name: str,
    role: str,
    limit: int | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Scored:
    """Scored rows of one role of the source described by `spec` ({dir, held_out}); train rows (the
    not-dermoscopy head's) are scored once, with their metadata."""
    rows = select(spec["dir"], role, limit, float(spec.get("held_out") or 0.0))
    return score_rows(run, rows, f"{name}-{role}", cache_dir, log, both=role != "train")


__all__ = ["ROLES", "Scored", "load_source", "role_rows", "row_key", "score_rows", "select"]
