"""`dermlens release`: the one release build (data -> members -> ensemble -> student -> choice -> the
packaged model -> test splits), resumable end to end; `release levers`: the lever study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermlens.cli.groups import group

app = group("Build the model that ships (`dermlens release build`), and the lever study.")


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


@app.command("levers")
def levers(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="training key=value overrides for every lever, e.g. trainer.threads=1"),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="train only these levers (repeat); default: all")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "-r", help="levers YAML (default configs/levers.yaml)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the table as JSON here")] = None,
    train: Annotated[bool, typer.Option("--train/--no-train", help="--no-train only tabulates")] = True,
) -> None:
    """Train one-at-a-time variants of the release recipe and tabulate each one's val effect."""
    import json

    from dermlens.cli.research import echo, run_or_exit

    def go() -> dict:
        from dermlens.pipeline.levers import check, load_levers, summarise, train_levers

        r = load_levers(recipe, list(overrides or []))
        names = list(only or [str(lever["name"]) for lever in r["levers"]])
        check(r, names)  # every bad name or override fails before any training
        if train:
            train_levers(r, names, echo)
        earlier = json.loads(out.read_text()) if out is not None and out.is_file() else None
        return summarise(r, earlier)

    table = run_or_exit(go)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=2) + "\n")
    for row in table["levers"]:
        typer.echo(_lever_line(row))
    if table["not_run"]:
        typer.echo(f"not run yet: {', '.join(table['not_run'])}")


def _lever_line(row: dict) -> str:
    """One lever's figures: val BA (difference from `versus`, its paired 95% CI), no metadata, external."""
    line = f"{row['lever']:<22} val BA {row['val_bal_acc']:.4f}"
    if (ci := row["delta_val_bal_acc_ci95"]) is not None:
        line += f" ({row['delta_val_bal_acc']:+.4f} vs {row['versus']}, 95% CI {ci[0]:+.4f} to {ci[1]:+.4f})"
    elif row.get("delta_val_bal_acc") is not None:
        line += f" ({row['delta_val_bal_acc']:+.4f} vs {row['versus']}, no paired CI: a run is not here)"
    if row["val_bal_acc_no_metadata"] is not None:
        line += f", no metadata {row['val_bal_acc_no_metadata']:.4f}"
    if row["external_bal_acc3"] is not None:
        line += f", external 3-class {row['external_bal_acc3']:.4f}"
    for name, value in (row.get("sources_val_bal_acc_no_metadata") or {}).items():
        line += f", {name} {value:.4f}"
        delta = (row.get("delta_sources_no_metadata") or {}).get(name) or {}
        if delta.get("ci95") is not None:
            line += f" ({delta['delta']:+.4f}, CI {delta['ci95'][0]:+.4f} to {delta['ci95'][1]:+.4f})"
    return line


@app.command("compare")
def compare(
    model: Annotated[
        Path, typer.Option("--model", help="the bundle to score (e.g. a new release candidate)")
    ],
    out: Annotated[Path, typer.Option("--out", help="write the figures as JSON here")],
    versus: Annotated[
        Path | None, typer.Option("--versus", help="a second bundle, scored on the same images (paired CIs)")
    ] = None,
    role: Annotated[
        str, typer.Option("--role", help="val (to choose) or test (read once, at the end)")
    ] = "val",
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime threads (0 = all cores)")] = 0,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML over configs/trust.yaml (its `sources`)")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="at most this many images per source")] = None,
) -> None:
    """Balanced accuracy on every dermoscopy source's val or test split without metadata, with lesion CIs;
    with --versus, both bundles and their paired difference."""
    import json

    from dermlens.cli.research import echo, run_or_exit
    from dermlens.errors import UsageError

    if role not in ("val", "test"):
        raise UsageError(f"--role is val or test, not {role!r}")

    def go() -> dict:
        from dermlens.pipeline.source_figures import compare as run

        bundles = {"model": model, **({"versus": versus} if versus is not None else {})}
        from dermlens.trust.outputs import trust_config

        return run(bundles, role, threads or None, echo, trust_config(config), limit)

    table = run_or_exit(go)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    typer.echo(f"wrote {out}")
