"""One prediction as a DICOM Structured Report (highdicom, TID 1500 Measurement Report in a
Comprehensive SR) that references the source image, so a PACS can store it beside the image.

Content, in standard codes where one exists: one measurement group per diagnosis (finding type: the SNOMED CT
disorder, measurement: DCM "Probability"), and one for the lesion (finding type SNOMED "Skin lesion", the
finding site in SNOMED CT anatomy, DCM "Impression" = the most probable diagnosis, DCM "Probability of
cancer", DCM "Certainty of Finding" = the top class's calibrated probability, benign/malignant in SNOMED).
The model's name, version, precision and card SHA-256 are the algorithm identification and observer device.
Private codes (scheme 99DERMLENS, declared in the SR) only for what has no standard code: refer to a
dermatologist, the out-of-distribution flag and score, and the "unknown" class.
The SR's series and instance UIDs derive from the source image and the model, so a re-run writes (and a PACS
stores) the same SR again rather than a duplicate.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermlens import DISCLAIMER, __version__
from dermlens.data.taxonomy import FINE_NAMES, FINE_SNOMED, site_snomed
from dermlens.dicom import INSTALL_HINT, DicomError, check_image_class
from dermlens.infer.prediction import Prediction

SCHEME = "99DERMLENS"
SCHEME_NAME = "dermlens prediction concepts"
UID_ROOT = "1.2.826.0.1.3680043.10.1208."  # dermlens UIDs: a root under pydicom's, + hash digits
SR_SUFFIX = ".sr.dcm"


@dataclass(frozen=True)
class SrUids:
    """The SR's series and instance UIDs, derived from the source image and the model."""

    series: str
    instance: str

    @property
    def filename(self) -> str:
        """A safe file name: the instance UID (digits and dots only) + .sr.dcm."""
        return self.instance + SR_SUFFIX


def _hd():
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise DicomError(f"writing DICOM SR needs highdicom: {INSTALL_HINT}") from None
    return hd, codes


def _private(hd, value: str, meaning: str):
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def diagnosis_code(hd, code: str):
    """The SNOMED CT concept of a fine diagnosis code (private 99DERMLENS for one without)."""
    if code in FINE_SNOMED:
        value, meaning = FINE_SNOMED[code]
        return hd.sr.CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)
    return _private(hd, code.upper(), FINE_NAMES.get(code, code).split(" (")[0])


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=list(parts)))


def sr_uids(source_uid: str, study_uid: str, model: str, card_sha256: str | None) -> SrUids:
    """Series UID per (study, model); instance UID per (source image, model): a re-run gives the same."""
    identity = [model, card_sha256 or ""]
    return SrUids(series=_uid("series", study_uid, *identity), instance=_uid("sr", source_uid, *identity))


def _device_uid(model_name: str, model_version: str) -> str:
    """A stable UID per model version (the observer device), derived from its name and version."""
    digits = str(int(hashlib.sha256(f"{model_name} {model_version}".encode()).hexdigest()[:24], 16))
    return (UID_ROOT + digits)[:64]


@functools.cache
def _sct_meanings() -> dict[str, str]:
    """SNOMED CT code -> meaning, from pydicom's code dictionary (read once)."""
    from pydicom.sr.codedict import codes

    entries = (getattr(codes.SCT, name, None) for name in dir(codes.SCT))
    return {c.value: c.meaning for c in entries if hasattr(c, "value")}


def _sct_meaning(value: str, default: str) -> str:
    """The meaning pydicom's SNOMED CT dictionary gives a code (e.g. 77568009 -> Back), else `default`."""
    return _sct_meanings().get(value, default)


def _yes_no(codes, flag: bool):
    return codes.SCT.Yes if flag else codes.SCT.No


def _algorithm(hd, pred: Prediction, card_sha256: str | None):
    params = [f"precision={pred.precision}"] + ([f"card_sha256={card_sha256}"] if card_sha256 else [])
    return hd.sr.AlgorithmIdentification(name=pred.model_name, version=pred.model_version, parameters=params)


def _tracking(hd, uids: SrUids, label: str):
    return hd.sr.TrackingIdentifier(uid=_uid("tracking", uids.instance, label), identifier=label)


def _lesion_group(hd, codes, source: Any, pred: Prediction, site: str | None, uids: SrUids, sha: str | None):
    """TID 1501 group about the lesion: top diagnosis, P(cancer), certainty, refer and OOD."""
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    measurements = [
        hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=float(pred.p_malignant), unit=unit),
        hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=float(pred.confidence), unit=unit),
        hd.sr.Measurement(
            name=_private(hd, "OODSCORE", "Out-of-distribution score"), value=pred.ood_score, unit=unit
        ),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(name=codes.DCM.Impression, value=diagnosis_code(hd, pred.top_class)),
        hd.sr.QualitativeEvaluation(
            name=_private(hd, "COARSE", "Benign or malignant"),
            value=codes.SCT.Malignant if pred.p_malignant >= 0.5 else codes.SCT.Benign,
        ),
        hd.sr.QualitativeEvaluation(
            name=_private(hd, "REFER", "Refer to a dermatologist"), value=_yes_no(codes, pred.refer)
        ),
        hd.sr.QualitativeEvaluation(
            name=_private(hd, "OOD", "Out of distribution"), value=_yes_no(codes, pred.ood)
        ),
    ]
    code = site_snomed(site) if site else None
    sites = [hd.sr.FindingSite(hd.sr.CodedConcept(code, "SCT", _sct_meaning(code, site)))] if code else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(hd, uids, "lesion"),
        finding_type=codes.SCT.SkinLesion,
        algorithm_id=_algorithm(hd, pred, sha),
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _class_group(hd, codes, source: Any, pred: Prediction, code: str, uids: SrUids, sha: str | None):
    """TID 1501 group for one diagnosis: its SNOMED CT concept and the model's probability of it."""
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(hd, uids, f"diagnosis {code}"),
        finding_type=diagnosis_code(hd, code),
        algorithm_id=_algorithm(hd, pred, sha),
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=float(pred.fine[code]), unit=unit)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


# Patient/study attributes the SR copies from its evidence; Type 2 (may be empty) when the source lacks them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime")
_TYPE2 += ("AccessionNumber", "ReferringPhysicianName")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _valid_uid(value: Any) -> bool:
    from pydicom.uid import UID

    return UID(str(value)).is_valid


def _evidence(source: Any) -> Any:
    """A header-only copy of the source with empty Type 2 attributes where the source has none."""
    missing = [k for k in _REQUIRED if not getattr(source, k, None)]
    if missing:
        raise DicomError(f"the source DICOM lacks {', '.join(missing)}: the SR cannot reference it")
    bad = [k for k in _REQUIRED if not _valid_uid(getattr(source, k))]
    if bad:
        shown = ", ".join(f"{k} {str(getattr(source, k))[:70]!r}" for k in bad)
        raise DicomError(f"the source DICOM has an invalid {shown}: the SR cannot reference it")
    check_image_class(source, "the source DICOM")
    ds = source.copy()
    if "PixelData" in ds:
        del ds.PixelData
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def uids_for(source: Any, pred: Prediction, card_sha256: str | None = None) -> SrUids:
    """The SR UIDs for `pred` about `source` (DicomError if the source lacks its UIDs)."""
    source = _evidence(source)
    model = f"{pred.model_name} {pred.model_version}"
    return sr_uids(str(source.SOPInstanceUID), str(source.StudyInstanceUID), model, card_sha256)


def build_sr(source: Any, pred: Prediction, site: str | None = None, card_sha256: str | None = None) -> Any:
    """A highdicom ComprehensiveSR for `pred`, in the source image's study, referencing the image.

    Raises DicomError (one line) when the source's header cannot make a valid SR."""
    try:
        return _build(_evidence(source), pred, site, card_sha256)
    except (ValueError, TypeError, AttributeError) as e:
        if isinstance(e, DicomError):
            raise
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DicomError(f"the source DICOM cannot make a valid SR: {detail}") from e


def _build(source: Any, pred: Prediction, site: str | None, card_sha256: str | None) -> Any:
    hd, codes = _hd()
    uids = uids_for(source, pred, card_sha256)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(pred.model_name, pred.model_version),
            name="dermlens",
            manufacturer_name="dermlens (research software)",
            model_name=f"{pred.model_name} {pred.model_version}"[:64],
        ),
    )
    groups = [_lesion_group(hd, codes, source, pred, site, uids, card_sha256)]
    groups += [_class_group(hd, codes, source, pred, c, uids, card_sha256) for c in pred.fine]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.DermoscopicPhotography,
        imaging_measurements=groups,
        referenced_images=[source] if _library_knows(hd, source) else None,
    )
    comments = [f"Refer reason: {pred.refer_reason}"] if pred.refer_reason else []
    for text in [*comments, DISCLAIMER]:
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=uids.series,
        series_number=900,
        sop_instance_uid=uids.instance,
        instance_number=1,
        manufacturer="dermlens",
        software_versions=__version__,
        series_description="dermlens prediction (research software, not a diagnosis)",
    )
    sr.CodingSchemeIdentificationSequence = [_scheme_item()]
    return sr


def _library_knows(hd, source: Any) -> bool:
    """Whether highdicom can describe the source in the Image Library (TID 1601). It predates some SOP
    classes (Dermoscopic Photography): their images are referenced by the measurement groups only."""
    try:
        hd.sr.ImageLibraryEntryDescriptors(source)
    except ValueError:
        return False
    return True


def _scheme_item():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "dermlens project"
    return item


def write_sr(
    source: Any, pred: Prediction, out_dir: Path, site: str | None = None, card_sha256: str | None = None
) -> Path:
    """Write the SR as OUT_DIR/<SR SOPInstanceUID>.sr.dcm (a derived UID, never a source tag); its path."""
    sr = build_sr(source, pred, site, card_sha256)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SrUids(str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)).filename
    sr.save_as(path, enforce_file_format=True)
    return path


def sr_bytes(source: Any, pred: Prediction, site: str | None = None, card_sha256: str | None = None) -> bytes:
    """The SR as DICOM Part 10 bytes (for the API and STOW-RS)."""
    import io

    buf = io.BytesIO()
    build_sr(source, pred, site, card_sha256).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class SrFolder:
    """Writes one SR per predicted DICOM input into a folder (`write(rows)` per batch); counts what it
    wrote and lists, one line each, what it could not (no valid SR, a SOPInstanceUID shared by two inputs)."""

    def __init__(self, out_dir: Path, card_sha256: str | None, sites: dict[str, str | None]) -> None:
        self.out_dir, self.card_sha256, self.sites = out_dir, card_sha256, sites
        self.written: dict[str, str] = {}  # SR file name -> the input it was written for
        self.skipped = 0
        self.failures: list[Any] = []

    def write(self, rows: list[Any]) -> None:
        from dermlens.dicom import is_dicom_file

        for s in rows:
            if is_dicom_file(s.item.path):
                self._write_one(str(s.item.path), s.prediction)
            else:
                self.skipped += 1

    def _write_one(self, path: str, prediction: Prediction) -> None:
        from dermlens.dicom import read_dataset
        from dermlens.predict.inputs import Failure

        try:
            source = read_dataset(path, pixels=False)
            name = uids_for(source, prediction, self.card_sha256).filename
            if name in self.written:
                reason = f"no DICOM SR: SOPInstanceUID {source.SOPInstanceUID} is also {self.written[name]}'s"
                self.failures.append(Failure(path, reason))
                return
            write_sr(source, prediction, self.out_dir, self.sites.get(path), self.card_sha256)
            self.written[name] = path
        except DicomError as e:
            self.failures.append(Failure(path, f"no DICOM SR: {e}"))
