"""PAD-UFES-20 reader: smartphone photos (not dermoscopy) with patient ids and Fitzpatrick skin types."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dermlens.data.manifest import DataError, data_config
from dermlens.data.readers import build_frame, index_images, read_csv_file, require_dir, require_file

PAD_CSV = "metadata.csv"
PAD_IMAGE_DIRS = ("images", ".")


def read_pad_ufes20(root: str | Path, image_dir: str | Path | None = None) -> pd.DataFrame:
    """PAD-UFES-20 smartphone photos: metadata.csv rows whose photo is in images/ (others are left out,
    with a note in `df.attrs["note"]`); patient_id and the Fitzpatrick skin type kept as columns."""
    root = require_dir(root)
    meta = read_csv_file(require_file(root, PAD_CSV))
    need = {"patient_id", "lesion_id", "diagnostic", "img_id"} - set(meta.columns)
    if need:
        raise DataError(f"{PAD_CSV} lacks columns {sorted(need)}")
    cfg = data_config()["pad_ufes20"]
    ids = meta["img_id"].str.strip().map(lambda v: Path(v).stem)
    dirs = [Path(image_dir)] if image_dir is not None else [root / s for s in PAD_IMAGE_DIRS]
    present = index_images(dirs)
    here = ids.isin(present).to_numpy()
    meta, ids = meta[here].reset_index(drop=True), ids[here].reset_index(drop=True)
    labels = {str(k).upper(): v for k, v in cfg["labels"].items()}
    sites = {str(k).upper(): v for k, v in cfg["sites"].items()}
    biopsied = meta.get("biopsed", pd.Series([None] * len(meta)))
    out = build_frame(
        ids,
        ids.map(present),
        meta["diagnostic"].str.strip().str.upper().map(lambda v: labels.get(v, v)),
        "pad_ufes20",
        lesion_id=meta["patient_id"].str.strip() + "_" + meta["lesion_id"].str.strip(),
        age=meta.get("age"),
        sex=meta.get("gender"),
        site=meta.get("region", pd.Series([None] * len(meta))).map(
            lambda v: sites.get(str(v).strip().upper(), v) if pd.notna(v) else None
        ),
        dx_type=biopsied.map(lambda v: "histo" if str(v).strip().lower() == "true" else None),
        patient_id=meta["patient_id"].str.strip(),
        fitzpatrick=pd.to_numeric(meta.get("fitspatrick"), errors="coerce"),
    )
    if not here.all():
        out.attrs["note"] = (
            f"{int((~here).sum())} metadata.csv rows have no photo in {root} (the shared copy holds "
            f"{int(here.sum())} of the dataset's photos); left out"
        )
    return out
