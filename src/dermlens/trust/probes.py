"""Deterministic out-of-distribution probe sets: images that are not dermoscopy, at the model's input size.

Sources are the sample images inside the scikit-image wheel (no downloads) and synthetic patterns.
Every set is a uint8 NxHxWx3 array made with the project's Preprocessing.resize, like a user's upload.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from dermlens.extras import require
from dermlens.preprocess import Preprocessing

# skimage.data loaders that ship inside the wheel (no pooch download).
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "horse",
    "brick",
    "grass",
    "gravel",
    "clock",
    "colorwheel",
    "logo",
    "checkerboard",
)
MODALITIES: tuple[str, ...] = (
    "retina",
    "microaneurysms",
    "immunohistochemistry",
    "cell",
    "hubble_deep_field",
    "shepp_logan_phantom",
)
SETS: tuple[str, ...] = (
    "skimage_photos",
    "skimage_crops",
    "skimage_transformed",
    "other_modalities",
    "synthetic",
)
# Dermoscopy made wrong (needs in-distribution images): reported apart, not part of the far-OOD target.
NEAR_SETS: tuple[str, ...] = ("ham_corrupted",)


def _to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    """Any skimage sample (bool, float, gray, RGBA) -> HxWx3 uint8."""
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
        a = (a * 255 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float64) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def skimage_image(name: str) -> np.ndarray:
    """One scikit-image sample image as RGB uint8 (motorcycle_left/right come from stereo_motorcycle)."""
    data = require("skimage", "evaluate").data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        return _to_rgb_uint8(left if name == "motorcycle_left" else right)
    return _to_rgb_uint8(getattr(data, name)())


def _crop(img: np.ndarray, rng: np.random.Generator, scale: float, aspect: float) -> np.ndarray:
    """Random crop covering `scale` of the shorter side with width/height = aspect."""
    h, w = img.shape[:2]
    ch = max(8, int(min(h, w / aspect) * scale))
    cw = max(8, int(ch * aspect))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    return img[y : y + ch, x : x + cw]


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def _gray(img: np.ndarray) -> np.ndarray:
    g = (img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _tile(imgs: list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """2x2 mosaic of four images at half the model size each."""
    h, w = prep.height // 2, prep.width // 2
    small = [np.asarray(Image.fromarray(i).resize((w, h), Image.Resampling.BILINEAR)) for i in imgs]
    return np.concatenate([np.concatenate(small[:2], 1), np.concatenate(small[2:], 1)], 0)


def _resize_all(imgs: list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    return np.stack([prep.resize(np.ascontiguousarray(i)) for i in imgs])


def _photos() -> list[np.ndarray]:
    return [skimage_image(n) for n in (*PHOTOS, "motorcycle_left", "motorcycle_right")]


def skimage_photos(prep: Preprocessing, seed: int = 0) -> np.ndarray:
    """Whole natural photos, textures and documents from scikit-image (19 images)."""
    return _resize_all(_photos(), prep)


def skimage_crops(prep: Preprocessing, seed: int = 0, per_scale: int = 4) -> np.ndarray:
    """Random crops at scales 0.3/0.5/0.75 of each photo, model aspect, random flips (228 images)."""
    rng = np.random.default_rng(seed)
    aspect = prep.width / prep.height
    out = []
    for img in _photos():
        for scale in (0.3, 0.5, 0.75):
            for _ in range(per_scale):
                c = _crop(img, rng, scale, aspect)
                out.append(c[:, ::-1] if rng.random() < 0.5 else c)
    return _resize_all(out, prep)


def skimage_transformed(prep: Preprocessing, seed: int = 0) -> np.ndarray:
    """Each photo grayscale, colour-inverted, heavily blurred, and 2x2 mosaics of photos (~95 images)."""
    rng = np.random.default_rng(seed)
    photos = [prep.resize(p) for p in _photos()]
    out = []
    for p in photos:
        out += [_gray(p), 255 - p, _blur(p, 8.0), np.ascontiguousarray(p[::-1, ::-1])]
    for _ in range(19):
        idx = rng.choice(len(photos), 4, replace=False)
        out.append(_tile([photos[i] for i in idx], prep))
    return _resize_all(out, prep)


def other_modalities(prep: Preprocessing, seed: int = 0, crops: int = 12) -> np.ndarray:
    """Other imaging modalities: fundus, histology, microscopy, astronomy, CT phantom, faces; plus crops."""
    data = require("skimage", "evaluate").data

    rng = np.random.default_rng(seed)
    aspect = prep.width / prep.height
    out = []
    for name in MODALITIES:
        img = skimage_image(name)
        out.append(img)
        for i in range(crops):
            out.append(_crop(img, rng, (0.3, 0.5, 0.75)[i % 3], aspect))
    faces = data.lfw_subset()
    for i in rng.choice(len(faces), 24, replace=False):
        out.append(_to_rgb_uint8(faces[i]))
    return _resize_all(out, prep)


def _smooth_field(rng: np.random.Generator, prep: Preprocessing, cells: int) -> np.ndarray:
    """Low-frequency colour noise: a cells x cells random grid upsampled bicubically."""
    small = rng.integers(
        0, 256, size=(cells, max(2, int(cells * prep.width / prep.height)), 3), dtype=np.uint8
    )
    return np.asarray(Image.fromarray(small).resize((prep.width, prep.height), Image.Resampling.BICUBIC))


def synthetic(prep: Preprocessing, seed: int = 0) -> np.ndarray:
    """Uniform colours (incl. skin tones), pixel noise, smooth noise, gradients, checkerboards (108)."""
    rng = np.random.default_rng(seed)
    h, w = prep.height, prep.width
    out: list[np.ndarray] = []
    skin = [(255, 224, 196), (234, 192, 134), (198, 134, 66), (141, 85, 36), (224, 172, 105), (241, 194, 125)]
    colours = skin + [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(14)]
    colours += [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
    out += [np.full((h, w, 3), c, np.uint8) for c in colours]
    for _ in range(15):
        out.append(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    for _ in range(15):
        g = np.clip(rng.normal(128, 40, size=(h, w, 1)), 0, 255).astype(np.uint8)
        out.append(np.repeat(g, 3, axis=2))
    for i in range(30):
        out.append(_smooth_field(rng, prep, (2, 4, 8, 16, 32)[i % 5]))
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    for _ in range(15):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (xx if rng.random() < 0.5 else yy)[..., None]
        out.append((a * (1 - t) + b * t + 0.5).astype(np.uint8))
    for sq in (4, 8, 16, 25, 50):
        board = ((np.arange(h)[:, None] // sq + np.arange(w)[None, :] // sq) % 2).astype(np.uint8) * 255
        out.append(np.repeat(board[..., None], 3, axis=2))
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out.append(np.where(board[..., None] > 0, a, b).astype(np.uint8))
    return np.stack(out)


def ham_corrupted(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Near-OOD from in-distribution images (uint8 NHWC): colour-inverted, 5x5 jigsaw-shuffled, blur r=10."""
    rng = np.random.default_rng(seed)
    out = []
    for i, img in enumerate(np.asarray(images)):
        kind = i % 3
        if kind == 0:
            out.append(255 - img)
        elif kind == 1:
            h, w = img.shape[:2]
            ph, pw = h // 5, w // 5
            tiles = [img[y * ph : (y + 1) * ph, x * pw : (x + 1) * pw] for y in range(5) for x in range(5)]
            order = rng.permutation(25)
            rows = [np.concatenate([tiles[order[r * 5 + c]] for c in range(5)], 1) for r in range(5)]
            shuffled = np.array(img)
            shuffled[: 5 * ph, : 5 * pw] = np.concatenate(rows, 0)
            out.append(shuffled)
        else:
            out.append(_blur(np.ascontiguousarray(img), 10.0))
    return np.stack(out).astype(np.uint8)


_BUILDERS = {
    "skimage_photos": skimage_photos,
    "skimage_crops": skimage_crops,
    "skimage_transformed": skimage_transformed,
    "other_modalities": other_modalities,
    "synthetic": synthetic,
}


def probe_sets(
    prep: Preprocessing | None = None, names: tuple[str, ...] = SETS, seed: int = 0
) -> dict[str, np.ndarray]:
    """Named probe sets -> uint8 NxHxWx3 arrays at the model's input size (deterministic for a seed)."""
    prep = prep or Preprocessing.default()
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown probe sets {unknown}; choose from {SETS}")
    return {n: _BUILDERS[n](prep, seed=seed) for n in names}
