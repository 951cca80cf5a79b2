"""Model-input preprocessing shared by training, the cache, export and the torch-free runtime.

Needs only numpy and Pillow. Decoding accepts only the formats of configs/decode.yaml (JPEG/PNG/BMP/
TIFF/WebP) in any mode and bit depth, applies EXIF orientation, and guards against decompression bombs.
DICOM colour photographs (also allow-listed) are decoded by dermlens.dicom (the `dicom` extra).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from dermlens import config as configuration
from dermlens.errors import ImageDecodeError  # noqa: F401 (re-exported)

# The decoder's pixel limit when none is given: the upload limit of configs/serve.yaml (one source).
DEFAULT_MAX_PIXELS: int = int(configuration.packaged("serve")["limits"]["max_pixels"])
COLOR_CONSTANCY: tuple[str, ...] = ("none", "shades_of_gray")
# How an image of another aspect ratio meets the model's (height, width): squash (resize, aspect lost; what
# cards without the key mean), crop (centre crop to the model aspect), pad (letterbox by reflection) or
# pad_mean (letterbox with the image's mean colour).
FITS: tuple[str, ...] = ("squash", "crop", "pad", "pad_mean")


@dataclass(frozen=True)
class ImageInfo:
    """What an image header says: size and Pillow mode (bit depth), and the memory a decode needs."""

    width: int
    height: int
    mode: str

    @property
    def decoded_bytes(self) -> int:
        return decoded_bytes(self.mode, self.width, self.height)


@dataclass(frozen=True)
class Preprocessing:
    """Resize-and-normalize parameters; one instance travels with each model."""

    height: int
    width: int
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_constancy: str = "none"  # none | shades_of_gray (Finlayson & Trezzi 2004, p = 6)
    fit: str = "squash"  # squash | crop | pad | pad_mean (see FITS)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From a card or config dict; a missing `fit` (cards written before it existed) means squash."""
        cc = str(d.get("color_constancy") or "none")
        if cc not in COLOR_CONSTANCY:
            raise ValueError(f"color_constancy {cc!r} is not one of {'|'.join(COLOR_CONSTANCY)}")
        fit = str(d.get("fit") or "squash")
        if fit not in FITS:
            raise ValueError(f"fit {fit!r} is not one of {'|'.join(FITS)}")
        mean, std = tuple(d["mean"]), tuple(d["std"])
        return cls(int(d["height"]), int(d["width"]), str(d["resample"]), mean, std, cc, fit)

    @classmethod
    def default(cls) -> Preprocessing:
        """The project default, from configs/preprocess.yaml."""
        return cls.from_dict(configuration.load("preprocess"))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @property
    def geometry(self) -> Preprocessing:
        """The resize step alone (no colour constancy): for shrinking decoded images early, before
        `Predictor.predict_arrays` applies the whole preprocessing once."""
        return replace(self, color_constancy="none")

    @property
    def cache_name(self) -> str:
        """File name of the decoded-image cache built with this preprocessing."""
        tag = "" if self.color_constancy == "none" else f"_{self.color_constancy}"
        fit = "" if self.fit == "squash" else f"_{self.fit}"
        return f"images_{self.height}x{self.width}{fit}{tag}.npy"

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> the model's uint8 input: fitted to (height, width), colour constancy applied."""
        if rgb.shape[:2] != (self.height, self.width):
            rgb = fit_image(rgb, self.height, self.width, self.fit, self.resample)
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


def fit_image(
    rgb: np.ndarray, height: int, width: int, fit: str = "squash", resample: str = "bilinear"
) -> np.ndarray:
    """HxWx3 uint8 -> (height, width) by `fit`: squash, crop (centre, model aspect) or pad (letterbox)."""
    if fit == "crop":
        rgb = centre_crop(rgb, width / height)
    elif fit in ("pad", "pad_mean"):
        h, w = rgb.shape[:2]
        scale = min(height / h, width / w)
        inner = _resized(rgb, max(1, round(h * scale)), max(1, round(w * scale)), resample)
        return letterbox(inner, height, width, "reflect" if fit == "pad" else "mean")
    return _resized(rgb, height, width, resample)


def _resized(rgb: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    filt = getattr(Image.Resampling, resample.upper())
    return np.asarray(Image.fromarray(rgb).resize((width, height), filt))


def centre_crop(rgb: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centred window of `rgb` whose width / height is `aspect`."""
    h, w = rgb.shape[:2]
    if w > h * aspect:
        cw = max(1, round(h * aspect))
        return rgb[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    ch = max(1, round(w / aspect))
    return rgb[(h - ch) // 2 : (h - ch) // 2 + ch]


def letterbox(rgb: np.ndarray, height: int, width: int, fill: str = "reflect") -> np.ndarray:
    """Pad `rgb` (at most height x width) evenly to (height, width) by reflection or its mean colour."""
    h, w = rgb.shape[:2]
    top, left = (height - h) // 2, (width - w) // 2
    pads = ((top, height - h - top), (left, width - w - left), (0, 0))
    if fill == "mean":
        out = np.empty((height, width, 3), np.uint8)
        out[:] = np.round(rgb.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        out[top : top + h, left : left + w] = rgb
        return out
    return np.pad(rgb, pads, mode="reflect" if min(h, w) > 1 else "edge")


def shades_of_gray(rgb: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy: scale channels so the image's Minkowski-p mean colour is grey."""
    x = rgb.astype(np.float32)
    illum = np.power(np.mean(np.power(x, power), axis=(0, 1)), 1.0 / power)
    gain = np.sqrt(3.0) * illum / max(float(np.linalg.norm(illum)), 1e-6)
    return np.clip(x / np.maximum(gain, 1e-6) + 0.5, 0, 255).astype(np.uint8)


def data_white(arr: np.ndarray) -> float:
    """The value that maps to 255 for a single-channel image deeper than 8 bits, from the data's range.

    Float data: 1.0 if its maximum is <= 1 (a [0, 1] image), else 255 if <= 255, else its maximum.
    Integer data: 2**b - 1 for the smallest b of 8, 10, 12, 14, 16 that holds its maximum (12-bit data in
    a 16-bit file has a maximum below 4096 and is scaled as 12-bit), else its maximum. So an image is scaled
    by the depth its data use, not by its container's type; the darkest values stay 0."""
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    top = float(finite.max()) if finite.size else 0.0
    if arr.dtype.kind == "f":
        return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
    return next((float(2**b - 1) for b in (8, 10, 12, 14, 16) if top < 2**b), top)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, I, F...) to 8-bit RGB; deep modes by `data_white`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)  # native depth: no float64 copy of the whole image
        white = data_white(arr)
        out = np.empty(arr.shape, np.uint8)
        for s in range(0, arr.shape[0], 256):  # float temporaries for 256 rows at a time
            rows = np.nan_to_num(arr[s : s + 256].astype(np.float32), nan=0.0)
            out[s : s + 256] = np.clip(rows / white * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(out, "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


@functools.cache
def decode_config() -> dict:
    """configs/decode.yaml: the allow-listed formats (magic bytes, Pillow plugin) and bytes per mode."""
    return configuration.load("decode")


def image_suffixes() -> tuple[str, ...]:
    """File suffixes of the allow-listed formats (configs/decode.yaml), lower case."""
    return tuple(str(s).lower() for s in decode_config()["suffixes"])


def find_image(folder: Path, stem: str) -> Path | None:
    """FOLDER/STEM.<suffix> for the first image suffix (lower, then upper case) that exists, else None."""
    for suffix in image_suffixes():
        for s in (suffix, suffix.upper()):
            if (folder / f"{stem}{s}").is_file():
                return folder / f"{stem}{s}"
    return None


def sniff_format(head: bytes) -> str | None:
    """The allow-listed format whose magic bytes `head` carries, or None. File names are never trusted.

    Formats decoded by their own module (DICOM) are tried first: a DICOM preamble may hold a TIFF header."""
    formats = sorted(decode_config()["formats"].items(), key=lambda kv: "pillow" in kv[1])
    for key, spec in formats:
        checks = [(int(off), bytes.fromhex(hx)) for off, hx in (m.split(":") for m in spec["magic"])]
        if all(head[off : off + len(magic)] == magic for off, magic in checks):
            return key
    return None


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Memory a decode needs: pixels x (bytes per pixel at the file's depth + the 8-bit RGB copy)."""
    table = decode_config()["mode_bytes"]
    per_pixel = table[mode] if mode in table else 4 * Image.getmodebands(mode)
    return width * height * (int(per_pixel) + 3)


def _fail(name: str, code: str, reason: str, detail: str | None = None) -> ImageDecodeError:
    """An ImageDecodeError: `reason` in our words (safe to show anyone), `detail` only in the message."""
    err = ImageDecodeError(f"{name}: {reason}" + (f" ({detail})" if detail else ""))
    err.code, err.reason = code, reason
    return err


def _open_checked(fh: BinaryIO, name: str, max_pixels: int, max_bytes: int | None) -> Image.Image:
    """Open `fh` with the one Pillow plugin its magic bytes name; check pixels and decoded bytes."""
    spec = decode_config()["formats"].get(_sniff(fh) or "", {})
    if "pillow" not in spec:  # (a format decoded by its own module adds its branch to _decode)
        allowed = ", ".join(sorted({s.get("pillow", k) for k, s in decode_config()["formats"].items()}))
        raise _fail(name, "unsupported_format", f"not a supported image format ({allowed})")
    img = Image.open(fh, formats=[spec["pillow"]])
    if img.width * img.height > max_pixels:
        raise _fail(
            name, "image_too_large", f"{img.width}x{img.height} exceeds the {max_pixels:,}-pixel limit"
        )
    need = decoded_bytes(img.mode, img.width, img.height)
    if max_bytes is not None and need > max_bytes:
        raise _fail(
            name, "image_too_large", f"decoding needs {need:,} bytes, over the {max_bytes:,}-byte limit"
        )
    return img


def _sniff(fh: BinaryIO) -> str | None:
    head = fh.read(132)
    fh.seek(0)
    return sniff_format(head)


def dicom_info(header: object, max_pixels: int, max_bytes: int | None, name: str = "<upload>") -> ImageInfo:
    """ImageInfo of a DICOM photograph from its header (bytes, or a pydicom header already read)."""
    from dermlens.dicom import DicomError, header_size

    try:
        width, height = header_size(header, max_pixels, name, max_bytes)
    except DicomError as e:
        raise _dicom_fail(name, e) from e
    return ImageInfo(width, height, "RGB")


def _dicom_rgb(data: bytes, name: str, max_pixels: int, max_bytes: int | None) -> np.ndarray:
    """A DICOM colour photograph decoded by dermlens.dicom (the `dicom` extra), within the limits."""
    from dermlens.dicom import DicomError, decode

    try:
        return decode(data, max_pixels, name, max_bytes)
    except DicomError as e:
        raise _dicom_fail(name, e) from e


def _dicom_fail(name: str, e: Exception) -> ImageDecodeError:
    """DICOM's own refusal as the loader's error, keeping its code and one-line reason."""
    return _fail(name, getattr(e, "code", "unsupported_format"), str(e).removeprefix(f"{name}: "))


def probe(source: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> ImageInfo:
    """Format, size, mode and decode memory of encoded image bytes, from the header only."""
    return _decode(
        source,
        max_pixels,
        max_bytes,
        lambda img: ImageInfo(img.width, img.height, img.mode),
        lambda data, name: dicom_info(data, max_pixels, max_bytes, name),
    )


def load_rgb(
    source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
) -> np.ndarray:
    """Decode a file path or bytes into an HxWx3 uint8 RGB array, EXIF orientation applied.

    Only the formats of configs/decode.yaml reach a decoder; every failure is an ImageDecodeError. Images
    deeper than 8 bits are scaled by the depth their data use (see `data_white`): a float image in [0, 1]
    is multiplied by 255, 12-bit data in a 16-bit file are scaled as 12-bit.
    """
    return _decode(
        source,
        max_pixels,
        max_bytes,
        lambda img: np.asarray(_to_rgb(_loaded(img))),
        lambda data, name: _dicom_rgb(data, name, max_pixels, max_bytes),
    )


def _loaded(img: Image.Image) -> Image.Image:
    img.load()
    return ImageOps.exif_transpose(img)


def _decode(
    source: str | Path | bytes, max_pixels: int, max_bytes: int | None, then: Callable, dicom: Callable
):
    """Open `source`, dispatch by magic bytes (DICOM to `dicom(bytes, name)`, the rest to Pillow and
    `then(image)`), and turn every failure into one ImageDecodeError."""
    name = "<upload>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes) and not source:
        raise _fail(name, "empty_file", "empty file")
    if not isinstance(source, bytes) and Path(source).exists() and not Path(source).is_file():
        raise _fail(name, "unreadable", "not a regular file (a folder, FIFO or device)")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise _fail(name, "unreadable", f"cannot open ({e.strerror or e})") from e
    with fh:
        try:
            if decode_config()["formats"].get(_sniff(fh) or "", {}).get("module") == "dermlens.dicom":
                return dicom(fh.read(), name)
            return then(_open_checked(fh, name, max_pixels, max_bytes))
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:
            raise _fail(name, "image_too_large", "image exceeds the decompression-bomb limit") from e
        except MemoryError as e:
            raise _fail(name, "image_too_large", "image too large to decode in memory") from e
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's error, never a crash
            raise _fail(name, "corrupt_image", "corrupt or truncated image", type(e).__name__) from e
