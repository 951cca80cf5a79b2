"""The "not dermoscopy" signal: a logistic head on the model's embedding, trained to tell dermoscopic
images from synthetic clinical-like (naked-eye, phone-like) views of the same training images.

A clinical-like view removes what a dermoscope gives: it zooms out so the lesion is small in a field of
skin (no dark dermoscope circle), or crops the circle away, changes white balance and lighting, may add
flash glare, a perspective tilt, blur, sensor noise and JPEG compression. Views are deterministic for a
seed. Scoring (dermlens.infer.ood.not_dermoscopy_score) is embedding_l2 . w + b (a logit; higher = less
like dermoscopy).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from dermlens.extras import require
from dermlens.infer.ood import l2_normalize

# Skin tones (RGB) for the field around a zoomed-out lesion: Fitzpatrick I-VI, as photographed.
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (236, 202, 180),
    (226, 185, 160),
    (210, 161, 128),
    (188, 134, 100),
    (150, 100, 70),
    (100, 66, 46),
)
FAMILIES: tuple[str, ...] = ("zoom_out", "decircle")


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))


def _skin_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photographed skin background: a tone, smooth shading, fine texture (float 0..255)."""
    tone = np.array(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], np.float64)
    tone = tone * rng.uniform(0.9, 1.1, 3)
    small = rng.normal(1.0, 0.06, size=(4, 5, 1))
    shade = _resize(((small.repeat(3, 2) * 127).clip(0, 255)).astype(np.uint8), (w, h)) / 127.0
    grain = rng.normal(0.0, 4.0, size=(h, w, 1))
    return np.clip(tone * shade + grain, 0, 255)


def _centre(img: np.ndarray, frac: float) -> np.ndarray:
    """The central `frac` of each side (drops the dermoscope's dark corners)."""
    h, w = img.shape[:2]
    ch, cw = int(h * frac), int(w * frac)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


def zoom_out(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The lesion photographed from further away: a small, feathered patch in a field of skin."""
    h, w = img.shape[:2]
    patch = _centre(img, rng.uniform(0.55, 0.75))
    s = rng.uniform(0.25, 0.6)
    ph, pw = max(8, int(h * s)), max(8, int(w * s))
    patch = _resize(patch, (pw, ph)).astype(np.float64)
    field = _skin_field(rng, h, w)
    # match the patch's surrounding skin brightness to the field so only the lesion stands out
    ring = np.concatenate([patch[:3].reshape(-1, 3), patch[-3:].reshape(-1, 3)])
    patch = patch * (field.reshape(-1, 3).mean(0) / np.maximum(ring.mean(0), 1.0)) ** rng.uniform(0.5, 1.0)
    yy, xx = np.mgrid[0:ph, 0:pw]
    r = np.hypot((yy - ph / 2) / (ph / 2), (xx - pw / 2) / (pw / 2))
    alpha = np.clip((1.0 - r) / 0.35, 0, 1)[..., None]
    y0 = int(rng.integers(0, h - ph + 1))
    x0 = int(rng.integers(0, w - pw + 1))
    out = field.copy()
    region = out[y0 : y0 + ph, x0 : x0 + pw]
    out[y0 : y0 + ph, x0 : x0 + pw] = alpha * np.clip(patch, 0, 255) + (1 - alpha) * region
    return out.astype(np.uint8)


def decircle(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A close-up without the dermoscope: the circle cropped away, fine pigment detail softened."""
    h, w = img.shape[:2]
    c = _centre(img, rng.uniform(0.5, 0.7))
    small = _resize(c, (max(8, int(w * 0.35)), max(8, int(h * 0.35))))
    return _resize(small, (w, h))


def lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White balance, exposure and gamma of a phone camera, with a one-sided illumination gradient."""
    h, w = img.shape[:2]
    x = img.astype(np.float64) / 255.0
    x = x ** rng.uniform(0.75, 1.35) * rng.uniform(0.88, 1.14, 3) * rng.uniform(0.8, 1.2)
    yy, xx = np.mgrid[0:h, 0:w]
    ang = rng.uniform(0, 2 * np.pi)
    g = (np.cos(ang) * (xx / w - 0.5) + np.sin(ang) * (yy / h - 0.5)) * rng.uniform(0.2, 0.6)
    return (np.clip(x * (1.0 + g[..., None]), 0, 1) * 255).astype(np.uint8)


def glare(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Specular highlights of a flash on unpolarised skin: a few soft white spots."""
    h, w = img.shape[:2]
    x = img.astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 8)
        spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        x = x + spot * (255 - x) * rng.uniform(0.5, 0.9)
    return x.clip(0, 255).astype(np.uint8)


def perspective(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tilted camera: a random projective warp, borders filled by stretching the image."""
    h, w = img.shape[:2]
    d = rng.uniform(-0.12, 0.12, size=8) * np.array([w, h] * 4)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    dst = src + d.reshape(4, 2)
    a = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coeffs = np.linalg.solve(np.array(a), src.reshape(-1))
    out = Image.fromarray(img).transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), Image.BILINEAR)
    arr = np.asarray(out)
    blank = arr.sum(axis=2) == 0
    if blank.any():
        arr = arr.copy()
        arr[blank] = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(6)))[blank]
    return arr


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera shake or focus blur, sensor noise and JPEG compression."""
    out = Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    x = np.asarray(out).astype(np.float64) + rng.normal(0, rng.uniform(1, 6), size=img.shape)
    buf = io.BytesIO()
    Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(20, 70)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def clinical_view(img: np.ndarray, rng: np.random.Generator, family: str | None = None) -> np.ndarray:
    """One clinical-like view of a dermoscopic uint8 HxWx3 image (geometry family random unless given)."""
    family = family or FAMILIES[int(rng.integers(len(FAMILIES)))]
    out = zoom_out(img, rng) if family == "zoom_out" else decircle(img, rng)
    out = lighting(out, rng)
    if rng.random() < 0.3:
        out = glare(out, rng)
    if rng.random() < 0.5:
        out = perspective(out, rng)
    if rng.random() < 0.8:
        out = degrade(out, rng)
    return out


def clinical_views(images: np.ndarray, seed: int = 0, family: str | None = None) -> np.ndarray:
    """Clinical-like views (uint8 NxHxWx3, same size) of dermoscopic images, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return np.stack([clinical_view(np.asarray(im), rng, family) for im in images]).astype(np.uint8)


def dermoscopy_jitter(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dermoscopy-preserving variants (flips, mild exposure change): negatives, so the head does not learn
    'any change' as 'not dermoscopy'."""
    rng = np.random.default_rng(seed)
    out = []
    for im in np.asarray(images):
        x = im[:, ::-1] if rng.random() < 0.5 else im
        x = x[::-1] if rng.random() < 0.5 else x
        x = np.clip(x.astype(np.float64) * rng.uniform(0.9, 1.1, 3), 0, 255)
        out.append(x.astype(np.uint8))
    return np.stack(out)


def fit_head(emb_in: np.ndarray, emb_out: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, float]:
    """Logistic regression (scikit-learn) on standardized L2-normalized embeddings; returns (w, b) that act
    on the L2-normalized embedding directly."""
    LogisticRegression = require("sklearn.linear_model", "evaluate").LogisticRegression

    x = l2_normalize(np.concatenate([emb_in, emb_out]))
    y = np.r_[np.zeros(len(emb_in)), np.ones(len(emb_out))]
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000).fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    return w, float(clf.intercept_[0] - (w * mu).sum())


__all__ = ["FAMILIES", "clinical_view", "clinical_views", "dermoscopy_jitter", "fit_head"]
