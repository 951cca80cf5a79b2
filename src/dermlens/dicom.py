"""DICOM input: read a file's header and decode single-frame colour photographs (RGB or YBR, compressed or
not). Needs the `dicom` extra (pydicom + pixel-data handlers). The tags' age/sex/site in dermlens's
vocabulary come from `dermlens.data.dicom_meta`.

A DICOM file is recognised by its "DICM" preamble at byte 128, never by its name. Anything that is not a
colour photograph (a CT slice, a grey-scale image, a multi-frame cine), and a transfer syntax no installed
decoder reads (JPEG Lossless: its one decoder, pylibjpeg-libjpeg, is GPL and not a dependency), are refused
with a one-line reason. A deflated data set is inflated here, never by pydicom, within bounds set before
inflating (configs/decode.yaml `dicom`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dermlens import config as configuration
from dermlens.errors import DicomError  # noqa: F401 (re-exported)
from dermlens.extras import install_hint

MAGIC_OFFSET = 128
MAGIC = b"DICM"
COLOUR_PHOTOMETRIC = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
PILLOW_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})  # JPEG Baseline/Extended
INSTALL_HINT = install_hint("dicom")
DECODED = "uncompressed, RLE, JPEG Baseline/Extended, JPEG-LS and JPEG 2000"  # with the dicom extra
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
DECODED_BYTES_PER_PIXEL = 6  # the file's 8-bit RGB pixels + the decoded copy (preprocess's RGB mode_bytes)
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def is_dicom_bytes(head: bytes) -> bool:
    """True if `head` (the file's first 132+ bytes) carries the DICOM Part 10 preamble."""
    return head[MAGIC_OFFSET : MAGIC_OFFSET + len(MAGIC)] == MAGIC


def is_dicom_file(path: str | Path) -> bool:
    """True if the file at `path` is a DICOM Part 10 file (False if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return is_dicom_bytes(fh.read(MAGIC_OFFSET + len(MAGIC)))
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DicomError(f"reading DICOM needs pydicom: {INSTALL_HINT}") from None
    return pydicom


def _refuse(name: str, code: str, reason: str) -> DicomError:
    """A DicomError with the decoder's error `code` (corrupt_image, image_too_large, unsupported_format)."""
    err = DicomError(f"{name}: {reason}")
    err.code, err.reason = code, reason
    return err


@functools.cache
def limits() -> dict[str, int]:
    """configs/decode.yaml `dicom`: bounds on what a deflated data set may inflate to."""
    return {k: int(v) for k, v in configuration.load("decode")["dicom"].items()}


@contextlib.contextmanager
def _opened(source: str | Path | bytes | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, bytes | bytearray):
        yield io.BytesIO(source)
    elif isinstance(source, str | Path):
        with open(source, "rb") as fh:
            yield fh
    else:
        yield source


def read_dataset(
    source: str | Path | bytes | BinaryIO,
    pixels: bool = True,
    name: str | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Any:
    """Parse a DICOM file (path, bytes or binary file) into a pydicom Dataset; header only when pixels=False.

    A deflated data set is inflated within bounds (see `_read_deflated`); a pixel read of one also checks
    the photograph and its pixel and byte limits before inflating the pixels."""
    pydicom = _pydicom()
    name = name or (str(source) if isinstance(source, str | Path) else "<upload>")
    try:
        with _opened(source) as fh:
            start = fh.tell()
            pydicom.filereader.read_preamble(fh, False)
            meta = pydicom.filereader._read_file_meta_info(fh)  # the one reader of group 0002 pydicom has
            if str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
                return _read_deflated(fh.read(), meta, pixels, name, max_pixels, max_bytes)
            fh.seek(start)
            return pydicom.dcmread(fh, stop_before_pixels=not pixels)
    except DicomError:
        raise
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, KeyError, EOFError, zlib.error) as e:
        raise _refuse(name, "corrupt_image", f"not a readable DICOM file ({e})") from e


def check_image_class(ds: Any, name: str) -> None:
    """Refuse a dataset whose SOP class is a known non-image object (a structured report, an RT plan, ...)."""
    uid = getattr(ds, "SOPClassUID", None)
    label = getattr(uid, "name", "") if uid else ""
    if label and label != str(uid) and "Image" not in label:
        reason = f"a {label} object ({uid}), not an image; dermlens reads photographs"
        raise _refuse(name, "unsupported_format", reason)


def _read_deflated(
    stream: bytes, meta: Any, pixels: bool, name: str, max_pixels: int | None, max_bytes: int | None
) -> Any:
    """A deflated data set, inflated by us in two bounded steps: the header (up to `max_header_bytes`),
    then, for a pixel read, only what the header's Rows x Columns x 3 need (+ `max_trailer_bytes`)."""
    lim = limits()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(stream, lim["max_header_bytes"] + 1)
    header, at_pixels = _parse_header(head, meta, name, lim["max_header_bytes"])
    if not pixels or at_pixels is None:
        return header
    check_photograph(header, name, max_pixels, pixels=False, max_bytes=max_bytes)
    pixel_bytes = int(header.Rows) * int(header.Columns) * 3
    bound = at_pixels + 12 + pixel_bytes + 1 + lim["max_trailer_bytes"]  # tag, VR, length; odd-length pad
    rest = inflater.decompress(inflater.unconsumed_tail, max(bound + 1 - len(head), 1))
    if len(head) + len(rest) > bound:
        size = f"{int(header.Columns)}x{int(header.Rows)}"
        reason = f"deflated DICOM inflates beyond what its {size} header declares"
        raise _refuse(name, "image_too_large", reason)
    return _parse(head + rest, meta, name)[0]


def _parse_header(head: bytes, meta: Any, name: str, limit: int) -> tuple[Any, int | None]:
    """The header of an inflated prefix; a header that does not end within `limit` bytes is refused."""
    try:
        ds, at_pixels = _parse(head, meta, name, stop_at_pixels=True)
    except (ValueError, KeyError, EOFError, OSError):
        if len(head) <= limit:
            raise
        ds, at_pixels = None, None
    if at_pixels is None and len(head) > limit:
        raise _refuse(name, "image_too_large", f"deflated DICOM header exceeds {limit:,} bytes")
    return ds, at_pixels


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)


def _parse(data: bytes, meta: Any, name: str, stop_at_pixels: bool = False) -> tuple[Any, int | None]:
    """An inflated data set (Explicit VR Little Endian) -> (FileDataset, offset of Pixel Data or None)."""
    pydicom = _pydicom()
    fh = pydicom.filebase.DicomBytesIO(data)
    stop = _at_pixel_data if stop_at_pixels else None
    ds = pydicom.filereader.read_dataset(fh, is_implicit_VR=False, is_little_endian=True, stop_when=stop)
    ds = pydicom.dataset.FileDataset(name, ds, None, meta, is_implicit_VR=False, is_little_endian=True)
    at = fh.tell()
    return ds, (at if stop_at_pixels and data[at : at + 2] == b"\xe0\x7f" else None)


def check_photograph(
    ds: Any, name: str, max_pixels: int | None = None, pixels: bool = True, max_bytes: int | None = None
) -> None:
    """Refuse anything but a single-frame 8-bit colour photograph within the pixel and decoded-byte limits
    (6 bytes a pixel: the RGB pixel data and the decoded copy). pixels=False checks a header alone."""
    check_image_class(ds, name)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    modality = getattr(ds, "Modality", "?")
    if frames > 1:
        raise _refuse(
            name,
            "unsupported_format",
            f"multi-frame DICOM ({frames} frames, modality {modality}) is not a photograph; "
            "dermlens reads single-frame colour images",
        )
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 0) or 0)
    if samples != 3 or photometric not in COLOUR_PHOTOMETRIC:
        raise _refuse(
            name,
            "unsupported_format",
            f"not a colour photograph (modality {modality}, {photometric or 'no'} photometric "
            f"interpretation, {samples} sample(s) per pixel); dermlens reads RGB/YBR colour DICOM images",
        )
    bits = int(getattr(ds, "BitsAllocated", 0) or 0)
    if bits != 8:
        raise _refuse(
            name, "unsupported_format", f"{bits}-bit colour DICOM; dermlens reads 8-bit colour photographs"
        )
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if not rows or not cols or (pixels and "PixelData" not in ds):
        raise _refuse(name, "unsupported_format", "DICOM file holds no image pixels")
    if max_pixels is not None and rows * cols > max_pixels:
        raise _refuse(name, "image_too_large", f"{cols}x{rows} exceeds the {max_pixels:,}-pixel limit")
    if max_bytes is not None and rows * cols * DECODED_BYTES_PER_PIXEL > max_bytes:
        need = rows * cols * DECODED_BYTES_PER_PIXEL
        reason = f"decoding needs {need:,} bytes, over the {max_bytes:,}-byte limit"
        raise _refuse(name, "image_too_large", reason)


def decode(
    source: str | Path | bytes,
    max_pixels: int | None = None,
    name: str | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """A DICOM colour photograph (path or bytes) -> HxWx3 uint8 RGB; raises DicomError naming it."""
    name = name or ("<upload>" if isinstance(source, bytes) else str(source))
    ds = read_dataset(source, pixels=True, name=name, max_pixels=max_pixels, max_bytes=max_bytes)
    check_photograph(ds, name, max_pixels, max_bytes=max_bytes)
    check_decodable(ds, name)
    try:
        arr = _pixels(ds)
    except (NotImplementedError, RuntimeError, ImportError) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        label = getattr(syntax, "name", syntax) or "unknown"
        reason = f"cannot decode the {label} pixel data ({e.__class__.__name__}); {INSTALL_HINT}"
        raise _refuse(name, "unsupported_format", reason) from e
    except (ValueError, AttributeError, EOFError) as e:
        raise _refuse(name, "corrupt_image", f"corrupt DICOM pixel data ({e})") from e
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        reason = f"decoded pixel data has shape {arr.shape}, not rows x columns x 3"
        raise _refuse(name, "corrupt_image", reason)
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False))


def check_decodable(ds: Any, name: str) -> None:
    """Refuse, in one line, pixel data whose transfer syntax no installed decoder reads."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DicomError(
            f"{name}: {syntax.name} pixel data is not supported; dermlens decodes {DECODED} DICOM "
            "(convert the file, e.g. with dcmtk's dcmdjpeg)"
        )


def _pixels(ds: Any) -> np.ndarray:
    """Pixel data as RGB (pydicom converts YBR). Baseline JPEG frames go to Pillow, the decoder of .jpg
    files, so a JPEG wrapped in DICOM gives exactly the pixels of the JPEG itself."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax in PILLOW_SYNTAXES:
        ds.pixel_array_options(decoding_plugin="pillow")
    return ds.pixel_array


def header_size(
    source: Any, max_pixels: int | None = None, name: str = "<upload>", max_bytes: int | None = None
) -> tuple[int, int]:
    """(width, height) of a DICOM photograph from its header alone (bytes, or a header already read)."""
    ds = read_dataset(source, pixels=False, name=name) if isinstance(source, bytes | bytearray) else source
    check_photograph(ds, name, max_pixels, pixels=False, max_bytes=max_bytes)
    return int(ds.Columns), int(ds.Rows)


def parse_age(value: object) -> float | None:
    """DICOM Age String ('045Y', '006M', '010W', '020D') -> years; None when empty or malformed."""
    m = _AGE.match(str(value or ""))
    if not m:
        return None
    return round(int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()], 3)


def merge_meta(given: dict[str, Any] | None, tags: dict[str, Any]) -> dict[str, Any]:
    """Metadata given by the user wins field by field; the DICOM tags fill what is missing."""
    given = given or {}
    return {k: given.get(k) if given.get(k) is not None else tags.get(k) for k in ("age", "sex", "site")}
