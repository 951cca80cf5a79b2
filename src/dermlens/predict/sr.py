"""One prediction as a DICOM Structured Report (highdicom, TID 1500 Measurement Report in a
Comprehensive SR) that references the source image, so a PACS can store it beside the image.

Content: per-class probabilities, P(malignant), confidence and OOD score (measurements); the top class,
benign/malignant, refer and out-of-distribution decisions (qualitative evaluations); the model name and
version (algorithm identification and observer device); the refer reason and the disclaimer (comments).
Class-specific concepts use the private coding scheme 99DERMLENS, declared in the SR.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dermlens import DISCLAIMER, __version__
from dermlens.data.taxonomy import FINE_NAMES, site_snomed
from dermlens.dicom import INSTALL_HINT, DicomError
from dermlens.infer.prediction import Prediction

SCHEME = "99DERMLENS"
SCHEME_NAME = "dermlens prediction concepts"
UID_ROOT = "1.2.826.0.1.3680043.10.1208."  # dermlens UIDs: a root under pydicom's, + hash digits


def _hd():
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise DicomError(f"writing DICOM SR needs highdicom: {INSTALL_HINT}") from None
    return hd, codes


def _code(hd, value: str, meaning: str):
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def _name(code: str) -> str:
    """The class's name without its parenthesised details (coded meanings hold at most 64 characters)."""
    return FINE_NAMES.get(code, code).split(" (")[0]


def _device_uid(model_name: str, model_version: str) -> str:
    """A stable UID per model version (the observer device), derived from its name and version."""
    digits = str(int(hashlib.sha256(f"{model_name} {model_version}".encode()).hexdigest()[:24], 16))
    return (UID_ROOT + digits)[:64]


def _yes_no(codes, flag: bool):
    return codes.SCT.Yes if flag else codes.SCT.No


def _group(hd, codes, source: Any, pred: Prediction, site: str | None):
    """TID 1501 measurement group: the model's outputs about the lesion in the source image."""
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    measurements = [
        hd.sr.Measurement(name=_code(hd, f"P-{c}", f"Probability of {_name(c)}"), value=float(p), unit=unit)
        for c, p in pred.fine.items()
    ]
    measurements += [
        hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=float(pred.p_malignant), unit=unit),
        hd.sr.Measurement(
            name=_code(hd, "CONF", "Confidence of the top class"), value=pred.confidence, unit=unit
        ),
        hd.sr.Measurement(
            name=_code(hd, "OODSCORE", "Out-of-distribution score"), value=pred.ood_score, unit=unit
        ),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=_code(hd, "TOP", "Most probable class"),
            value=_code(hd, pred.top_class, _name(pred.top_class)),
        ),
        hd.sr.QualitativeEvaluation(
            name=_code(hd, "COARSE", "Benign or malignant"),
            value=codes.SCT.Malignant if pred.p_malignant >= 0.5 else codes.SCT.Benign,
        ),
        hd.sr.QualitativeEvaluation(
            name=_code(hd, "REFER", "Refer to a dermatologist"), value=_yes_no(codes, pred.refer)
        ),
        hd.sr.QualitativeEvaluation(
            name=_code(hd, "OOD", "Out of distribution"), value=_yes_no(codes, pred.ood)
        ),
    ]
    code = site_snomed(site) if site else None
    sites = [hd.sr.FindingSite(hd.sr.CodedConcept(code, "SCT", site))] if code else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="dermlens prediction"),
        finding_type=codes.SCT.SkinLesion,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=pred.model_name, version=pred.model_version, parameters={"precision": pred.precision}
        ),
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


# Patient/study attributes the SR copies from its evidence; Type 2 (may be empty) when the source lacks them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime")
_TYPE2 += ("AccessionNumber", "ReferringPhysicianName")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _evidence(source: Any) -> Any:
    """A header-only copy of the source with empty Type 2 attributes where the source has none."""
    missing = [k for k in _REQUIRED if not getattr(source, k, None)]
    if missing:
        raise DicomError(f"the source DICOM lacks {', '.join(missing)}: the SR cannot reference it")
    ds = source.copy()
    if "PixelData" in ds:
        del ds.PixelData
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def build_sr(source: Any, pred: Prediction, site: str | None = None) -> Any:
    """A highdicom ComprehensiveSR for `pred`, in the source image's study, referencing the image."""
    hd, codes = _hd()
    source = _evidence(source)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(pred.model_name, pred.model_version),
            name="dermlens",
            manufacturer_name="dermlens (research software)",
            model_name=f"{pred.model_name} {pred.model_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.DermoscopicPhotography,
        imaging_measurements=[_group(hd, codes, source, pred, site)],
        referenced_images=[source],
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
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dermlens",
        software_versions=__version__,
        series_description="dermlens prediction (research software, not a diagnosis)",
    )
    sr.CodingSchemeIdentificationSequence = [_scheme_item()]
    return sr


def _scheme_item():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "dermlens project"
    return item


def write_sr(source: Any, pred: Prediction, out_dir: Path, site: str | None = None) -> Path:
    """Write the SR as OUT_DIR/<source SOPInstanceUID>.sr.dcm and return its path."""
    sr = build_sr(source, pred, site)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{source.SOPInstanceUID}.sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def sr_bytes(source: Any, pred: Prediction, site: str | None = None) -> bytes:
    """The SR as DICOM Part 10 bytes (for the API)."""
    import io

    buf = io.BytesIO()
    build_sr(source, pred, site).save_as(buf, enforce_file_format=True)
    return buf.getvalue()
