"""`dermlens release build`: members -> ensemble -> distilled student -> bundles, resumable end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Build the release models in one resumable command.", no_args_is_help=True)


@app.command("build")
def build(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="training key=value overrides for every run, e.g. data.dir=work/ham10000"),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", "-r", help="build YAML (default configs/release_build.yaml)"),
    ] = None,
) -> None:
    """Run (or continue) the release build; finished runs and stages are skipped on rerun."""
    from dermlens.cli.research import echo, run_or_exit

    def go() -> dict:
        from dermlens.pipeline.release_build import build_release, load_build_recipe

        return build_release(load_build_recipe(recipe, list(overrides or [])), echo)

    s = run_or_exit(go)
    c = s["choice"]
    typer.echo(
        f"ensemble {s['ensemble']['bundle']} val BA {c['val_bal_acc_int8']['ensemble']:.4f}; student "
        f"{s['student']['bundle']} val BA {c['val_bal_acc_int8']['student']:.4f}; default: {c['default']}"
    )
