"""External validity on ISIC 2017: melanoma-vs-rest and the 3-class mapping (mel, SK -> bkl, nevus -> nv)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from dermlens.evaluate.bootstrap import bootstrap

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
