"""`dermlens records`: inspect the prediction records written by `dermlens serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.callback()
def records() -> None:
    """Prediction records kept by the API server (SQLite by default, any SQLAlchemy URL)."""


UrlOpt = Annotated[
    str | None,
    typer.Option(
        help="SQLAlchemy URL (default: $DERMLENS_RECORDS_URL, serve.yaml, or the user-data SQLite file)"
    ),
]
ConfigOpt = Annotated[Path | None, typer.Option(help="serve.yaml-style file naming records.url")]


def _url(url: str | None, config: Path | None) -> str | None:
    from dermlens.serve.settings import load_settings

    return url or load_settings(config).records.url


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="CSV file to write")],
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write every prediction record as CSV (one p_<class> column per class)."""
    from dermlens.serve.records import RecordStore, export_csv

    store = RecordStore(_url(url, config))
    try:
        n = export_csv(store, out)
    finally:
        store.close()
    typer.echo(f"{n} records from {store.describe()} -> {out}")


if __name__ == "__main__":
    app()
