"""Real DICOM files built from real HAM10000 JPEGs (VL Photographic Image Storage), as a clinic stores them.

`jpeg` wraps the JPEG bytes unchanged (JPEG Baseline, YBR_FULL_422, the usual camera path); `rgb` and
`ybr` store decoded pixels uncompressed; `rle`, `j2k` and `jls` (JPEG-LS) compress them losslessly with
pydicom's encoders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    VLPhotographicImageStorage,
    generate_uid,
)

from dermlens.data.taxonomy import site_snomed
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
