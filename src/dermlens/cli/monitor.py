"""`dermlens monitor`: drift of the API's prediction records against the model's reference (cron-able).

Exit codes: 0 no alert, 1 an alert fired, 2 bad arguments or missing inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermlens.extras import install_hint

EXIT_ALERT, EXIT_USAGE = 1, 2
INSTALL_HINT = install_hint("monitor")


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _bundle(model: Path | None, config: Path | None) -> Path:
    from dermlens.bundle import release_dir
    from dermlens.serve.settings import load_settings

    chosen = model or load_settings(config).model
    return Path(chosen) if chosen else release_dir()


def monitor(
    out: Annotated[Path | None, typer.Option(help="HTML report to write")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="summary JSON to write")] = None,
    since: Annotated[
        str | None, typer.Option(help="window start: ISO 8601 time (UTC if no zone) or a span back: 24h, 7d")
    ] = None,
    until: Annotated[str | None, typer.Option(help="window end (exclusive), same forms as --since")] = None,
    last: Annotated[
        int | None, typer.Option(min=1, help="the most recent N records (default: configs/monitor.yaml)")
    ] = None,
    records_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL of the records (default: as `dermlens serve`)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="serve.yaml-style file (records.url, model)")] = None,
    model: Annotated[
        Path | None, typer.Option(help="model bundle whose reference and records are compared")
    ] = None,
) -> None:
    """Compare a window of served predictions with the model's validation outputs; exit 1 on an alert."""
    from dermlens import DISCLAIMER

    try:
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401

        from dermlens.monitor.drift import compare, parse_time, records_frame, select_window
        from dermlens.monitor.reference import MissingReference, Reference
        from dermlens.monitor.report import write_report
    except ImportError as e:
        _err(f"monitoring needs scipy and matplotlib ({e.name} is missing): {INSTALL_HINT}")
        raise typer.Exit(EXIT_USAGE) from None
    from dermlens.serve.records import RecordStore
    from dermlens.serve.settings import load_settings

    typer.echo(DISCLAIMER, err=True)
    try:
        ref = Reference.load(_bundle(model, config))
        t0, t1 = parse_time(since), parse_time(until)
    except (MissingReference, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_USAGE) from None
    from dermlens.evaluate.field import field_performance
    from dermlens.serve.outcomes import confirmed_cases

    store = RecordStore(records_url or load_settings(config).records.url)
    try:
        history = records_frame(store, ref.model_version)
        field = field_performance(confirmed_cases(store, ref.model_version), ref.classes)
    finally:
        store.close()
    window = select_window(history, t0, t1, last)
    summary = compare(window, ref)
    _print(summary, store.describe())
    _print_field(field)
    if out is not None:
        typer.echo(f"wrote {write_report(out, summary, window, history, ref, field)}", err=True)
    if json_out is not None:
        import json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**summary.to_dict(), "field_performance": field}, indent=2) + "\n")
    if summary.alert:
        raise typer.Exit(EXIT_ALERT)


def _print(summary, where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print(
        f"model {summary.model_version}: {summary.n_window} record(s) in the window from {where} "
        f"({summary.window_start} to {summary.window_end}); reference {summary.n_reference} validation images"
    )
    if summary.note:
        console.print(f"note: {summary.note}")
    t = Table()
    for col in ("signal", "test", "statistic", "p-value", "effect", "window", "reference", "status"):
        t.add_column(col)
    for r in summary.results:
        status = "[bold red]ALERT[/]" if r.alert else "[green]ok[/]"
        t.add_row(
            r.signal,
            r.test,
            f"{r.statistic:.4g}",
            f"{r.p_value:.3g}",
            f"{r.effect_name} {r.effect:.3f} (min {r.min_effect:g})",
            r.window,
            r.reference,
            status,
        )
    if summary.results:
        console.print(t)
    console.print(
        f"[bold red]ALERT: drift in {', '.join(summary.alerts)}[/]" if summary.alert else "no alert"
    )


def _print_field(field: dict) -> None:
    """Field performance on confirmed cases: counts, each metric with its interval, the bias note."""
    from rich.console import Console
    from rich.table import Table

    from dermlens.monitor.report import FIELD_LABELS

    console = Console(soft_wrap=True)
    methods = ", ".join(f"{k} {v}" for k, v in field["methods"].items()) or "none"
    console.print(
        f"field performance: {field['n_confirmed']} confirmed case(s) ({methods}), "
        f"{field['n_scored']} of the model's classes; {field['status']}"
    )
    if field["metrics"]:
        t = Table()
        for col in ("metric", "value", f"{round(100 * field['ci_level'])}% CI (by image hash)"):
            t.add_column(col)
        for k, m in field["metrics"].items():
            t.add_row(FIELD_LABELS.get(k, k), _f(m["value"]), f"{_f(m['low'])} to {_f(m['high'])}")
        console.print(t)
    console.print(f"note: {field['note']}")


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def monitor_reference(
    manifest: Annotated[Path, typer.Option(help="prepared data folder (manifest.csv + image cache)")],
    split: Annotated[str, typer.Option(help="split whose outputs are the reference")] = "val",
    model: Annotated[Path | None, typer.Option(help="model bundle to write into (default: release)")] = None,
    precision: Annotated[str | None, typer.Option(help="int8 | fp32 (default: the bundle's)")] = None,
) -> None:
    """Write MODEL/monitor_reference.json: the model's outputs on `split`, the baseline of `monitor`."""
    from dermlens.bundle import BundleError, release_dir
    from dermlens.data.manifest import DataError
    from dermlens.infer.predictor import Predictor
    from dermlens.monitor.reference import build_reference

    try:
        predictor = Predictor.load(model, precision)
        ref = build_reference(predictor, manifest, split)
    except (BundleError, DataError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_USAGE) from None
    path = ref.save(model or release_dir())
    typer.echo(
        f"wrote {path}: {ref.n} {split} images, refer rate {sum(ref.refer) / ref.n:.3f}, "
        f"model {ref.model_version} ({ref.precision})"
    )
