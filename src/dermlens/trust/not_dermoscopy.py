"""The "not dermoscopy" head fitted on REAL photos: a logistic head on the model's L2-normalized embedding,
smartphone photos of PAD-UFES-20 train patients (positives) against dermoscopy train images of every
source (negatives); the threshold is chosen on the val splits (PAD val and each dermoscopy source's val).

Optionally synthetic clinical-like views (dermlens.trust.photo_views) of HAM10000 train images join the
positives; `compare_variants` fits both ways so the choice is made on val.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.extras import require
from dermlens.infer.ood import l2_normalize, not_dermoscopy_score
from dermlens.metrics import auroc
from dermlens.trust import photo_views
from dermlens.trust.shift import Runner, no_meta
from dermlens.trust.sources import Scored, row_key

VARIANTS = ("real", "real+synthetic")


@dataclass
class Head:
    """A fitted head and its threshold (refuse when score > threshold)."""

    weight: np.ndarray
    bias: float
    threshold: float
    rule: dict[str, Any]

    def score(self, embedding: np.ndarray) -> np.ndarray:
        """Not-dermoscopy logit per embedding (higher = more like an ordinary photo)."""
        return not_dermoscopy_score(embedding, self.weight, self.bias)

    def refused(self, embedding: np.ndarray) -> np.ndarray:
        """True where the image is refused as not dermoscopy."""
        return self.score(embedding) > self.threshold


def fit_weights(photos: np.ndarray, derm: np.ndarray, c: float, balanced: bool) -> tuple[np.ndarray, float]:
    """Logistic regression (scikit-learn) on standardized L2-normalized embeddings; returns (w, b) acting
    on the L2-normalized embedding directly."""
    LogisticRegression = require("sklearn.linear_model", "evaluate").LogisticRegression

    x = l2_normalize(np.concatenate([derm, photos]).astype(np.float64))
    y = np.r_[np.zeros(len(derm)), np.ones(len(photos))]
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None)
    clf.fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    return w, float(clf.intercept_[0] - (w * mu).sum())


def choose_threshold(photo_val: np.ndarray, derm_val: dict[str, np.ndarray], cfg: dict[str, Any]) -> tuple:
    """Threshold on val scores (refuse when score > threshold) with the most room under both targets: the
    one minimizing max(photo miss rate / (1 - target_refusal), worst source false refusal /
    target_false_refusal). Returns (threshold, rule)."""
    miss_t, fr_t = 1.0 - float(cfg["target_refusal"]), float(cfg["target_false_refusal"])
    cands = np.unique(np.concatenate([photo_val, *derm_val.values()]))
    miss = (photo_val[None, :] <= cands[:, None]).mean(axis=1)
    fr = np.max([(s[None, :] > cands[:, None]).mean(axis=1) for s in derm_val.values()], axis=0)
    worst = np.maximum(miss / miss_t, fr / fr_t)
    i = int(np.flatnonzero(worst == worst.min())[-1])  # ties: the highest (fewest false refusals)
    thr = float(cands[i]) if i == len(cands) - 1 else float((cands[i] + cands[i + 1]) / 2)
    rule = {
        "val_photo_miss": float(miss[i]),
        "val_worst_false_refusal": float(fr[i]),
        "text": "refuse when score > threshold; threshold chosen on val to minimize the larger of "
        f"PAD-UFES-20 photos missed / {miss_t:.0%} and the worst dermoscopy source's false refusals / "
        f"{fr_t:.0%}",
    }
    return thr, rule


def synthetic_views(
    run: Runner, derm_train: Scored, n: int, seed: int, cache: Path | None = None
) -> np.ndarray:
    """Embeddings of clinical-like views of the first `n` dermoscopy train images (cached in `cache`)."""
    from dermlens.preprocess import load_rgb

    rows = derm_train.frame.iloc[:n]
    path = None if cache is None else Path(cache) / f"synthetic-{seed}-{row_key(run, rows)}.npy"
    if path is not None and path.is_file():
        return np.load(path)
    images = np.stack([run.prep.resize(load_rgb(p)) for p in rows["image_path"]])
    views = run.views(photo_views.clinical_views(images, seed))
    emb = run(views, no_meta(len(views)))["embedding"].astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, emb)
    return emb


def fit_head(
    photos_train: np.ndarray,
    derm_train: np.ndarray,
    photos_val: np.ndarray,
    derm_val: dict[str, np.ndarray],
    cfg: dict[str, Any],
) -> Head:
    """Fit the head on train embeddings and choose its threshold on the val embeddings."""
    w, b = fit_weights(photos_train, derm_train, float(cfg["C"]), bool(cfg["balanced"]))
    score = lambda e: not_dermoscopy_score(e, w, b)  # noqa: E731
    thr, rule = choose_threshold(score(photos_val), {k: score(v) for k, v in derm_val.items()}, cfg)
    return Head(w.astype(np.float32), b, thr, rule)


def val_figures(head: Head, photos_val: np.ndarray, derm_val: dict[str, np.ndarray]) -> dict[str, Any]:
    """Refusal of val photos, false refusal per dermoscopy source and AUROC (photos vs all dermoscopy)."""
    derm = np.concatenate(list(derm_val.values()))
    return {
        "photo_refusal": float(head.refused(photos_val).mean()),
        "false_refusal": {k: float(head.refused(v).mean()) for k, v in derm_val.items()},
        "auroc": auroc(head.score(derm), head.score(photos_val)),
        "threshold": head.threshold,
    }


def compare_variants(
    photos_train: np.ndarray,
    derm_train: np.ndarray,
    synthetic: np.ndarray,
    photos_val: np.ndarray,
    derm_val: dict[str, np.ndarray],
    cfg: dict[str, Any],
) -> tuple[str, dict[str, Head], dict[str, Any]]:
    """Fit the head with real photos only and with the synthetic views added; the variant kept is the one
    with the lower worst val error (max of photo miss rate and any source's false refusal), real on ties."""
    heads = {
        "real": fit_head(photos_train, derm_train, photos_val, derm_val, cfg),
        "real+synthetic": fit_head(
            np.concatenate([photos_train, synthetic]), derm_train, photos_val, derm_val, cfg
        ),
    }
    figures = {k: val_figures(h, photos_val, derm_val) for k, h in heads.items()}

    def worst(f: dict[str, Any]) -> float:
        miss = (1.0 - f["photo_refusal"]) / (1.0 - float(cfg["target_refusal"]))
        return max(miss, max(f["false_refusal"].values()) / float(cfg["target_false_refusal"]))

    chosen = min(VARIANTS, key=lambda k: (round(worst(figures[k]), 6), VARIANTS.index(k)))
    info = {
        "chosen": chosen,
        "criterion": "lower worst val error relative to the targets: max((1 - PAD val refusal) / (1 - "
        "target_refusal), worst source's val false refusal / target_false_refusal); real photos only on ties",
        "n_synthetic_views": int(len(synthetic)),
        "val": figures,
    }
    return chosen, heads, info


def log_head(log: Callable[[str], None], name: str, f: dict[str, Any]) -> None:
    """One line per variant: PAD refusal and false refusals on val."""
    fr = ", ".join(f"{k} {v:.3f}" for k, v in f["false_refusal"].items())
    log(f"not-dermoscopy head {name}: PAD val refused {f['photo_refusal']:.3f}; dermoscopy val refused {fr}")


def photo_dir(cfg: dict[str, Any]) -> Path | None:
    """The prepared PAD-UFES-20 folder named in configs/trust.yaml, when prepared."""
    path = Path(cfg["photos"]["dir"])
    return path if (path / "manifest.csv").is_file() else None


__all__ = ["VARIANTS", "Head", "choose_threshold", "compare_variants", "fit_head", "fit_weights", "photo_dir"]
