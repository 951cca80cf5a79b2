"""`dermlens predict`: score image files, folders or manifest CSVs with an ONNX model bundle (no torch)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from dermlens.cli.options import ReferRate
from dermlens.errors import UsageError


def _echo_err(msg: str) -> None:
    typer.echo(_shown(msg), err=True)


def _shown(text: str) -> str:
    """`text` printable on any terminal: bytes of a file name that are not UTF-8 shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@contextlib.contextmanager
def _sigterm_interrupts(received: list[int]) -> Iterator[None]:
    """Inside, SIGTERM stops the run like Ctrl-C (KeyboardInterrupt); the signals seen go to `received`."""

    def stop(signum: int, _frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def predict(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="image files, folders (searched recursively) or manifest CSVs"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="predictions CSV (one row per image)")
    ] = None,
    isic_csv: Annotated[
        Path | None, typer.Option("--isic-csv", help="ISIC submission CSV (columns: --isic-format)")
    ] = None,
    isic_format: Annotated[
        str,
        typer.Option(
            "--isic-format",
            help="2018: image,MEL,...,VASC (scc merged into AKIEC); 2019: image,MEL,...,SCC,UNK "
            "(a referred image: UNK 0.5, the class probabilities halved)",
        ),
    ] = "2018",
    cam: Annotated[
        Path | None, typer.Option("--cam", help="folder for class-activation overlays (PNG)")
    ] = None,
    age: Annotated[
        str | None, typer.Option(help="patient age in years (plain decimal, 0-120), for every image")
    ] = None,
    sex: Annotated[str | None, typer.Option(help="female | male, for every image")] = None,
    site: Annotated[
        str | None, typer.Option(help="anatomic site (e.g. 'upper extremity', 'back'), for every image")
    ] = None,
    metadata: Annotated[
        Path | None, typer.Option("--metadata", help="CSV with image id/path and age, sex, site columns")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="model bundle folder (default: packaged release)")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="int8 | fp32 (default: the bundle's)")] = None,
    refer_rate: ReferRate = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per onnxruntime call")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="image decode threads (0 = all cores)")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime intra-op threads (0 = all cores)")] = 0,
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="test-time augmentation (default: the bundle's)")
    ] = None,
    dicom_sr: Annotated[
        Path | None,
        typer.Option(
            "--dicom-sr",
            help="folder for one DICOM Structured Report per DICOM input (needs the dicom extra)",
        ),
    ] = None,
    fhir: Annotated[
        Path | None,
        typer.Option("--fhir", help="folder for one FHIR R4 Bundle (JSON) per image (needs the fhir extra)"),
    ] = None,
    dicomweb: Annotated[
        str | None,
        typer.Option(
            "--dicomweb",
            help="DICOMweb base URL of a PACS (e.g. http://127.0.0.1:8042/dicom-web): predict its dermoscopy "
            "images (--study or --since) and store one DICOM SR per image back (STOW-RS)",
        ),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="with --dicomweb: the StudyInstanceUID to predict")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="with --dicomweb: every study dated on or after DATE (YYYY-MM-DD)"),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="run on Ray Data (needs the ray extra): a local Ray instance on this machine's cores, or "
            "the cluster at --ray-address. Rows are ordered by image id.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Ray cluster for --ray: auto, ray://HOST:10001 or HOST:6379"),
    ] = None,
) -> None:
    """Predict lesion classes; writes CSVs incrementally, lists unreadable files at the end (exit 1).

    A CSV stays NAME.partial until the run completes; Ctrl-C/SIGTERM leave it so (exit 130/143).

    Same-named files in different folders get ids NAME_<8 hex digits of the SHA-1 of the path>.
    """
    import os

    # numpy's BLAS only does the small OOD matrix products here; its spinning threads would fight
    # onnxruntime and the decode threads for the cores (18x slower under load). Set before numpy loads.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from dermlens import DISCLAIMER
    from dermlens.infer.operating_point import at_refer_rate, describe
    from dermlens.infer.predictor import Predictor
    from dermlens.predict.dicomweb import check_sources
    from dermlens.predict.folder import BatchInputError, run_batch
    from dermlens.predict.inputs import apply_dicom_meta, collect_inputs, read_metadata_csv

    err = Console(stderr=True, soft_wrap=True)
    err.print(f"[bold yellow]{DISCLAIMER}[/]")
    if metadata is not None and any(v is not None for v in (age, sex, site)):
        raise UsageError("give either --metadata CSV or --age/--sex/--site, not both")
    ray_at = (ray_address or "local") if ray or ray_address else None
    if ray_at is not None and (cam is not None or dicom_sr is not None or fhir is not None):
        raise UsageError("--ray writes the predictions CSVs only; drop --cam/--dicom-sr/--fhir or --ray")
    if ray_at is not None and refer_rate is not None:
        raise UsageError("--ray uses the bundle's packaged operating point; drop --refer-rate or --ray")
    folder_only = any(v is not None for v in (ray_at, cam, dicom_sr, fhir))
    check_sources(bool(inputs), dicomweb, study, since, folder_only)
    age, sex, site = _checked_meta(age, sex, site)
    if dicomweb is not None:
        predictor = at_refer_rate(Predictor.load(model, precision, threads or None), refer_rate)
        given = {"age": age, "sex": sex, "site": site}
        _predict_dicomweb(err, predictor, dicomweb, study, since, given, out, batch_size, workers, tta)
        return
    inputs = inputs or []
    predictor = Predictor.load(model, precision, threads or None)
    predictor = at_refer_rate(predictor, refer_rate)
    items, failures = collect_inputs(inputs)
    if metadata is not None:
        table = read_metadata_csv(metadata)
        for it in items:  # keyed by file name without extension (an id may carry a path hash)
            it.meta = table.get(it.path.stem, it.meta)
    elif any(v is not None for v in (age, sex, site)):
        for it in items:
            it.meta = {"age": age, "sex": sex, "site": site}
    n_dicom = apply_dicom_meta(items)
    has_meta = metadata is not None or any(v is not None for v in (age, sex, site))
    if has_meta and not predictor.card.uses_metadata:
        _echo_err("note: this model does not use patient metadata; age/sex/site are ignored")
    if not items:
        _show_failures(err, failures)
        raise BatchInputError("no images to predict")
    err.print(
        f"model {predictor.card.name} {predictor.version} ({predictor.precision}"
        + (f"; {predictor.precision_note}" if predictor.precision_note else "")
        + f"), {len(items)} image(s)"
        + (f", {n_dicom} DICOM (metadata from tags where not given)" if n_dicom else "")
    )
    point = describe(predictor.trust)
    if point["words"]:
        err.print(
            f"refer threshold {point['min_confidence']:.3f}: {point['words']} (measured on validation images)"
        )
    if ray_at is not None:
        isic = (isic_csv, isic_format)
        _predict_on_ray(err, predictor, items, failures, ray_at, out, isic, batch_size, tta)
        return
    sr_writer = _sr_folder(predictor, items, dicom_sr) if dicom_sr is not None else None
    fhir_writer = _fhir_writer(predictor, fhir)

    human: list = []  # Scored rows shown on the terminal when no CSV is written
    columns = [
        TextColumn("predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    signals: list[int] = []
    with Progress(*columns, console=err, transient=False) as bar, _sigterm_interrupts(signals):
        task = bar.add_task("predict", total=len(items))
        summary = run_batch(
            predictor,
            items,
            out_csv=out,
            isic_csv=isic_csv,
            isic_format=isic_format,
            cam_dir=cam,
            batch_size=batch_size,
            workers=workers or None,
            tta=tta,
            on_progress=lambda n: bar.advance(task, n),
            on_rows=_on_rows(human if out is None and isic_csv is None else None, sr_writer, fhir_writer),
        )
    for s in human:
        r = s.prediction
        flag = f"  REFER: {r.refer_reason}" if r.refer else ""
        typer.echo(
            f"{_shown(str(s.item.path))}: {r.top_class} {r.confidence:.3f}  p_malignant {r.p_malignant:.3f}  "
            f"ood_score {r.ood_score:.4g}"
            + (f"  set {{{', '.join(r.prediction_set)}}}" if r.prediction_set else "")
            + flag
        )
    failures += summary.failures
    rate = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    err.print(
        f"{summary.done} of {summary.total} image(s) predicted in {summary.seconds:.1f} s "
        f"({rate:.1f} img/s); "
        f"{summary.referred} referred, {summary.ood} out of distribution"
    )
    if sr_writer is not None:
        failures += _report_srs(err, sr_writer)
    if fhir_writer is not None:
        err.print(f"wrote {fhir_writer.written} FHIR Bundle(s) to {fhir}")
    _finish(err, (out, isic_csv), failures, summary.interrupted, signals)


def _predict_dicomweb(err, predictor, url, study, since, given, out, batch_size, workers, tta) -> None:
    """`dermlens predict --dicomweb`: QIDO-RS, WADO-RS into a temporary folder, predict, STOW-RS the SRs."""
    from dermlens.predict.dicomweb import Pacs, parse_since, predict_pacs

    pacs = Pacs(url)
    found = pacs.find(study, parse_since(since) if since else None)
    skipped = ", ".join(f"{n} {name}" for name, n in sorted(found.skipped.items()))
    err.print(
        f"model {predictor.card.name} {predictor.version} ({predictor.precision}); "
        f"{len(found.instances)} photograph(s) found in {url}" + (f"; skipped {skipped}" if skipped else "")
    )
    run = predict_pacs(predictor, pacs, found, given, out, batch_size, workers or None, tta)
    err.print(
        f"{run.summary.done} of {len(found.instances)} image(s) predicted; "
        f"stored {run.stored} DICOM SR(s) in {url}"
    )
    _finish(err, (out,), run.failures, run.summary.interrupted)


def _finish(
    err, written: tuple[Path | None, ...], failures: list, interrupted: bool, signals: list[int] | None = None
) -> None:
    """Name the files written, list the failures, and exit 130/143 (interrupted by SIGINT/SIGTERM: the CSVs
    stay NAME.partial) or 1 (failures)."""
    from dermlens.predict.folder import partial_path

    if interrupted:
        _show_failures(err, failures)
        kept = ", ".join(str(partial_path(p)) for p in written if p is not None)
        _echo_err(
            "interrupted: the run is incomplete"
            + (f"; rows for finished images are in {kept}" if kept else "")
        )
        raise typer.Exit(143 if signal.SIGTERM in (signals or []) else 130)
    for path in written:
        if path is not None:
            err.print(f"wrote {_shown(str(path))}", markup=False, highlight=False)
    _show_failures(err, failures)
    if failures:
        raise typer.Exit(1)


def _checked_meta(age: str | None, sex: str | None, site: str | None) -> tuple:
    """--age/--sex/--site through the API's own parser: bad values stop the run (exit 2), never ignored."""
    from dermlens.predict.fields import InputError, parse_age, parse_sex, parse_site

    try:
        return parse_age(age), parse_sex(sex), parse_site(site)
    except InputError as e:
        raise UsageError(f"--{e.code.removeprefix('invalid_')}: {e}") from None


def _show_failures(console, failures) -> None:
    """List inputs that could not be scored (file + reason)."""
    if not failures:
        return
    console.print(f"[bold red]{len(failures)} input(s) could not be predicted:[/]")
    for f in failures:
        console.print(f"  {_shown(f.path)}: {_shown(f.reason)}", markup=False, highlight=False)


def _on_rows(human: list | None, *writers):
    """The per-batch callback: keep rows for the terminal listing and/or write their SRs / FHIR Bundles."""
    writers = [w for w in writers if w is not None]
    if human is None and not writers:
        return None

    def handle(rows: list) -> None:
        if human is not None:
            human.extend(rows)
        for w in writers:
            w.write(rows)

    return handle


def _fhir_writer(predictor, out_dir: Path | None):
    """The --fhir writer (None without --fhir); checks the fhir extra before any image is scored."""
    if out_dir is None:
        return None
    from dermlens.extras import require
    from dermlens.predict.fhir import FhirWriter, ModelDevice

    require("fhir.resources.R4B", "fhir", "--fhir")
    device = ModelDevice.from_bundle(predictor.bundle_dir, predictor.card.name, predictor.version)
    return FhirWriter(device, out_dir)


def _sr_folder(predictor, items, out_dir: Path):
    """The --dicom-sr writer: one SR per DICOM input, sites from the inputs' metadata."""
    from dermlens.bundle import card_sha256
    from dermlens.predict.sr import SrFolder

    sites = {str(it.path): (it.meta or {}).get("site") for it in items}
    return SrFolder(out_dir, card_sha256(predictor.bundle_dir), sites)


def _report_srs(console, srs) -> list:
    """Print what the SR folder writer wrote; return its failures."""
    console.print(f"wrote {len(srs.written)} DICOM SR(s) to {srs.out_dir}")
    if srs.skipped:
        console.print(f"note: {srs.skipped} non-DICOM input(s) have no source DICOM to reference: no SR")
    return srs.failures


def _predict_on_ray(err, predictor, items, failures, address, out, isic, batch_size, tta) -> None:
    """`dermlens predict --ray`: the same rows from Ray Data, written ordered by image id."""
    from dermlens.predict.ray import run_ray

    isic_csv, isic_format = isic
    if out is None and isic_csv is None:
        raise UsageError("--ray writes CSV files: give --out and/or --isic-csv")
    summary = run_ray(predictor, items, address, out, isic_csv, batch_size, tta, isic_format)
    rate = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    err.print(
        f"{summary.done} of {summary.total} image(s) predicted on Ray in {summary.seconds:.1f} s "
        f"({rate:.1f} img/s); {summary.referred} referred, {summary.ood} out of distribution"
    )
    _finish(err, (out, isic_csv), failures + summary.failures, summary.interrupted)
