"""Readers: turn each dataset's own layout into the canonical manifest table (one row per image).

Readers never drop rows and never decode images: labels they cannot map are kept as the raw lower-cased
string (validation reports them), and missing image files still get the path where they would be.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens.data import taxonomy as tx
from dermlens.data.manifest import DataError, data_config, normalize
from dermlens.preprocess import image_suffixes

IMAGE_SUFFIXES = image_suffixes()
HAM_CSV = "HAM10000_metadata.csv"
HAM_IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", ".")
HAM_MASK_DIRS = ("masks", "HAM10000_segmentations_lesion_tschandl")
ISIC2019_GT = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_META = "ISIC_2019_Training_Metadata.csv"
ISIC2019_IMAGE_DIRS = ("ISIC_2019_Training_Input", "images", ".")
ISIC2019_PROVENANCE = "images_provenance.csv"
ISIC2017_CSV = "ISIC-2017_labels.csv"
ISIC2017_IMAGE_DIRS = (
    "images",
    "ISIC-2017_Training_Data",
    "ISIC-2017_Validation_Data",
    "ISIC-2017_Test_v2_Data",
    ".",
)


def _abs(path: str | Path) -> str:
    """Absolute, normalized path string (symlinks are kept, '..' is collapsed)."""
    return os.path.abspath(os.fspath(path))


def require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    return root


def require_file(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise DataError(f"{name} not found in {root}")
    return path


def read_csv_file(path: Path) -> pd.DataFrame:
    """Read a CSV as strings (empty cells -> NaN); a malformed file becomes a DataError."""
    try:
        return pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def index_images(dirs: Iterable[Path], suffix: str = "") -> dict[str, str]:
    """Map image stem (without `suffix`) -> absolute path over the image files in `dirs` (first wins)."""
    found: dict[str, str] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() not in IMAGE_SUFFIXES or not stem.endswith(suffix):
                    continue
                key = stem[: len(stem) - len(suffix)] if suffix else stem
                found.setdefault(key, _abs(Path(d) / entry.name))
    return found


def locate(ids: pd.Series, root: Path, subdirs: Iterable[str], image_dir: Path | None) -> pd.Series:
    """Absolute image path per id: where the file is, else where it would be (first existing folder)."""
    dirs = [Path(image_dir)] if image_dir is not None else [root / s for s in subdirs]
    index = index_images(dirs)
    default = next((d for d in dirs if d.is_dir() and d != root), dirs[0])
    return ids.map(lambda i: index.get(i) or _abs(default / f"{i}.jpg"))


def map_label(raw: object) -> str | None:
    """Fine code for a raw label; the raw lower-cased string if unmappable; None if empty."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or str(raw).strip() == "":
        return None
    try:
        return tx.fine_code(raw)
    except tx.UnknownLabelError:
        return str(raw).strip().lower()


def _coarse(code: str | None) -> str | None:
    known = code in tx.FINE_CODES or code == tx.UNKNOWN
    return tx.coarse_label(code) if known else None


def build_frame(
    image_id: pd.Series,
    image_path: pd.Series,
    diagnosis: pd.Series,
    dataset: str,
    lesion_id: pd.Series | None = None,
    age: pd.Series | None = None,
    sex: pd.Series | None = None,
    site: pd.Series | None = None,
    dx_type: pd.Series | None = None,
    coarse: pd.Series | None = None,
    **extra: pd.Series,
) -> pd.DataFrame:
    """Assemble canonical manifest columns, applying the taxonomy to labels, sex, site and confirm type.

    `coarse` overrides benign/malignant where the dataset knows it but not the fine diagnosis.
    """
    n = len(image_id)

    def col(s: pd.Series | None, fn: Callable[[object], object]) -> list:
        return [None] * n if s is None else [fn(v) for v in s.tolist()]

    ids = [str(i).strip() for i in image_id.tolist()]
    lesions = col(lesion_id, lambda v: None if pd.isna(v) or str(v).strip() == "" else str(v).strip())
    dx = [map_label(v) for v in diagnosis.tolist()]
    df = pd.DataFrame(
        {
            "image_id": ids,
            "image_path": [str(p) for p in image_path.tolist()],
            "lesion_id": lesions,
            "group_id": [les if les is not None else i for les, i in zip(lesions, ids, strict=True)],
            "diagnosis": dx,
            "coarse": [_coarse(d) for d in dx] if coarse is None else coarse.tolist(),
            "age": pd.to_numeric(pd.Series(col(age, lambda v: v), dtype=object), errors="coerce"),
            "sex": col(sex, lambda v: tx.sex_value(v) if not pd.isna(v) else None),
            "site": col(site, lambda v: tx.site_general(v) if not pd.isna(v) else None),
            "dataset": dataset,
            "dx_type": col(dx_type, lambda v: tx.confirm_type(v) if not pd.isna(v) else None),
        }
    )
    for name, values in extra.items():
        df[name] = list(values)
    return normalize(df)


def read_ham10000(root: str | Path, image_dir: str | Path | None = None) -> pd.DataFrame:
    """HAM10000: metadata CSV + images in images/, one folder, or _part_1/_part_2; masks if present."""
    root = require_dir(root)
    meta = read_csv_file(require_file(root, HAM_CSV))
    need = {"lesion_id", "image_id", "dx"} - set(meta.columns)
    if need:
        raise DataError(f"{HAM_CSV} lacks columns {sorted(need)}")
    paths = locate(meta["image_id"].str.strip(), root, HAM_IMAGE_DIRS, image_dir and Path(image_dir))
    extra = {}
    mask_dirs = [root / d for d in HAM_MASK_DIRS if (root / d).is_dir()]
    if mask_dirs:
        masks = index_images(mask_dirs, suffix="_segmentation")
        extra["mask_path"] = meta["image_id"].str.strip().map(masks)
    get = meta.get
    return build_frame(
        meta["image_id"],
        paths,
        meta["dx"],
        "ham10000",
        lesion_id=meta["lesion_id"],
        age=get("age"),
        sex=get("sex"),
        site=get("localization"),
        dx_type=get("dx_type"),
        **extra,
    )


def read_isic2019(root: str | Path, image_dir: str | Path | None = None) -> pd.DataFrame:
    """ISIC 2019 training set: ground-truth one-hot CSV + metadata CSV (+ images, which may be absent).

    Where the image folder holds some images (the shared copy: the BCN20000 thumbnails), the rows without
    one are the HAM10000 and ISIC 2017 images, prepared from those datasets: they are left out, with a
    note in `df.attrs["note"]`. Identical thumbnails (same sha256 in images_provenance.csv) share a group.
    """
    root = require_dir(root)
    gt = read_csv_file(require_file(root, ISIC2019_GT))
    meta_path = root / ISIC2019_META
    meta = read_csv_file(meta_path) if meta_path.is_file() else pd.DataFrame({"image": gt["image"]})
    label_cols = [c for c in gt.columns if c != "image"]
    onehot = gt[label_cols].apply(pd.to_numeric, errors="coerce").fillna(0.0).to_numpy()
    codes = np.array([map_label(c) for c in label_cols], dtype=object)
    gt = gt.assign(_dx=np.where(onehot.max(axis=1) > 0, codes[onehot.argmax(axis=1)], None))
    df = gt[["image", "_dx"]].merge(meta, on="image", how="left", validate="many_to_one")
    df["image"] = df["image"].str.strip()
    dirs = [Path(image_dir)] if image_dir is not None else [root / s for s in ISIC2019_IMAGE_DIRS]
    present = index_images(dirs)
    note = None
    if present:
        here = df["image"].isin(present).to_numpy()
        if not here.all():
            note = (
                f"{int((~here).sum())} ISIC 2019 rows have their images in ham10000/isic2017 (prepare those "
                f"datasets for them); this manifest holds the {int(here.sum())} images in {root}"
            )
        df = df[here].reset_index(drop=True)
    extra = {}
    prov = root / ISIC2019_PROVENANCE
    if prov.is_file():
        sha = read_csv_file(prov).set_index("image")
        if "sha256" in sha.columns:
            extra["image_sha256"] = df["image"].map(sha["sha256"])
    get = df.get
    out = build_frame(
        df["image"],
        locate(df["image"], root, ISIC2019_IMAGE_DIRS, image_dir and Path(image_dir)),
        df["_dx"],
        "isic2019",
        lesion_id=get("lesion_id"),
        age=get("age_approx"),
        sex=get("sex"),
        site=get("anatom_site_general"),
        **extra,
    )
    if note:
        out.attrs["note"] = note
    return out


def _isic2017_label(mel: object, sk: object) -> str:
    """melanoma=1 -> mel, seborrheic_keratosis=1 -> bkl, SK unknown (val split) -> unk, else nv."""
    if pd.to_numeric(mel, errors="coerce") == 1:
        return "mel"
    sk_value = pd.to_numeric(sk, errors="coerce")
    if pd.isna(sk_value):
        return tx.UNKNOWN
    return "bkl" if sk_value == 1 else "nv"


def read_isic2017(root: str | Path, image_dir: str | Path | None = None) -> pd.DataFrame:
    """ISIC 2017 Part 3: ISIC-2017_labels.csv (melanoma / seborrheic_keratosis flags, own split) + images."""
    root = require_dir(root)
    lab = read_csv_file(require_file(root, ISIC2017_CSV))
    need = {"image_id", "melanoma", "seborrheic_keratosis"} - set(lab.columns)
    if need:
        raise DataError(f"{ISIC2017_CSV} lacks columns {sorted(need)}")
    dx = pd.Series(
        [_isic2017_label(m, s) for m, s in zip(lab["melanoma"], lab["seborrheic_keratosis"], strict=True)]
    )
    ids = lab["image_id"].str.strip()
    # melanoma is labelled in every split, so an "unk" (val split, SK column empty) row is known benign
    coarse = dx.map(lambda d: "malignant" if d == "mel" else "benign")
    extra = {"split": _split_values(lab["split"])} if "split" in lab.columns else {}
    return build_frame(
        ids,
        locate(ids, root, ISIC2017_IMAGE_DIRS, image_dir and Path(image_dir)),
        dx,
        "isic2017",
        age=lab.get("age_approximate"),
        sex=lab.get("sex"),
        coarse=coarse,
        **extra,
    )


_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


def _split_values(values: pd.Series) -> pd.Series:
    """A dataset's own split column as train/val/test (common spellings accepted)."""
    v = values.astype(str).str.strip().str.lower()
    return v.map(lambda x: _SPLIT_ALIASES.get(x, x)).where(values.notna(), None)


def _find_column(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[c.lower()] for c in candidates if c.lower() in lower), None)


def resolve_columns(columns: Iterable[str], overrides: dict[str, str] | None = None) -> dict[str, str | None]:
    """Role -> CSV column for a generic CSV: explicit overrides, else the first matching candidate name."""
    columns = list(columns)
    overrides = overrides or {}
    candidates: dict[str, list[str]] = data_config()["csv"]
    unknown_roles = set(overrides) - set(candidates)
    if unknown_roles:
        raise DataError(f"unknown column role(s) {sorted(unknown_roles)}; known: {sorted(candidates)}")
    out: dict[str, str | None] = {}
    for role, names in candidates.items():
        if role in overrides:
            if overrides[role] not in columns:
                raise DataError(f"column {overrides[role]!r} (for {role}) not in CSV columns {columns}")
            out[role] = overrides[role]
        else:
            out[role] = _find_column(columns, names)
    for role in ("image", "diagnosis"):
        if out[role] is None:
            raise DataError(f"no {role} column found among {columns}; name it with --columns {role}=COLUMN")
    return out


def _find_csv(root: Path) -> Path:
    if root.is_file():
        return root
    csvs = sorted(root.glob("*.csv")) if root.is_dir() else []
    if len(csvs) != 1:
        where = f"{len(csvs)} CSV files in {root}" if root.is_dir() else f"{root} does not exist"
        raise DataError(f"pass the CSV file itself as --root ({where})")
    return csvs[0]


def read_csv_dataset(
    root: str | Path,
    image_dir: str | Path | None = None,
    columns: dict[str, str] | None = None,
    dataset: str | None = None,
) -> pd.DataFrame:
    """A user's CSV: image path or id (+ image folder), diagnosis, optional lesion/age/sex/site/dx_type."""
    csv_path = _find_csv(Path(root))
    table = read_csv_file(csv_path)
    cols = resolve_columns(table.columns, columns)
    base = Path(image_dir) if image_dir is not None else csv_path.parent
    raw = table[cols["image"]].fillna("").str.strip()
    looks_like_path = raw.map(lambda v: Path(v).suffix.lower() in IMAGE_SUFFIXES or "/" in v)
    if looks_like_path.all():
        paths = raw.map(lambda v: _abs(base / v))
        ids = raw.map(lambda v: Path(v).stem)
    else:
        ids = raw.map(lambda v: Path(v).stem if Path(v).suffix.lower() in IMAGE_SUFFIXES else v)
        paths = locate(ids, base, ["images", "."], None if image_dir is None else base)

    def get(role: str) -> pd.Series | None:
        return table[cols[role]] if cols[role] else None

    extra = {}
    if cols["split"]:
        extra["split"] = _split_values(table[cols["split"]])
    df = build_frame(
        ids,
        paths,
        table[cols["diagnosis"]],
        dataset or csv_path.stem,
        lesion_id=get("lesion"),
        age=get("age"),
        sex=get("sex"),
        site=get("site"),
        dx_type=get("dx_type"),
        **extra,
    )
    return fill_from_dicom(df)


def fill_from_dicom(df: pd.DataFrame) -> pd.DataFrame:
    """Age, sex and site from the tags of DICOM images where the CSV leaves them empty (headers only)."""
    from dermlens.data.dicom_meta import read_meta
    from dermlens.dicom import is_dicom_file
    from dermlens.preprocess import ImageDecodeError

    for i, path in enumerate(df["image_path"]):
        if not is_dicom_file(path):
            continue
        try:
            tags = read_meta(path)
        except ImageDecodeError:
            continue  # validation reports the file when it fails to decode
        for col in ("age", "sex", "site"):
            if pd.isna(df.at[i, col]) and tags[col] is not None:
                df.at[i, col] = tags[col]
    return df
