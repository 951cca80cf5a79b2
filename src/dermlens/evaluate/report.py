"""The evaluation report: one self-contained HTML file (inline CSS, base64 PNGs) plus metrics.json.

Long module: one page template; its sections share the table/figure helpers above render_html.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens import DISCLAIMER
from dermlens.evaluate import HEADLINE, ISIC_PER_CLASS, PER_CLASS
from dermlens.metrics import predicted_labels

METRICS_JSON = "metrics.json"
REPORT_HTML = "report.html"

LABELS = {
    "balanced_accuracy": "Balanced accuracy (mean per-class recall; ISIC 2018/2019 ranking metric)",
    "accuracy": "Accuracy",
    "macro_auc": "Macro AUC (one-vs-rest)",
    "macro_auc_sens_80": "Macro AUC above 80% sensitivity (ISIC partial AUC)",
    "macro_ap": "Macro average precision",
    "macro_f1": "Macro F1 (argmax decision)",
    "malignant_auc": "Benign vs malignant AUC",
    "malignant_ap": "Benign vs malignant average precision",
    "ece": "Expected calibration error (lower is better)",
    "brier": "Multiclass Brier score (lower is better)",
    "aurc": "AURC, area under risk-coverage (lower is better)",
    "ece_uncalibrated": "ECE before calibration",
    "brier_uncalibrated": "Brier score before calibration",
    "refer_rate": "Fraction referred by the refer rule",
    "balanced_accuracy_not_referred": "Balanced accuracy on images not referred",
}
COLUMN_LABELS = {
    "sensitivity": "Sens.",
    "specificity": "Spec.",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "auc": "AUC",
    "auc_sens_80": "AUC>80%sens",
    "ap": "AP",
    "accuracy": "Acc.",
    "dice": "Dice",
}


def metric_label(key: str) -> str:
    """Human-readable name of an overall metric key."""
    if key in LABELS:
        return LABELS[key]
    for prefix, who in (("mel_", "Melanoma"), ("malignant_", "Malignant")):
        if key.startswith(prefix + "sens_at_spec_"):
            return f"{who} sensitivity at {key.rsplit('_', 1)[1]}% specificity"
    return key.replace("_", " ")


@dataclass
class GalleryItem:
    """One misclassified image for the gallery; ``cam_png`` is an optional explanation overlay."""

    image_path: str | Path | None
    true: str
    predicted: str
    confidence: float
    cam_png: bytes | None = None
    image_id: str = ""


@dataclass
class ReportInputs:
    """Arrays and side information the report draws (metrics come from the result dict)."""

    probs: np.ndarray
    truth: np.ndarray
    classes: Sequence[str]
    probs_uncalibrated: np.ndarray | None = None
    training_log: str | Path | None = None
    train_counts: dict[str, int] | None = None
    gallery: list[GalleryItem] = field(default_factory=list)
    title: str = "dermlens evaluation report"
    source: str = ""


def worst_misclassifications(
    probs: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[str],
    image_ids: Sequence[str],
    image_paths: Sequence[str | Path | None] | None,
    k: int,
) -> list[GalleryItem]:
    """The k errors made with the highest confidence (those with an image path, if paths are given)."""
    pred = predicted_labels(probs)
    conf = probs.max(axis=1)
    wrong = np.flatnonzero(pred != truth)
    wrong = wrong[np.argsort(-conf[wrong], kind="mergesort")]
    items = []
    for i in wrong:
        path = None if image_paths is None else image_paths[i]
        if image_paths is not None and (path is None or not Path(str(path)).is_file()):
            continue
        predicted = "undecided" if pred[i] < 0 else classes[pred[i]]
        items.append(GalleryItem(path, classes[truth[i]], predicted, float(conf[i]), None, str(image_ids[i])))
        if len(items) >= k:
            break
    return items


def read_training_log(path: str | Path) -> pd.DataFrame | None:
    """A Lightning CSVLogger metrics.csv reduced to one row per epoch (last logged value per column)."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    num = df.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
    key = "epoch" if "epoch" in num.columns else "step" if "step" in num.columns else None
    if key is None or num.empty:
        return None
    num = num.dropna(subset=[key])
    per = num.drop(columns=[c for c in ("epoch", "step") if c != key and c in num.columns])
    per = per.groupby(key).last().sort_index()
    per.index.name = key
    return per if not per.empty else None


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci_cell(iv: dict, stacked: bool = False) -> str:
    if iv["value"] is None:
        return '<td class="na">n/a</td>'
    ci = f"[{_fmt(iv['ci_low'])}, {_fmt(iv['ci_high'])}]"
    sep = "<br>" if stacked else " "
    return f'<td>{_fmt(iv["value"])}{sep}<span class="ci">{ci}</span></td>'


def _overall_table(result: dict) -> str:
    rows = []
    for key, iv in result["overall"].items():
        rows.append(f"<tr><th>{html.escape(metric_label(key))}</th>{_ci_cell(iv)}</tr>")
    head = f"<tr><th>Metric</th><th>Value [{result['bootstrap']['ci_level']:.0%} CI]</th></tr>"
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def _class_table(per_class: dict, names: Sequence[str], counts: dict | None = None) -> str:
    head = "".join(f"<th>{COLUMN_LABELS.get(m, m)}</th>" for m in names)
    n_head = "<th>n</th>" if counts else ""
    rows = []
    for code, ms in per_class.items():
        n = f"<td>{counts[code]}</td>" if counts else ""
        rows.append(
            f"<tr><th>{html.escape(code)}</th>{n}{''.join(_ci_cell(ms[m], True) for m in names)}</tr>"
        )
    return f'<table class="classes"><tr><th>Class</th>{n_head}{head}</tr>{"".join(rows)}</table>'


def _headline_cards(result: dict) -> str:
    level = f"{result['bootstrap']['ci_level']:.0%}"
    cards = []
    for key in HEADLINE[:5]:
        iv = result["overall"].get(key)
        if iv is None:
            continue
        ci = f"{_fmt(iv['ci_low'])}&ndash;{_fmt(iv['ci_high'])}"
        cards.append(
            f'<div class="card"><div class="v">{_fmt(iv["value"])}</div>'
            f'<div class="ci">{level} CI {ci}</div>'
            f'<div class="k">{html.escape(metric_label(key))}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _gallery(items: Sequence[GalleryItem]) -> str:
    from dermlens.evaluate.plots import thumbnail_png
    from dermlens.preprocess import ImageDecodeError, load_rgb

    cards = []
    for it in items:
        pics = []
        if it.image_path is not None:
            try:
                pics.append(_img(thumbnail_png(load_rgb(it.image_path)), f"image {it.image_id}"))
            except ImageDecodeError as e:
                pics.append(f'<div class="na">{html.escape(str(e))}</div>')
        if it.cam_png:
            pics.append(_img(it.cam_png, f"explanation overlay {it.image_id}"))
        caption = (
            f"<b>{html.escape(it.image_id)}</b><br>true <b>{html.escape(it.true)}</b>, predicted "
            f"<b>{html.escape(it.predicted)}</b> ({it.confidence:.1%})"
            + ("" if it.cam_png else '<br><span class="ci">no explanation overlay</span>')
        )
        cards.append(f'<figure class="g">{"".join(pics)}<figcaption>{caption}</figcaption></figure>')
    return f'<div class="gallery">{"".join(cards)}</div>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1240px;margin:0 auto;padding:16px 28px 48px}
h1{font-size:1.7em;margin:.4em 0 .1em} h2{border-bottom:2px solid #d6dbe1;padding-bottom:4px;margin-top:1.8em}
.meta{color:#5b6570;font-size:.92em}
.disclaimer{background:#fff4e5;border:2px solid #e8590c;border-radius:6px;padding:12px 16px;font-weight:600;
 color:#7a2e00;margin:14px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #d6dbe1;border-radius:6px;padding:10px 14px;flex:1 1 180px;min-width:0}
.card .v{font-size:1.7em;font-weight:700}.card .k{font-size:.85em;color:#4a545e}
table{border-collapse:collapse;background:#fff;margin:8px 0;font-size:.9em}
th,td{border:1px solid #d6dbe1;padding:4px 8px;text-align:left;white-space:nowrap}
table.metrics th{white-space:normal;max-width:520px;font-weight:500}
tr:nth-child(even) td{background:#fafbfc}
.ci{color:#6b7580;font-size:.85em}.na{color:#98a1aa}
.scroll{overflow-x:auto;max-width:100%}
img{max-width:100%;height:auto}
.fig{background:#fff;border:1px solid #d6dbe1;border-radius:6px;padding:8px;display:inline-block;
 max-width:100%;box-sizing:border-box}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:12px}
figure.g{margin:0;background:#fff;border:1px solid #d6dbe1;border-radius:6px;padding:8px}
figure.g img{width:100%;margin-bottom:4px}figcaption{font-size:.85em}
.ci{color:#5b6570;font-size:.85em}.flag{color:#b3261e}
.note{color:#4a545e;font-size:.9em;max-width:980px}
footer{margin-top:40px;font-size:.85em;color:#5b6570}
"""


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


NOTES = {
    "per-class": "Sensitivity, specificity, PPV, NPV and F1 use the argmax decision (the confusion matrix "
    "below); AUC, AUC above 80% sensitivity and AP rank each class probability one-vs-rest. "
    "n/a: undefined (no true or no predicted images of the class).",
    "calibrated": "Before: the model's raw softmax; after: the calibrated probabilities that every other "
    "section uses.",
    "single": "No uncalibrated probabilities were given, so only the evaluated probabilities are shown.",
    "bars": "Blue bars: accuracy in each equal-width confidence bin; red line: the bin's mean confidence; "
    "hatched: the gap between them; dots: images per bin.",
    "risk": "Images are accepted in order of decreasing top-class confidence; risk is the error rate of "
    "the accepted images. A lower AURC means confidence separates errors from correct predictions better.",
    "no-counts": "Training counts per class were not given (pass a manifest with a train split).",
    "no-log": "No training log was given, or it had no plottable columns (expects a Lightning CSVLogger "
    "metrics.csv).",
    "gallery": "The most confident errors, with the explanation overlay (class activation map of the "
    "predicted class) when one is available.",
    "no-gallery": "No gallery: no misclassified image with a readable image path was given.",
    "isic": "As the ISIC scorer defines them: a class counts as predicted when its own probability is "
    "above 0.5 (not argmax), and an undefined ratio scores 1.0.",
    "conditions": "The model is used with patient metadata (age, sex, site) and without it; each condition "
    "has its own calibration parameters, chosen on validation. 'no_meta': the same images predicted with "
    "every metadata field missing, as for an upload without age/sex/site. External rows: another clinic's "
    "images (labels mapped to the model's classes). Intervals: lesion-level bootstrap.",
    "refer-reasons": "Share of images flagged by each refer reason (an image can have several); "
    "'referred' is any of them.",
    "conformal": "A prediction set contains every diagnosis whose calibrated probability is high enough "
    "for its class-specific (Mondrian) split-conformal threshold, fitted on the validation split, plus "
    "the top class. Coverage: share of images whose true class is in the set; it should be at least the "
    "target for every class on exchangeable data, which external data need not be.",
    "methods": "ECE: sum over bins of |accuracy - mean confidence| weighted by the bin's share of images. "
    "Brier: mean over images of the squared distance between the probability vector and the one-hot "
    "truth (0..2). Sensitivity at a specificity: best sensitivity of any threshold meeting that "
    "specificity. Benign vs malignant: malignant = mel, bcc, akiec, scc; its score is the coarse "
    "malignant probability if the model has one, else the sum of the malignant classes' probabilities. "
    "AURC: mean over coverages k/N of the error rate of the k most confident images.",
}


def _fig(png: bytes, alt: str) -> str:
    return f'<div class="fig">{_img(png, alt)}</div>'


def _summary(result: dict) -> str:
    boot = result["bootstrap"]
    note = (
        f"Intervals: {boot['ci_level']:.0%} percentile intervals from {boot['n_resamples']} "
        f"{html.escape(boot['unit'])}-level bootstrap resamples (seed {boot['seed']}); "
        f"{result['n_images']} images of {result['n_lesions']} lesions. Resampling lesions, not images, "
        "keeps the images of one lesion together."
    )
    return _headline_cards(result) + _overall_table(result) + _note(note)


def _calibration(result: dict, value) -> str:
    from dermlens.evaluate import plots

    uncal = result["reliability"].get("uncalibrated")
    png = plots.reliability_png(
        result["reliability"]["calibrated"], uncal, value("ece"), value("ece_uncalibrated")
    )
    lead = NOTES["calibrated"] if uncal else NOTES["single"]
    scores = f" ECE {_fmt(value('ece'))}, Brier {_fmt(value('brier'))}."
    return _fig(png, "reliability diagram") + _note(f"{lead} {NOTES['bars']}{scores}")


def _imbalance(result: dict, inputs: ReportInputs) -> str:
    from dermlens.evaluate import plots

    if not inputs.train_counts:
        return _note(NOTES["no-counts"])
    classes = list(inputs.classes)
    f1 = [result["per_class"][c]["f1"]["value"] for c in classes]
    counts = ", ".join(f"{html.escape(c)}: {inputs.train_counts.get(c, 0)}" for c in classes)
    png = plots.imbalance_png(classes, f1, inputs.train_counts)
    return _fig(png, "F1 against training count") + _note(f"Training images per class: {counts}.")


def _training(inputs: ReportInputs) -> str:
    from dermlens.evaluate import plots

    log = read_training_log(inputs.training_log) if inputs.training_log else None
    png = plots.training_png(log) if log is not None else None
    return _fig(png, "training curves") if png else _note(NOTES["no-log"])


def _ci_text(iv: dict | None) -> str:
    if not iv or iv.get("value") is None:
        return "n/a"
    return (
        f'{_fmt(iv["value"])} <span class="ci">[{_fmt(iv.get("ci_low"))}, {_fmt(iv.get("ci_high"))}]</span>'
    )


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _conditions_html(trust: dict) -> str:
    rows = [
        [html.escape(name), str(t["n_images"]), _ci_text(t.get("ece")), _ci_text(t.get("accuracy"))]
        for name, t in trust.get("calibration_conditions", {}).items()
    ]
    refer = trust.get("refer_reasons", {})
    ref_rows = [
        [html.escape(name)]
        + [_fmt(r.get(k)) for k in ("ood", "not_dermoscopy", "low_confidence", "set_too_large", "refer")]
        for name, r in refer.items()
    ]
    return (
        _table(["condition", "images", "ECE (95% CI)", "accuracy"], rows)
        + _note(NOTES["conditions"])
        + (
            _table(["set", "OOD", "not dermoscopy", "low confidence", "set too large", "referred"], ref_rows)
            + _note(NOTES["refer-reasons"])
            if ref_rows
            else ""
        )
    )


def _conformal_html(trust: dict) -> str:
    alpha = trust.get("conformal_alpha")
    parts = []
    for name, t in trust.get("conformal", {}).items():
        rows = [["all", str(t["n_images"]), _ci_text(t["coverage"]), _ci_text(t["mean_set_size"])]]
        rows += [
            [html.escape(c), str(v["n"]), _ci_text(v["coverage"]), _ci_text(v["mean_set_size"])]
            for c, v in t["per_class"].items()
        ]
        parts.append(
            f"<h3>{html.escape(name)}</h3>"
            + _table(["true class", "images", "coverage", "mean set size"], rows)
        )
    target = f"Target coverage {1 - alpha:.0%} per class. " if alpha is not None else ""
    return "".join(parts) + _note(target + NOTES["conformal"])


def _subgroups_html(sub: dict) -> str:
    names = {
        "balanced_accuracy": "BA",
        "mel_sensitivity": f"mel sens @ {sub['specificity']:.0%} spec",
        "ece": "ECE",
        "refer_rate": "refer rate",
    }
    rows = []
    for r in sub["rows"]:
        cells = [
            html.escape(r["attribute"]),
            html.escape(str(r["group"])),
            str(r["n_images"]),
            str(r["n_lesions"]),
            str(r["n_melanoma"]),
        ]
        for k in names:
            m = r["metrics"].get(k)
            cell = _ci_text(m) if m else "n/a"
            if m and m.get("flag"):
                p_holm = f'<span class="ci">p<sub>Holm</sub>={m["p_holm"]:.3g}</span>'
                cell = f'<b class="flag">{cell} &#9873;</b> {p_holm}'
            cells.append(cell)
        rows.append(cells)
    flagged = ", ".join(html.escape(f) for f in sub["flagged"]) or "none"
    note = (
        f"Flagged (differs from the rest of the images at family-wise error {sub['alpha']:.0%}): {flagged}. "
        f"Test: {html.escape(sub['test'])}; {sub['n_tests']} tests; groups under {sub['min_images']} images "
        "are listed but not tested"
        + (
            f", nor is melanoma sensitivity where the group or the rest has under {sub['min_melanomas']} "
            "melanomas"
            if sub.get("min_melanomas")
            else ""
        )
        + ". Melanoma sensitivity is read at the threshold giving the stated specificity within the group."
    )
    head = ["attribute", "group", "images", "lesions", "melanomas", *names.values()]
    return _table(head, rows) + _note(note)


def _refer_curves_html(trust: dict) -> str:
    from dermlens.evaluate import plots

    curves = trust["refer_curves"]
    rows = [
        [
            html.escape(name),
            _fmt(c["operating_point"]["min_confidence"]),
            _fmt(c["operating_point"]["coverage"]),
            _fmt(c["operating_point"]["risk"]),
        ]
        for name, c in curves.items()
    ]
    return (
        _fig(plots.refer_curves_png(curves), "refer rule risk-coverage per set")
        + _table(["set", "min_confidence", "coverage (accepted)", "risk (1 - BA of accepted)"], rows)
        + _note(
            "Images referred by the other flags (out of distribution, not dermoscopy, prediction set too "
            "large) stay referred along each curve; the confidence threshold sweeps. The dot is the bundle's "
            "operating point (`refer.accept_rate` fitted on validation, or --refer-rate)."
        )
    )


def _trust_sections(result: dict) -> list[tuple[str, str, str]]:
    """Report sections for the trust block (model-driven evaluation only)."""
    trust = result.get("trust")
    if not trust:
        return []
    out = [("calibration-conditions", "Calibration per condition of use", _conditions_html(trust))]
    if trust.get("conformal"):
        out.append(("conformal", "Conformal prediction sets: coverage and size", _conformal_html(trust)))
    if trust.get("refer_curves"):
        out.append(("refer-curves", "Refer rule: risk-coverage per set", _refer_curves_html(trust)))
    if trust.get("subgroups"):
        out.append(
            ("subgroups", "Subgroup audit (sex, age band, body site)", _subgroups_html(trust["subgroups"]))
        )
    return out


def render_html(result: dict, inputs: ReportInputs) -> str:
    """The report as one HTML string with every figure embedded."""
    from dermlens.evaluate import plots

    probs, truth, classes = np.asarray(inputs.probs), np.asarray(inputs.truth), list(inputs.classes)

    def value(key: str) -> float | None:
        return result["overall"].get(key, {}).get("value")

    cm = np.asarray(result["confusion_matrix"]["counts"])
    undecided = result["n_undecided"]
    per_class = _class_table(result["per_class"], PER_CLASS, result["class_counts"])
    gallery = _gallery(inputs.gallery) if inputs.gallery else _note(NOTES["no-gallery"])
    methods = f"Decision rule: {result['settings']['decision_rule']}. {result['settings']['ece_binning']}. "
    sections = [
        ("summary", "Summary", _summary(result)),
        (
            "per-class",
            "Per-class metrics",
            f'<div class="scroll">{per_class}</div>' + _note(NOTES["per-class"]),
        ),
        (
            "confusion",
            "Confusion matrix",
            _fig(plots.confusion_png(cm, classes), "confusion matrix")
            + (_note(f"{undecided} image(s) had a tied top probability (undecided).") if undecided else ""),
        ),
        (
            "roc-pr",
            "ROC and precision-recall curves",
            _fig(plots.roc_pr_png(probs, truth, classes), "ROC, PR"),
        ),
        ("calibration", "Calibration (reliability diagrams)", _calibration(result, value)),
        (
            "risk-coverage",
            "Selective prediction (risk-coverage)",
            _fig(plots.risk_coverage_png(probs, truth, value("aurc")), "risk-coverage")
            + _note(NOTES["risk"]),
        ),
        ("imbalance", "Class imbalance", _imbalance(result, inputs)),
        ("training", "Training curves", _training(inputs)),
        ("gallery", "Worst misclassifications", _note(NOTES["gallery"]) + gallery),
        (
            "isic",
            "ISIC challenge per-category metrics",
            f'<div class="scroll">{_class_table(result["isic_per_class"], ISIC_PER_CLASS)}</div>'
            + _note(NOTES["isic"]),
        ),
        *_trust_sections(result),
        ("methods", "Definitions", _note(html.escape(methods + NOTES["methods"]))),
    ]
    body = "".join(_section(*s) for s in sections)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = [f"dermlens {result['dermlens_version']}", now, inputs.source, "classes: " + ", ".join(classes)]
    meta_html = " &middot; ".join(html.escape(m) for m in meta if m)
    title = html.escape(inputs.title)
    disclaimer = html.escape(DISCLAIMER)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{title}</h1>"
        f'<div class="meta">{meta_html}</div>'
        f'<div class="disclaimer" id="disclaimer" role="alert">{disclaimer}</div>'
        f"{body}<footer>{disclaimer}</footer></main></body></html>"
    )


def write_outputs(out_dir: str | Path, result: dict, inputs: ReportInputs | None) -> tuple[Path, Path | None]:
    """Write metrics.json and (if ``inputs`` is given) report.html into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS_JSON
    metrics_path.write_text(json.dumps(result, indent=2, allow_nan=False))
    if inputs is None:
        return metrics_path, None
    report_path = out / REPORT_HTML
    report_path.write_text(render_html(result, inputs), encoding="utf-8")
    return metrics_path, report_path
