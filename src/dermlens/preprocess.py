"""Model-input preprocessing shared by training, the cache, export and the torch-free runtime.

Needs only numpy and Pillow. Decoding accepts JPEG/PNG/BMP/TIFF/WebP in any mode and bit depth,
applies EXIF orientation, and guards against decompression bombs.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
COLOR_CONSTANCY: tuple[str, ...] = ("none", "shades_of_gray")


class ImageDecodeError(ValueError):
    """An input that cannot be decoded as an image (names the source)."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize-and-normalize parameters; one instance travels with each model."""

    height: int
    width: int
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_constancy: str = "none"  # none | shades_of_gray (Finlayson & Trezzi 2004, p = 6)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        cc = str(d.get("color_constancy") or "none")
        if cc not in COLOR_CONSTANCY:
            raise ValueError(f"color_constancy {cc!r} is not one of {'|'.join(COLOR_CONSTANCY)}")
        mean, std = tuple(d["mean"]), tuple(d["std"])
        return cls(int(d["height"]), int(d["width"]), str(d["resample"]), mean, std, cc)

    @classmethod
    def default(cls) -> Preprocessing:
        """The project default, from configs/preprocess.yaml."""
        text = resources.files("dermlens.configs").joinpath("preprocess.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @property
    def cache_name(self) -> str:
        """File name of the decoded-image cache built with this preprocessing."""
        tag = "" if self.color_constancy == "none" else f"_{self.color_constancy}"
        return f"images_{self.height}x{self.width}{tag}.npy"

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> the model's uint8 input: resized to (height, width), colour constancy applied."""
        if rgb.shape[:2] != (self.height, self.width):
            filt = getattr(Image.Resampling, self.resample.upper())
            rgb = np.asarray(Image.fromarray(rgb).resize((self.width, self.height), filt))
        return shades_of_gray(rgb) if self.color_constancy == "shades_of_gray" else rgb

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NxHxWx3 (or HxWx3) -> float32 Nx3xHxW normalized model input."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        x = (x / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """One decoded image -> 1x3xHxW float32."""
        return self.normalize(self.resize(rgb))


def shades_of_gray(rgb: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy: scale channels so the image's Minkowski-p mean colour is grey."""
    x = rgb.astype(np.float32)
    illum = np.power(np.mean(np.power(x, power), axis=(0, 1)), 1.0 / power)
    gain = np.sqrt(3.0) * illum / max(float(np.linalg.norm(illum)), 1e-6)
    return np.clip(x / np.maximum(gain, 1e-6) + 0.5, 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, I, F...) to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a file path or bytes into an HxWx3 uint8 RGB array, EXIF orientation applied."""
    name = "<upload>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes) and not source:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageDecodeError(f"{name}: cannot open ({e.strerror or e})") from e
    with fh:
        try:
            img = Image.open(fh)
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"{name}: {img.width}x{img.height} exceeds the {max_pixels:,}-pixel limit"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.asarray(_to_rgb(img))
        except ImageDecodeError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ImageDecodeError(f"{name}: not a readable image ({e})") from e
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from e
