"""The canonical manifest table: columns, dtypes, read/write, content hash, data-layer config."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens import config as configuration
from dermlens.errors import DataError  # noqa: F401 (re-exported)

MANIFEST_NAME = "manifest.csv"
SPLITS_NAME = "splits.json"
REPORT_NAME = "validation_report.json"

# Column order of DIR/manifest.csv; `mask_path`, `split`, `fold` are added when known.
BASE_COLUMNS: tuple[str, ...] = (
    "image_id",
    "image_path",
    "lesion_id",
    "group_id",
    "diagnosis",
    "coarse",
    "age",
    "sex",
    "site",
    "dataset",
    "dx_type",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("mask_path", "split", "fold")
_STR_COLUMNS = ("image_id", "image_path", "lesion_id", "group_id", "diagnosis", "coarse", "sex", "site")
_STR_COLUMNS += ("dataset", "dx_type", "mask_path", "split")


@cache
def data_config() -> dict:
    """Settings from configs/data.yaml (split fractions, seed, folds, validation limits, cache workers)."""
    return configuration.load("data")


def _clean_str(s: pd.Series) -> pd.Series:
    """Strings stay strings; NaN/empty become None (object dtype, so CSV round-trips keep them empty)."""
    out = s.astype(object).where(s.notna(), None)
    return out.map(lambda v: None if v is None or str(v).strip() == "" else str(v))


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Order columns canonically and coerce dtypes (age float, fold int, strings or None)."""
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    cols = list(BASE_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in df.columns]
    cols += [c for c in df.columns if c not in cols]
    out = df[cols].reset_index(drop=True).copy()
    for c in _STR_COLUMNS:
        if c in out.columns:
            out[c] = _clean_str(out[c])
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype(float)
    if "fold" in out.columns:
        out["fold"] = pd.to_numeric(out["fold"], errors="coerce").fillna(-1).astype(np.int64)
    return out


def write_manifest(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write DIR/manifest.csv atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    tmp = path.with_suffix(".csv.tmp")
    normalize(df).to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_manifest(out_dir: str | Path) -> pd.DataFrame:
    """Read DIR/manifest.csv (or a manifest CSV path) into a DataFrame with canonical dtypes."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"no manifest at {path}: run `dermlens data prepare` first")
    df = pd.read_csv(path, dtype={c: object for c in _STR_COLUMNS}, keep_default_na=False, na_values=[""])
    return normalize(df)


def split_hash(df: pd.DataFrame) -> str:
    """Content hash of the split assignment (image id, split, diagnosis), whatever the row order or paths."""
    h = hashlib.sha256()
    cols = [df[c].astype(str) for c in ("image_id", "split", "diagnosis")]
    for row in sorted(zip(*cols, strict=True)):
        h.update("\t".join(row).encode() + b"\n")
    return h.hexdigest()


def manifest_hash(df: pd.DataFrame) -> str:
    """Content hash of the image list (ids and paths in row order): identifies what a cache holds."""
    h = hashlib.sha256()
    for image_id, path in zip(df["image_id"], df["image_path"], strict=True):
        h.update(f"{image_id}\t{path}\n".encode())
    return h.hexdigest()
