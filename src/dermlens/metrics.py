"""The one metrics module (numpy + scikit-learn) that training, export, trust fitting and evaluation call:
classification metrics with ISIC challenge definitions, evaluated for many sample weightings at once.

Every metric is computed from per-image weights ``W`` of shape (B, N): row ``b`` says how many times each
image counts. The point estimate is ``W = 1``; a bootstrap resample is ``W[b, i] =`` the number of times
image i's lesion was drawn. One vectorized code path therefore serves both, and tests check it against
``isic-challenge-scoring`` and scikit-learn.

Definitions (ISIC 2018/2019, isic-challenge-scoring 5.6):

- predicted label: argmax of the probabilities; a row whose maximum is tied is "undecided" (-1) and
  counts as wrong for every class.
- balanced accuracy: mean over classes present in the truth of per-class recall of the predicted label.
- auc / ap: one-vs-rest ROC AUC and (step-function) average precision of each class probability.
- auc_sens_80: partial ROC area for sensitivity >= 0.8, not normalized (ISIC ``auc_above_sensitivity``).
- isic_* per-class sensitivity/specificity/ppv/npv/dice/accuracy: the class is predicted when its own
  probability is > 0.5 (not argmax); ill-defined ratios score 1.0, exactly as the ISIC scorer does.
- sensitivity/specificity/ppv/npv/f1 (no prefix): one-vs-rest from the argmax decision, i.e. from the
  confusion matrix; ill-defined ratios are NaN (shown as "n/a"), never a free 1.0.
- sensitivity at specificity s: the largest sensitivity of any threshold whose specificity is >= s
  (an achievable operating point on the empirical ROC curve, no interpolation).
- ece: top-label expected calibration error, ``n_bins`` equal-width confidence bins right-closed
  ``(k/n, (k+1)/n]`` (confidence 0 goes to the first bin), ``sum_k |sum_k correct - sum_k conf| / N``.
- brier: multiclass Brier score, mean over images of ``sum_c (p_c - y_c)^2`` (range 0..2).
- aurc: area under the risk-coverage curve: images sorted by top-class confidence, risk at coverage k/N =
  error rate of the k most confident; AURC = mean risk over k. Images with equal confidence are accepted
  together (each gets the risk of the whole tie group), so the order of the input never matters.
- auroc (OOD): ROC AUC of telling out (positive, higher score) from in; tied scores count one half.

The point-estimate helpers at the end (classification_metrics, ece, reliability, risk_coverage, aurc,
auroc) use the same definitions, so training, export, trust and evaluate agree on ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dermlens.data.taxonomy import MALIGNANT, UNKNOWN

UNDECIDED = -1
# Bounded (B x N) work arrays: bootstrap chunks are sized so one array stays below this many elements.
CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class MetricSettings:
    """Choices that change metric values: recorded in metrics.json."""

    specificity_levels: tuple[float, ...] = (0.80, 0.90, 0.95)
    ece_bins: int = 15
    auc_min_sensitivity: float = 0.80


@dataclass(frozen=True)
class EvalData:
    """Validated inputs: probabilities [N, C] (rows sum to 1), truth indices [N], class codes [C]."""

    probs: np.ndarray
    truth: np.ndarray
    classes: tuple[str, ...]
    malignant_prob: np.ndarray | None = None

    def __post_init__(self) -> None:
        p, t = self.probs, self.truth
        if p.ndim != 2 or p.shape[1] != len(self.classes):
            raise ValueError(f"probs must be [N, {len(self.classes)}], got {p.shape}")
        if t.shape != (p.shape[0],) or (t.size and (t.min() < 0 or t.max() >= p.shape[1])):
            raise ValueError("truth must be [N] class indices in range")
        if self.malignant_prob is not None and self.malignant_prob.shape != t.shape:
            raise ValueError("malignant_prob must be [N]")

    @classmethod
    def build(
        cls,
        probs: np.ndarray,
        truth: np.ndarray,
        classes: Sequence[str],
        malignant_prob: np.ndarray | None = None,
    ) -> EvalData:
        m = None if malignant_prob is None else np.asarray(malignant_prob, np.float64)
        return cls(np.asarray(probs, np.float64), np.asarray(truth, np.int64), tuple(classes), m)

    @property
    def malignant_score(self) -> np.ndarray:
        """Coarse malignant probability: given, else the sum of the malignant fine classes."""
        if self.malignant_prob is not None:
            return self.malignant_prob
        cols = [i for i, c in enumerate(self.classes) if c in MALIGNANT]
        return self.probs[:, cols].sum(axis=1)


def predicted_labels(probs: np.ndarray) -> np.ndarray:
    """Argmax per row, or UNDECIDED (-1) when the maximum is shared by several classes (ISIC rule)."""
    top = probs.max(axis=1, keepdims=True)
    labels = probs.argmax(axis=1)
    labels[(probs == top).sum(axis=1) > 1] = UNDECIDED
    return labels


def _div(num: np.ndarray, den: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """num / den with ``fill`` where den == 0."""
    out = np.full(np.broadcast(num, den).shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def curve_counts(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted TP and FP counts at each distinct threshold (descending), with a leading 0: [B, T+1]."""
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    w = weights[:, order]
    tp = np.cumsum(w * positive[order], axis=1)[:, ends]
    fp = np.cumsum(w, axis=1)[:, ends] - tp
    zero = np.zeros((weights.shape[0], 1))
    return np.hstack([zero, tp]), np.hstack([zero, fp])


def _trapezoid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.diff(x, axis=1) * (y[:, 1:] + y[:, :-1]) / 2).sum(axis=1)


def ranking_metrics(
    score: np.ndarray, positive: np.ndarray, weights: np.ndarray, settings: MetricSettings
) -> dict[str, np.ndarray]:
    """AUC, ISIC partial AUC, average precision and sensitivity at specificity levels: each [B]."""
    tp, fp = curve_counts(score, positive, weights)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    defined = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
    tpr, fpr = _div(tp, n_pos, 0.0), _div(fp, n_neg, 0.0)
    out = {"auc": _trapezoid(fpr, tpr)}
    # ISIC auc_above_sensitivity: area right of the point where the ROC curve first reaches s.
    s = settings.auc_min_sensitivity
    rows = np.arange(tp.shape[0])
    i = np.maximum(np.argmax(tpr >= s, axis=1), 1)
    t0, t1, f0, f1 = tpr[rows, i - 1], tpr[rows, i], fpr[rows, i - 1], fpr[rows, i]
    f_s = f0 + _div(s - t0, t1 - t0, 0.0) * (f1 - f0)
    seg = np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2
    after = np.arange(1, tpr.shape[1])[None, :] > i[:, None]
    out["auc_sens_80"] = (seg * after).sum(axis=1) + (f1 - f_s) * (t1 + s) / 2
    # Average precision: sum over thresholds of recall increment x precision.
    precision = _div(tp[:, 1:], tp[:, 1:] + fp[:, 1:], 0.0)
    out["ap"] = (np.diff(tpr, axis=1) * precision).sum(axis=1)
    for level in settings.specificity_levels:
        ok = fpr <= (1.0 - level) + 1e-9
        out[f"sens_at_spec_{round(level * 100)}"] = np.where(ok, tpr, 0.0).max(axis=1)
    for k in out:
        out[k] = np.where(defined, out[k], np.nan)
    return out


def confusion_counts(data: EvalData, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices [B, C, C+1]: rows truth, columns predicted, last column undecided."""
    c = len(data.classes)
    pred = predicted_labels(data.probs)
    col = np.where(pred == UNDECIDED, c, pred)
    key = data.truth * (c + 1) + col
    onehot = np.zeros((key.size, c * (c + 1)))
    onehot[np.arange(key.size), key] = 1.0
    return (weights @ onehot).reshape(-1, c, c + 1)


def decision_metrics(data: EvalData, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Argmax-decision metrics: balanced accuracy, accuracy [B]; per-class sens/spec/ppv/npv/f1 [B, C]."""
    cm = confusion_counts(data, weights)
    c = len(data.classes)
    total = cm.sum(axis=(1, 2))
    tp = cm[:, np.arange(c), np.arange(c)]
    n_true = cm.sum(axis=2)
    n_pred = cm[:, :, :c].sum(axis=1)
    fn, fp = n_true - tp, n_pred - tp
    tn = total[:, None] - tp - fn - fp
    sens = _div(tp, n_true)
    return {
        "balanced_accuracy": _nanmean_rows(np.where(n_true > 0, sens, np.nan)),
        "accuracy": _div(tp.sum(axis=1), total),
        "sensitivity": sens,
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "confusion_matrix": cm[:, :, :c],
        "n_undecided": cm[:, :, c].sum(axis=1),
    }


def isic_threshold_metrics(data: EvalData, weights: np.ndarray) -> dict[str, np.ndarray]:
    """ISIC per-category metrics at probability > 0.5 with the scorer's 1.0 for ill-defined ratios: [B, C]."""
    c = len(data.classes)
    t = data.truth[:, None] == np.arange(c)[None, :]
    p = data.probs > 0.5
    tp, fp = weights @ (t & p).astype(float), weights @ (~t & p).astype(float)
    fn, tn = weights @ (t & ~p).astype(float), weights @ (~t & ~p).astype(float)
    return {
        "isic_accuracy": _div(tp + tn, tp + tn + fp + fn),
        "isic_sensitivity": _div(tp, tp + fn, 1.0),
        "isic_specificity": _div(tn, tn + fp, 1.0),
        "isic_dice": _div(2 * tp, 2 * tp + fp + fn, 1.0),
        "isic_ppv": _div(tp, tp + fp, 1.0),
        "isic_npv": _div(tn, tn + fn, 1.0),
    }


def calibration_metrics(probs: np.ndarray, truth: np.ndarray, weights: np.ndarray, n_bins: int) -> dict:
    """Top-label ECE, multiclass Brier score and AURC: each [B]."""
    conf = probs.max(axis=1)
    correct = (predicted_labels(probs) == truth).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    onehot = np.zeros((conf.size, n_bins))
    onehot[np.arange(conf.size), bins] = 1.0
    total = weights.sum(axis=1)
    gap = np.abs(weights @ (onehot * correct[:, None]) - weights @ (onehot * conf[:, None]))
    sq = ((probs - np.eye(probs.shape[1])[truth]) ** 2).sum(axis=1)
    order = np.argsort(-conf, kind="mergesort")
    c = conf[order]
    ends = np.r_[np.flatnonzero(c[1:] != c[:-1]), c.size - 1]
    w = weights[:, order]
    cum_w = np.cumsum(w, axis=1)[:, ends]
    risk = _div(np.cumsum(w * (1.0 - correct[order]), axis=1)[:, ends], cum_w, 0.0)
    group_w = np.diff(cum_w, axis=1, prepend=0.0)
    return {
        "ece": _div(gap.sum(axis=1), total),
        "brier": _div(weights @ sq, total),
        "aurc": _div((group_w * risk).sum(axis=1), total),
    }


def compute(data: EvalData, weights: np.ndarray, settings: MetricSettings) -> dict[str, np.ndarray]:
    """All metrics for each weighting row: scalars [B], per-class [B, C], confusion matrix [B, C, C]."""
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    out: dict[str, np.ndarray] = decision_metrics(data, weights)
    out.update(isic_threshold_metrics(data, weights))
    per_class: dict[str, list[np.ndarray]] = {}
    for k in range(len(data.classes)):
        for name, v in ranking_metrics(data.probs[:, k], data.truth == k, weights, settings).items():
            per_class.setdefault(name, []).append(v)
    for name, cols in per_class.items():
        stacked = np.stack(cols, axis=1)
        if name in ("auc", "auc_sens_80", "ap"):
            out[name] = stacked
            out[f"macro_{name}"] = _nanmean_rows(stacked)
        elif "mel" in data.classes:
            out[f"mel_{name}"] = stacked[:, data.classes.index("mel")]
    out["macro_f1"] = _nanmean_rows(out["f1"])
    known = np.array([c != UNKNOWN for c in data.classes])[data.truth]
    malignant = np.array([c in MALIGNANT for c in data.classes])[data.truth]
    coarse = ranking_metrics(data.malignant_score, malignant, weights * known, settings)
    out.update({f"malignant_{k}": v for k, v in coarse.items() if k != "auc_sens_80"})
    out.update(calibration_metrics(data.probs, data.truth, weights, settings.ece_bins))
    return out


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row mean ignoring NaN (classes undefined in that resample); NaN if the whole row is NaN."""
    n = (~np.isnan(x)).sum(axis=1)
    return _div(np.nansum(x, axis=1), n)


def reliability_bins(probs: np.ndarray, truth: np.ndarray, n_bins: int) -> dict[str, list]:
    """Per-bin count, mean confidence and accuracy for a reliability diagram (same bins as ECE)."""
    conf = probs.max(axis=1)
    correct = predicted_labels(probs) == truth
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean_conf = _div(np.bincount(bins, conf, n_bins), count)
    acc = _div(np.bincount(bins, correct.astype(float), n_bins), count)
    return {
        "lower": [k / n_bins for k in range(n_bins)],
        "upper": [(k + 1) / n_bins for k in range(n_bins)],
        "count": count.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": acc.tolist(),
    }


def risk_coverage(probs: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and risk (error rate of the accepted) at each distinct confidence threshold, descending."""
    conf = probs.max(axis=1)
    order = np.argsort(-conf, kind="mergesort")
    c = conf[order]
    ends = np.r_[np.flatnonzero(c[1:] != c[:-1]), c.size - 1]
    err = np.cumsum(predicted_labels(probs)[order] != truth[order])[ends]
    k = ends + 1
    return k / c.size, err / k


# ---- point estimates (training, export, trust) ------------------------------------------------------------


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the classes present in truth of the per-class recall of `pred` (UNDECIDED counts wrong)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    return float(np.mean([(pred[truth == c] == c).mean() for c in np.unique(truth)]))


def classification_metrics(probs: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, float]:
    """Balanced accuracy, accuracy and macro one-vs-rest AUC of class probabilities [N, C]; the AUC averages
    the classes present in `truth` (an eight-class model on a seven-class set)."""
    from sklearn.metrics import roc_auc_score

    p, truth = np.asarray(probs, np.float64), np.asarray(truth, np.int64)
    pred = predicted_labels(p)
    present = [k for k in range(n_classes) if 0 < (truth == k).sum() < len(truth)]
    aucs = [roc_auc_score(truth == k, p[:, k]) for k in present]
    return {
        "n": int(len(truth)),
        "bal_acc": balanced_accuracy(pred, truth),
        "accuracy": float((pred == truth).mean()),
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
    }


def _point(probs: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth, np.int64)
    return calibration_metrics(probs, truth, np.ones((1, len(truth))), n_bins)


def ece(probs: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error (right-closed equal-width bins; a tied top is wrong)."""
    return float(_point(probs, truth, n_bins)["ece"][0])


def aurc(probs: np.ndarray, truth: np.ndarray) -> float:
    """Area under the risk-coverage curve (tie groups accepted together)."""
    return float(_point(probs, truth)["aurc"][0])


def reliability(probs: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """Per-bin count, mean confidence and accuracy (None for an empty bin), the bins of ece()."""
    out = reliability_bins(np.asarray(probs, np.float64), np.asarray(truth, np.int64), n_bins)
    for key in ("confidence", "accuracy"):
        out[key] = [None if np.isnan(v) else float(v) for v in out[key]]
    return out


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """ROC AUC of telling out (positive, higher score) from in; ties count half; NaN if a side is empty."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))
