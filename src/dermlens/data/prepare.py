"""`dermlens data prepare`: read a dataset, validate it, split it without lesion leakage, write the manifest,
splits.json and the validation report, and build the decoded-image cache. Progress goes to a rich console."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dermlens.data import registry
from dermlens.data import splits as sp
from dermlens.data.manifest import REPORT_NAME, DataError, data_config, manifest_hash, write_manifest
from dermlens.data.summary import archive_summary, class_table, missing_table
from dermlens.errors import ValidationFailed  # noqa: F401 (re-exported)

Show = Callable[[object], None]


@dataclass
class PrepareOptions:
    """What to prepare and how (None: the default from configs/data.yaml or the dataset's layout)."""

    dataset: str
    root: Path | None
    out: Path | None = None
    method: str = "auto"
    seed: int | None = None
    folds: int | None = None
    fractions: dict[str, float] | None = None
    on_error: str = "skip"
    build: bool = True
    check_images: bool = True
    image_dir: Path | None = None
    columns: dict[str, str] | None = None
    duplicates: Path | None = None
    workers: int | None = None
    image_types: str | None = None


@dataclass
class Prepared:
    """A prepared folder: its manifest, the splits.json record and the image cache (if built)."""

    out: Path
    manifest: Path
    record: dict
    cache: Path | None = None


def image_types(text: str | None) -> tuple[str, ...]:
    """--image-types: () for 'all', else the comma-separated values (default from the config)."""
    from dermlens.data.isic_archive import archive_config

    if text is None:
        return tuple(archive_config()["image_types"])
    if text.strip().lower() == "all":
        return ()
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise ValueError(f"--image-types expects comma-separated image_type values or 'all', got {text!r}")
    return values


def _resolve(opts: PrepareOptions, cfg: dict) -> PrepareOptions:
    """Fill seed, folds, fractions and out from the config; check root, image dir and folds."""
    from dermlens.settings import work_dir

    seed = int(cfg["seed"] if opts.seed is None else opts.seed)
    folds = int(cfg["folds"] if opts.folds is None else opts.folds)
    per_dataset = data_config().get(opts.dataset, {}).get("fractions")
    fractions = opts.fractions or {k: float(v) for k, v in (per_dataset or cfg["fractions"]).items()}
    out = Path(opts.out) if opts.out is not None else work_dir() / opts.dataset
    if opts.root is None:
        raise DataError("--root is required: the dataset folder (or, for --dataset csv, the CSV file)")
    if not opts.root.exists():
        raise DataError(f"--root {opts.root} does not exist")
    if opts.image_dir is not None and not opts.image_dir.is_dir():
        raise DataError(f"--image-dir {opts.image_dir} is not a folder")
    if folds == 1 or folds < 0:
        raise DataError(f"--folds must be 0 (none) or at least 2, got {folds}")
    return PrepareOptions(**{**vars(opts), "seed": seed, "folds": folds, "fractions": fractions, "out": out})


def _read(opts: PrepareOptions, show: Show) -> pd.DataFrame:
    """Read the dataset with its reader (csv columns, archive image types); summarise what it left out."""
    kwargs: dict = {"image_dir": opts.image_dir}
    if opts.dataset == "csv":
        kwargs["columns"] = opts.columns
    elif opts.columns:
        raise DataError("--columns only applies to --dataset csv")
    if opts.dataset == "isic-archive":
        kwargs["image_types"] = image_types(opts.image_types)
    elif opts.image_types:
        raise DataError("--image-types only applies to --dataset isic-archive")
    df = registry.read_dataset(opts.dataset, opts.root, **kwargs)
    show(f"Read [bold]{len(df)}[/bold] images of {opts.dataset} from {opts.root}")
    if df.attrs.get("note"):
        show(f"note: {df.attrs['note']}")
    if opts.dataset == "isic-archive":
        archive_summary(show, df, kwargs["image_types"])
    if df.empty:
        raise DataError(f"{opts.root} lists no images")
    return df


def _validated(df: pd.DataFrame, opts: PrepareOptions, show: Show) -> pd.DataFrame:
    """Validate, write the report; drop bad rows (on_error skip) or raise ValidationFailed (fail)."""
    from dermlens.data.validate import drop_bad_rows, validate

    report = validate(df, check_files=opts.check_images, progress=True, workers=opts.workers)
    opts.out.mkdir(parents=True, exist_ok=True)
    report_path = report.write(opts.out / REPORT_NAME, df, opts.on_error)
    if not opts.check_images:
        show("[yellow]Image files not checked (--no-check-images); no cache built.[/yellow]")
    hint = ""
    if any(i.kind == "missing_file" for i in report.issues):
        hint = (
            " If the images are elsewhere pass --image-dir; for a CSV-only manifest pass --no-check-images."
        )
    if report.ok:
        checked = "images exist and decode, " if opts.check_images else ""
        show(f"[green]Validation passed[/green]: {checked}labels, ids, lesions and ages consistent")
        return df
    show(report.table())
    if opts.on_error == "fail":
        raise ValidationFailed(
            f"validation failed: {report.summary()}. Fix the data or re-run with "
            f"--on-error skip to drop these rows (report: {report_path}).{hint}"
        )
    df = drop_bad_rows(df, report)
    show(f"[yellow]Skipped {len(report.bad_rows)} bad rows[/yellow] (report: {report_path})")
    if df.empty:
        raise ValidationFailed(f"no usable rows left after skipping bad rows.{hint}")
    return df


def _groups(df: pd.DataFrame, opts: PrepareOptions) -> int:
    """Set group_id (lesions, near-duplicate pairs merged); the number of duplicate pairs used."""
    root, duplicates = opts.root, opts.duplicates
    dup_path = duplicates or (root / sp.DUPLICATES_CSV if root.is_dir() else None)
    pairs = sp.read_duplicate_pairs(dup_path) if dup_path and Path(dup_path).is_file() else []
    if duplicates and not duplicates.is_file():
        raise DataError(f"--duplicates {duplicates} not found")
    df["group_id"] = sp.assign_groups(df, pairs)
    return len(pairs)


def _split(df: pd.DataFrame, opts: PrepareOptions, cfg: dict, show: Show) -> tuple[str, dict]:
    """Set the split column by the method (auto, grouped, dermamnist, dataset); the method and search info."""
    method, root = opts.method, opts.root
    if method == "auto":
        method = "dataset" if "split" in df.columns else "grouped"
    info: dict = {}
    if method == "grouped":
        df["split"], info = sp.grouped_split(
            df, opts.fractions, opts.seed, int(cfg["attempts"]), float(cfg["max_deviation"])
        )
        if sp.leaking_groups(df):
            raise DataError("internal error: a lesion group spans two splits")
    elif method == "dermamnist":
        csv = root / sp.DERMAMNIST_CSV if root.is_dir() else Path(sp.DERMAMNIST_CSV)
        if not csv.is_file():
            raise DataError(f"{sp.DERMAMNIST_CSV} not found in {root}")
        df["split"] = sp.dermamnist_split(df, csv)
        show(f"[bold yellow]warning:[/bold yellow] {sp.DERMAMNIST_WARNING}")
    elif "split" not in df.columns:
        raise DataError(f"--split dataset: {opts.dataset} has no split column")
    unknown_splits = set(df["split"].dropna()) - set(sp.SPLITS)
    if unknown_splits or df["split"].isna().any():
        raise DataError(f"split values must be train/val/test, got {sorted(map(str, unknown_splits))}")
    return method, info


def _record(df: pd.DataFrame, opts: PrepareOptions, method: str, info: dict, n_pairs: int, deviation) -> dict:
    """The splits.json record: how the split was made, counts, hash and class-share deviation."""
    return {
        "dataset": opts.dataset,
        "root": str(opts.root.resolve()),
        "method": method,
        "seed": opts.seed,
        "fractions": opts.fractions if method == "grouped" else None,
        "folds": opts.folds,
        "fold_scope": "train+val" if opts.folds else None,
        "n_images": len(df),
        "n_groups": int(df["group_id"].nunique()),
        "duplicate_pairs": n_pairs,
        "manifest_hash": manifest_hash(df),
        "counts": sp.split_counts(df),
        "max_class_share_deviation_points": {k: round(100 * v, 3) for k, v in deviation.items()},
        "leaking_groups": len(sp.leaking_groups(df)),
        **({"search": info} if info else {}),
        **({"warning": sp.DERMAMNIST_WARNING} if method == "dermamnist" else {}),
    }


def _console() -> Show:
    from rich.console import Console

    return Console(soft_wrap=True).print


def prepare(options: PrepareOptions, show: Show | None = None) -> Prepared:
    """Prepare a dataset into options.out (manifest.csv, splits.json, validation report, cache)."""
    from dermlens.data.cache import build_cache
    from dermlens.preprocess import Preprocessing

    show = show or _console()
    cfg = data_config()["split"]
    opts = _resolve(options, cfg)
    df = _validated(_read(opts, show), opts, show)
    n_pairs = _groups(df, opts)
    method, info = _split(df, opts, cfg, show)
    if opts.folds:
        df["fold"] = sp.kfold(df, opts.folds, opts.seed, within=df["split"].isin(["train", "val"]))
    manifest_path = write_manifest(df, opts.out)
    deviation = sp.max_deviation(df["diagnosis"], df["split"])
    record = _record(df, opts, method, info, n_pairs, deviation)
    sp.write_splits_json(opts.out, record)
    show(class_table(df, deviation))
    show(missing_table(df))
    show(f"Wrote {manifest_path} and {opts.out / sp.SPLITS_NAME} ({method} split, seed {opts.seed})")
    result = Prepared(opts.out, manifest_path, record)
    if opts.build:
        prep = Preprocessing.default()
        result.cache = build_cache(df, opts.out, prep, workers=opts.workers)
        show(f"Image cache: {result.cache} ({len(df)}x{prep.height}x{prep.width}x3 uint8)")
    return result
