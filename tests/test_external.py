"""ISIC 2017 external-validity scoring with the packaged model on real ISIC 2017 images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermlens.bundle import release_dir
from dermlens.evaluate.external import ISIC2017_CLASSES, isic2017_scores
from dermlens.preprocess import load_rgb


@pytest.fixture(scope="module")
def isic2017_sample(data_root):
    """60 labelled ISIC 2017 test images (20 per class) scored by the release model."""
    from dermlens.infer.predictor import Predictor

    labels = pd.read_csv(data_root / "isic2017" / "ISIC-2017_labels.csv")
    test = labels[labels["split"] == "test"]
    picks = pd.concat(
        [
            test[test["melanoma"] == 1].head(20),
            test[test["seborrheic_keratosis"] == 1].head(20),
            test[(test["melanoma"] == 0) & (test["seborrheic_keratosis"] == 0)].head(20),
        ]
    )
    dx = ["mel"] * 20 + ["bkl"] * 20 + ["nv"] * 20
    images = [load_rgb(data_root / "isic2017" / "images" / f"{i}.jpg") for i in picks["image_id"]]
    predictor = Predictor.load(release_dir())
    return predictor.predict_arrays(images)["probs"], predictor.classes, dx


def test_isic2017_scores_match_sklearn(isic2017_sample):
    probs, classes, dx = isic2017_sample
    scores = isic2017_scores(probs, classes, dx, n_resamples=50)
    is_mel = np.array([d == "mel" for d in dx])
    mel_auc = roc_auc_score(is_mel, probs[:, classes.index("mel")])
    assert scores["melanoma_auc"]["value"] == pytest.approx(mel_auc)
    p3 = probs[:, [classes.index(c) for c in ISIC2017_CLASSES]]
    y3 = [ISIC2017_CLASSES.index(d) for d in dx]
    ba = balanced_accuracy_score(y3, p3.argmax(axis=1))
    assert scores["three_class"]["balanced_accuracy"]["value"] == pytest.approx(ba)
    ci = scores["melanoma_auc"]
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    assert np.sum(scores["three_class"]["confusion_matrix"]) == 60


def test_unknown_fine_labels_are_left_out_of_three_class(isic2017_sample):
    probs, classes, dx = isic2017_sample
    scores = isic2017_scores(probs, classes, dx[:-5] + ["unk"] * 5, n_resamples=20)
    assert scores["n_images"] == 60
    assert scores["three_class"]["n_images"] == 55
