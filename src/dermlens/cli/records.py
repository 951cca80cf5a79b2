"""`dermlens records`: inspect the prediction records written by `dermlens serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermlens.errors import DataError

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


def _open(url: str | None, config: Path | None):
    """The configured RecordStore (schema upgraded); a one-line error and exit 2 if it cannot be used."""
    from dermlens.serve.records import RecordsConfigError, RecordStore
    from dermlens.serve.settings import load_settings

    try:
        r = load_settings(config).records
        return RecordStore(url or r.url, lock_timeout_s=r.lock_timeout_s)
    except (RecordsConfigError, OSError, ValueError) as e:
        raise RecordsConfigError(str(e).splitlines()[0]) from None


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="CSV file to write (0600; formula-like cells escaped)")],
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write every prediction record as CSV (one p_<class> column per class)."""
    from dermlens.serve.records import export_csv

    store = _open(url, config)
    try:
        n = export_csv(store, out)
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        store.close()
    typer.echo(f"{n} records from {store.describe()} -> {out}")


@app.command()
def outcome(
    csv_file: Annotated[
        Path,
        typer.Option(
            "--csv",
            help="CSV with record_id or image_sha256, diagnosis, method (histopathology|follow-up|...), "
            "date (YYYY-MM-DD) and optionally source",
        ),
    ],
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Attach confirmed diagnoses to stored predictions (all rows or none: a bad row stops the import)."""
    from dermlens.serve.outcomes import import_csv

    store = _open(url, config)
    try:
        n = import_csv(store, csv_file)
    finally:
        store.close()
    typer.echo(f"{n} outcome(s) attached in {store.describe()}")


@app.command()
def upgrade(url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Bring the records database schema to this version (Alembic; also done when `dermlens serve` starts)."""
    from dermlens.serve.migrations import current_revision

    store = _open(url, config)  # opening upgrades
    try:
        typer.echo(f"{store.describe()}: schema at revision {current_revision(store.engine)}")
    finally:
        store.close()


if __name__ == "__main__":
    app()
