"""Write an image file as a DICOM Dermoscopic Photography image (what a clinic's dermatoscope stores), with
the patient's age, sex and lesion site in the tags. A baseline JPEG is wrapped unchanged; other formats are
stored as uncompressed RGB. Needs the `dicom` extra (pydicom)."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dermlens.data.taxonomy import site_snomed
from dermlens.dicom import INSTALL_HINT, DicomError
from dermlens.preprocess import load_rgb

MODALITY = "DMS"  # Dermoscopy (DICOM CID 29)
_JPEG_SOI = b"\xff\xd8"
_SEX = {"female": "F", "male": "M"}
# Sites whose SNOMED code (Head, Back) is an unpaired body part: Laterality absent. Every other site is
# paired (a limb) or not known to be unpaired: Laterality present and empty (= unknown), as dciodvfy checks.
_UNPAIRED_SITES = frozenset({"head/neck", "posterior torso"})


def _version() -> str:
    """The installed dermlens version (from the package metadata: this base module sits below dermlens)."""
    try:
        return version("dermlens")
    except PackageNotFoundError:
        return "unknown"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DicomError(f"writing DICOM needs pydicom: {INSTALL_HINT}") from None
    return pydicom


def _is_baseline_jpeg(data: bytes) -> bool:
    """True for a baseline (SOF0) JPEG: its bytes can be wrapped in DICOM unchanged."""
    return data[:2] == _JPEG_SOI and b"\xff\xc0" in data and b"\xff\xc2" not in data


def _patient(ds: Any, meta: dict[str, Any], patient_id: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "", patient_id, ""
    ds.PatientSex = _SEX.get(meta.get("sex") or "", "")
    if meta.get("age") is not None:
        ds.PatientAge = f"{int(meta['age']):03d}Y"


def _site(ds: Any, site: str | None) -> None:
    """AnatomicRegionSequence: the lesion site as SNOMED CT (left out when unknown); Laterality empty
    (unknown) unless the site is unpaired."""
    from pydicom.dataset import Dataset

    code = site_snomed(site) if site else None
    if site not in _UNPAIRED_SITES:
        ds.Laterality = ""
    if code:
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = code, "SCT", site
        ds.AnatomicRegionSequence = [region]


def _header(uids: dict[str, str], when: datetime) -> Any:
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DermoscopicPhotographyImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DermoscopicPhotographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AcquisitionDateTime = date + time
    ds.Modality, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = MODALITY, "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = 1, 1, ""
    ds.Manufacturer, ds.ManufacturerModelName = "dermlens", "dermlens data to-dicom"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", _version()
    ds.ImageType = ["DERIVED", "PRIMARY"]  # converted from an image file
    ds.AcquisitionContextSequence = pydicom.Sequence()
    # Dermoscopic Image module: nothing is known of the dermatoscope; a close-up shows no face.
    ds.RecognizableVisualFeatures = "NO"
    ds.LightSourcePolarization = ds.EmitterColorTemperature = ds.ContactMethod = None
    ds.OpticalMagnificationFactor = None
    ds.BurnedInAnnotation = "NO"
    return ds


def photo_dataset(
    image: Path,
    meta: dict[str, Any] | None = None,
    patient_id: str = "",
    study_uid: str | None = None,
    when: datetime | None = None,
) -> Any:
    """The image at `image` as a Dermoscopic Photography dataset (new series; `study_uid` or a new study)."""
    _pydicom()
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    meta = meta or {}
    rgb = load_rgb(image)
    data = Path(image).read_bytes()
    uids = {k: generate_uid() for k in ("sop", "series", "frame")}
    uids["study"] = study_uid or generate_uid()
    ds = _header(uids, when or datetime.now(UTC))
    _patient(ds, meta, patient_id)
    _site(ds, meta.get("site"))
    ds.Rows, ds.Columns, ds.SamplesPerPixel = int(rgb.shape[0]), int(rgb.shape[1]), 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PlanarConfiguration = 0
    if _is_baseline_jpeg(data):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation, ds.LossyImageCompression = "YBR_FULL_422", "01"
        ds.LossyImageCompressionRatio = f"{rgb.nbytes / len(data):.2f}"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PhotometricInterpretation, ds.LossyImageCompression = "RGB", "00"
        ds.PixelData = rgb.tobytes()
    return ds


def write_photo(image: Path, out: Path, meta: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write `image` as a Dermoscopic Photography DICOM file at `out` and return `out`."""
    ds = photo_dataset(image, meta, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
