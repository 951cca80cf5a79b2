"""Shared error handling of the research commands (tune, ensemble, distill, release build)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or missing data: reported in one line, never as a traceback."""
    from dermlens.bundle import BundleError
    from dermlens.data.manifest import DataError
    from dermlens.export import ExportError
    from dermlens.model.weights import WeightsError
    from dermlens.train.config import ConfigError
    from dermlens.train.datamodule import DataSetupError
    from dermlens.train.distill import DistillError
    from dermlens.train.folds import FoldError
    from dermlens.train.members import EnsembleError

    return (
        ConfigError,
        DataSetupError,
        DataError,
        BundleError,
        ExportError,
        WeightsError,
        EnsembleError,
        DistillError,
        FoldError,
        FileNotFoundError,
    )


def run_or_exit(fn: Callable[[], Any]) -> Any:
    """Call fn; known failures print `error: ...` and exit 2, a missing extra says what to install."""
    from dermlens.extras import as_missing_extra, missing

    try:
        errors = user_errors()
    except ImportError as e:
        typer.echo(f"error: {as_missing_extra(e) or missing(e.name or 'torch', 'train')}", err=True)
        raise typer.Exit(2) from None
    try:
        return fn()
    except ImportError as e:
        typer.echo(f"error: {as_missing_extra(e) or missing(e.name or 'torch', 'train')}", err=True)
        raise typer.Exit(2) from None
    except errors as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def echo(message: str) -> None:
    """Progress lines go to stderr, results to stdout."""
    typer.echo(message, err=True)
