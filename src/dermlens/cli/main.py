"""Entry point: `dermlens --help` lists the path data -> train -> evaluate -> export -> predict/serve."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

from dermlens import DISCLAIMER, __version__
from dermlens.cli import bundle as bundle_cli
from dermlens.cli import data
from dermlens.cli import distill as distill_cli
from dermlens.cli import ensemble as ensemble_cli
from dermlens.cli import evaluate as evaluate_cli
from dermlens.cli import export as export_cli
from dermlens.cli import monitor as monitor_cli
from dermlens.cli import predict as predict_cli
from dermlens.cli import pretrain as pretrain_cli
from dermlens.cli import records as records_cli
from dermlens.cli import release as release_cli
from dermlens.cli import serve as serve_cli
from dermlens.cli import train as train_cli
from dermlens.cli import trust as trust_cli
from dermlens.cli import tune as tune_cli
from dermlens.cli.groups import deprecated, group
from dermlens.errors import DermlensError

app = typer.Typer(
    name="dermlens",
    help=f"Classify dermoscopic skin-lesion images and evaluate models honestly.\n\n{DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The path, one noun each: data -> train -> bundle -> trust -> evaluate -> predict/serve -> records/monitor.
train_app = group(
    "Train models: a run, a hyper-parameter search, ensembles, distillation, pretraining.", "run"
)
train_app.command("run")(train_cli.train)
train_app.command("tune")(tune_cli.tune)
train_app.command("ensemble")(ensemble_cli.ensemble)
train_app.command("distill")(distill_cli.distill)
train_app.command("pretrain")(pretrain_cli.pretrain)
train_app.command("label-efficiency")(pretrain_cli.label_efficiency)
bundle_cli.app.command("export")(export_cli.export)
evaluate_app = group("Evaluate predictions or a model: metrics with lesion-level CIs, external sets.", "run")
evaluate_app.command("run")(evaluate_cli.evaluate)
evaluate_app.command("external")(evaluate_cli.external)
evaluate_app.command("skin-tone")(evaluate_cli.skin_tone)
monitor_app = group("Watch served predictions for drift against the model's reference.", "check")
monitor_app.command("check")(monitor_cli.monitor)
monitor_app.command("reference")(monitor_cli.monitor_reference)

app.add_typer(data.app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(bundle_cli.app, name="bundle")
app.add_typer(trust_cli.app, name="trust")
app.add_typer(evaluate_app, name="evaluate")
app.command("predict")(predict_cli.predict)
app.command("serve")(serve_cli.serve)
app.add_typer(records_cli.app, name="records")
app.add_typer(monitor_app, name="monitor")
app.add_typer(release_cli.app, name="release")

# Old spellings, hidden, for one version.
for old, new, fn in [
    ("export", "bundle export", export_cli.export),
    ("external", "evaluate external", evaluate_cli.external),
    ("monitor-reference", "monitor reference", monitor_cli.monitor_reference),
    ("tune", "train tune", tune_cli.tune),
    ("ensemble", "train ensemble", ensemble_cli.ensemble),
    ("distill", "train distill", distill_cli.distill),
    ("pretrain", "train pretrain", pretrain_cli.pretrain),
    ("label-efficiency", "train label-efficiency", pretrain_cli.label_efficiency),
]:
    app.command(old, hidden=True)(deprecated(fn, old, new))


@app.command()
def version() -> None:
    """Print the dermlens version."""
    typer.echo(__version__)


def _one_line_errors(fn: Callable) -> Callable:
    """A command that reports any DermlensError (a missing optional dependency included) as one line,
    `error: ...`, with exit code 2. Any other exception is a bug and shows as one."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DermlensError as e:
            _fail(str(e))
        except ImportError as e:
            from dermlens.extras import as_missing_extra

            err = as_missing_extra(e)
            if err is None:
                raise
            _fail(str(err))

    return run


def _fail(message: str) -> None:
    """Print `error: message` in red on stderr and exit 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from None


def _guard(group: typer.Typer) -> None:
    """Wrap every command of a Typer app (and of its sub-apps) with _one_line_errors."""
    for command in group.registered_commands:
        if command.callback is not None:
            command.callback = _one_line_errors(command.callback)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _guard(sub.typer_instance)


_guard(app)

if __name__ == "__main__":
    app()
