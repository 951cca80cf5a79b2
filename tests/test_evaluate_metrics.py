"""Metrics against isic-challenge-scoring and scikit-learn on real ISIC 2019 / HAM10000 labels; bootstrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from dermlens.data.taxonomy import HAM_CLASSES, MALIGNANT
from dermlens.evaluate import EvaluateConfig, evaluate_arrays
from dermlens.evaluate.bootstrap import bootstrap, group_indices, resample_weights
from dermlens.evaluate.isic_csv import align, read_predictions, read_truth, write_isic_csv
from dermlens.metrics import EvalData, MetricSettings, compute, predicted_labels
from dermlens.settings import data_root

N_SUBSET = 1500


def noisy_predictions(truth: np.ndarray, n_classes: int, seed: int, strength: float = 3.0, groups=None):
    """Synthetic but honest probabilities: a seeded Dirichlet centred towards the true class.

    With ``groups`` every image of a group shares one draw (images of one lesion look alike).
    """
    rng = np.random.default_rng(seed)
    alpha = 1.0 + strength * np.eye(n_classes)[truth]
    draws = rng.gamma(alpha)
    if groups is not None:
        codes, _ = group_indices(groups, len(truth))
        first = pd.Series(np.arange(len(truth))).groupby(codes).transform("first").to_numpy()
        draws = draws[first]
    return draws / draws.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def isic2019():
    """A seeded 1500-image subset of the real ISIC 2019 training truth, with lesion ids."""
    root = data_root() / "isic2019"
    truth = read_truth(root / "ISIC_2019_Training_GroundTruth.csv")
    meta = pd.read_csv(root / "ISIC_2019_Training_Metadata.csv").set_index("image")
    idx = np.sort(np.random.default_rng(2019).choice(len(truth.images), N_SUBSET, replace=False))
    images = [truth.images[i] for i in idx]
    classes = tuple(c for c in truth.classes if c != "unk")  # no UNK rows in the training truth
    y = truth.labels()[idx]
    return images, y, classes, meta.loc[images, "lesion_id"].tolist()


@pytest.fixture(scope="module")
def ham():
    """A seeded 1500-image subset of HAM10000 labels and lesion ids, sampled by lesion."""
    meta = pd.read_csv(data_root() / "ham10000" / "HAM10000_metadata.csv")
    lesions = meta["lesion_id"].unique()
    pick = np.random.default_rng(10015).permutation(lesions)
    sub = meta[meta["lesion_id"].isin(pick[:1100])].head(N_SUBSET)
    y = np.array([HAM_CLASSES.index(d) for d in sub["dx"]])
    return sub["image_id"].tolist(), y, HAM_CLASSES, sub["lesion_id"].tolist()


def _isic_score(truth_csv: Path, pred_csv: Path, monkeypatch):
    # isic-challenge-scoring 5.6 calls DataFrame.applymap, which pandas 3 renamed to DataFrame.map.
    monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    from isic_challenge_scoring import ClassificationMetric, ClassificationScore

    return ClassificationScore.from_file(truth_csv, pred_csv, ClassificationMetric.BALANCED_ACCURACY)


def _point(data: EvalData, settings: MetricSettings | None = None) -> dict:
    weights = np.ones((1, len(data.truth)))
    return {k: v[0] for k, v in compute(data, weights, settings or MetricSettings()).items()}


def quantized(probs: np.ndarray, step: float = 0.05) -> np.ndarray:
    """Probabilities on a coarse grid (many tied scores, as from a low-precision model); rows sum to 1."""
    q = np.round(probs / step) * step
    q[np.arange(len(q)), q.argmax(axis=1)] += 1.0 - q.sum(axis=1)
    return np.clip(q, 0.0, 1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:The inplace keyword")  # inside the scorer
@pytest.mark.parametrize(
    "dataset,style,coarse", [("isic2019", "2019", False), ("ham", "2018", False), ("isic2019", "2019", True)]
)
def test_parity_with_isic_scorer(dataset, style, coarse, request, tmp_path, monkeypatch):
    images, y, classes, _ = request.getfixturevalue(dataset)
    probs = noisy_predictions(y, len(classes), seed=1)
    if coarse:  # tied scores of positives and negatives exercise the ROC interpolation at 80% sensitivity
        probs = quantized(probs)
    probs[:4] = 1.0 / len(classes)  # tied maximum: ISIC scores these as "undecided"
    probs[4:7] = 0.0
    probs[4:7, :2] = 0.5  # also tied; and exactly 0.5 is not "> 0.5" for the ISIC per-category metrics
    truth_csv = write_isic_csv(
        tmp_path / "truth.csv", images, np.eye(len(classes))[y], classes, style=style, unk_column=False
    )
    pred_csv = write_isic_csv(tmp_path / "pred.csv", images, probs, classes, style=style, unk_column=False)
    score = _isic_score(truth_csv, pred_csv, monkeypatch)

    t, p = align(read_truth(truth_csv), read_predictions(pred_csv))
    assert t.classes == classes
    m = _point(EvalData.build(p.values, t.labels(), t.classes))
    assert m["n_undecided"] >= 7
    assert m["balanced_accuracy"] == pytest.approx(score.aggregate["balanced_accuracy"], abs=1e-6)
    pc = score.per_category
    for ours, theirs in {
        "auc": "auc",
        "auc_sens_80": "auc_sens_80",
        "ap": "ap",
        "isic_sensitivity": "sensitivity",
        "isic_specificity": "specificity",
        "isic_ppv": "ppv",
        "isic_npv": "npv",
        "isic_dice": "dice",
        "isic_accuracy": "accuracy",
    }.items():
        np.testing.assert_allclose(m[ours], pc[theirs].to_numpy(), atol=1e-6, err_msg=ours)
    for name in ("auc", "auc_sens_80", "ap"):
        assert m[f"macro_{name}"] == pytest.approx(score.macro_average[name], abs=1e-6)


def test_parity_with_sklearn(isic2019):
    images, y, classes, _ = isic2019
    probs = noisy_predictions(y, len(classes), seed=2, strength=2.0)
    probs[:3] = 1.0 / len(classes)
    data = EvalData.build(probs, y, classes)
    m = _point(data)
    pred = predicted_labels(probs)
    labels = list(range(len(classes)))
    np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred, labels=labels))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-9)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    for ours, fn in (("sensitivity", skm.recall_score), ("ppv", skm.precision_score), ("f1", skm.f1_score)):
        np.testing.assert_allclose(
            m[ours], fn(y, pred, labels=labels, average=None), atol=1e-12, err_msg=ours
        )
    onehot = np.eye(len(classes))[y]
    for k in labels:
        assert m["auc"][k] == pytest.approx(skm.roc_auc_score(onehot[:, k], probs[:, k]), abs=1e-9)
        assert m["ap"][k] == pytest.approx(skm.average_precision_score(onehot[:, k], probs[:, k]), abs=1e-9)
        tn, fp, fn_, tp = skm.confusion_matrix(y == k, pred == k, labels=[False, True]).ravel()
        assert m["specificity"][k] == pytest.approx(tn / (tn + fp))
        assert m["npv"][k] == pytest.approx(tn / (tn + fn_))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro"), abs=1e-12)
    # benign/malignant from summed fine probabilities, and from a given coarse probability
    is_mal = np.isin(np.array(classes)[y], list(MALIGNANT))
    mal = probs[:, [i for i, c in enumerate(classes) if c in MALIGNANT]].sum(axis=1)
    assert m["malignant_auc"] == pytest.approx(skm.roc_auc_score(is_mal, mal), abs=1e-9)
    coarse = np.clip(mal + np.random.default_rng(3).normal(0, 0.2, len(y)), 0, 1)
    m2 = _point(EvalData.build(probs, y, classes, coarse))
    assert m2["malignant_auc"] == pytest.approx(skm.roc_auc_score(is_mal, coarse), abs=1e-9)
    # melanoma sensitivity at specificity: best achievable operating point on the ROC curve
    fpr, tpr, _ = skm.roc_curve(y == 0, probs[:, 0], drop_intermediate=False)
    for level in (0.8, 0.9, 0.95):
        expected = tpr[fpr <= 1 - level + 1e-12].max()
        assert m[f"mel_sens_at_spec_{round(level * 100)}"] == pytest.approx(expected, abs=1e-12)
    assert m["brier"] == pytest.approx(((probs - onehot) ** 2).sum(axis=1).mean(), abs=1e-12)


def test_ece_matches_torchmetrics_and_trust(ham):
    torch = pytest.importorskip("torch")
    from torchmetrics.functional.classification import multiclass_calibration_error

    from dermlens.metrics import ece as point_ece

    _, y, classes, _ = ham
    probs = noisy_predictions(y, len(classes), seed=4, strength=1.5)
    m = _point(EvalData.build(probs, y, classes))
    ref = multiclass_calibration_error(
        torch.tensor(probs), torch.tensor(y), num_classes=len(classes), n_bins=15, norm="l1"
    )
    assert m["ece"] == pytest.approx(float(ref), abs=1e-5)
    assert m["ece"] == pytest.approx(point_ece(probs, y, n_bins=15), abs=1e-12)


def test_ece_bins_are_right_closed():
    # 4 bins: confidence 0.75 lies on a boundary and belongs to (0.5, 0.75], with 0.6
    probs = np.array([[0.6, 0.4], [0.75, 0.25]])
    data = EvalData.build(probs, np.array([0, 1]), ("mel", "nv"))  # first right, second wrong
    assert _point(data, MetricSettings(ece_bins=4))["ece"] == pytest.approx(abs(1 - 0.6 - 0.75) / 2)
    # 8 bins: (0.5, 0.625] and (0.625, 0.75] separate them
    assert _point(data, MetricSettings(ece_bins=8))["ece"] == pytest.approx((0.4 + 0.75) / 2)


def test_weights_equal_replicated_images(ham):
    """A weighting must give exactly the metrics of the dataset with images repeated that often."""
    _, y, classes, _ = ham
    y, probs = y[:400], noisy_predictions(y[:400], len(classes), seed=5)
    probs[10:20] = np.round(probs[10:20], 1)  # create score ties across images
    probs[10:20] /= probs[10:20].sum(axis=1, keepdims=True)
    w = np.random.default_rng(6).integers(0, 4, size=len(y)).astype(float)
    weighted = _point_with(EvalData.build(probs, y, classes), w)
    rep = np.repeat(np.arange(len(y)), w.astype(int))
    replicated = _point(EvalData.build(probs[rep], y[rep], classes))
    for key, value in replicated.items():
        np.testing.assert_allclose(weighted[key], value, atol=1e-10, err_msg=key)


def _point_with(data: EvalData, w: np.ndarray) -> dict:
    return {k: v[0] for k, v in compute(data, w[None, :], MetricSettings()).items()}


def test_undefined_class_is_nan_and_skipped(ham):
    _, y, classes, _ = ham
    y = np.where(y == classes.index("df"), classes.index("nv"), y)  # no dermatofibroma in the truth
    probs = noisy_predictions(y, len(classes), seed=7)
    m = _point(EvalData.build(probs, y, classes))
    k = classes.index("df")
    assert np.isnan(m["auc"][k]) and np.isnan(m["sensitivity"][k])
    assert m["macro_auc"] == pytest.approx(np.delete(m["auc"], k).mean())
    assert m["balanced_accuracy"] == pytest.approx(np.delete(m["sensitivity"], k).mean())


def test_cluster_weights_tie_images_of_a_lesion():
    groups = ["a", "a", "b", None, "c", "c", "c", np.nan]
    idx, n = group_indices(groups, len(groups))
    assert n == 5  # a, b, c and two images without a lesion id
    w = resample_weights(idx, n, 200, np.random.default_rng(0))
    assert w.shape == (200, 8)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 4] == w[:, 6]).all()
    # each resample draws exactly n lesions
    np.testing.assert_array_equal(w[:, [0, 2, 3, 4, 7]].sum(axis=1), n)


def test_bootstrap_ci_contains_point_and_is_reproducible(ham):
    _, y, classes, lesions = ham
    probs = noisy_predictions(y, len(classes), seed=8, groups=lesions)
    cfg = EvaluateConfig.load(n_resamples=300, seed=11)
    a = evaluate_arrays(probs, y, classes, groups=lesions, config=cfg)
    b = evaluate_arrays(probs, y, classes, groups=lesions, config=cfg)
    assert a["overall"] == b["overall"]
    assert a["n_lesions"] == len(set(lesions)) and a["n_images"] == len(y)
    assert a["bootstrap"]["unit"] == "lesion"
    for key in (
        "balanced_accuracy",
        "macro_auc",
        "macro_auc_sens_80",
        "malignant_auc",
        "ece",
        "brier",
        "aurc",
    ):
        iv = a["overall"][key]
        assert iv["ci_low"] <= iv["value"] <= iv["ci_high"], key
        assert iv["ci_low"] < iv["ci_high"], key
    for code in classes:
        iv = a["per_class"][code]["auc"]
        assert iv["ci_low"] <= iv["value"] <= iv["ci_high"], code
    other = evaluate_arrays(
        probs, y, classes, groups=lesions, config=EvaluateConfig.load(n_resamples=300, seed=12)
    )
    assert other["overall"]["balanced_accuracy"]["ci_low"] != a["overall"]["balanced_accuracy"]["ci_low"]


def test_lesion_bootstrap_differs_from_image_bootstrap(ham):
    _, y, classes, lesions = ham
    assert len(set(lesions)) < len(lesions)  # HAM10000 has several images per lesion
    probs = noisy_predictions(y, len(classes), seed=9, groups=lesions)
    data = EvalData.build(probs, y, classes)

    def fn(w):
        return compute(data, w, MetricSettings())

    by_lesion = bootstrap(fn, len(y), lesions, n_resamples=1000, seed=0)
    by_image = bootstrap(fn, len(y), None, n_resamples=1000, seed=0)
    width_lesion = by_lesion.high["balanced_accuracy"] - by_lesion.low["balanced_accuracy"]
    width_image = by_image.high["balanced_accuracy"] - by_image.low["balanced_accuracy"]
    assert by_lesion.point["balanced_accuracy"] == by_image.point["balanced_accuracy"]
    assert width_lesion > 1.05 * width_image  # correlated images: image resampling is overconfident
    # with one image per lesion the two procedures are the same
    singles = [f"L{i}" for i in range(len(y))]
    same = bootstrap(fn, len(y), singles, n_resamples=200, seed=0)
    img = bootstrap(fn, len(y), None, n_resamples=200, seed=0)
    np.testing.assert_array_equal(same.low["macro_auc"], img.low["macro_auc"])


def test_bootstrap_runs_every_resample(isic2019):
    """1,000 lesion resamples of all ISIC 2019 images (speed is a benchmark's business, not a test's)."""
    _, y, classes, lesions = isic2019
    probs = noisy_predictions(y, len(classes), seed=10)
    res = evaluate_arrays(probs, y, classes, groups=lesions, config=EvaluateConfig.load(n_resamples=1000))
    assert res["bootstrap"]["n_resamples"] == 1000
    assert res["overall"]["balanced_accuracy"]["n_valid"] == 1000


def test_aurc_by_hand_and_independent_of_tie_order():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    data = EvalData.build(probs, np.array([0, 1, 0]), ("mel", "nv"))  # the middle one is wrong
    assert _point(data)["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    tied = np.array([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4]])
    a = _point(EvalData.build(tied, np.array([0, 1, 0]), ("mel", "nv")))["aurc"]
    b = _point(EvalData.build(tied, np.array([1, 0, 0]), ("mel", "nv")))["aurc"]
    assert a == b == pytest.approx((2 * 0.5 + 1 / 3) / 3)


def test_config_file_overrides_packaged_defaults(tmp_path):
    assert EvaluateConfig.load() == EvaluateConfig()  # YAML and dataclass defaults agree
    user = tmp_path / "eval.yaml"
    user.write_text("bootstrap:\n  n_resamples: 50\nece_bins: 10\n")
    cfg = EvaluateConfig.load(user, seed=3)
    assert (cfg.n_resamples, cfg.ece_bins, cfg.seed, cfg.gallery_size) == (50, 10, 3, 12)
    user.write_text("n_resample: 5\n")
    with pytest.raises(ValueError, match="n_resample"):
        EvaluateConfig.load(user)
