"""The monitoring report: one self-contained HTML page (summary table + matplotlib plots as data URIs).

Plots over time cover every record of the model version (the tested window shaded) in bins of equal
record counts; distribution plots compare the window with the reference.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens import DISCLAIMER
from dermlens.extras import require
from dermlens.monitor.drift import DriftSummary
from dermlens.monitor.reference import Reference, monitor_config


def _png(fig) -> str:
    plt = require("matplotlib.pyplot", "monitor")

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bins(history: pd.DataFrame, n_bins: int) -> list[pd.DataFrame]:
    n = max(1, min(n_bins, len(history)))
    return [history.iloc[idx] for idx in np.array_split(np.arange(len(history)), n) if len(idx)]


def over_time(history: pd.DataFrame, window: pd.DataFrame, ref: Reference, n_bins: int) -> str:
    """Refer rate, median confidence, median OOD score and class shares per bin of records, over time."""
    matplotlib = require("matplotlib", "monitor")

    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "monitor")

    parts = _bins(history, n_bins)
    t = [p["created_at"].iloc[len(p) // 2] for p in parts]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = [
        ("refer rate", [p["refer"].mean() for p in parts], float(np.mean(ref.refer))),
        ("median confidence", [p["confidence"].median() for p in parts], float(np.median(ref.confidence))),
        ("median OOD score", [p["ood_score"].median() for p in parts], float(np.median(ref.ood_score))),
    ]
    for ax, (label, values, ref_value) in zip(axes[:3], series, strict=True):
        ax.plot(t, values, marker="o")
        ax.axhline(ref_value, ls="--", color="grey", label="reference (validation)")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
    shares = np.array([[np.mean(p["top_class"] == c) for c in ref.classes] for p in parts])
    for k, c in enumerate(ref.classes):
        line = axes[3].plot(t, shares[:, k], marker=".", label=c)[0]
        axes[3].axhline(ref.class_shares()[k], ls=":", color=line.get_color())
    axes[3].set_ylabel("predicted class share")
    axes[3].legend(loc="upper left", fontsize=7, ncol=len(ref.classes))
    if len(window):
        for ax in axes:
            ax.axvspan(window["created_at"].min(), window["created_at"].max(), color="orange", alpha=0.15)
    axes[0].set_title("Served predictions over time (shaded: the tested window; dashed/dotted: reference)")
    fig.autofmt_xdate()
    return _png(fig)


def distributions(window: pd.DataFrame, ref: Reference) -> str:
    """Class mix, confidence and OOD score: window vs reference."""
    matplotlib = require("matplotlib", "monitor")

    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "monitor")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(len(ref.classes))
    win_shares = [np.mean(window["top_class"] == c) for c in ref.classes]
    axes[0].bar(x - 0.2, ref.class_shares(), 0.4, label="reference")
    axes[0].bar(x + 0.2, win_shares, 0.4, label="window")
    axes[0].set_xticks(x, ref.classes)
    axes[0].set_title("predicted class mix")
    axes[0].legend(fontsize=8)
    for ax, col, values in (
        (axes[1], "confidence", np.asarray(ref.confidence)),
        (axes[2], "ood_score", np.asarray(ref.ood_score)),
    ):
        w = window[col].dropna().to_numpy(float)
        edges = np.histogram_bin_edges(np.concatenate([values, w]), bins=30)
        ax.hist(values, edges, density=True, alpha=0.5, label="reference")
        ax.hist(w, edges, density=True, alpha=0.5, label="window")
        ax.set_title(col.replace("_", " "))
        ax.legend(fontsize=8)
    return _png(fig)


def _table(summary: DriftSummary) -> str:
    head = [
        "signal",
        "test",
        "statistic",
        "p-value",
        "effect",
        "min. effect",
        "window",
        "reference",
        "status",
    ]
    rows = []
    for r in summary.results:
        status = '<b class="alert">ALERT</b>' if r.alert else '<span class="ok">ok</span>'
        cells = [
            r.signal,
            r.test,
            f"{r.statistic:.4g}",
            f"{r.p_value:.3g}",
            f"{r.effect_name} {r.effect:.3f}",
            f"{r.min_effect:g}",
            html.escape(r.window),
            html.escape(r.reference),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{status}</td></tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


FIELD_LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "mel_sensitivity": "melanoma sensitivity",
    "mel_specificity": "melanoma specificity",
    "ece": "calibration error (ECE)",
    "refer_rate": "refer rate",
}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def field_section(field: dict | None) -> str:
    """Field performance on confirmed cases (the dict of evaluate.field.field_performance) as HTML."""
    if field is None:
        return ""
    level = round(100 * field.get("ci_level", 0.95))
    rows = "".join(
        f"<tr><td>{FIELD_LABELS.get(k, k)}</td><td>{_fmt(m['value'])}</td>"
        f"<td>{_fmt(m['low'])} to {_fmt(m['high'])}</td></tr>"
        for k, m in field["metrics"].items()
    )
    table = f"<table><tr><th>metric</th><th>value</th><th>{level}% CI</th></tr>{rows}</table>" if rows else ""
    methods = ", ".join(f"{k} {v}" for k, v in field["methods"].items()) or "none"
    return (
        f"<h2>Field performance on confirmed cases</h2><p>{field['n_confirmed']} confirmed case(s) "
        f"({html.escape(methods)}), {field['n_scored']} of the model's classes; "
        f"{html.escape(str(field['status']))}. Intervals: bootstrap over image hashes (lesion proxy).</p>"
        f"{table}<p><b>{html.escape(field['note'])}</b></p>"
    )


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.alert{color:#b00}.ok{color:#070}
.disclaimer{background:#fff3cd;padding:.6em;border:1px solid #e0c060}img{max-width:100%}"""


def render_html(
    summary: DriftSummary,
    window: pd.DataFrame,
    history: pd.DataFrame,
    ref: Reference,
    field: dict | None = None,
) -> str:
    """The whole report page (with field performance on confirmed cases when given)."""
    verdict = (
        f'<p class="alert"><b>ALERT</b>: drift in {", ".join(summary.alerts)}</p>'
        if summary.alert
        else '<p class="ok">No alert.</p>'
    )
    note = f"<p><b>Note:</b> {html.escape(summary.note)}</p>" if summary.note else ""
    plots = ""
    if len(history):
        bins = int(monitor_config()["report"]["time_bins"])
        plots += (
            f'<h2>Over time</h2><img alt="signals over time" src="{over_time(history, window, ref, bins)}">'
        )
    if len(window):
        plots += f'<h2>Window vs reference</h2><img alt="distributions" src="{distributions(window, ref)}">'
    split = html.escape(str(ref.source.get("split", "validation")))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>dermlens monitor</title>
<style>{_STYLE}</style></head><body><h1>dermlens drift monitor</h1>
<p class="disclaimer">{html.escape(DISCLAIMER)}</p>
<p>Model {html.escape(summary.model_name)} {html.escape(summary.model_version)}. Window: {summary.n_window}
record(s), {html.escape(str(summary.window_start))} to {html.escape(str(summary.window_end))}. Reference:
{summary.n_reference} {split} images ({html.escape(ref.precision)}).
Alert rule: p &lt; {summary.alpha:g} and effect &ge; its minimum (configs/monitor.yaml).</p>
{verdict}{note}{_table(summary) if summary.results else ""}{field_section(field)}{plots}</body></html>"""


def write_report(
    path: Path,
    summary: DriftSummary,
    window: pd.DataFrame,
    history: pd.DataFrame,
    ref: Reference,
    field: dict | None = None,
) -> Path:
    """Write the HTML report to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(summary, window, history, ref, field), encoding="utf-8")
    return path
