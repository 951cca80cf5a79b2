"""External validity on ISIC 2017: melanoma-vs-rest and the 3-class mapping (mel, SK -> bkl, nevus -> nv)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from dermlens import DISCLAIMER
from dermlens.evaluate.bootstrap import bootstrap
from dermlens.evaluate.sources import EvaluationInputError, predict_rows
from dermlens.settings import machine

ISIC2017_CLASSES: tuple[str, ...] = ("mel", "bkl", "nv")


def _with_ci(fn, n: int, n_resamples: int, seed: int) -> dict:
    """Point estimate plus a 95% bootstrap CI (ISIC 2017 has one image per lesion id)."""
    r = bootstrap(lambda w: {"v": fn(w)}, n, groups=None, n_resamples=n_resamples, seed=seed)
    return {"value": float(r.point["v"]), "ci_low": float(r.low["v"]), "ci_high": float(r.high["v"])}


def isic2017_scores(
    probs: np.ndarray, classes: tuple[str, ...], diagnosis: list[str], n_resamples: int = 1000, seed: int = 0
) -> dict:
    """Melanoma AUC on all labelled images; 3-class balanced accuracy and SK AUC where SK is known."""
    diagnosis = np.asarray(diagnosis)
    p_mel = probs[:, classes.index("mel")]
    is_mel = (diagnosis == "mel").astype(int)

    def mel_auc(w: np.ndarray) -> np.ndarray:
        return np.array([roc_auc_score(is_mel, p_mel, sample_weight=wi) for wi in np.atleast_2d(w)])

    known = np.isin(diagnosis, ISIC2017_CLASSES)
    cols = [classes.index(c) for c in ISIC2017_CLASSES]
    p3 = probs[known][:, cols]
    p3 = p3 / p3.sum(axis=1, keepdims=True)
    y3 = np.array([ISIC2017_CLASSES.index(d) for d in diagnosis[known]])
    pred3 = p3.argmax(axis=1)
    is_sk = (y3 == 1).astype(int)

    def bal_acc(w: np.ndarray) -> np.ndarray:
        return np.array([balanced_accuracy_score(y3, pred3, sample_weight=wi) for wi in np.atleast_2d(w)])

    def sk_auc(w: np.ndarray) -> np.ndarray:
        return np.array([roc_auc_score(is_sk, p3[:, 1], sample_weight=wi) for wi in np.atleast_2d(w)])

    return {
        "n_images": int(len(diagnosis)),
        "n_melanoma": int(is_mel.sum()),
        "melanoma_auc": _with_ci(mel_auc, len(diagnosis), n_resamples, seed),
        "three_class": {
            "classes": list(ISIC2017_CLASSES),
            "n_images": int(known.sum()),
            "balanced_accuracy": _with_ci(bal_acc, int(known.sum()), n_resamples, seed),
            "seborrheic_keratosis_auc": _with_ci(sk_auc, int(known.sum()), n_resamples, seed),
            "confusion_matrix": confusion_matrix(y3, pred3, labels=[0, 1, 2]).tolist(),
        },
    }


def _manifest_rows(manifest: Path, split: str) -> pd.DataFrame:
    """The manifest's rows of one split ('all': every row); an unreadable or empty selection is an error."""
    try:
        rows = pd.read_csv(manifest)
    except OSError as e:
        raise EvaluationInputError(f"cannot read {manifest}: {e}") from e
    if split != "all":
        rows = rows[rows["split"] == split]
    if rows.empty:
        raise EvaluationInputError(f"no rows in {manifest} for split {split!r}")
    return rows


def score_isic2017(
    manifest: Path, out: Path, split: str, model: Path | None, n_bootstrap: int, metadata: bool
) -> tuple[dict, Path]:
    """Predict a prepared ISIC 2017 manifest split with a bundle and write OUT/external.json."""
    from dermlens.evaluate import EvaluateConfig
    from dermlens.infer.predictor import Predictor

    rows = _manifest_rows(manifest, split)
    predictor = Predictor.load(model)
    probs = predict_rows(predictor, rows, EvaluateConfig.load().batch_size, metadata)["probs"]
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
    path = out / "external.json"
    path.write_text(json.dumps(scores, indent=2) + "\n")
    return scores, path
