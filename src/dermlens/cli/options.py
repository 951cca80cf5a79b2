"""Command-line arguments shared by several commands (train and pretrain; predict and serve)."""

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


ReferRate = Annotated[
    float | None,
    typer.Option(
        "--refer-rate",
        min=0.0,
        max=1.0,
        help="share of images to refer, e.g. 0.2, mapped on the bundle's validation quantiles "
        "(default: the bundle's packaged operating point; serve: configs/serve.yaml)",
    ),
]
