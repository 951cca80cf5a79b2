"""`dermlens evaluate` and `dermlens evaluate external`: options, one library call each, the printed summary.

The work is in dermlens.evaluate (inputs, runner, conditions, external); heavy imports happen in the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermlens import DISCLAIMER


def _print_summary(result: dict, paths: list[Path]) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from dermlens.evaluate import HEADLINE
    from dermlens.evaluate.report import metric_label

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    boot = result["bootstrap"]
    table = Table(
        title=f"dermlens evaluate: {result['n_images']} images, {result['n_lesions']} lesions",
        caption=f"{boot['ci_level']:.0%} CI: {boot['n_resamples']} {boot['unit']}-level bootstrap resamples",
    )
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    table.add_column(f"{boot['ci_level']:.0%} CI", justify="right")
    for key in HEADLINE:
        iv = result["overall"].get(key)
        if iv is not None:
            table.add_row(metric_label(key), f(iv["value"]), f"[{f(iv['ci_low'])}, {f(iv['ci_high'])}]")
    console = Console()
    console.print(table)
    trust = result.get("trust") or {}
    for name, t in trust.get("calibration_conditions", {}).items():
        cov = trust.get("conformal", {}).get(name)
        extra = (
            f"; {1 - trust['conformal_alpha']:.0%} set coverage {f(cov['coverage']['value'])}, "
            f"mean size {f(cov['mean_set_size']['value'])}"
            if cov and trust.get("conformal_alpha") is not None
            else ""
        )
        console.print(
            f"{name}: ECE {f(t['ece']['value'])} [{f(t['ece']['ci_low'])}, {f(t['ece']['ci_high'])}]{extra}"
        )
    if trust.get("subgroups"):
        console.print(f"subgroups flagged: {', '.join(trust['subgroups']['flagged']) or 'none'}")
    for p in paths:
        console.print(f"wrote {p}")
    console.print(Panel(DISCLAIMER, title="Disclaimer", border_style="red"))


def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Output folder for metrics.json and report.html.")],
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Predictions CSV. ISIC format: column 'image' + class columns MEL,NV,BCC,AKIEC,BKL,DF,VASC "
            "(ISIC 2018) or MEL,NV,BCC,AK,BKL,DF,VASC,SCC[,UNK] (ISIC 2019); or dermlens format: "
            "'image_id' + one 'p_<code>' column per class (p_mel, p_nv, ...). Rows must sum to 1.",
        ),
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth", help="ISIC ground-truth CSV ('image' + one-hot class columns, 2018 or 2019 layout)."
        ),
    ] = None,
    groups: Annotated[
        Path | None,
        typer.Option(
            "--groups",
            help="manifest.csv (image_id, group_id/lesion_id, image_path, split, diagnosis) or ISIC "
            "metadata CSV (image, lesion_id): lesions for the bootstrap, image paths for the gallery, "
            "training counts per class.",
        ),
    ] = None,
    uncalibrated: Annotated[
        Path | None,
        typer.Option(
            "--uncalibrated",
            help="Optional CSV of uncalibrated probabilities (same format) for the reliability plot.",
        ),
    ] = None,
    image_dir: Annotated[
        Path | None,
        typer.Option("--image-dir", help="Folder with <image>.jpg files for the misclassification gallery."),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest", help="Model mode: manifest.csv (or its folder) from `dermlens data prepare`."
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Model mode: manifest split to evaluate.")] = "test",
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model mode: bundle folder (default: the packaged release bundle)."),
    ] = None,
    training_log: Annotated[
        Path | None,
        typer.Option(
            "--training-log", help="Lightning CSVLogger metrics.csv for the training-curve section."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML overriding configs/evaluate.yaml.")
    ] = None,
    n_bootstrap: Annotated[
        int | None, typer.Option("--n-bootstrap", min=1, help="Bootstrap resamples (default from config).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Bootstrap seed.")] = None,
    external: Annotated[
        Path | None,
        typer.Option(
            "--external",
            help="Model mode: a prepared external manifest (e.g. work/isic2017) whose --external-split is "
            "also scored for calibration per condition and conformal coverage.",
        ),
    ] = None,
    external_split: Annotated[
        str, typer.Option("--external-split", help="Split of --external to score (its test split).")
    ] = "test",
    metadata: Annotated[
        bool,
        typer.Option("--metadata/--no-metadata", help="Model mode: give age/sex/site, or withhold them all."),
    ] = True,
    exclude_train_of: Annotated[
        Path | None,
        typer.Option(
            "--exclude-train-of",
            help="Model mode: leave out images in the train split of this manifest (e.g. to score the "
            "DermaMNIST test split only on images the model never trained on).",
        ),
    ] = None,
) -> None:
    """Evaluate predictions (or a model on a manifest split): metrics with lesion-level 95% bootstrap CIs.

    From predictions:
    dermlens evaluate --predictions preds.csv --truth truth.csv [--groups manifest.csv] --out DIR

    From a model:
    dermlens evaluate --manifest DIR/manifest.csv --split test [--model BUNDLE_DIR] --out DIR

    Writes DIR/metrics.json and DIR/report.html (one self-contained file).
    """
    from dermlens.evaluate.runner import EvaluateRequest, run_evaluation

    request = EvaluateRequest(
        out=out,
        predictions=predictions,
        truth=truth,
        groups=groups,
        uncalibrated=uncalibrated,
        image_dir=image_dir,
        manifest=manifest,
        split=split,
        model=model,
        training_log=training_log,
        config=config,
        n_bootstrap=n_bootstrap,
        seed=seed,
        external=external,
        external_split=external_split,
        metadata=metadata,
        exclude_train_of=exclude_train_of,
    )
    result, paths = run_evaluation(request)
    _print_summary(result, paths)


def external(
    manifest: Annotated[Path, typer.Option(help="Prepared ISIC 2017 manifest.csv.")],
    out: Annotated[Path, typer.Option(help="Output folder for external.json.")],
    split: Annotated[str, typer.Option(help="Split of the manifest to score, or 'all'.")] = "all",
    model: Annotated[Path | None, typer.Option(help="Model bundle (default: the packaged model).")] = None,
    n_bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = 1000,
    metadata: Annotated[
        bool, typer.Option("--metadata/--no-metadata", help="Give age/sex/site, or withhold them all.")
    ] = True,
) -> None:
    """External validity on ISIC 2017: melanoma-vs-rest AUC and 3 classes (mel, SK->bkl, nevus->nv)."""
    from dermlens.evaluate.external import score_isic2017

    scores, path = score_isic2017(manifest, out, split, model, n_bootstrap, metadata)
    tc = scores["three_class"]
    typer.echo(
        f"ISIC 2017 [{split}] melanoma AUC {_fmt(scores['melanoma_auc'])}; "
        f"3-class balanced accuracy {_fmt(tc['balanced_accuracy'])}; "
        f"SK AUC {_fmt(tc['seborrheic_keratosis_auc'])}"
    )
    typer.echo(f"wrote {path}\n{DISCLAIMER}")


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def skin_tone(
    manifest: Annotated[Path, typer.Option(help="Prepared HAM10000 folder or manifest.csv.")],
    out: Annotated[Path, typer.Option(help="Output JSON (e.g. docs/results/skin_tone_audit.json).")],
    split: Annotated[str, typer.Option(help="Split of --manifest to audit.")] = "test",
    external: Annotated[
        Path | None, typer.Option(help="A prepared external manifest (e.g. work/isic2017), also audited.")
    ] = None,
    external_split: Annotated[str, typer.Option(help="Split of --external to audit.")] = "test",
    model: Annotated[Path | None, typer.Option(help="Model bundle (default: the packaged model).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML overriding configs/skin_tone.yaml (ITA bands, skin pixels).")
    ] = None,
    n_bootstrap: Annotated[int | None, typer.Option(min=1, help="Bootstrap resamples for the CIs.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Audit at most this many images per set.")] = None,
) -> None:
    """Skin-tone audit: ITA band of the skin around each lesion (mask or border ring), then balanced
    accuracy, melanoma sensitivity, ECE and refer rate per band (and sex, age band, site), without
    metadata, with lesion-level CIs and Holm-corrected flags."""
    import json

    from dermlens.evaluate import json_safe
    from dermlens.evaluate.skin_tone_audit import skin_tone_audit

    sets = [(manifest, split)] + ([(external, external_split)] if external is not None else [])
    result = skin_tone_audit(sets, model, config, n_bootstrap, limit, log=lambda m: typer.echo(m, err=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=2) + "\n")
    for name, s in result["sets"].items():
        counts = ", ".join(f"{b} {c['n_images']}" for b, c in s["band_counts"].items())
        typer.echo(f"{name}: {counts}")
    flagged = [f for s in result["sets"].values() for f in s["audit"]["flagged"]]
    typer.echo(f"flagged: {', '.join(flagged) or 'none'}")
    typer.echo(f"wrote {out}\n{DISCLAIMER}")
