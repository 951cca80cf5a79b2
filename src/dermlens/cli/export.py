"""`dermlens bundle export`: a trained run -> a model bundle (ONNX fp32 + int8, trust statistics, card)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to write")],
    run: Annotated[
        Path | None, typer.Option("--run", help="training run folder (uses checkpoints/best.ckpt)")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="a .ckpt from `dermlens train`, or a bundle's model.pt"),
    ] = None,
    manifest: Annotated[
        Path,
        typer.Option("--manifest", help="prepared data folder (manifest.csv + cache) for val/train outputs"),
    ] = Path("work/ham10000"),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML overriding configs/export.yaml sections")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads for the parity check (0 = all cores)")] = 0,
    external: Annotated[
        Path | None,
        typer.Option(
            "--external",
            help="prepared external manifest (e.g. work/isic2017): its train split joins the choice and fit "
            "of calibration per condition",
        ),
    ] = None,
) -> None:
    """Export a model to ONNX (fp32 + int8) and card.json, then fit calibration/OOD/refer on val with the
    precision that will be served."""
    import torch

    from dermlens.errors import UsageError
    from dermlens.export.checkpoint import find_checkpoint
    from dermlens.export.stage import export_config
    from dermlens.pipeline.bundle import build_bundle

    if (run is None) == (checkpoint is None):
        raise UsageError("give exactly one of --run RUN_DIR or --checkpoint CKPT")
    if threads > 0:
        torch.set_num_threads(threads)
    ckpt = checkpoint if checkpoint is not None else find_checkpoint(run)
    card = build_bundle(
        ckpt, manifest, out, export_config(config), log=lambda m: typer.echo(m, err=True), external=external
    )
    _write_monitor_reference(out, manifest)
    val = card["metrics"]["val"]
    typer.echo(
        f"bundle {out} ({card['version']}): val balanced accuracy fp32 {val['fp32']['bal_acc']:.4f}, "
        f"int8 {val['int8']['bal_acc']:.4f}; fp32 vs PyTorch max |dp| "
        f"{card['export']['parity_fp32_vs_torch']['max_abs_prob_diff']:.1e}"
    )


def _write_monitor_reference(bundle: Path, manifest: Path) -> None:
    """The bundle's drift-monitoring baseline: its runtime outputs on val (dermlens.monitor.reference)."""
    from dermlens.infer.predictor import Predictor
    from dermlens.monitor.reference import build_reference

    path = build_reference(Predictor.load(bundle), manifest, "val").save(bundle)
    typer.echo(f"monitoring reference: {path}", err=True)
