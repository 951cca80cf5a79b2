"""`dermlens train`: train a model from a YAML config with dotted overrides."""

from __future__ import annotations

import typer

from dermlens.cli.options import Overrides, Resume, config_option


def train(
    overrides: Overrides = None,
    config: config_option("train.yaml") = None,
    resume: Resume = None,
) -> None:
    """Train a classifier; writes runs/<name>/ with config, logs, checkpoints, metrics and val outputs."""
    from dermlens.train.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides or [])  # checked before torch is imported: quick errors
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    from dermlens.train.datamodule import DataSetupError

    try:
        from dermlens.train.engine import train as run

        metrics = run(cfg, resume=resume)
    except (ConfigError, DataSetupError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - user-facing one-line message for known failure types
        from dermlens.model.weights import WeightsError

        if isinstance(e, WeightsError):
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        raise
    if metrics:
        typer.echo(
            f"val balanced accuracy {metrics['bal_acc']:.4f}, macro AUC {metrics['macro_auc']:.4f} "
            f"(best epoch {metrics['best_epoch']}); run folder written"
        )
