"""ISIC Archive downloads (isic-cli: images + metadata.csv in the Archive's current schema) as a manifest.

The diagnosis_1..diagnosis_5 hierarchy maps onto dermlens classes through the taxonomy (deepest level
that maps wins); rows that map to no class keep their deepest term as the label, so validation reports
them and `--on-error skip` drops them. Only `image_type` values asked for are kept (default dermoscopic).
`patient_id` travels in the manifest so splits group by lesion and by patient.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd

from dermlens import config as configuration
from dermlens.data import taxonomy as tx
from dermlens.data.manifest import DataError
from dermlens.data.readers import build_frame, locate, read_csv_file, require_dir

REQUIRED = ("isic_id", "diagnosis_1")


@cache
def archive_config() -> dict:
    """Settings from configs/isic_archive.yaml."""
    return configuration.load("isic_archive")


def _levels(meta: pd.DataFrame) -> list[list[object]]:
    cols = [c for c in tx.ARCHIVE_LEVELS if c in meta.columns]
    return meta[cols].astype(object).where(meta[cols].notna(), None).values.tolist()


def _path(levels: list[object]) -> str:
    return ":".join(str(v).strip() for v in levels if v is not None and str(v).strip())


def _label(levels: list[object]) -> str | None:
    """Fine code, else the deepest term lower-cased (reported as unmapped), else None (no diagnosis)."""
    code = tx.archive_fine_code(levels)
    if code is not None:
        return code
    terms = [str(v).strip() for v in levels if v is not None and str(v).strip()]
    return terms[-1].lower() if terms else None


def keep_image_types(meta: pd.DataFrame, image_types: tuple[str, ...]) -> pd.DataFrame:
    """Rows whose image_type is one of `image_types` (empty: every row)."""
    if not image_types:
        return meta
    if "image_type" not in meta.columns:
        raise DataError("metadata.csv has no image_type column; pass --image-types all to keep every row")
    wanted = {t.strip().lower() for t in image_types}
    return meta[meta["image_type"].fillna("").str.strip().str.lower().isin(wanted)]


def read_isic_archive(
    root: str | Path,
    image_dir: str | Path | None = None,
    image_types: tuple[str, ...] = ("dermoscopic",),
) -> pd.DataFrame:
    """An isic-cli download (metadata.csv + ISIC_*.jpg) -> manifest table (+ patient_id, image_type)."""
    root = require_dir(root)
    csv = root / archive_config()["metadata_csv"]
    if not csv.is_file():
        raise DataError(f"{csv.name} not found in {root}: pass the folder `isic image download` wrote")
    meta = read_csv_file(csv)
    missing = [c for c in REQUIRED if c not in meta.columns]
    if missing:
        raise DataError(f"{csv} lacks columns {missing}: not the ISIC Archive's current metadata schema")
    total = len(meta)
    meta = keep_image_types(meta, image_types).reset_index(drop=True)
    levels = _levels(meta)
    ids = meta["isic_id"].str.strip()
    get = meta.get
    df = build_frame(
        ids,
        locate(ids, root, ["images", "."], image_dir and Path(image_dir)),
        pd.Series([_label(lv) for lv in levels], dtype=object),
        "isic-archive",
        lesion_id=get("lesion_id"),
        age=get("age_approx"),
        sex=get("sex"),
        site=get("anatom_site_general"),
        dx_type=get("diagnosis_confirm_type"),
        patient_id=_strings(get("patient_id"), len(meta)),
        image_type=_strings(get("image_type"), len(meta)),
        isic_diagnosis=[_path(lv) for lv in levels],
    )
    df.attrs["dropped_image_type"] = total - len(meta)
    return df


def _strings(values: pd.Series | None, n: int) -> list[str | None]:
    if values is None:
        return [None] * n
    return [None if pd.isna(v) or not str(v).strip() else str(v).strip() for v in values]


def unmapped(df: pd.DataFrame) -> pd.Series:
    """Count of rows per ISIC diagnosis path that maps to no dermlens class (most frequent first)."""
    known = set(tx.FINE_CODES) | {tx.UNKNOWN}
    bad = df[~df["diagnosis"].isin(known)]
    return bad["isic_diagnosis"].replace("", "(no diagnosis)").value_counts()
