"""Trust: OOD scores separate non-dermoscopy probes from real HAM images; thresholds keep 95% of val."""

from __future__ import annotations

import numpy as np
import pytest

from _ham import ham_reference, imagenet_features
from dermlens.bundle import release_dir
from dermlens.infer.ood import energy_score, knn_score, mahalanobis_score, msp_score
from dermlens.infer.state import TrustState
from dermlens.metrics import auroc
from dermlens.preprocess import Preprocessing
from dermlens.trust.ood import fit_gaussian, threshold_for_keep

skimage = pytest.importorskip("skimage", reason="probe sets need scikit-image (dev/evaluate dependency)")
from dermlens.trust import probes  # noqa: E402


@pytest.fixture(scope="module")
def probe_images() -> dict[str, np.ndarray]:
    """A lean slice of each far-OOD probe set at the model size."""
    sets = probes.probe_sets(Preprocessing.default(), ("skimage_photos", "other_modalities", "synthetic"))
    return {
        "skimage_photos": sets["skimage_photos"],
        "other": np.concatenate([sets["other_modalities"][::5], sets["synthetic"][::5]]),
    }


@pytest.fixture(scope="module")
def embeddings(probe_images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ImageNet-backbone embeddings: HAM fit/val/held-out lesions (disjoint) and the probes."""
    fit, val, held = ham_reference(15, 0), ham_reference(10, 15), ham_reference(10, 25)
    return {
        "fit": fit["embedding"],
        "fit_y": fit["labels"],
        "val": val["embedding"],
        "held": held["embedding"],
        "photos": imagenet_features(probe_images["skimage_photos"])["embedding"],
        "other": imagenet_features(probe_images["other"])["embedding"],
    }


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 60).astype(float), rng.integers(2, 8, 40).astype(float)
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert auroc(a, b) == pytest.approx(pairs)
    assert auroc(np.zeros(3), np.ones(3)) == 1.0


def test_logit_scores_rank_confident_as_in_distribution() -> None:
    logits = np.array([[9.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    assert msp_score(logits)[0] < msp_score(logits)[1]
    assert energy_score(logits)[0] < energy_score(logits)[1]


def test_probe_sets_are_deterministic_and_model_sized() -> None:
    prep = Preprocessing.default()
    a = probes.probe_sets(prep, ("skimage_photos", "synthetic"), seed=3)
    b = probes.probe_sets(prep, ("skimage_photos", "synthetic"), seed=3)
    for name in a:
        assert a[name].dtype == np.uint8 and a[name].shape[1:] == (prep.height, prep.width, 3)
        assert np.array_equal(a[name], b[name])
    assert len(a["skimage_photos"]) >= 15
    with pytest.raises(ValueError, match="unknown probe sets"):
        probes.probe_sets(prep, ("nope",))


def test_feature_scores_separate_skimage_photos_from_ham(embeddings: dict[str, np.ndarray]) -> None:
    means, precision, alpha = fit_gaussian(embeddings["fit"], embeddings["fit_y"], 7)
    assert 0 <= alpha <= 1
    maha = {k: mahalanobis_score(embeddings[k], means, precision) for k in ("held", "photos", "other")}
    knn = {k: knn_score(embeddings[k], embeddings["fit"], k=5) for k in ("held", "photos", "other")}
    assert auroc(maha["held"], maha["photos"]) >= 0.95
    assert auroc(maha["held"], maha["other"]) >= 0.95
    assert auroc(knn["held"], knn["photos"]) >= 0.95


def test_threshold_keeps_95_percent_of_validation(embeddings: dict[str, np.ndarray]) -> None:
    means, precision, _ = fit_gaussian(embeddings["fit"], embeddings["fit_y"], 7)
    val = mahalanobis_score(embeddings["val"], means, precision)
    t = threshold_for_keep(val, 0.95)
    assert (val <= t).mean() >= 0.95
    # the same threshold refuses most photos and keeps most unseen lesions
    assert (mahalanobis_score(embeddings["photos"], means, precision) > t).mean() >= 0.9
    assert (mahalanobis_score(embeddings["held"], means, precision) <= t).mean() >= 0.8


def test_release_bundle_refuses_skimage_photos(probe_images: dict[str, np.ndarray]) -> None:
    bundle = release_dir()
    if not (bundle / "card.json").is_file() or not (bundle / "trust.npz").is_file():
        pytest.skip(f"no release bundle with trust.npz at {bundle} yet (the release model trains later)")
    from dermlens.infer.predictor import Predictor

    pred = Predictor.load(bundle, precision="fp32", threads=1)
    state: TrustState = pred.trust
    ham = pred.predict_arrays(list(ham_reference(10, 25)["images"]))
    photos = pred.predict_arrays(list(probe_images["skimage_photos"]))
    assert auroc(ham["ood_score"], photos["ood_score"]) >= 0.95
    assert photos["ood"].mean() >= 0.9 and state.val_keep_rate >= 0.95
    assert (~ham["ood"]).mean() >= 0.85
