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
    from dermlens.train.config import load_config

    cfg = load_config(config, overrides or [])  # checked before torch is imported: quick errors
    from dermlens.train.engine import train as run

    metrics = run(cfg, resume=resume)
    if metrics:
        typer.echo(
            f"val balanced accuracy {metrics['bal_acc']:.4f}, macro AUC {metrics['macro_auc']:.4f} "
            f"(best epoch {metrics['best_epoch']}); run folder written"
        )
