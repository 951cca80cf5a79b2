"""`dermlens evaluate`: metrics with lesion-level bootstrap CIs, metrics.json and a self-contained report.

Heavy imports (numpy, pandas, matplotlib, the predictor) happen inside the command.

Long module: `evaluate` and `external` share input loading (CSV or model mode) and the trust tables;
moving those under dermlens.evaluate waits for the one config system (issue 12, arch-config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from dermlens import DISCLAIMER


class EvaluationInputError(ValueError):
    """Inputs that cannot be evaluated together (message says why)."""


@dataclass
class _Inputs:
    images: list[str]
    classes: tuple[str, ...]
    probs: object
    truth: object
    groups: list | None = None
    malignant: object = None
    uncalibrated: object = None
    refer: object = None
    image_paths: list | None = None
    train_counts: dict[str, int] | None = None
    source: str = ""
    predictor: object = None
    frame: object = None  # model mode: the evaluated manifest rows (age/sex/site for the subgroup audit)
    arrays: dict | None = None  # model mode: every Predictor output (incl. nometa_* without metadata)


def _train_counts(side) -> dict[str, int] | None:
    """Diagnosis counts of the train split in a manifest-like table, or None."""
    if side is None or not {"split", "diagnosis"} <= set(side.columns):
        return None
    counts = side.loc[side["split"] == "train", "diagnosis"].value_counts()
    return {str(k): int(v) for k, v in counts.items()} or None


def _find_image(image_dir: Path, image_id: str) -> str | None:
    from dermlens.preprocess import find_image

    found = find_image(image_dir, image_id)
    return None if found is None else str(found)


def _from_csv(
    predictions: Path,
    truth: Path,
    groups: Path | None,
    uncalibrated: Path | None,
    image_dir: Path | None,
    cfg,
) -> _Inputs:
    """Inputs from ISIC/dermlens CSVs (+ optional manifest for groups, image paths and train counts)."""
    import numpy as np
    import pandas as pd

    from dermlens.evaluate.isic_csv import align, read_image_table, read_predictions, read_truth

    t_raw = read_truth(truth)
    t, p = align(t_raw, read_predictions(predictions, cfg.row_sum_tolerance))
    uncal = None
    if uncalibrated is not None:
        tu, u = align(t_raw, read_predictions(uncalibrated, cfg.row_sum_tolerance))
        if tu.classes != t.classes:
            raise EvaluationInputError(
                f"{uncalibrated}: classes {tu.classes} differ from the predictions' {t.classes}"
            )
        uncal = u.values
    out = _Inputs(
        list(t.images),
        t.classes,
        p.values,
        t.labels(),
        uncalibrated=uncal,
        source=f"predictions {predictions.name}, truth {truth.name}",
    )
    if groups is not None:
        side = read_image_table(groups).set_index("image")
        known = side.reindex(out.images)
        n_missing = int((~pd.Index(out.images).isin(side.index)).sum())
        if n_missing == len(out.images):
            raise EvaluationInputError(f"{groups}: none of the {len(out.images)} evaluated images is listed")
        if n_missing:
            typer.echo(
                f"note: {n_missing} image(s) not in {groups.name}; each counts as its own lesion", err=True
            )
        if "group" in known.columns:
            out.groups = [None if isinstance(g, float) else g for g in known["group"].tolist()]
        if "image_path" in known.columns:
            out.image_paths = [None if isinstance(x, float) else x for x in known["image_path"].tolist()]
        out.train_counts = _train_counts(side.reset_index())
    if image_dir is not None:
        found = [_find_image(image_dir, i) for i in out.images]
        prior = out.image_paths or [None] * len(found)
        out.image_paths = [a if a is not None else b for a, b in zip(prior, found, strict=True)]
    out.probs, out.truth = np.asarray(out.probs), np.asarray(out.truth)
    return out


def _predict_rows(predictor, rows, batch_size: int, use_metadata: bool = True, no_meta: bool = False) -> dict:
    """Predict every manifest row (image plus age/sex/site where present, unless use_metadata is False);
    with no_meta, also each image without metadata (keys prefixed 'nometa_'), decoded once."""
    import math

    import numpy as np

    from dermlens.preprocess import load_rgb

    def text(v: object) -> str | None:
        return v if isinstance(v, str) else None

    parts: dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows.iloc[start : start + batch_size]
        images = [load_rgb(p) for p in batch["image_path"]]
        meta = [
            {
                "age": None
                if r.age is None or (isinstance(r.age, float) and math.isnan(r.age))
                else float(r.age),
                "sex": text(r.sex),
                "site": text(getattr(r, "site", None)),
            }
            for r in batch.itertuples()
        ]
        outs = {"": predictor.predict_arrays(images, meta if use_metadata else None)}
        if no_meta and use_metadata:
            outs["nometa_"] = predictor.predict_arrays(images, None)
        for prefix, res in outs.items():
            for k, v in res.items():
                if v is not None and k != "refer_codes":
                    parts.setdefault(prefix + k, []).append(np.asarray(v))
                elif k == "refer_codes":
                    parts.setdefault(prefix + k, []).append(np.array(["|".join(c) for c in v], dtype=object))
        typer.echo(f"predicted {min(start + batch_size, len(rows))}/{len(rows)}", err=True)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _unseen(rows, seen_manifest: Path | None):
    """Drop rows whose image is in the `train` split of another manifest (the model's training data)."""
    if seen_manifest is None:
        return rows
    from dermlens.data.manifest import read_manifest

    seen = read_manifest(seen_manifest)
    trained = set(seen.loc[seen["split"] == "train", "image_id"].astype(str))
    kept = rows[~rows["image_id"].astype(str).isin(trained)]
    typer.echo(
        f"note: {len(rows) - len(kept)} image(s) in the train split of {seen_manifest} left out", err=True
    )
    return kept


def _from_model(
    manifest: Path,
    split: str,
    model: Path | None,
    cfg,
    use_metadata: bool = True,
    exclude_train_of: Path | None = None,
) -> _Inputs:
    """Run the inference layer's Predictor on a manifest split (labelled images only)."""
    import numpy as np

    from dermlens.data.manifest import read_manifest

    try:
        from dermlens.infer.predictor import Predictor
    except ImportError as e:
        raise EvaluationInputError(f"model mode needs the inference runtime (dermlens.infer): {e}") from e

    df = read_manifest(manifest)
    rows = _unseen(df[df["split"] == split], exclude_train_of)
    if rows.empty:
        raise EvaluationInputError(
            f"{manifest}: no rows in split {split!r} (splits: {sorted(df['split'].unique())})"
        )
    predictor = Predictor.load(model)
    classes = tuple(predictor.classes)
    labelled = rows[rows["diagnosis"].isin(classes)]
    if len(labelled) < len(rows):
        typer.echo(
            f"note: {len(rows) - len(labelled)} {split} image(s) without a label in {classes} skipped",
            err=True,
        )
    if labelled.empty:
        raise EvaluationInputError(f"{manifest}: no labelled images in split {split!r}")
    arr = _predict_rows(predictor, labelled, cfg.batch_size, use_metadata, no_meta=True)
    truth = np.array([classes.index(c) for c in labelled["diagnosis"]])
    group_col = "group_id" if "group_id" in labelled.columns else "lesion_id"
    return _Inputs(
        images=labelled["image_id"].astype(str).tolist(),
        classes=classes,
        probs=arr["probs"],
        truth=truth,
        groups=labelled[group_col].tolist() if group_col in labelled.columns else None,
        malignant=arr.get("malignant"),
        uncalibrated=arr.get("probs_uncalibrated"),
        refer=arr.get("refer"),
        image_paths=labelled["image_path"].astype(str).tolist(),
        train_counts=_train_counts(df),
        source=f"model {model or 'release bundle'}, {manifest.name} split {split}"
        + ("" if use_metadata else ", metadata withheld"),
        predictor=predictor,
        frame=labelled.reset_index(drop=True),
        arrays=arr,
    )


def _condition_tables(name: str, arr: dict, truth, classes, groups, cfg) -> tuple[dict, dict]:
    """ECE and conformal coverage of one evaluated set, with metadata and without (lesion-level CIs)."""
    import numpy as np

    from dermlens.evaluate.audit import coverage_with_ci, ece_with_ci

    ece, cov = {}, {}
    for prefix in ("", "nometa_"):
        if f"{prefix}probs" not in arr:
            continue
        given = prefix == "" and bool(np.asarray(arr.get("has_meta", [True])).any())
        cond = "meta" if given else "no_meta"
        if f"{name}/{cond}" in ece:
            continue  # no image had metadata: both passes are the 'no_meta' condition
        ece[f"{name}/{cond}"] = ece_with_ci(arr[f"{prefix}probs"], truth, groups, cfg)
        sets = arr.get(f"{prefix}prediction_sets")
        if sets is not None:
            cov[f"{name}/{cond}"] = coverage_with_ci(sets, truth, classes, groups, cfg)
    return ece, cov


def _refer_table(arr: dict) -> dict:
    """Share of images flagged by each refer reason, and referred at all."""
    import numpy as np

    keys = ("ood", "not_dermoscopy", "low_confidence", "set_too_large", "refer")
    return {k: float(np.mean(arr[k])) for k in keys if k in arr}


def _trust_block(inputs: _Inputs, split_name: str, external: Path | None, external_split: str, cfg) -> dict:
    """Calibration per condition, conformal coverage / set sizes, refer reasons and the subgroup audit."""
    import numpy as np

    from dermlens.evaluate.audit import subgroup_audit

    arr, classes = inputs.arrays, inputs.classes
    frame = inputs.frame
    name = f"{frame['dataset'].iloc[0] if 'dataset' in frame.columns else 'manifest'}/{split_name}"
    ece, cov = _condition_tables(name, arr, inputs.truth, classes, inputs.groups, cfg)
    from dermlens.trust.clinical_probe import cpu_name

    block: dict = {
        "model_version": inputs.predictor.card.version,
        "precision": inputs.predictor.precision,
        "cpu": cpu_name(),
        "calibration_conditions": ece,
        "conformal": cov,
        "conformal_alpha": getattr(inputs.predictor.trust, "conformal_alpha", None),
        "refer_reasons": {f"{name}/{'meta' if arr['has_meta'].any() else 'no_meta'}": _refer_table(arr)},
        "subgroups": subgroup_audit(
            inputs.frame, arr["probs"], inputs.truth, classes, arr.get("refer"), inputs.groups, cfg
        ),
    }
    if external is not None:
        ext = _external_rows(external, external_split, classes)
        ext_arr = _predict_rows(inputs.predictor, ext, cfg.batch_size, no_meta=True)
        truth = np.array([classes.index(c) for c in ext["diagnosis"]])
        ext_name = f"{ext['dataset'].iloc[0] if 'dataset' in ext.columns else external.name}/{external_split}"
        e2, c2 = _condition_tables(ext_name, ext_arr, truth, classes, None, cfg)
        block["calibration_conditions"].update(e2)
        block["conformal"].update(c2)
        cond = "meta" if ext_arr["has_meta"].any() else "no_meta"
        block["refer_reasons"][f"{ext_name}/{cond}"] = _refer_table(ext_arr)
        block["external_note"] = (
            "External labels mapped to the model's classes (ISIC 2017: melanoma -> mel, seborrheic "
            "keratosis -> bkl, nevus -> nv); rows with another or an unknown label are left out."
        )
    return block


def _external_rows(manifest: Path, split: str, classes: tuple[str, ...]):
    """Labelled rows of an external manifest split (diagnosis one of the model's classes)."""
    from dermlens.data.manifest import read_manifest

    df = read_manifest(manifest)
    rows = df[(df["split"] == split) & df["diagnosis"].isin(classes)]
    if rows.empty:
        raise EvaluationInputError(f"{manifest}: no labelled rows in split {split!r}")
    return rows.reset_index(drop=True)


def _provenance(inputs: _Inputs, manifest: Path | None, split: str, metadata: bool) -> dict:
    """What produced these figures: model version, data, metadata condition and the machine."""
    from dermlens.settings import machine

    card = getattr(inputs.predictor, "card", None)
    return {
        "model_version": getattr(card, "version", None),
        "manifest": str(manifest) if manifest else None,
        "split": split if manifest else None,
        "metadata": "given" if metadata else "withheld",
        "machine": machine(),
    }


def _add_cams(items: list, predictor) -> None:
    """Attach the predictor's CAM overlay of the predicted class to gallery items (best effort)."""
    from dermlens.preprocess import load_rgb

    for item in items:
        try:
            item.cam_png = predictor.predict_image(load_rgb(item.image_path), None, cam=True).cam_png
        except Exception as e:  # an explanation is optional: report it, keep the evaluation
            typer.echo(f"note: no explanation overlay for {item.image_id}: {e}", err=True)
            return


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
    import yaml

    from dermlens.bundle import BundleError
    from dermlens.evaluate import EvaluateConfig, evaluate_arrays, json_safe
    from dermlens.evaluate.isic_csv import PredictionFileError
    from dermlens.evaluate.report import ReportInputs, worst_misclassifications, write_outputs
    from dermlens.preprocess import ImageDecodeError

    expected: tuple[type[Exception], ...] = (
        PredictionFileError,
        EvaluationInputError,
        BundleError,
        ImageDecodeError,
        OSError,
        ValueError,
        yaml.YAMLError,
    )
    try:
        from dermlens.data.manifest import DataError

        expected = (*expected, DataError)
    except ImportError:  # data package not installed alongside
        pass
    try:
        cfg = EvaluateConfig.load(config, n_resamples=n_bootstrap, seed=seed)
        if manifest is not None:
            if predictions is not None or truth is not None:
                raise EvaluationInputError(
                    "give either --manifest (model mode) or --predictions/--truth, not both"
                )
            inputs = _from_model(manifest, split, model, cfg, metadata, exclude_train_of)
        elif predictions is not None and truth is not None:
            inputs = _from_csv(predictions, truth, groups, uncalibrated, image_dir, cfg)
        else:
            raise EvaluationInputError("give --predictions and --truth, or --manifest (see --help)")
        result = evaluate_arrays(
            inputs.probs,
            inputs.truth,
            inputs.classes,
            groups=inputs.groups,
            malignant_prob=inputs.malignant,
            probs_uncalibrated=inputs.uncalibrated,
            refer=inputs.refer,
            config=cfg,
        )
        if inputs.arrays is not None:
            result["trust"] = json_safe(_trust_block(inputs, split, external, external_split, cfg))
        elif external is not None:
            raise EvaluationInputError("--external needs model mode (--manifest)")
        gallery = (
            worst_misclassifications(
                inputs.probs,
                inputs.truth,
                inputs.classes,
                inputs.images,
                inputs.image_paths,
                cfg.gallery_size,
            )
            if inputs.image_paths is not None
            else []
        )
        if inputs.predictor is not None and hasattr(inputs.predictor, "predict_image"):
            _add_cams(gallery, inputs.predictor)
        report = ReportInputs(
            inputs.probs,
            inputs.truth,
            inputs.classes,
            probs_uncalibrated=inputs.uncalibrated,
            training_log=training_log,
            train_counts=inputs.train_counts,
            gallery=gallery,
            source=inputs.source,
        )
        result["provenance"] = _provenance(inputs, manifest, split, metadata)
        result["provenance"]["excluded_train_images_of"] = str(exclude_train_of) if exclude_train_of else None
        paths = write_outputs(out, result, report)
    except expected as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    _print_summary(result, [p for p in paths if p is not None])


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
    import json

    import pandas as pd

    from dermlens.evaluate import EvaluateConfig
    from dermlens.evaluate.external import isic2017_scores
    from dermlens.infer.predictor import Predictor

    try:
        rows = pd.read_csv(manifest)
    except OSError as e:
        raise typer.BadParameter(f"cannot read {manifest}: {e}") from e
    if split != "all":
        rows = rows[rows["split"] == split]
    if rows.empty:
        typer.secho(f"error: no rows in {manifest} for split {split!r}", fg="red", err=True)
        raise typer.Exit(2)
    predictor = Predictor.load(model)
    from dermlens.settings import machine

    probs = _predict_rows(predictor, rows, EvaluateConfig.load().batch_size, metadata)["probs"]
    scores = isic2017_scores(probs, predictor.classes, rows["diagnosis"].tolist(), n_bootstrap)
    scores.update(
        {
            "split": split,
            "model_version": predictor.card.version,
            "metadata": "given" if metadata else "withheld",
            "machine": machine(),
            "disclaimer": DISCLAIMER,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "external.json").write_text(json.dumps(scores, indent=2) + "\n")
    tc = scores["three_class"]
    typer.echo(
        f"ISIC 2017 [{split}] melanoma AUC {_fmt(scores['melanoma_auc'])}; "
        f"3-class balanced accuracy {_fmt(tc['balanced_accuracy'])}; "
        f"SK AUC {_fmt(tc['seborrheic_keratosis_auc'])}"
    )
    typer.echo(f"wrote {out / 'external.json'}\n{DISCLAIMER}")


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
