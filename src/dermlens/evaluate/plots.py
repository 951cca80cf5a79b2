"""Report figures rendered to PNG bytes with matplotlib's Agg canvas (Figure objects, no pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from dermlens.metrics import risk_coverage

DPI = 100


def to_png(fig: Figure) -> bytes:
    """Serialize a figure as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def confusion_png(counts: np.ndarray, classes: Sequence[str]) -> bytes:
    """Confusion matrix: colour = row-normalized recall, text = count and row percentage."""
    counts = np.asarray(counts, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    fig = Figure(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            color = "white" if frac[i, j] > 0.6 else "black"
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color=color,
            )
    ax.set_xticks(range(n), classes)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted (argmax)")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return to_png(fig)


def roc_pr_png(probs: np.ndarray, truth: np.ndarray, classes: Sequence[str]) -> bytes:
    """One-vs-rest ROC (left) and precision-recall (right) curves, one line per class."""
    fig = Figure(figsize=(12, 5.2))
    ax_roc, ax_pr = fig.subplots(1, 2)
    for k, (code, color) in enumerate(zip(classes, _colors(len(classes)), strict=True)):
        y = truth == k
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, k])
        ax_roc.plot(fpr, tpr, color=color, lw=1.4, label=f"{code} (AUC {np.trapezoid(tpr, fpr):.3f})")
        prec, rec, _ = precision_recall_curve(y, probs[:, k])
        ap = -np.sum(np.diff(rec) * prec[:-1])
        ax_pr.plot(rec, prec, color=color, lw=1.4, label=f"{code} (AP {ap:.3f}, prev. {y.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax_roc.axhline(0.8, ls=":", color="grey", lw=0.8)
    ax_roc.set(
        xlabel="1 - specificity (FPR)",
        ylabel="sensitivity (TPR)",
        title="ROC, one-vs-rest",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax_pr.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title="Precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    for ax in (ax_roc, ax_pr):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
        ax.grid(alpha=0.3)
    return to_png(fig)


def _reliability_axes(ax, bins: dict, title: str, ece: float | None) -> None:
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
    width = upper - lower
    ax.bar(
        lower,
        np.nan_to_num(acc),
        width=width,
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="accuracy",
    )
    gap_lo = np.minimum(acc, conf)
    ax.bar(
        lower,
        np.nan_to_num(np.abs(conf - acc)),
        bottom=np.nan_to_num(gap_lo),
        width=width,
        align="edge",
        facecolor="none",
        hatch="///",
        edgecolor="#c44e52",
        lw=0.8,
        label="gap to mean confidence",
    )
    ax.hlines(conf, lower, upper, color="#c44e52", lw=2, label="mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    label = title if ece is None else f"{title} (ECE {ece:.3f})"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-class confidence", ylabel="accuracy", title=label)
    twin = ax.twinx()
    twin.plot((lower + upper) / 2, bins["count"], "k.", ms=4, label="images per bin")
    twin.set_yscale("symlog")
    twin.set_ylabel("images per bin (dots)", fontsize=8)
    ax.legend(fontsize=8, loc="upper left")


def reliability_png(
    calibrated: dict,
    uncalibrated: dict | None = None,
    ece: float | None = None,
    ece_uncal: float | None = None,
) -> bytes:
    """Reliability diagram(s): before calibration (left, if given) and after (right)."""
    panels = [(uncalibrated, "before calibration", ece_uncal)] if uncalibrated else []
    panels.append((calibrated, "after calibration" if uncalibrated else "model output", ece))
    fig = Figure(figsize=(6 * len(panels), 5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (bins, title, e) in zip(axes, panels, strict=True):
        _reliability_axes(ax, bins, title, e)
    fig.tight_layout()
    return to_png(fig)


def risk_coverage_png(probs: np.ndarray, truth: np.ndarray, aurc: float | None) -> bytes:
    """Selective-prediction risk (error rate of accepted images) against coverage."""
    coverage, risk = risk_coverage(probs, truth)
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(coverage, risk, color="#4c72b0", lw=1.6, label="model (sorted by confidence)")
    ax.axhline(risk[-1], ls=":", color="grey", lw=1, label=f"full-coverage error {risk[-1]:.3f}")
    ax.fill_between(coverage, risk, alpha=0.15, color="#4c72b0")
    title = "Risk-coverage" + ("" if aurc is None else f" (AURC {aurc:.4f})")
    ax.set(
        xlabel="coverage (fraction of images accepted)",
        ylabel="risk (error rate of accepted)",
        title=title,
        xlim=(0, 1),
        ylim=(0, max(0.05, float(risk.max()) * 1.05)),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


def refer_curves_png(curves: dict[str, dict]) -> bytes:
    """Risk (1 - balanced accuracy of accepted) against coverage of the refer rule, one line per set, the
    operating point marked on each."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for (name, c), color in zip(curves.items(), _colors(len(curves)), strict=True):
        ax.plot(c["coverage"], c["risk"], color=color, lw=1.6, label=name)
        op = c["operating_point"]
        if op.get("risk") is not None:
            ax.plot([op["coverage"]], [op["risk"]], "o", color=color, ms=7, mec="black")
    ax.plot([], [], "o", color="white", mec="black", label="operating point (min_confidence)")
    ax.set(
        xlabel="coverage (share of images accepted by the refer rule)",
        ylabel="risk (1 - balanced accuracy of accepted)",
        title="Refer rule: risk-coverage per set",
        xlim=(0, 1),
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


def imbalance_png(classes: Sequence[str], f1: Sequence[float | None], train_counts: dict[str, int]) -> bytes:
    """Per-class F1 against the number of training images (log x)."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for code, value, color in zip(classes, f1, _colors(len(classes)), strict=True):
        n = train_counts.get(code, 0)
        if value is None or n <= 0:
            continue
        ax.scatter([n], [value], s=60, color=color)
        ax.annotate(code, (n, value), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    shown = [train_counts.get(c, 0) for c in classes if train_counts.get(c, 0) > 0]
    if shown:
        ax.set_xlim(min(shown) / 1.6, max(shown) * 2.2)
    ax.set(
        xlabel="training images of the class (log scale)",
        ylabel="test F1 (argmax decision)",
        title="Class imbalance: F1 vs training count",
        ylim=(0, 1.05),
    )
    ax.grid(alpha=0.3, which="both")
    return to_png(fig)


def training_png(log: pd.DataFrame) -> bytes | None:
    """Loss curves (left) and other logged metrics (right) per epoch; None if nothing to plot."""
    x = log.index.to_numpy()
    loss_cols = [c for c in log.columns if "loss" in c.lower()]
    other = [c for c in log.columns if c not in loss_cols and not c.lower().startswith(("lr", "step"))]
    panels = [(cols, ylabel) for cols, ylabel in ((loss_cols, "loss"), (other, "metric")) if cols]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (cols, ylabel) in zip(axes, panels, strict=True):
        for c in cols:
            y = log[c].to_numpy(dtype=float)
            ok = ~np.isnan(y)
            ax.plot(x[ok], y[ok], marker="o", ms=3, lw=1.4, label=c)
        ax.set(xlabel=log.index.name or "epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def thumbnail_png(rgb: np.ndarray, max_side: int = 256) -> bytes:
    """An HxWx3 uint8 image shrunk to at most ``max_side`` pixels, as PNG."""
    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
