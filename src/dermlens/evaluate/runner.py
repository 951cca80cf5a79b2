"""One evaluation end to end: CSV or model inputs, metrics with CIs, metrics.json and report.html."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dermlens.evaluate import EvaluateConfig, evaluate_arrays, json_safe
from dermlens.evaluate.conditions import trust_block
from dermlens.evaluate.report import ReportInputs, worst_misclassifications, write_outputs
from dermlens.evaluate.sources import EvalInputs, EvaluationInputError, from_csv, from_model, note


@dataclass
class EvaluateRequest:
    """What to evaluate (CSVs, or a model on a manifest split), where to write it, and the options."""

    out: Path
    predictions: Path | None = None
    truth: Path | None = None
    groups: Path | None = None
    uncalibrated: Path | None = None
    image_dir: Path | None = None
    manifest: Path | None = None
    split: str = "test"
    model: Path | None = None
    training_log: Path | None = None
    config: Path | None = None
    n_bootstrap: int | None = None
    seed: int | None = None
    external: Path | None = None
    external_split: str = "test"
    metadata: bool = True
    exclude_train_of: Path | None = None


def load_inputs(req: EvaluateRequest, cfg: EvaluateConfig) -> EvalInputs:
    """Model mode (--manifest) or CSV mode (--predictions + --truth); never both."""
    if req.manifest is not None:
        if req.predictions is not None or req.truth is not None:
            raise EvaluationInputError(
                "give either --manifest (model mode) or --predictions/--truth, not both"
            )
        return from_model(req.manifest, req.split, req.model, cfg, req.metadata, req.exclude_train_of)
    if req.predictions is not None and req.truth is not None:
        return from_csv(req.predictions, req.truth, req.groups, req.uncalibrated, req.image_dir, cfg)
    raise EvaluationInputError("give --predictions and --truth, or --manifest (see --help)")


def provenance(inputs: EvalInputs, req: EvaluateRequest) -> dict:
    """What produced these figures: model version, data, metadata condition and the machine."""
    from dermlens.settings import machine

    card = getattr(inputs.predictor, "card", None)
    return {
        "model_version": getattr(card, "version", None),
        "manifest": str(req.manifest) if req.manifest else None,
        "split": req.split if req.manifest else None,
        "metadata": "given" if req.metadata else "withheld",
        "machine": machine(),
        "excluded_train_images_of": str(req.exclude_train_of) if req.exclude_train_of else None,
    }


def add_cams(items: list, predictor) -> None:
    """Attach the predictor's CAM overlay of the predicted class to gallery items (best effort)."""
    from dermlens.preprocess import load_rgb

    for item in items:
        try:
            item.cam_png = predictor.predict_image(load_rgb(item.image_path), None, cam=True).cam_png
        except Exception as e:  # an explanation is optional: report it, keep the evaluation
            note(f"note: no explanation overlay for {item.image_id}: {e}")
            return


def _report_inputs(inputs: EvalInputs, req: EvaluateRequest, cfg: EvaluateConfig) -> ReportInputs:
    """The report's extra inputs: uncalibrated probabilities, training log, train counts, the gallery."""
    gallery = (
        worst_misclassifications(
            inputs.probs, inputs.truth, inputs.classes, inputs.images, inputs.image_paths, cfg.gallery_size
        )
        if inputs.image_paths is not None
        else []
    )
    if inputs.predictor is not None and hasattr(inputs.predictor, "predict_image"):
        add_cams(gallery, inputs.predictor)
    return ReportInputs(
        inputs.probs,
        inputs.truth,
        inputs.classes,
        probs_uncalibrated=inputs.uncalibrated,
        training_log=req.training_log,
        train_counts=inputs.train_counts,
        gallery=gallery,
        source=inputs.source,
    )


def run_evaluation(req: EvaluateRequest) -> tuple[dict, list[Path]]:
    """Evaluate, write OUT/metrics.json and OUT/report.html; the result and the paths written."""
    cfg = EvaluateConfig.load(req.config, n_resamples=req.n_bootstrap, seed=req.seed)
    inputs = load_inputs(req, cfg)
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
        result["trust"] = json_safe(trust_block(inputs, req.split, req.external, req.external_split, cfg))
    elif req.external is not None:
        raise EvaluationInputError("--external needs model mode (--manifest)")
    report = _report_inputs(inputs, req, cfg)
    result["provenance"] = provenance(inputs, req)
    paths = write_outputs(req.out, result, report)
    return result, [p for p in paths if p is not None]
