"""Real DICOM files built from real HAM10000 JPEGs (VL Photographic Image Storage), as a clinic stores them.

`jpeg` wraps the JPEG bytes unchanged (JPEG Baseline, YBR_FULL_422, the usual camera path); `rgb` and
`ybr` store decoded pixels uncompressed; `rle`, `j2k` and `jls` (JPEG-LS) compress them losslessly with
pydicom encoders. `write_deflated` writes the whole data set deflated (transfer syntax
1.2.840.10008.1.2.1.99), optionally with a huge element of zeros that inflates far beyond the file size
(a deflate bomb).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    VLPhotographicImageStorage,
    generate_uid,
)

from dermlens.data.taxonomy import FINE_SNOMED, site_snomed
from dermlens.preprocess import load_rgb

SYNTAXES = ("jpeg", "rgb", "ybr", "rle", "j2k", "jls")
COMPRESSED = {"rle": RLELossless, "j2k": JPEG2000Lossless, "jls": JPEGLSLossless}


def _dataset(rows: int, cols: int, syntax_uid: str, meta: dict) -> Dataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = VLPhotographicImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = syntax_uid
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer = "XC", "test"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Test^Patient", "HAM-TEST", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
    if meta.get("age") is not None:
        ds.PatientAge = f"{int(meta['age']):03d}Y"
    if meta.get("sex"):
        ds.PatientSex = {"female": "F", "male": "M"}[meta["sex"]]
    code = site_snomed(meta["site"]) if meta.get("site") else None
    if code:
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = code, "SCT", meta["site"]
        ds.AnatomicRegionSequence = [region]
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PlanarConfiguration = 0
    return ds


def write_photo(jpeg_path: Path, out: Path, syntax: str = "jpeg", meta: dict | None = None) -> Path:
    """Write `jpeg_path` as a DICOM photograph with transfer syntax `syntax` and patient metadata tags."""
    meta = meta or {}
    rgb = load_rgb(jpeg_path)
    rows, cols = rgb.shape[:2]
    if syntax == "jpeg":
        ds = _dataset(rows, cols, JPEGBaseline8Bit, meta)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([Path(jpeg_path).read_bytes()])
        ds["PixelData"].VR = "OB"
    elif syntax == "ybr":
        ds = _dataset(rows, cols, ExplicitVRLittleEndian, meta)
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint8).tobytes()
    else:
        ds = _dataset(rows, cols, ExplicitVRLittleEndian, meta)
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = rgb.tobytes()
        if syntax in COMPRESSED:
            ds.compress(COMPRESSED[syntax])
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def write_ct_slice(out: Path) -> Path:
    """A grey-scale 16-bit CT-like slice (real DICOM, not a photograph)."""
    ds = _dataset(64, 64, ExplicitVRLittleEndian, {})
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CT", 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    del ds.PlanarConfiguration
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def write_multiframe(jpeg_path: Path, out: Path, frames: int = 3) -> Path:
    """A multi-frame colour cine built from one real image repeated."""
    rgb = load_rgb(jpeg_path)
    ds = _dataset(rgb.shape[0], rgb.shape[1], ExplicitVRLittleEndian, {})
    ds.PhotometricInterpretation, ds.NumberOfFrames = "RGB", frames
    ds.PixelData = np.stack([rgb] * frames).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


BOMB_TAGS = {"header": (0x0009, 0x1000), "trailer": (0xFFFC, 0xFFFC)}  # private element / trailing padding
_MARK = b"DERMLENS-BOMB-MARK"  # placeholder value, replaced by the bomb's zeros in the deflated stream


def write_deflated(
    jpeg_path: Path, out: Path, meta: dict | None = None, bomb_bytes: int = 0, bomb_at: str = "header"
) -> Path:
    """`jpeg_path` as an RGB DICOM photograph whose data set is deflated; with `bomb_bytes`, an OB element of
    that many zeros sits before the pixels ("header") or after them ("trailer"), streamed into the deflate
    stream so that neither this writer nor the file holds them (a few hundred kB on disk)."""
    rgb = load_rgb(jpeg_path)
    ds = _dataset(rgb.shape[0], rgb.shape[1], DeflatedExplicitVRLittleEndian, meta or {})
    ds.PhotometricInterpretation, ds.PixelData = "RGB", rgb.tobytes()
    if bomb_bytes:
        if bomb_at == "header":
            ds.add_new((0x0009, 0x0010), "LO", "DERMLENS TEST")
        ds.add_new(BOMB_TAGS[bomb_at], "OB", _MARK)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    data = body.getvalue()
    zip_ = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    if bomb_bytes:
        group, elem = BOMB_TAGS[bomb_at]
        element = struct.pack("<HH2sHI", group, elem, b"OB", 0, len(_MARK)) + _MARK
        before, after = data.split(element)
        chunks = [zip_.compress(before + struct.pack("<HH2sHI", group, elem, b"OB", 0, bomb_bytes))]
        zeros = bytes(1 << 20)
        for start in range(0, bomb_bytes, len(zeros)):
            chunks.append(zip_.compress(zeros[: min(len(zeros), bomb_bytes - start)]))
        chunks.append(zip_.compress(after))
    else:
        chunks = [zip_.compress(data)]
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(head.getvalue() + b"".join(chunks) + zip_.flush())
    return out


def coded(code: str) -> tuple[str, str]:
    """(code value, scheme) the SR uses for a diagnosis: SNOMED CT where FINE_SNOMED has it, else private."""
    return (FINE_SNOMED[code][0], "SCT") if code in FINE_SNOMED else (code.upper(), "99DERMLENS")


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' validator: its Error lines (none for a valid object); skip without the tool off CI."""
    import os
    import shutil
    import subprocess

    import pytest

    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI: dciodvfy (Debian's dicom3tools) is not installed")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
