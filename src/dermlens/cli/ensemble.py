"""`dermlens train ensemble`: k fold members (and/or architectures) -> averaging or stacking -> one bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def ensemble(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="training key=value overrides for every member, e.g. data.dir=work/ham10000"),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", "-r", help="ensemble YAML (default configs/ensemble.yaml)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="folder for members/ and ensemble.json")] = None,
    bundle: Annotated[Path | None, typer.Option(help="bundle folder to write (default OUT/bundle)")] = None,
    combine: Annotated[
        str | None, typer.Option(help="mean_prob | mean_logit | stack (default: the recipe's)")
    ] = None,
    folds: Annotated[int | None, typer.Option(help="members per architecture, one per fold")] = None,
) -> None:
    """Train (or resume, or skip finished) members, fit the stacker on out-of-fold predictions, export."""
    from dermlens.cli.research import echo, run_or_exit

    def go() -> dict:
        from dermlens.pipeline.ensemble_bundle import build_ensemble
        from dermlens.train.members import load_recipe

        over: dict = {
            k: v for k, v in {"out": out, "combine": combine, "folds": folds}.items() if v is not None
        }
        if "out" in over:
            over["out"] = str(over["out"])
        r = load_recipe(recipe, over)
        r["overrides"] = [*(r.get("overrides") or []), *(overrides or [])]
        return build_ensemble(r, bundle, echo)

    s = run_or_exit(go)
    v = s["val"]
    typer.echo(
        f"bundle {s['bundle']} ({s['architecture']}): val balanced accuracy fp32 {v['fp32']['bal_acc']:.4f}, "
        f"int8 {v['int8']['bal_acc']:.4f}"
        + ("  (members saw the val split: see the out-of-fold figures)" if s["val_seen_in_training"] else "")
    )
