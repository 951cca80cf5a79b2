"""`dermlens train pretrain`: self-supervised (SimCLR) pretraining of a backbone on unlabelled dermoscopy
images."""

from __future__ import annotations

from typing import Annotated

import typer

from dermlens.cli.options import Overrides, Resume, config_option


def pretrain(
    overrides: Overrides = None,
    config: config_option("pretrain.yaml") = None,
    resume: Resume = None,
) -> None:
    """Pretrain a backbone with SimCLR; writes <run_dir>/backbone.pt for `dermlens train model.init=PATH`."""
    from dermlens.cli.research import run_or_exit

    def go() -> dict | None:
        from dermlens.train.pretrain import load_pretrain_config
        from dermlens.train.pretrain import pretrain as run

        return run(load_pretrain_config(config, overrides or []), resume=resume)

    report = run_or_exit(go)
    if report:
        losses = report["epoch_losses"]
        first, last = (f"{losses[0]:.3f}", f"{losses[-1]:.3f}") if losses else ("-", "-")
        typer.echo(
            f"{report['epochs']} epoch(s) on {report['images']} unlabelled images, loss {first} -> {last}; "
            f"backbone weights: {report['backbone']} (use: dermlens train model.init={report['backbone']})"
        )


def label_efficiency(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="YAML study (default configs/label_efficiency.yaml)"),
    ] = None,
) -> None:
    """Fine-tune from ImageNet and from the SSL encoder on 10-100% of the labels; table, JSON and plot."""
    from dermlens.cli.research import run_or_exit

    def go() -> tuple[dict, dict]:
        from dermlens.evaluate.label_efficiency import load_study, run_study

        study = load_study(config)
        return study, run_study(study)

    study, out = run_or_exit(go)
    typer.echo("init      labels  val BA                test BA               ISIC 2017 mel AUC")
    for c in out["cells"]:
        cols = [c[k] for k in ("val_bal_acc", "test_bal_acc", "isic2017_test_mel_auc")]
        text = "  ".join(f"{v['value']:.3f} ({v['ci_low']:.3f}-{v['ci_high']:.3f})" for v in cols)
        typer.echo(f"{c['init']:<9} {c['fraction'] * 100:>5.0f}%  {text}")
    typer.echo(f"written: {study['out']} and {study['plot']}")
