"""Command groups by noun: a group that runs its default command when no sub-command is named (so
`dermlens train key=value` and `dermlens evaluate --manifest ...` keep working), and hidden aliases that
keep an old spelling for one version with a deprecation line."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click
import typer
from typer.core import TyperGroup


class DefaultGroup(TyperGroup):
    """A group whose first command runs when the first argument names no sub-command."""

    default_command: str = ""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Insert the default command's name unless a sub-command or --help comes first."""
        first = args[0] if args else None
        if first is None or (first not in self.commands and first not in ctx.help_option_names):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def group(help: str, default: str | None = None) -> typer.Typer:
    """A Typer app for one noun; `default` names the command run when no sub-command is given."""
    if default is None:
        return typer.Typer(help=help, no_args_is_help=True)
    cls = type(f"Default_{default}", (DefaultGroup,), {"default_command": default})
    return typer.Typer(help=help, cls=cls)


def deprecated(fn: Callable, old: str, new: str) -> Callable:
    """`fn` run under its old spelling: one note on stderr first, then the command as before."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        typer.secho(
            f"note: `dermlens {old}` is now `dermlens {new}`; the old spelling goes away in the next version",
            fg=typer.colors.YELLOW,
            err=True,
        )
        return fn(*args, **kwargs)

    return run
