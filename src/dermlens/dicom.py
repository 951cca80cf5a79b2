"""DICOM input: decode single-frame colour photographs (RGB or YBR, compressed or not) and read the
patient's age, sex and lesion site from the tags. Needs the `dicom` extra (pydicom + pixel-data handlers).

A DICOM file is recognised by its "DICM" preamble at byte 128, never by its name. Anything that is not a
colour photograph (a CT slice, a grey-scale image, a multi-frame cine), and a transfer syntax no installed
decoder reads (JPEG Lossless: its one decoder, pylibjpeg-libjpeg, is GPL and not a dependency), are refused
with a one-line reason.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.data.taxonomy import sex_value, site_general, snomed_site
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
_SEX = {"F": "female", "M": "male"}


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


def read_dataset(source: str | Path | bytes, pixels: bool = True, name: str | None = None) -> Any:
    """Parse a DICOM file (path or bytes) into a pydicom Dataset; header only when pixels=False."""
    pydicom = _pydicom()
    name = name or ("<upload>" if isinstance(source, bytes) else str(source))
    fh = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(fh, stop_before_pixels=not pixels)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, KeyError, EOFError) as e:
        raise DicomError(f"{name}: not a readable DICOM file ({e})") from e


def check_image_class(ds: Any, name: str) -> None:
    """Refuse a dataset whose SOP class is a known non-image object (a structured report, an RT plan, ...)."""
    uid = getattr(ds, "SOPClassUID", None)
    label = getattr(uid, "name", "") if uid else ""
    if label and label != str(uid) and "Image" not in label:
        raise DicomError(f"{name}: a {label} object ({uid}), not an image; dermlens reads photographs")


def check_photograph(ds: Any, name: str, max_pixels: int | None = None, pixels: bool = True) -> None:
    """Refuse anything but a single-frame 8-bit colour photograph within the pixel limit.

    pixels=False checks a header read without its pixel data."""
    check_image_class(ds, name)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    modality = getattr(ds, "Modality", "?")
    if frames > 1:
        raise DicomError(
            f"{name}: multi-frame DICOM ({frames} frames, modality {modality}) is not a photograph; "
            "dermlens reads single-frame colour images"
        )
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 0) or 0)
    if samples != 3 or photometric not in COLOUR_PHOTOMETRIC:
        raise DicomError(
            f"{name}: not a colour photograph (modality {modality}, {photometric or 'no'} photometric "
            f"interpretation, {samples} sample(s) per pixel); dermlens reads RGB/YBR colour DICOM images"
        )
    bits = int(getattr(ds, "BitsAllocated", 0) or 0)
    if bits != 8:
        raise DicomError(f"{name}: {bits}-bit colour DICOM; dermlens reads 8-bit colour photographs")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if not rows or not cols or (pixels and "PixelData" not in ds):
        raise DicomError(f"{name}: DICOM file holds no image pixels")
    if max_pixels is not None and rows * cols > max_pixels:
        raise DicomError(f"{name}: {cols}x{rows} exceeds the {max_pixels:,}-pixel limit")


def decode(source: str | Path | bytes, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
    """A DICOM colour photograph (path or bytes) -> HxWx3 uint8 RGB; raises DicomError naming it."""
    name = name or ("<upload>" if isinstance(source, bytes) else str(source))
    ds = read_dataset(source, pixels=True, name=name)
    check_photograph(ds, name, max_pixels)
    check_decodable(ds, name)
    try:
        arr = _pixels(ds)
    except (NotImplementedError, RuntimeError, ImportError) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        label = getattr(syntax, "name", syntax) or "unknown"
        raise DicomError(
            f"{name}: cannot decode the {label} pixel data ({e.__class__.__name__}); {INSTALL_HINT}"
        ) from e
    except (ValueError, AttributeError, EOFError) as e:
        raise DicomError(f"{name}: corrupt DICOM pixel data ({e})") from e
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DicomError(f"{name}: decoded pixel data has shape {arr.shape}, not rows x columns x 3")
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


def header_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of a DICOM photograph from its header alone; refuses non-photographs."""
    ds = read_dataset(data, pixels=False)
    check_photograph(ds, "<upload>", max_pixels, pixels=False)
    return int(ds.Columns), int(ds.Rows)


def parse_age(value: object) -> float | None:
    """DICOM Age String ('045Y', '006M', '010W', '020D') -> years; None when empty or malformed."""
    m = _AGE.match(str(value or ""))
    if not m:
        return None
    return round(int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()], 3)


def region_site(ds: Any) -> str | None:
    """Site from AnatomicRegionSequence (SNOMED codes), else from BodyPartExamined if it names one."""
    for item in getattr(ds, "AnatomicRegionSequence", None) or []:
        site = snomed_site(getattr(item, "CodeValue", None), getattr(item, "CodingSchemeDesignator", None))
        if site:
            return site
    return site_general(str(getattr(ds, "BodyPartExamined", "") or "").replace("_", " "))


def patient_meta(ds: Any) -> dict[str, Any]:
    """age (years), sex ('female'/'male') and site (dermlens vocabulary) from a dataset; None if absent."""
    sex = _SEX.get(str(getattr(ds, "PatientSex", "") or "").strip().upper())
    return {"age": parse_age(getattr(ds, "PatientAge", None)), "sex": sex_value(sex), "site": region_site(ds)}


def read_meta(source: str | Path | bytes) -> dict[str, Any]:
    """Patient metadata from a DICOM file's header (pixels are not read)."""
    return patient_meta(read_dataset(source, pixels=False))


def merge_meta(given: dict[str, Any] | None, tags: dict[str, Any]) -> dict[str, Any]:
    """Metadata given by the user wins field by field; the DICOM tags fill what is missing."""
    given = given or {}
    return {k: given.get(k) if given.get(k) is not None else tags.get(k) for k in ("age", "sex", "site")}
