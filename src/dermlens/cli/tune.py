"""`dermlens train tune`: an Optuna study over training config keys (resumable, SQLite), pruned on val BA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def tune(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="training key=value overrides for every trial, e.g. data.dir=work/ham10000"),
    ] = None,
    study: Annotated[
        Path | None,
        typer.Option("--study", "-s", help="study YAML (search space etc.; default configs/tune.yaml)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="study folder (study.db, trials/, results)")] = None,
    n_trials: Annotated[int | None, typer.Option(help="finished trials the study should hold")] = None,
) -> None:
    """Search hyper-parameters; rerun the same command to continue an interrupted study."""
    from dermlens.cli.research import echo, run_or_exit

    def go() -> dict:
        from dermlens.train.tune import load_study_config, run_study

        over: dict = {}
        if out is not None:
            over["out"] = str(out)
        if n_trials is not None:
            over["n_trials"] = n_trials
        cfg = load_study_config(study, over)
        cfg["overrides"] = [*(cfg.get("overrides") or []), *(overrides or [])]
        return run_study(cfg, echo)

    summary = run_or_exit(go)
    best = summary["best"]
    where = Path(summary["storage"]).parent
    if best:
        typer.echo(
            f"best trial {best['trial']}: {summary['objective']} {best['value']:.4f} "
            f"(val balanced accuracy {best.get('val_bal_acc') or float('nan'):.4f}) {best['params']}; "
            f"table {where / 'results.md'}"
        )
    else:
        typer.echo(f"no finished trial yet; table {where / 'results.md'}")
