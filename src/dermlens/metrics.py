"""The one metrics module (numpy + scikit-learn) that training, export, trust fitting and evaluation call."""

from __future__ import annotations

import numpy as np


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """Balanced accuracy, accuracy and macro one-vs-rest AUC of class probabilities [N, C]."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    p = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    return {
        "n": int(len(labels)),
        "bal_acc": float(balanced_accuracy_score(labels, p.argmax(1))),
        "accuracy": float((p.argmax(1) == labels).mean()),
        "macro_auc": float(
            roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=list(range(n_classes)))
        ),
    }
