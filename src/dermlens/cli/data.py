"""`dermlens data ...`: read a dataset, validate it, split it without lesion leakage, cache its images.

Long module: one typer group of four commands (prepare, fetch, cache, holdout) and their rich tables.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Prepare datasets: manifest, validation report, leak-free splits and the decoded-image cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """Prepare datasets: manifest, validation report, leak-free splits and the decoded-image cache."""


EXIT_USAGE = 2  # bad arguments, missing root or CSV
EXIT_INVALID = 1  # data failed validation with --on-error fail


class Dataset(StrEnum):
    ham10000 = "ham10000"
    isic2019 = "isic2019"
    isic2017 = "isic2017"
    csv = "csv"
    isic_archive = "isic-archive"


class SplitMethod(StrEnum):
    auto = "auto"
    grouped = "grouped"
    dermamnist = "dermamnist"
    dataset = "dataset"


class OnError(StrEnum):
    skip = "skip"
    fail = "fail"


_EXAMPLES = (
    "--dataset ham10000 --root ../shared/data/ham10000 --out work/ham10000",
    "--dataset ham10000 --root ../shared/data/ham10000 --out work/ham-dm --split dermamnist",
    "--dataset isic2019 --root ../shared/data/isic2019 --out work/isic2019 --no-check-images",
    "--dataset isic2017 --root ../shared/data/isic2017 --out work/isic2017 --on-error fail",
    "--dataset csv --root labels.csv --image-dir imgs --out work/mine --columns image=file,diagnosis=dx",
    "--dataset isic-archive --root downloads/isic --out work/isic-archive --image-types dermoscopic",
)
PREPARE_EPILOG = "\n\n".join(
    [
        "[bold]Examples[/bold]",
        *(f"  dermlens data prepare {e}" for e in _EXAMPLES),
        "[bold]Outputs[/bold] in DIR: manifest.csv (one row per image: image_id, image_path, lesion_id, "
        "group_id, diagnosis, coarse, age, sex, site, dataset, dx_type, split, fold), splits.json (seed, "
        "method, fractions, counts), validation_report.json, cache/images_HxW.npy (uint8, row order).",
        "Defaults (fractions, seed, folds, cache workers) live in src/dermlens/configs/data.yaml.",
    ]
)


def _fail(message: str, code: int) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/bold red] {escape(message)}", highlight=False
    )
    return typer.Exit(code)


def _choice(option: str, value: str | None, choices: type[StrEnum]) -> str:
    """Validate a choice option ourselves, so a bad value is a one-line error (exit 2), not a usage panel."""
    names = [c.value for c in choices]
    if value is None:
        raise ValueError(f"{option} is required: one of {'|'.join(names)}")
    if value.lower() not in names:
        raise ValueError(f"{option} {value!r} is not one of {'|'.join(names)}")
    return value.lower()


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"--columns expects role=column[,role=column...], got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _parse_fractions(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"--fractions expects three shares train,val,test summing to 1, got {text!r}")
    return dict(zip(("train", "val", "test"), values, strict=True))


class _Invalid(Exception):
    """Validation failed under --on-error fail."""


@app.command(epilog=PREPARE_EPILOG)
def prepare(
    dataset: Annotated[
        str | None,
        typer.Option(
            metavar="ham10000|isic2019|isic2017|csv|isic-archive",
            help="Dataset layout to read (isic-archive: a folder written by `dermlens data fetch` or "
            "`isic image download`). Required.",
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(help="Dataset folder (for --dataset csv: the CSV file or its folder). Required."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder DIR. Default: $DERMLENS_WORK/<dataset> (./work/...).")
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            metavar="auto|grouped|dermamnist|dataset",
            help="grouped: stratified by diagnosis, grouped by lesion (leak-free). dermamnist: the "
            "MedMNIST image-level split (leaks lesions; only to compare with MedMNIST). dataset: keep the "
            "dataset's own split column. auto: dataset for isic2017 and CSVs with a split column, "
            "else grouped.",
        ),
    ] = SplitMethod.auto.value,
    seed: Annotated[
        int | None, typer.Option(help="Split/fold seed. Default from configs/data.yaml (42).")
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="Cross-validation folds over train+val (`fold` column); 0 = none.")
    ] = None,
    fractions: Annotated[
        str | None, typer.Option(help="train,val,test shares for --split grouped, e.g. 0.7,0.15,0.15.")
    ] = None,
    on_error: Annotated[
        str,
        typer.Option(
            metavar="skip|fail", help="skip: drop bad rows and report them. fail: stop with exit code 1."
        ),
    ] = OnError.skip.value,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Build the decoded-image cache.")] = True,
    check_images: Annotated[
        bool,
        typer.Option(
            "--check-images/--no-check-images",
            help="Check that every image exists and decodes. --no-check-images builds a CSV-only manifest "
            "(e.g. ISIC 2019 labels without the images) and implies --no-cache.",
        ),
    ] = True,
    image_dir: Annotated[
        Path | None, typer.Option(help="Image folder, if not where the dataset layout expects it.")
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(
            help="For --dataset csv: role=column pairs, roles image, diagnosis, lesion, age, sex, site, "
            "dx_type, split. Unnamed roles are auto-detected from common column names."
        ),
    ] = None,
    duplicates: Annotated[
        Path | None,
        typer.Option(
            help="CSV of near-duplicate pairs (from_img,to_img) to keep together. "
            "Default: ROOT/duplicates_abhishek2025.csv if present."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decode processes. Default from configs/data.yaml.")
    ] = None,
    image_types: Annotated[
        str | None,
        typer.Option(
            help="For --dataset isic-archive: image_type values to keep, comma-separated, or 'all'. "
            "Default from configs/isic_archive.yaml (dermoscopic)."
        ),
    ] = None,
) -> None:
    """Read a dataset, validate it, split it without lesion leakage and cache its decoded images.

    Writes DIR/manifest.csv, DIR/splits.json, DIR/validation_report.json and DIR/cache/.
    """
    from dermlens.data.manifest import DataError

    try:
        _prepare(
            _choice("--dataset", dataset, Dataset),
            root,
            out,
            _choice("--split", split, SplitMethod),
            seed,
            folds,
            _parse_fractions(fractions),
            _choice("--on-error", on_error, OnError),
            cache and check_images,
            check_images,
            image_dir,
            _parse_columns(columns),
            duplicates,
            workers,
            image_types,
        )
    except (DataError, ValueError) as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except ModuleNotFoundError as e:
        from dermlens.extras import missing

        raise _fail(str(missing(e.name or "sklearn", "evaluate", "data preparation")), EXIT_USAGE) from None
    except _Invalid as e:
        raise _fail(str(e), EXIT_INVALID) from None


def _prepare(
    dataset: str,
    root: Path | None,
    out: Path | None,
    method: str,
    seed: int | None,
    folds: int | None,
    fractions: dict[str, float] | None,
    on_error: str,
    build: bool,
    check_images: bool,
    image_dir: Path | None,
    columns: dict[str, str] | None,
    duplicates: Path | None,
    workers: int | None,
    image_types: str | None = None,
) -> None:
    from rich.console import Console

    from dermlens.data import registry
    from dermlens.data import splits as sp
    from dermlens.data.cache import build_cache
    from dermlens.data.manifest import REPORT_NAME, DataError, data_config, manifest_hash, write_manifest
    from dermlens.data.validate import drop_bad_rows, validate
    from dermlens.preprocess import Preprocessing
    from dermlens.settings import work_dir

    console = Console(soft_wrap=True)
    cfg = data_config()["split"]
    seed = int(cfg["seed"] if seed is None else seed)
    folds = int(cfg["folds"] if folds is None else folds)
    fractions = fractions or {k: float(v) for k, v in cfg["fractions"].items()}
    out = Path(out) if out is not None else work_dir() / dataset
    if root is None:
        raise DataError("--root is required: the dataset folder (or, for --dataset csv, the CSV file)")
    if not root.exists():
        raise DataError(f"--root {root} does not exist")
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"--image-dir {image_dir} is not a folder")
    if folds == 1 or folds < 0:
        raise DataError(f"--folds must be 0 (none) or at least 2, got {folds}")

    kwargs: dict = {"image_dir": image_dir}
    if dataset == "csv":
        kwargs["columns"] = columns
    elif columns:
        raise DataError("--columns only applies to --dataset csv")
    if dataset == "isic-archive":
        kwargs["image_types"] = _image_types(image_types)
    elif image_types:
        raise DataError("--image-types only applies to --dataset isic-archive")
    df = registry.read_dataset(dataset, root, **kwargs)
    console.print(f"Read [bold]{len(df)}[/bold] images of {dataset} from {root}")
    if dataset == "isic-archive":
        _archive_summary(console, df, kwargs["image_types"])
    if df.empty:
        raise DataError(f"{root} lists no images")

    report = validate(df, check_files=check_images, progress=True, workers=workers)
    out.mkdir(parents=True, exist_ok=True)
    report_path = report.write(out / REPORT_NAME, df, on_error)
    if not check_images:
        console.print("[yellow]Image files not checked (--no-check-images); no cache built.[/yellow]")
    hint = ""
    if any(i.kind == "missing_file" for i in report.issues):
        hint = (
            " If the images are elsewhere pass --image-dir; for a CSV-only manifest pass --no-check-images."
        )
    if not report.ok:
        console.print(report.table())
        if on_error == "fail":
            raise _Invalid(
                f"validation failed: {report.summary()}. Fix the data or re-run with "
                f"--on-error skip to drop these rows (report: {report_path}).{hint}"
            )
        df = drop_bad_rows(df, report)
        console.print(f"[yellow]Skipped {len(report.bad_rows)} bad rows[/yellow] (report: {report_path})")
        if df.empty:
            raise _Invalid(f"no usable rows left after skipping bad rows.{hint}")
    else:
        checked = "images exist and decode, " if check_images else ""
        console.print(f"[green]Validation passed[/green]: {checked}labels, ids, lesions and ages consistent")

    dup_path = duplicates or (root / sp.DUPLICATES_CSV if root.is_dir() else None)
    pairs = sp.read_duplicate_pairs(dup_path) if dup_path and Path(dup_path).is_file() else []
    if duplicates and not duplicates.is_file():
        raise DataError(f"--duplicates {duplicates} not found")
    df["group_id"] = sp.assign_groups(df, pairs)

    if method == "auto":
        method = "dataset" if "split" in df.columns else "grouped"
    info: dict = {}
    if method == "grouped":
        df["split"], info = sp.grouped_split(
            df, fractions, seed, int(cfg["attempts"]), float(cfg["max_deviation"])
        )
        if sp.leaking_groups(df):
            raise DataError("internal error: a lesion group spans two splits")
    elif method == "dermamnist":
        csv = root / sp.DERMAMNIST_CSV if root.is_dir() else Path(sp.DERMAMNIST_CSV)
        if not csv.is_file():
            raise DataError(f"{sp.DERMAMNIST_CSV} not found in {root}")
        df["split"] = sp.dermamnist_split(df, csv)
        console.print(f"[bold yellow]warning:[/bold yellow] {sp.DERMAMNIST_WARNING}")
    elif "split" not in df.columns:
        raise DataError(f"--split dataset: {dataset} has no split column")
    unknown_splits = set(df["split"].dropna()) - set(sp.SPLITS)
    if unknown_splits or df["split"].isna().any():
        raise DataError(f"split values must be train/val/test, got {sorted(map(str, unknown_splits))}")

    trainval = df["split"].isin(["train", "val"])
    if folds:
        df["fold"] = sp.kfold(df, folds, seed, within=trainval)
    manifest_path = write_manifest(df, out)
    deviation = sp.max_deviation(df["diagnosis"], df["split"])
    record = {
        "dataset": dataset,
        "root": str(root.resolve()),
        "method": method,
        "seed": seed,
        "fractions": fractions if method == "grouped" else None,
        "folds": folds,
        "fold_scope": "train+val" if folds else None,
        "n_images": len(df),
        "n_groups": int(df["group_id"].nunique()),
        "duplicate_pairs": len(pairs),
        "manifest_hash": manifest_hash(df),
        "counts": sp.split_counts(df),
        "max_class_share_deviation_points": {k: round(100 * v, 3) for k, v in deviation.items()},
        "leaking_groups": len(sp.leaking_groups(df)),
        **({"search": info} if info else {}),
        **({"warning": sp.DERMAMNIST_WARNING} if method == "dermamnist" else {}),
    }
    sp.write_splits_json(out, record)
    console.print(_class_table(df, deviation))
    console.print(_missing_table(df))
    console.print(f"Wrote {manifest_path} and {out / sp.SPLITS_NAME} ({method} split, seed {seed})")
    if build:
        prep = Preprocessing.default()
        path = build_cache(df, out, prep, workers=workers)
        console.print(f"Image cache: {path} ({len(df)}x{prep.height}x{prep.width}x3 uint8)")


@app.command()
def fetch(
    out: Annotated[Path, typer.Option(help="Folder to download into (images + metadata.csv).")],
    search: Annotated[
        str | None,
        typer.Option(
            help="ISIC Archive search query, e.g. 'diagnosis_3:\"Melanoma Invasive\" AND age_approx:50'."
        ),
    ] = None,
    collections: Annotated[
        str | None, typer.Option(help="Comma-separated collection ids (`isic collection list`).")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Download at most LIMIT images (0 = all that match).")
    ] = 0,
    client: Annotated[
        str | None, typer.Option(help="isic-cli executable. Default from configs/isic_archive.yaml (isic).")
    ] = None,
) -> None:
    """Download ISIC Archive images and metadata with isic-cli (needs the network and the isic extra).

    Then: dermlens data prepare --dataset isic-archive --root OUT.
    """
    from dermlens.data.fetch import FetchError
    from dermlens.data.fetch import fetch as run_fetch

    try:
        n = run_fetch(out, search, collections, limit, client)
    except FetchError as e:
        raise _fail(str(e), EXIT_USAGE) from None
    typer.echo(f"{n} image(s) with metadata in {out}")
    typer.echo(f"next: dermlens data prepare --dataset isic-archive --root {out}")


def _image_types(text: str | None) -> tuple[str, ...]:
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


def _archive_summary(console, df, image_types: tuple[str, ...]) -> None:
    """What the ISIC Archive reader left out: other image types, diagnoses that map to no class."""
    from rich.table import Table

    from dermlens.data.isic_archive import unmapped

    dropped = int(df.attrs.get("dropped_image_type", 0))
    if dropped:
        kept = ", ".join(image_types)
        console.print(
            f"Kept image_type {kept}: left out {dropped} other image(s) (--image-types all keeps them)"
        )
    counts = unmapped(df)
    if counts.empty:
        console.print("[green]Every diagnosis maps onto a dermlens class[/green]")
        return
    t = Table(title=f"{int(counts.sum())} image(s) whose ISIC diagnosis maps to no dermlens class")
    t.add_column("diagnosis_1:...:diagnosis_5")
    t.add_column("images", justify="right")
    for path, n in counts.items():
        t.add_row(str(path), str(int(n)))
    console.print(t)


def _class_table(df, deviation: dict[str, float]):  # -> rich.table.Table
    from rich.table import Table

    from dermlens.data.splits import SPLITS

    splits = [s for s in SPLITS if s in set(df["split"])]
    t = Table(title="Images per class and split (share of split)")
    t.add_column("class", style="bold")
    for s in splits:
        t.add_column(s, justify="right")
    t.add_column("all", justify="right")
    sizes = df["split"].value_counts()
    for c, n in df["diagnosis"].value_counts().items():
        cells = []
        for s in splits:
            k = int(((df["diagnosis"] == c) & (df["split"] == s)).sum())
            cells.append(f"{k} ({100 * k / sizes[s]:.1f}%)")
        t.add_row(str(c), *cells, f"{n} ({100 * n / len(df):.1f}%)")
    t.add_row("total", *[str(int(sizes[s])) for s in splits], str(len(df)), style="bold")
    t.add_row("max share dev.", *[f"{100 * deviation.get(s, 0):.2f} pt" for s in splits], "", style="dim")
    return t


def _missing_table(df):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title="Missing metadata")
    t.add_column("field", style="bold")
    t.add_column("missing", justify="right")
    t.add_column("share", justify="right")
    for c in ("lesion_id", "age", "sex", "site", "dx_type"):
        k = int(df[c].isna().sum())
        t.add_row(c, str(k), f"{100 * k / len(df):.1f}%")
    return t


@app.command("cache")
def cache_cmd(
    dir: Annotated[Path, typer.Argument(help="A prepared folder (with manifest.csv).")],
    height: Annotated[
        int | None, typer.Option(help="Model input height (default configs/preprocess.yaml).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Model input width (default configs/preprocess.yaml).")
    ] = None,
    color_constancy: Annotated[
        str | None,
        typer.Option(metavar="none|shades_of_gray", help="Colour constancy applied after resizing."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decode processes. Default from configs/data.yaml.")
    ] = None,
) -> None:
    """Build another decoded-image cache for a prepared folder (another size or colour constancy)."""
    from dermlens.data.cache import build_cache
    from dermlens.data.manifest import read_manifest
    from dermlens.preprocess import Preprocessing

    manifest = dir / "manifest.csv"
    if not manifest.is_file():
        raise _fail(f"no manifest at {manifest}: run `dermlens data prepare` first", EXIT_USAGE)
    over = {"height": height, "width": width, "color_constancy": color_constancy}
    try:
        prep = Preprocessing.from_dict(
            {**Preprocessing.default().to_dict(), **{k: v for k, v in over.items() if v is not None}}
        )
    except ValueError as e:
        raise _fail(str(e), EXIT_USAGE) from None
    path = build_cache(read_manifest(dir), dir, prep, workers=workers)
    typer.echo(f"Image cache: {path}")


@app.command("holdout")
def holdout_cmd(
    dir: Annotated[Path, typer.Argument(help="A prepared folder (e.g. work/isic2017).")],
    out: Annotated[
        Path, typer.Option(help="New prepared folder: the hold-out rows become its `train` split.")
    ],
    fraction: Annotated[float, typer.Option(help="Share of the `train` rows held out.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed (training uses the config's `seed`, default 42).")] = 42,
) -> None:
    """Materialise the external hold-out that training used (`data.external_val`) as its own prepared folder.

    The rows training held out of `dir`'s train split become the only `train` rows of OUT (every other row's
    split is set to `-`), so trust fitting or evaluation can use exactly the images the model never saw.
    """
    import shutil

    from dermlens.data.manifest import read_manifest, write_manifest
    from dermlens.data.splits import holdout_rows

    if not (dir / "manifest.csv").is_file():
        raise _fail(f"no manifest at {dir / 'manifest.csv'}: run `dermlens data prepare` first", EXIT_USAGE)
    df = read_manifest(dir)
    held = holdout_rows(df, fraction, seed)
    df["split"] = "-"
    df.loc[held, "split"] = "train"
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(df, out)
    shutil.copy(dir / "splits.json", out / "splits.json")
    (out / "cache").mkdir(exist_ok=True)
    for cache in (dir / "cache").glob("images_*"):
        target = out / "cache" / cache.name
        if not target.exists():
            target.symlink_to(cache.resolve())
    typer.echo(f"{len(held)} held-out rows of {dir} are the train split of {out} (caches linked)")
