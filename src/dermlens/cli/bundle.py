"""`dermlens bundle ...`: show a model bundle, check it, and record evaluation results in its card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dermlens.errors import BundleError, DermlensError

app = typer.Typer(
    help="Inspect, verify and annotate model bundles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BundleArg = Annotated[
    Path | None, typer.Argument(help="Bundle folder (default: the packaged release bundle).")
]


def _fail(message: str) -> DermlensError:
    """A one-line error that cli/main.py prints (exit 2)."""
    return BundleError(message)


def _bundle(path: Path | None) -> Path:
    from dermlens.bundle import release_dir

    return Path(path) if path is not None else release_dir()


@app.command()
def info(bundle: BundleArg = None) -> None:
    """Print what a bundle is: version, architecture, input, data lineage and recorded metrics."""
    from dermlens.bundle import BundleError, read_card

    try:
        card = read_card(_bundle(bundle)).to_dict()
    except (BundleError, ValueError, KeyError) as e:
        raise _fail(str(e)) from None
    p = card["preprocessing"]
    typer.echo(
        f"{card['name']} {card['version']} ({card['architecture']}; card schema {card['schema_version']})"
    )
    typer.echo(
        f"input {p['height']}x{p['width']} ({p.get('fit') or 'squash'}), "
        f"colour constancy {p.get('color_constancy', 'none')}, "
        f"metadata {'used' if card['uses_metadata'] else 'not used'}; classes {', '.join(card['classes'])}"
    )
    for entry in card.get("lineage", {}).get("evaluated_on", []) + card.get("lineage", {}).get(
        "extra_training_data", []
    ):
        typer.echo(f"data {entry.get('dataset')}: split hash {str(entry.get('split_hash'))[:16]}")
    for name, m in card.get("metrics", {}).items():
        if isinstance(m, dict) and "summary" in m:
            typer.echo(f"metrics[{name}]: " + ", ".join(f"{k} {v:.3f}" for k, v in m["summary"].items()))
    typer.echo(f"licence: code Apache-2.0, weights {card.get('license') or 'not stated'} (docs/licences.md)")
    typer.echo(card.get("disclaimer", ""))


@app.command()
def verify(
    bundle: BundleArg = None,
    expect: Annotated[
        str | None, typer.Option(help="The bundle digest (sha256:...) you were given: it must match.")
    ] = None,
) -> None:
    """Check a bundle as serve and predict do: every file as sealed in MANIFEST.sha256 (card included), a
    usable card, each ONNX graph runs with the card's shapes. Prints the bundle digest."""
    from dermlens.bundle import BundleError, verify_bundle

    lines = verify_bundle(_bundle(bundle))
    digest = next(line.split(": ", 1)[1] for line in lines if line.startswith("bundle digest: "))
    if expect is not None and expect.removeprefix("sha256:").lower() != digest.removeprefix("sha256:"):
        raise BundleError(f"bundle digest is {digest}, not the expected {expect}")
    for line in lines:
        typer.echo(line)
    typer.echo("bundle verified")


@app.command()
def seal(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder you built or changed yourself.")],
) -> None:
    """Record the sha256 of every file of a bundle you built or changed yourself in its MANIFEST.sha256
    (sealing vouches for the files as they are now)."""
    from dermlens.bundle import seal as seal_bundle
    from dermlens.integrity import manifest_digest

    path = seal_bundle(bundle)
    typer.echo(f"sealed {path}: bundle digest sha256:{manifest_digest(bundle)}")


@app.command("add-metrics")
def add_metrics(
    name: Annotated[str, typer.Argument(help="Name of the condition, e.g. test_no_metadata.")],
    results: Annotated[Path, typer.Argument(help="metrics.json of `dermlens evaluate` or external.json.")],
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (default: the packaged one).")] = None,
) -> None:
    """Record an evaluation of this very model (same model_version) in the bundle's card."""
    from dermlens.bundle import BundleError, record_metrics

    try:
        summary = record_metrics(_bundle(bundle), name, json.loads(results.read_text()))
    except (BundleError, OSError, ValueError) as e:
        raise _fail(f"{results}: {e}") from None
    typer.echo(f"recorded {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


@app.command("record-lineage")
def record_lineage(
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (default: the packaged one).")] = None,
) -> None:
    """Record the extra training sources (each ensemble member's data.extra_train) with their hashes."""
    from dermlens.bundle import BundleError
    from dermlens.export.lineage import record_extra_sources

    try:
        found = record_extra_sources(_bundle(bundle))
    except (BundleError, OSError, ValueError) as e:
        raise _fail(str(e)) from None
    for entry in found:
        typer.echo(
            f"extra training data {entry['dir']} {entry['dataset']}: split hash {entry['split_hash'][:16]}"
        )
    if not found:
        typer.echo("no extra training data in the card's training record")
