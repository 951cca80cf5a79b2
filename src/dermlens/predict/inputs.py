"""The inputs of a folder prediction: files, folders (searched recursively) and manifest CSVs expanded into
items, with per-image metadata from CSV columns or DICOM tags, and failures for what cannot be read.

Image ids are file names without extension; files of the same name (in different folders) get ids made
unique by a short hash of their path (`NAME_1a2b3c4d`), so neither rows nor CAM files collide.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermlens.errors import BatchInputError
from dermlens.preprocess import ImageDecodeError, find_image, image_suffixes

IMAGE_EXTENSIONS: frozenset[str] = frozenset(image_suffixes())
# Column names tried (case-insensitive) when reading a manifest or metadata CSV; the first present wins.
IMAGE_COLUMNS = ("image_path", "path", "file", "filename", "image", "image_id", "isic_id", "id")
AGE_COLUMNS = ("age", "age_approx", "age_approximate")
SEX_COLUMNS = ("sex", "gender")
SITE_COLUMNS = ("site", "anatom_site_general", "localization", "location")


@dataclass
class Item:
    """One image to score."""

    path: Path
    image_id: str
    meta: dict[str, Any] | None = None


@dataclass
class Failure:
    """An input that could not be scored, with the reason."""

    path: str
    reason: str


def _pick(columns: Iterable[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _clean(value: Any) -> Any:
    """NaN / empty -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return None if isinstance(value, str) and not value.strip() else value


def _row_meta(row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any] | None:
    meta = {k: _clean(row.get(c)) if c else None for k, c in cols.items()}
    return meta if any(v is not None for v in meta.values()) else None


def _meta_columns(columns: Iterable[str]) -> dict[str, str | None]:
    columns = list(columns)
    return {
        "age": _pick(columns, AGE_COLUMNS),
        "sex": _pick(columns, SEX_COLUMNS),
        "site": _pick(columns, SITE_COLUMNS),
    }


def _resolve_image(value: str, base: Path) -> Path:
    """A manifest cell (absolute or relative path, or an id without extension) -> an image path."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, p]
    if not p.suffix:
        candidates += [f for f in (find_image(folder, p.name) for folder in (base, base / "images")) if f]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_manifest_csv(path: Path) -> list[Item]:
    """Images listed in a CSV (first image-like column), with age/sex/site columns as metadata."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BatchInputError(f"{path}: not a readable CSV ({e})") from e
    col = _pick(df.columns, IMAGE_COLUMNS)
    if col is None:
        raise BatchInputError(f"{path}: no image column (tried {', '.join(IMAGE_COLUMNS)})")
    mcols = _meta_columns(df.columns)
    items = []
    for row in df.to_dict("records"):
        value = str(row[col]).strip()
        if value:
            img = _resolve_image(value, path.parent)
            items.append(Item(img, img.stem, _row_meta(row, mcols)))
    return items


def read_metadata_csv(path: Path) -> dict[str, dict[str, Any]]:
    """Per-image metadata keyed by image id (file name without extension) from a CSV."""
    items = read_manifest_csv(path)
    return {it.image_id: it.meta for it in items if it.meta}


def apply_dicom_meta(items: list[Item]) -> int:
    """Fill each DICOM item's missing age/sex/site from its tags (given values win); returns the count.

    Reads headers only; a file whose header is unreadable is left alone (decoding reports it).
    """
    from dermlens.data.dicom_meta import read_meta
    from dermlens.dicom import is_dicom_file, merge_meta

    n = 0
    for it in items:
        if is_dicom_file(it.path):
            try:
                it.meta = merge_meta(it.meta, read_meta(it.path))
                n += 1
            except ImageDecodeError:
                continue
    return n


def collect_inputs(inputs: list[Path]) -> tuple[list[Item], list[Failure]]:
    """Expand files, folders (recursive, image extensions) and manifest CSVs into items, in order.

    A file or folder entry that is not a regular file (a dangling symbolic link, a FIFO, a device) is a
    failure, never opened; ids shared by several files are made unique (`unique_ids`)."""
    items: list[Item] = []
    failures: list[Failure] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and not f.is_dir())
            reasons = {f: _not_regular(f) for f in found}
            files = [f for f in found if reasons[f] is None]
            failures += [Failure(str(f), r) for f, r in reasons.items() if r is not None]
            if not found:
                failures.append(
                    Failure(
                        str(p), "folder holds no image files (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
                    )
                )
            items += [Item(f, f.stem) for f in files]
        elif p.suffix.lower() == ".csv" and p.is_file():
            items += read_manifest_csv(p)
        elif _not_regular(p) is None:
            items.append(Item(p, p.stem))
        else:
            failures.append(Failure(str(p), _not_regular(p) or ""))
    return unique_ids(_unique_paths(items)), failures


def _unique_paths(items: list[Item]) -> list[Item]:
    seen: set[Path] = set()
    unique = []
    for it in items:
        key = it.path.absolute()
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return unique


def _not_regular(path: Path) -> str | None:
    """Why `path` cannot be read as an image file (missing, dangling link, FIFO...), or None if it can."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "dangling symbolic link" if path.is_symlink() else "no such file or folder"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    kind = "FIFO (named pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return f"not a regular file ({kind})"


def unique_ids(items: list[Item]) -> list[Item]:
    """Give files that share an id (same name in two folders) the id `ID_HASH`, HASH the first 8 hex
    digits of the SHA-1 of the file's path: one row and one CAM file per file, the same on every run."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.image_id] = counts.get(it.image_id, 0) + 1
    for it in items:
        if counts[it.image_id] > 1:
            raw = os.fsencode(it.path)
            it.image_id = f"{it.image_id}_{hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:8]}"
    return items
