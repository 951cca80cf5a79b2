"""Balanced accuracy of one or two bundles on every dermoscopy source's val or test split, without metadata,
with lesion-bootstrap CIs and (two bundles) the paired difference: the figures that choose a release.

    dermlens release compare --model NEW --versus OLD --role val --out docs/results/sources_val.json

Each image goes through each bundle's own preprocessing and ONNX graph at its served precision, from its file
(BCN's 84 px thumbnails are upsampled like any small upload), as in `dermlens trust measure-sources`.
Figures per source (argmax among the listed classes; a class a model lacks has probability 0):
- ham10000: `ba` over the model's own classes (an eight-class model may call a HAM10000 image scc: an error)
  and `ba_7` over the seven HAM10000 classes with p(scc) added to akiec (the ISIC 2018 rule);
- isic2017: `ba_3` over mel, nv and bkl (its labels: melanoma, nevus, seborrheic keratosis);
- isic2019: `ba_8` over ISIC 2019's eight classes, and `ba_7` with the scc images left out and p(scc) added
  to akiec (what a seven-class model can be compared on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from dermlens.data.taxonomy import HAM_CLASSES, ISIC2019_CLASSES
from dermlens.evaluate.bootstrap import bootstrap
from dermlens.metrics import EvalData, decision_metrics
from dermlens.settings import cpu_name
from dermlens.trust.outputs import trust_settings
from dermlens.trust.per_source import cache_dir
from dermlens.trust.shift import Runner
from dermlens.trust.sources import Scored, load_source

Log = Callable[[str], None]
ISIC2017_CLASSES = ("mel", "nv", "bkl")


@dataclass(frozen=True)
class Figure:
    """One balanced accuracy: the classes argmax chooses among, and whether scc is merged into akiec."""

    classes: tuple[str, ...]
    merge_scc: bool = False
    drop_scc_images: bool = False


def figures(source: str, model_classes: tuple[str, ...]) -> dict[str, Figure]:
    """The figures of one source (module docstring)."""
    if source == "isic2017":
        return {"ba_3": Figure(ISIC2017_CLASSES)}
    if source == "isic2019":
        return {"ba_8": Figure(ISIC2019_CLASSES), "ba_7": Figure(HAM_CLASSES, True, True)}
    return {"ba": Figure(model_classes), "ba_7": Figure(HAM_CLASSES, True)}


def restricted(probs: np.ndarray, model_classes: tuple[str, ...], fig: Figure) -> np.ndarray:
    """Probabilities over `fig.classes` (p(scc) added to akiec when asked), renormalised."""
    column = {c: probs[:, i] for i, c in enumerate(model_classes)}
    zero = np.zeros(len(probs))
    out = {c: column.get(c, zero).copy() for c in fig.classes}
    if fig.merge_scc and "akiec" in out:
        out["akiec"] = out["akiec"] + column.get("scc", zero)
    p = np.stack([out[c] for c in fig.classes], axis=1)
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)


def kept_rows(s: Scored, fig: Figure) -> np.ndarray:
    """Rows whose diagnosis is one of the figure's classes (scc images left out where asked)."""
    dx = s.frame["diagnosis"].astype(str).to_numpy()
    keep = np.isin(dx, fig.classes)
    return keep & (dx != "scc") if fig.drop_scc_images else keep


def score_figure(models: dict[str, tuple[Scored, tuple[str, ...]]], fig: Figure, seed: int = 0) -> dict:
    """The figure for each model on the same rows, and (two models) the paired difference first - second."""
    first = next(iter(models.values()))[0]
    keep = kept_rows(first, fig)
    truth = np.array([fig.classes.index(d) for d in first.frame["diagnosis"].astype(str)[keep]])
    data = {
        name: EvalData(restricted(softmax(s.logits_none[keep], axis=1), classes, fig), truth, fig.classes)
        for name, (s, classes) in models.items()
    }
    names = list(data)

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        out = {n: decision_metrics(d, w)["balanced_accuracy"] for n, d in data.items()}
        if len(names) == 2:
            out["difference"] = out[names[0]] - out[names[1]]
        return out

    r = bootstrap(fn, len(truth), first.groups()[keep], n_resamples=1000, seed=seed)
    result: dict[str, Any] = {"n_images": int(len(truth)), "n_lesions": int(r.n_groups)}
    result["class_counts"] = {c: int((truth == i).sum()) for i, c in enumerate(fig.classes)}
    result["recall"] = {name: per_class_recall(d) for name, d in data.items()}
    for key in r.point:
        result[key] = {
            "value": float(r.point[key]),
            "ci_low": float(r.low[key]),
            "ci_high": float(r.high[key]),
        }
    return result


def per_class_recall(data: EvalData) -> dict[str, float]:
    """Sensitivity (dermlens.metrics) of each class the truth has, argmax among the figure's classes."""
    sens = decision_metrics(data, np.ones((1, len(data.truth))))["sensitivity"][0]
    return {c: float(sens[i]) for i, c in enumerate(data.classes) if (data.truth == i).any()}


def compare(
    bundles: dict[str, Path],
    role: str,
    threads: int | None = None,
    log: Log = print,
    cfg: dict | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Every source's figures for each bundle (one or two) on `role` (val or test), no metadata; the
    sources are configs/trust.yaml's (`cfg` overrides it); `limit` caps the images per source (tests)."""
    cfg = trust_settings(cfg)
    runs = {name: Runner(Path(b), threads) for name, b in bundles.items()}
    out: dict[str, Any] = {
        "role": role,
        "metadata": "withheld (images alone, as a folder of files is predicted)",
        "models": {
            n: {"bundle": str(bundles[n]), "version": r.card.version, "precision": r.precision}
            for n, r in runs.items()
        },
        "cpu": cpu_name(),
        "limit_per_source": limit,
        "sources": {},
    }
    for source, spec in cfg["sources"].items():
        scored = {
            name: (load_source(run, spec, source, role, limit, cache_dir(), log), tuple(run.card.classes))
            for name, run in runs.items()
        }
        model_classes = next(iter(scored.values()))[1]
        out["sources"][source] = {
            key: score_figure(scored, fig) for key, fig in figures(source, model_classes).items()
        }
        log(
            f"{source} {role}: "
            + ", ".join(_line(k, v, list(runs)) for k, v in out["sources"][source].items())
        )
    return out


def _line(key: str, fig: dict, names: list[str]) -> str:
    values = " vs ".join(f"{n} {fig[n]['value']:.3f}" for n in names)
    diff = fig.get("difference")
    return f"{key} {values}" + (
        f" (diff {diff['value']:+.3f}, CI {diff['ci_low']:+.3f}..{diff['ci_high']:+.3f})" if diff else ""
    )
