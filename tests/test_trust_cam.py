"""Trust: class activation maps from a real feature map, overlay PNG, and heat-vs-lesion-mask measures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from _ham import ham_sample
from dermlens.bundle import release_dir
from dermlens.infer.cam import cam, jet, overlay_png, upsample
from dermlens.preprocess import load_rgb
from dermlens.settings import data_root
from dermlens.trust.cam import dilated_fraction, heat_in_mask, pointing_hit

IMAGE_ID = "ISIC_0024306"


@pytest.fixture(scope="module")
def lesion() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model-size RGB, its ImageNet-backbone feature map [D,h,w], its lesion mask) for one HAM image."""
    from _ham import imagenet_features
    from dermlens.preprocess import Preprocessing

    prep = Preprocessing.default()
    rgb = prep.resize(load_rgb(data_root() / "ham10000" / "images" / f"{IMAGE_ID}.jpg"))
    fmap = imagenet_features(rgb[None])["feature_map"][0]
    mask = np.asarray(Image.open(data_root() / "ham10000" / "masks" / f"{IMAGE_ID}_segmentation.png")) > 127
    return rgb, fmap, mask


def test_cam_shape_range_and_overlay_png(lesion: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    rgb, fmap, _ = lesion
    weight = np.random.default_rng(0).normal(size=(7, fmap.shape[0])).astype(np.float32)
    heat = cam(fmap, weight, 3)
    assert heat.shape == fmap.shape[1:] and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    big = upsample(heat, rgb.shape[:2])
    assert big.shape == rgb.shape[:2] and big.min() >= 0 and big.max() <= 1
    png = overlay_png(rgb, heat)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (rgb.shape[1], rgb.shape[0]) and img.mode == "RGB"
    # the overlay changes the image where the heat is
    assert not np.array_equal(np.asarray(img), rgb)


def test_cam_of_negative_evidence_is_all_zero() -> None:
    fmap = np.ones((4, 3, 5), np.float32)
    assert cam(fmap, -np.ones((2, 4)), 1).max() == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        cam(fmap, np.ones((2, 3)), 0)


def test_jet_colormap_runs_blue_to_red() -> None:
    c = jet(np.array([[0.0, 0.5, 1.0]]))[0]
    assert c[0, 2] > 100 and c[0, 0] == 0  # cold: blue
    assert c[2, 0] > 100 and c[2, 2] == 0  # hot: red
    assert c[1, 1] == 255  # middle: green-ish


def test_mask_measures_on_a_real_mask(lesion: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, _, mask = lesion
    assert 0.02 < mask.mean() < 0.98
    as_heat = mask.astype(np.float32)
    assert heat_in_mask(as_heat, mask) == pytest.approx(1.0)
    assert pointing_hit(as_heat, mask, 0)
    outside = (~mask).astype(np.float32)
    assert heat_in_mask(outside, mask) == pytest.approx(0.0)
    far = np.unravel_index(np.argmax(outside * np.indices(mask.shape).sum(0)), mask.shape)
    spot = np.zeros(mask.shape, np.float32)
    spot[far] = 1.0
    assert not pointing_hit(spot, mask, 0)
    assert pointing_hit(spot, mask, 10_000)
    # a uniform heat puts the mask's area share inside the lesion: the chance baseline
    assert heat_in_mask(np.ones(mask.shape, np.float32), mask) == pytest.approx(mask.mean())
    assert mask.mean() <= dilated_fraction(mask, 5) <= 1.0


def test_release_bundle_cam_from_onnx() -> None:
    bundle = release_dir()
    if not (bundle / "card.json").is_file() or not (bundle / "trust.npz").is_file():
        pytest.skip(f"no release bundle with trust.npz at {bundle} yet (the release model trains later)")
    from dermlens.infer.predictor import Predictor

    pred = Predictor.load(bundle, precision="fp32", threads=1)
    if pred.trust.cam_weight is None:
        pytest.fail("release trust.npz has no cam_weight")
    prep = pred.prep
    images = np.stack([prep.resize(load_rgb(p)) for p in ham_sample(1, skip=40)["image_path"][:3]])
    out = pred.predict_arrays(list(images), cam=True)
    for heat, rgb in zip(out["cam"], images, strict=True):
        assert heat.ndim == 2 and heat.min() >= 0 and heat.max() <= 1
        assert Image.open(io.BytesIO(overlay_png(rgb, heat))).size == (rgb.shape[1], rgb.shape[0])
