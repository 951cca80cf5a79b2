"""What `dermlens evaluate` scores: probabilities and truth from ISIC/dermlens CSVs, or a model on a manifest.

Notes on left-out rows go to stderr; inputs that cannot be evaluated raise `EvaluationInputError`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from dermlens.errors import EvaluationInputError  # noqa: F401 (re-exported)


@dataclass
class EvalInputs:
    """Probabilities, truth and what else the metrics and the report use, from CSVs or a model."""

    images: list[str]
    classes: tuple[str, ...]
    probs: object
    truth: object
    groups: list | None = None
    malignant: object = None
    uncalibrated: object = None
    refer: object = None
    image_paths: list | None = None
    train_counts: dict[str, int] | None = None
    source: str = ""
    predictor: object = None
    frame: object = None  # model mode: the evaluated manifest rows (age/sex/site for the subgroup audit)
    arrays: dict | None = None  # model mode: every Predictor output (incl. nometa_* without metadata)


def note(text: str) -> None:
    """A note on stderr (rows left out, optional parts skipped)."""
    print(text, file=sys.stderr)


def train_counts(side) -> dict[str, int] | None:
    """Diagnosis counts of the train split in a manifest-like table, or None."""
    if side is None or not {"split", "diagnosis"} <= set(side.columns):
        return None
    counts = side.loc[side["split"] == "train", "diagnosis"].value_counts()
    return {str(k): int(v) for k, v in counts.items()} or None


def _find_image(image_dir: Path, image_id: str) -> str | None:
    from dermlens.preprocess import find_image

    found = find_image(image_dir, image_id)
    return None if found is None else str(found)


def _add_groups(out: EvalInputs, groups: Path) -> None:
    """Lesions, image paths and train counts of the evaluated images from a manifest or ISIC metadata CSV."""
    import pandas as pd

    from dermlens.evaluate.isic_csv import read_image_table

    side = read_image_table(groups).set_index("image")
    known = side.reindex(out.images)
    n_missing = int((~pd.Index(out.images).isin(side.index)).sum())
    if n_missing == len(out.images):
        raise EvaluationInputError(f"{groups}: none of the {len(out.images)} evaluated images is listed")
    if n_missing:
        note(f"note: {n_missing} image(s) not in {groups.name}; each counts as its own lesion")
    if "group" in known.columns:
        out.groups = [None if isinstance(g, float) else g for g in known["group"].tolist()]
    if "image_path" in known.columns:
        out.image_paths = [None if isinstance(x, float) else x for x in known["image_path"].tolist()]
    out.train_counts = train_counts(side.reset_index())


def from_csv(
    predictions: Path,
    truth: Path,
    groups: Path | None,
    uncalibrated: Path | None,
    image_dir: Path | None,
    cfg,
) -> EvalInputs:
    """Inputs from ISIC/dermlens CSVs (+ optional manifest for groups, image paths and train counts)."""
    import numpy as np

    from dermlens.evaluate.isic_csv import align, read_predictions, read_truth

    t_raw = read_truth(truth)
    t, p = align(t_raw, read_predictions(predictions, cfg.row_sum_tolerance))
    uncal = None
    if uncalibrated is not None:
        tu, u = align(t_raw, read_predictions(uncalibrated, cfg.row_sum_tolerance))
        if tu.classes != t.classes:
            raise EvaluationInputError(
                f"{uncalibrated}: classes {tu.classes} differ from the predictions' {t.classes}"
            )
        uncal = u.values
    out = EvalInputs(
        list(t.images),
        t.classes,
        p.values,
        t.labels(),
        uncalibrated=uncal,
        source=f"predictions {predictions.name}, truth {truth.name}",
    )
    if groups is not None:
        _add_groups(out, groups)
    if image_dir is not None:
        found = [_find_image(image_dir, i) for i in out.images]
        prior = out.image_paths or [None] * len(found)
        out.image_paths = [a if a is not None else b for a, b in zip(prior, found, strict=True)]
    out.probs, out.truth = np.asarray(out.probs), np.asarray(out.truth)
    return out


def _row_meta(r) -> dict:
    """age/sex/site of one manifest row (itertuples), None where missing."""
    import math

    def text(v: object) -> str | None:
        return v if isinstance(v, str) else None

    age = None if r.age is None or (isinstance(r.age, float) and math.isnan(r.age)) else float(r.age)
    return {"age": age, "sex": text(r.sex), "site": text(getattr(r, "site", None))}


def predict_rows(predictor, rows, batch_size: int, use_metadata: bool = True, no_meta: bool = False) -> dict:
    """Predict every manifest row (image plus age/sex/site where present, unless use_metadata is False);
    with no_meta, also each image without metadata (keys prefixed 'nometa_'), decoded once."""
    import numpy as np

    from dermlens.preprocess import load_rgb

    parts: dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows.iloc[start : start + batch_size]
        images = [load_rgb(p) for p in batch["image_path"]]
        meta = [_row_meta(r) for r in batch.itertuples()]
        outs = {"": predictor.predict_arrays(images, meta if use_metadata else None)}
        if no_meta and use_metadata:
            outs["nometa_"] = predictor.predict_arrays(images, None)
        for prefix, res in outs.items():
            for k, v in res.items():
                if v is not None and k != "refer_codes":
                    parts.setdefault(prefix + k, []).append(np.asarray(v))
                elif k == "refer_codes":
                    parts.setdefault(prefix + k, []).append(np.array(["|".join(c) for c in v], dtype=object))
        note(f"predicted {min(start + batch_size, len(rows))}/{len(rows)}")
    return {k: np.concatenate(v) for k, v in parts.items()}


def unseen(rows, seen_manifest: Path | None):
    """Drop rows whose image is in the `train` split of another manifest (the model's training data)."""
    if seen_manifest is None:
        return rows
    from dermlens.data.manifest import read_manifest

    seen = read_manifest(seen_manifest)
    trained = set(seen.loc[seen["split"] == "train", "image_id"].astype(str))
    kept = rows[~rows["image_id"].astype(str).isin(trained)]
    note(f"note: {len(rows) - len(kept)} image(s) in the train split of {seen_manifest} left out")
    return kept


def external_rows(manifest: Path, split: str, classes: tuple[str, ...]):
    """Labelled rows of an external manifest split (diagnosis one of the model's classes)."""
    from dermlens.data.manifest import read_manifest

    df = read_manifest(manifest)
    rows = df[(df["split"] == split) & df["diagnosis"].isin(classes)]
    if rows.empty:
        raise EvaluationInputError(f"{manifest}: no labelled rows in split {split!r}")
    return rows.reset_index(drop=True)


def _split_rows(manifest: Path, split: str, exclude_train_of: Path | None):
    """The manifest and the rows of one split (only those unseen in training, if asked)."""
    from dermlens.data.manifest import read_manifest

    df = read_manifest(manifest)
    rows = unseen(df[df["split"] == split], exclude_train_of)
    if rows.empty:
        raise EvaluationInputError(
            f"{manifest}: no rows in split {split!r} (splits: {sorted(df['split'].unique())})"
        )
    return df, rows


def from_model(
    manifest: Path,
    split: str,
    model: Path | None,
    cfg,
    use_metadata: bool = True,
    exclude_train_of: Path | None = None,
) -> EvalInputs:
    """Run the inference layer's Predictor on a manifest split (labelled images only)."""
    import numpy as np

    try:
        from dermlens.infer.predictor import Predictor
    except ImportError as e:
        raise EvaluationInputError(f"model mode needs the inference runtime (dermlens.infer): {e}") from e

    df, rows = _split_rows(manifest, split, exclude_train_of)
    predictor = Predictor.load(model)
    classes = tuple(predictor.classes)
    labelled = rows[rows["diagnosis"].isin(classes)]
    if len(labelled) < len(rows):
        note(f"note: {len(rows) - len(labelled)} {split} image(s) without a label in {classes} skipped")
    if labelled.empty:
        raise EvaluationInputError(f"{manifest}: no labelled images in split {split!r}")
    arr = predict_rows(predictor, labelled, cfg.batch_size, use_metadata, no_meta=True)
    truth = np.array([classes.index(c) for c in labelled["diagnosis"]])
    group_col = "group_id" if "group_id" in labelled.columns else "lesion_id"
    return EvalInputs(
        images=labelled["image_id"].astype(str).tolist(),
        classes=classes,
        probs=arr["probs"],
        truth=truth,
        groups=labelled[group_col].tolist() if group_col in labelled.columns else None,
        malignant=arr.get("malignant"),
        uncalibrated=arr.get("probs_uncalibrated"),
        refer=arr.get("refer"),
        image_paths=labelled["image_path"].astype(str).tolist(),
        train_counts=train_counts(df),
        source=f"model {model or 'release bundle'}, {manifest.name} split {split}"
        + ("" if use_metadata else ", metadata withheld"),
        predictor=predictor,
        frame=labelled.reset_index(drop=True),
        arrays=arr,
    )
