"""`dermlens train distill`: train one student on a teacher bundle's soft targets (e.g. an ensemble's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def distill(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="student training key=value overrides")
    ] = None,
    teacher: Annotated[Path | None, typer.Option(help="teacher bundle folder (e.g. an ensemble)")] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="student training config (default release.yaml)")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="weight of the soft-target loss (0..1)")] = None,
    temperature: Annotated[float | None, typer.Option(help="soft-target temperature T")] = None,
    export: Annotated[
        Path | None, typer.Option(help="also export the finished student to this bundle folder")
    ] = None,
    external: Annotated[
        Path | None,
        typer.Option(help="with --export: external prepared data (e.g. work/isic2017-holdout) for trust"),
    ] = None,
) -> None:
    """Precompute the teacher's logits once, then train the student (resumable, like `dermlens train`)."""
    from dermlens.cli.research import echo, run_or_exit

    def go() -> dict:
        from dermlens import config as configuration
        from dermlens.train.distill import distill as run
        from dermlens.train.distill import student_config

        given = {"teacher": teacher, "config": config, "alpha": alpha, "temperature": temperature}
        layer = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
        d = configuration.load("distill", layers=[("command-line options", layer)])
        if not 0.0 <= float(d["alpha"]) <= 1.0 or float(d["temperature"]) <= 0:
            from dermlens.train.config import ConfigError

            raise ConfigError("--alpha must be in 0..1 and --temperature > 0")
        done = run(d, list(overrides or []), echo)
        if export is not None:
            from dermlens.export.checkpoint import find_checkpoint
            from dermlens.pipeline.bundle import build_bundle

            cfg = student_config(d, list(overrides or []))
            run_dir = cfg["trainer"]["run_dir"]
            build_bundle(find_checkpoint(run_dir), cfg["data"]["dir"], export, log=echo, external=external)
        return done

    done = run_or_exit(go)
    typer.echo(f"student val balanced accuracy {done['metrics']['bal_acc']:.4f}")
