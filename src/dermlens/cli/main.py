"""Entry point: `dermlens --help` lists the path data -> train -> evaluate -> export -> predict/serve."""

from __future__ import annotations

import typer

from dermlens import DISCLAIMER, __version__
from dermlens.cli import bundle as bundle_cli
from dermlens.cli import data
from dermlens.cli import evaluate as evaluate_cli
from dermlens.cli import export as export_cli
from dermlens.cli import predict as predict_cli
from dermlens.cli import records as records_cli
from dermlens.cli import serve as serve_cli
from dermlens.cli import train as train_cli
from dermlens.cli import trust as trust_cli

app = typer.Typer(
    name="dermlens",
    help=f"Classify dermoscopic skin-lesion images and evaluate models honestly.\n\n{DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(bundle_cli.app, name="bundle")
app.add_typer(data.app, name="data")
app.command("evaluate")(evaluate_cli.evaluate)
app.command("external")(evaluate_cli.external)
app.command("export")(export_cli.export)
app.command("predict")(predict_cli.predict)
app.command("serve")(serve_cli.serve)
app.add_typer(records_cli.app, name="records")
app.command("train")(train_cli.train)
app.add_typer(trust_cli.app, name="trust")


@app.command()
def version() -> None:
    """Print the dermlens version."""
    typer.echo(__version__)


if __name__ == "__main__":
    app()
