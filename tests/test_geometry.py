"""The one Preprocessing's geometry on a real 3:2 image: squash (old cards), crop keeps the centre, pad
keeps the whole image; the cache builder and the runtime fit images through the same function."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dermlens.bundle import BundleError, ModelCard, read_card
from dermlens.data.cache import build_cache, cache_is_current
from dermlens.data.manifest import read_manifest
from dermlens.preprocess import Preprocessing, load_rgb

PREP = Preprocessing(120, 160, "bilinear", (0.5,) * 3, (0.5,) * 3)  # 4:3, like the model


@pytest.fixture(scope="module")
def wide(ham_root) -> np.ndarray:
    """A real dermoscopy image (stored at 200x150) cut to 3:2 (200x133): wider than the model's 4:3."""
    return load_rgb(ham_root / "images" / "ISIC_0024306.jpg")[8:141]


def resized(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def test_cards_without_fit_squash(wide):
    old = {k: v for k, v in PREP.to_dict().items() if k != "fit"}
    prep = Preprocessing.from_dict(old)
    assert prep.fit == "squash" and prep.cache_name == "images_120x160.npy"
    assert np.array_equal(prep.resize(wide), resized(wide, 120, 160))  # the whole image, aspect lost


def test_crop_keeps_the_centre(wide):
    out = replace(PREP, fit="crop").resize(wide)
    assert out.shape == (120, 160, 3)
    assert wide.shape[:2] == (133, 200)
    centre = wide[:, 11:188]  # 133 x 177.3 -> 177 wide, centred: 4:3
    assert np.array_equal(out, resized(centre, 120, 160))
    assert not np.array_equal(out, resized(wide, 120, 160))


@pytest.mark.parametrize("fit", ["pad", "pad_mean"])
def test_pad_keeps_the_whole_image(wide, fit):
    out = replace(PREP, fit=fit).resize(wide)
    assert out.shape == (120, 160, 3)
    inner = resized(wide, 106, 160)  # 200x133 at scale 160/200: the whole image, aspect kept
    top = (120 - 106) // 2
    assert np.array_equal(out[top : top + 106], inner)
    if fit == "pad":  # reflection: the band above mirrors the image's first rows (edge row not repeated)
        assert np.array_equal(out[top - 1], inner[1]) and np.array_equal(out[top - 3], inner[3])
    else:  # the image's mean colour
        mean = np.round(inner.reshape(-1, 3).mean(axis=0))
        assert np.array_equal(out[0, 0], mean) and np.array_equal(out[-1, -1], mean)


def test_model_sized_images_pass_unchanged(wide):
    small = resized(wide, 120, 160)
    for fit in ("squash", "crop", "pad", "pad_mean"):
        assert np.array_equal(replace(PREP, fit=fit).resize(small), small)


def test_unknown_fit_is_refused(predictor, tmp_path):
    with pytest.raises(ValueError, match="fit 'zoom' is not one of squash"):
        Preprocessing.from_dict({**PREP.to_dict(), "fit": "zoom"})
    card = json.loads((predictor.bundle_dir / "card.json").read_text())
    assert card["preprocessing"].get("fit", "squash") == "squash" == predictor.prep.fit  # the shipped card
    old = {k: v for k, v in card["preprocessing"].items() if k != "fit"}
    assert Preprocessing.from_dict(old).fit == "squash"  # a card written before the key existed
    card["preprocessing"]["fit"] = "zoom"
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="fit"):
        read_card(tmp_path)


def test_card_carries_the_fit(predictor):
    card = predictor.card.to_dict()
    card["preprocessing"]["fit"] = "pad"
    again = ModelCard.from_dict(json.loads(json.dumps(ModelCard.from_dict(card).to_dict())))
    assert again.preprocessing.fit == "pad" and again.preprocessing.to_dict()["fit"] == "pad"


def test_cache_and_runtime_fit_alike(ham_small_prepared, predictor, tmp_path):
    df = read_manifest(ham_small_prepared).head(4)
    prep = Preprocessing(96, 96, "bilinear", (0.5,) * 3, (0.5,) * 3, "shades_of_gray", "crop")  # 4:3 -> 1:1
    path = build_cache(df, tmp_path, prep, workers=1, progress=False)
    assert path.name == "images_96x96_crop_shades_of_gray.npy" and cache_is_current(tmp_path, df, prep)
    assert not cache_is_current(tmp_path, df, replace(prep, fit="pad"))
    cached = np.load(path)
    rgbs = [load_rgb(p) for p in df["image_path"]]
    assert np.array_equal(cached[0], prep.resize(centre_square(rgbs[0])))
    predictor_prep = predictor.prep
    try:
        predictor.prep = prep
        assert np.array_equal(cached, predictor.prepare(rgbs))
    finally:
        predictor.prep = predictor_prep


def centre_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return rgb[:, (w - h) // 2 : (w - h) // 2 + h]
