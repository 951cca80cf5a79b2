"""`dermlens data ...`: options of prepare, fetch, cache and holdout; the work is in dermlens.data."""

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
    pad_ufes20 = "pad_ufes20"
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
    "--dataset isic2019 --root ../shared/data/isic2019 --out work/isic2019",
    "--dataset pad_ufes20 --root ../shared/data/pad_ufes20 --out work/pad_ufes20",
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


@app.command(epilog=PREPARE_EPILOG)
def prepare(
    dataset: Annotated[
        str | None,
        typer.Option(
            metavar="ham10000|isic2019|isic2017|pad_ufes20|csv|isic-archive",
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
        from dermlens.data.prepare import PrepareOptions, ValidationFailed
        from dermlens.data.prepare import prepare as run_prepare

        options = PrepareOptions(
            dataset=_choice("--dataset", dataset, Dataset),
            root=root,
            out=out,
            method=_choice("--split", split, SplitMethod),
            seed=seed,
            folds=folds,
            fractions=_parse_fractions(fractions),
            on_error=_choice("--on-error", on_error, OnError),
            build=cache and check_images,
            check_images=check_images,
            image_dir=image_dir,
            columns=_parse_columns(columns),
            duplicates=duplicates,
            workers=workers,
            image_types=image_types,
        )
        run_prepare(options)
    except (DataError, ValueError) as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except ModuleNotFoundError as e:
        from dermlens.extras import missing

        raise _fail(str(missing(e.name or "sklearn", "evaluate", "data preparation")), EXIT_USAGE) from None
    except ValidationFailed as e:
        raise _fail(str(e), EXIT_INVALID) from None


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
    fit: Annotated[
        str | None,
        typer.Option(metavar="squash|crop|pad|pad_mean", help="How another aspect ratio meets the model's."),
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
    over = {"height": height, "width": width, "color_constancy": color_constancy, "fit": fit}
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
    from dermlens.data.splits import materialise_holdout

    if not (dir / "manifest.csv").is_file():
        raise _fail(f"no manifest at {dir / 'manifest.csv'}: run `dermlens data prepare` first", EXIT_USAGE)
    held = materialise_holdout(dir, out, fraction, seed)
    typer.echo(f"{held} held-out rows of {dir} are the train split of {out} (caches linked)")


@app.command("to-dicom")
def to_dicom(
    image: Annotated[Path, typer.Argument(help="image file (JPEG, PNG, ...)")],
    out: Annotated[Path, typer.Argument(help="DICOM file to write")],
    age: Annotated[str | None, typer.Option(help="patient age in years")] = None,
    sex: Annotated[str | None, typer.Option(help="female | male")] = None,
    site: Annotated[str | None, typer.Option(help="anatomic site (e.g. 'posterior torso', 'back')")] = None,
    patient_id: Annotated[str, typer.Option("--patient-id", help="PatientID tag")] = "",
    study_uid: Annotated[
        str | None, typer.Option("--study-uid", help="StudyInstanceUID to add the image to (default: new)")
    ] = None,
) -> None:
    """Write IMAGE as a DICOM Dermoscopic Photography image (age, sex and site in the tags), e.g. to try
    `dermlens predict --dicomweb` with a PACS. A baseline JPEG is wrapped unchanged."""
    from dermlens.dicom_photo import write_photo
    from dermlens.predict.fields import parse_age, parse_sex, parse_site

    meta = {"age": parse_age(age), "sex": parse_sex(sex), "site": parse_site(site)}
    ds_path = write_photo(image, out, meta, patient_id=patient_id, study_uid=study_uid)
    import pydicom

    ds = pydicom.dcmread(ds_path, stop_before_pixels=True)
    typer.echo(f"wrote {ds_path}: study {ds.StudyInstanceUID}, instance {ds.SOPInstanceUID}")
