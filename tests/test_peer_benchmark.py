"""The peer comparison's pure parts (benchmarks/peer_sklesion.py) on real labels and the release model's real
probabilities: the peer's class order mapped onto HAM7, the ISIC 2017 definitions, the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.evaluate.external import ISIC2017_CLASSES, isic2017_scores
from dermlens.preprocess import load_rgb
from peer_sklesion import paired_scores, to_ham7  # benchmarks/peer_sklesion.py

# sklesion 0.2.2's output order: its model_props.pkl `i_cl_map` {0: akiec, 1: bcc, ..., 6: vasc}.
PEER_ORDER = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def ham_lesions(data_root) -> pd.DataFrame:
    """HAM10000 images of 21 lesions with several images each (real labels, real lesion groups)."""
    md = pd.read_csv(data_root / "ham10000" / "HAM10000_metadata.csv").sort_values("image_id")
    multi = md[md.duplicated("lesion_id", keep=False)]
    lesions = multi.drop_duplicates("lesion_id").groupby("dx").head(3)["lesion_id"]
    rows = multi[multi["lesion_id"].isin(lesions)].reset_index(drop=True)
    rows["image_path"] = [str(data_root / "ham10000" / "images" / f"{i}.jpg") for i in rows["image_id"]]
    return rows


def _probs(predictor, paths: list[str]) -> np.ndarray:
    """The release model's HAM7 probabilities without metadata."""
    probs = predictor.predict_arrays([load_rgb(p) for p in paths])["probs"]
    return probs[:, [list(predictor.classes).index(c) for c in HAM_CLASSES]]


def test_peer_columns_land_on_their_ham_class(ham_lesions: pd.DataFrame) -> None:
    one_hot = np.eye(7)[[PEER_ORDER.index(d) for d in ham_lesions["dx"]]]
    mapped = to_ham7(one_hot, PEER_ORDER)
    assert [HAM_CLASSES[i] for i in mapped.argmax(axis=1)] == ham_lesions["dx"].tolist()
    with pytest.raises(ValueError, match="seven HAM10000 classes"):
        to_ham7(one_hot, [*PEER_ORDER[:6], "scc"])


def test_paired_difference_on_real_lesion_groups(predictor, ham_lesions: pd.DataFrame) -> None:
    ours = _probs(predictor, ham_lesions["image_path"].tolist())
    truth = np.eye(7)[[HAM_CLASSES.index(d) for d in ham_lesions["dx"]]]
    args = (ham_lesions["dx"].tolist(), ham_lesions["lesion_id"].tolist(), HAM_CLASSES, 300)
    same = paired_scores(ours, ours, *args)
    assert same["n_lesions"] == ham_lesions["lesion_id"].nunique() < same["n_images"]
    assert same["difference"]["balanced_accuracy"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    vs_perfect = paired_scores(ours, truth, *args)
    diff, mine = vs_perfect["difference"]["balanced_accuracy"], vs_perfect["dermlens"]["balanced_accuracy"]
    assert vs_perfect["peer"]["balanced_accuracy"]["value"] == 1.0
    assert diff["value"] == pytest.approx(mine["value"] - 1.0)
    assert diff["ci_low"] == pytest.approx(mine["ci_low"] - 1.0) and diff["ci_high"] <= 0.0


def test_isic2017_figures_follow_the_external_definitions(predictor, data_root) -> None:
    labels = pd.read_csv(data_root / "isic2017" / "ISIC-2017_labels.csv")
    labels["dx"] = np.where(
        labels["melanoma"] == 1, "mel", np.where(labels["seborrheic_keratosis"] == 1, "bkl", "nv")
    )
    test = labels[labels["split"] == "test"].groupby("dx").head(12)
    dx = test["dx"].to_numpy()
    ours = _probs(predictor, [str(data_root / "isic2017" / "images" / f"{i}.jpg") for i in test["image_id"]])
    scores = paired_scores(ours, ours, dx.tolist(), test["image_id"].tolist(), ISIC2017_CLASSES, 50)
    reference = isic2017_scores(ours, HAM_CLASSES, dx.tolist(), 50)
    assert scores["dermlens"]["melanoma_auc"]["value"] == pytest.approx(reference["melanoma_auc"]["value"])
    bal_acc = reference["three_class"]["balanced_accuracy"]["value"]
    assert scores["dermlens"]["balanced_accuracy"]["value"] == pytest.approx(bal_acc)
