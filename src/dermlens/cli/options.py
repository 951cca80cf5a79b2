"""Command-line arguments shared by the training-style commands (train, pretrain)."""

from __future__ import annotations

from typing import Annotated

import typer

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. trainer.max_epochs=3")]
Resume = Annotated[
    bool | None,
    typer.Option("--resume/--no-resume", help="resume from last.ckpt (default: if it exists)"),
]


def config_option(name: str):
    """The --config option of a command whose packaged defaults are configs/<name>."""
    return Annotated[str | None, typer.Option("--config", "-c", help=f"YAML config (default configs/{name})")]
