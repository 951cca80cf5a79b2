"""Skin tone per image from its pixels: the individual typology angle (ITA) of the skin outside the lesion
(lesion mask where one exists, else a border ring without the dermoscope vignette) and Del Bino's ITA bands.

CIELAB through scikit-image's rgb2lab (derm-ita, the PyPI package, is unmaintained since 2021 and has no
mask-based strategy). Dermoscopy lighting and colour casts shift ITA: it is a proxy for skin tone, not a
measured Fitzpatrick type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dermlens import config as configuration

MASK = "mask"
RING = "border_ring"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class ItaSettings:
    """configs/skin_tone.yaml."""

    bands: tuple[tuple[str, float], ...]
    work_side: int
    lesion_margin: float
    ring_width: float
    vignette_l: float
    min_pixels: int
    mask_dir: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> ItaSettings:
        """configs/skin_tone.yaml <- an optional YAML file."""
        d = configuration.load("skin_tone", path)
        d["bands"] = tuple((str(n), float(lo)) for n, lo in d["bands"])
        return cls(**d)


@dataclass(frozen=True)
class Ita:
    """One image's ITA (None when too few skin pixels), how the skin was found and how many pixels."""

    ita: float | None
    method: str
    n_pixels: int
    cast: bool = False  # median skin b* <= 0: a blue/grey cast, the ITA is past +-90 degrees


def ita_from_lab(lab: np.ndarray) -> tuple[float, float]:
    """ITA in degrees from CIELAB pixels [..., 3], the angle of (median b*, median L* - 50), i.e.
    arctan((L* - 50) / b*) for b* > 0 and beyond +-90 for a blue or grey cast (b* <= 0); and median b*."""
    lab = np.asarray(lab, np.float64).reshape(-1, 3)
    lightness, b = float(np.median(lab[:, 0])), float(np.median(lab[:, 2]))
    return float(np.degrees(np.arctan2(lightness - 50.0, b))), b


def _small(rgb: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The image reduced to `side` on its longest edge (never enlarged) and the scale used."""
    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    if s == 1.0:
        return rgb, s
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX)), s


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of `radius` pixels (scikit-image)."""
    from skimage.morphology import dilation, disk

    return dilation(mask, disk(radius)) if radius > 0 else mask


def ring(shape: tuple[int, int], width: float) -> np.ndarray:
    """Pixels within `width` x the shorter side of the image border."""
    h, w = shape
    k = max(1, round(width * min(h, w)))
    out = np.zeros((h, w), bool)
    out[:k], out[-k:], out[:, :k], out[:, -k:] = True, True, True, True
    return out


def skin_ita(rgb: np.ndarray, lesion: np.ndarray | None, cfg: ItaSettings) -> Ita:
    """ITA of the skin of an RGB uint8 image: outside the (dilated) lesion mask, else in a border ring;
    pixels darker than the vignette level are left out. Method 'unknown' when too few skin pixels remain."""
    from skimage.color import rgb2lab

    small, _ = _small(np.asarray(rgb, np.uint8), cfg.work_side)
    h, w = small.shape[:2]
    lab = rgb2lab(small)
    if lesion is not None:
        m = np.asarray(Image.fromarray(np.asarray(lesion, np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        skin, method = ~_dilate(m, round(cfg.lesion_margin * max(h, w))), MASK
    else:
        skin, method = ring((h, w), cfg.ring_width), RING
    skin &= lab[..., 0] >= cfg.vignette_l
    n = int(skin.sum())
    if n < cfg.min_pixels:
        return Ita(None, UNKNOWN, n)
    ita, b = ita_from_lab(lab[skin])
    return Ita(ita, method, n, cast=b <= 0)


def band(ita: float | None, bands: tuple[tuple[str, float], ...]) -> str:
    """Name of the first band whose lower edge `ita` exceeds ('unknown' for None)."""
    if ita is None or not np.isfinite(ita):
        return UNKNOWN
    for name, lower in bands:
        if ita > lower:
            return name
    return bands[-1][0]


def load_image(path: str | Path, side: int) -> np.ndarray:
    """RGB uint8 of an image file, decoded at a reduced size where the JPEG allows (EXIF applied)."""
    with Image.open(path) as im:
        scale = side / max(im.size)
        if scale < 1:
            im.draft("RGB", (round(im.size[0] * scale), round(im.size[1] * scale)))
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def load_mask(mask_dir: Path | None, image_id: str) -> np.ndarray | None:
    """The lesion mask <image_id>_segmentation.png from mask_dir (True = lesion), None if absent."""
    if mask_dir is None:
        return None
    p = Path(mask_dir) / f"{image_id}_segmentation.png"
    if not p.is_file():
        return None
    with Image.open(p) as im:
        return np.asarray(im.convert("L")) > 127


def image_itas(frame: Any, mask_dir: Path | None, cfg: ItaSettings) -> list[Ita]:
    """ITA per manifest row (image_id, image_path)."""
    out = []
    for r in frame.itertuples():
        rgb = load_image(r.image_path, 2 * cfg.work_side)
        out.append(skin_ita(rgb, load_mask(mask_dir, str(r.image_id)), cfg))
    return out


__all__ = [
    "Ita",
    "ItaSettings",
    "band",
    "image_itas",
    "ita_from_lab",
    "load_image",
    "load_mask",
    "ring",
    "skin_ita",
]
