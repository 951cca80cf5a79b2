"""Shared helpers of the research commands (tune, ensemble, distill, release): a missing training stack is
one line naming the extra; every other expected failure is a DermlensError, printed by cli/main.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer


def run_or_exit(fn: Callable[[], Any]) -> Any:
    """Call fn; an ImportError of the training stack becomes a MissingExtra naming what to install."""
    from dermlens.extras import as_missing_extra, missing

    try:
        return fn()
    except ImportError as e:
        raise as_missing_extra(e) or missing(e.name or "torch", "train") from None


def echo(message: str) -> None:
    """Progress lines go to stderr, results to stdout."""
    typer.echo(message, err=True)
