"""One prediction as a FHIR R4 (R4B models of fhir.resources) Bundle of type collection: a DiagnosticReport
whose conclusion carries the disclaimer and the top class (coded in SNOMED CT where a code exists), one
Observation per class probability, P(malignant), the prediction set and the refer decision with its
reasons, the model as a Device (name, version, card.json SHA-256), and, for a DICOM source, a reference
to its ImagingStudy by Study Instance UID. Entries reference each other by urn:uuid full URLs.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermlens import DISCLAIMER
from dermlens.bundle import CARD
from dermlens.data.taxonomy import FINE_NAMES, FINE_SNOMED
from dermlens.extras import require
from dermlens.infer.prediction import Prediction

MEDIA_TYPE = "application/fhir+json"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
# dermlens' own concepts (class probabilities, refer codes): a URN, as DICOM SR uses the 99DERMLENS scheme.
SYSTEM = "urn:dermlens:concept"
RECORD_SYSTEM = "urn:dermlens:record-id"
IMAGE_SYSTEM = "urn:dermlens:image-id"
DICOM_UID = "urn:dicom:uid"


@dataclass(frozen=True)
class ModelDevice:
    """The model as a FHIR Device: its name, version and the SHA-256 of its card.json."""

    name: str
    version: str
    card_sha256: str

    @classmethod
    def from_bundle(cls, bundle_dir: Path, name: str, version: str) -> ModelDevice:
        """The Device of a loaded bundle (hash of its card.json bytes)."""
        digest = hashlib.sha256((Path(bundle_dir) / CARD).read_bytes()).hexdigest()
        return cls(name, version, digest)


def _bundle_model() -> Any:
    """The R4B Bundle model (fhir.resources >= 7 keeps its R4-compatible models under R4B)."""
    return require("fhir.resources.R4B.bundle", "fhir", "FHIR output").Bundle


def _concept(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": SYSTEM, "code": code, "display": display}], "text": display}


def _name(code: str) -> str:
    return FINE_NAMES.get(code, code).split(" (")[0]


def class_concept(code: str) -> dict[str, Any]:
    """A fine class as a CodeableConcept: SNOMED CT where FINE_SNOMED has it, always the dermlens code."""
    coding = [{"system": SYSTEM, "code": code, "display": _name(code)}]
    if code in FINE_SNOMED:
        sct, display = FINE_SNOMED[code]
        coding.insert(0, {"system": SNOMED, "code": sct, "display": display})
    return {"coding": coding, "text": _name(code)}


def _percent(p: float) -> dict[str, Any]:
    return {"value": round(float(p) * 100.0, 4), "unit": "%", "system": UCUM, "code": "%"}


def _observations(pred: Prediction, status: str, device: str) -> list[dict[str, Any]]:
    """Observations: each class probability, P(malignant), the prediction set, the refer decision."""
    base = {"resourceType": "Observation", "status": status, "device": {"reference": device}}
    out = [
        {**base, "code": _concept(f"p-{c}", f"Probability of {_name(c)}"), "valueQuantity": _percent(p)}
        for c, p in pred.fine.items()
    ]
    malignant = _concept("p-malignant", "Probability of malignancy")
    out.append({**base, "code": malignant, "valueQuantity": _percent(pred.p_malignant)})
    if pred.prediction_set is not None:
        member = _concept("set-member", "Member of the prediction set")
        out.append(
            {
                **base,
                "code": _concept("prediction-set", "Conformal prediction set"),
                "valueString": ", ".join(pred.prediction_set),
                "component": [
                    {"code": member, "valueCodeableConcept": class_concept(c)} for c in pred.prediction_set
                ],
                **(
                    {"note": [{"text": f"target coverage {pred.set_coverage:g}"}]}
                    if pred.set_coverage
                    else {}
                ),
            }
        )
    reasons = [
        {"code": _concept("refer-reason", "Refer reason"), "valueCodeableConcept": _concept(r, r)}
        for r in pred.refer_codes
    ]
    out.append(
        {
            **base,
            "code": _concept("refer", "Refer to a dermatologist"),
            "valueBoolean": pred.refer,
            **({"component": reasons} if reasons else {}),
            **({"note": [{"text": pred.refer_reason}]} if pred.refer_reason else {}),
        }
    )
    return out


def _device(device: ModelDevice) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "status": "active",
        "deviceName": [{"name": device.name, "type": "model-name"}],
        "type": {"text": "Software: dermoscopic image classifier (research software, not a medical device)"},
        "version": [
            {"type": {"text": "model version"}, "value": device.version},
            {"type": {"text": "model card SHA-256"}, "value": device.card_sha256},
        ],
        "note": [{"text": DISCLAIMER}],
    }


def conclusion(pred: Prediction) -> str:
    """The report's conclusion: the disclaimer, then the top class and its probability."""
    text = f"{DISCLAIMER} Most probable class: {_name(pred.top_class)} ({pred.confidence:.1%})."
    return text + (f" Refer: {pred.refer_reason}." if pred.refer and pred.refer_reason else "")


def build_bundle(
    pred: Prediction,
    device: ModelDevice,
    *,
    record_id: str | None = None,
    image_id: str | None = None,
    study_uid: str | None = None,
    issued: datetime | None = None,
) -> dict[str, Any]:
    """The prediction as a validated FHIR Bundle (JSON-ready dict). Referred: status preliminary."""
    status = "preliminary" if pred.refer else "final"
    urls = {"device": f"urn:uuid:{uuid.uuid4()}"}
    observations = _observations(pred, status, urls["device"])
    obs_urls = [f"urn:uuid:{uuid.uuid4()}" for _ in observations]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": _concept("dermoscopy-classification", "Dermoscopic lesion classification"),
        "issued": (issued or datetime.now(UTC)).isoformat(),
        "result": [{"reference": u} for u in obs_urls],
        "conclusion": conclusion(pred),
        "conclusionCode": [class_concept(pred.top_class)],
    }
    ids = [(RECORD_SYSTEM, record_id), (IMAGE_SYSTEM, image_id)]
    if any(v for _, v in ids):
        report["identifier"] = [{"system": s, "value": v} for s, v in ids if v]
    if study_uid:
        report["imagingStudy"] = [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
            }
        ]
    entries = [(f"urn:uuid:{uuid.uuid4()}", report), (urls["device"], _device(device))]
    entries += list(zip(obs_urls, observations, strict=True))
    bundle = _bundle_model().model_validate(  # validates every entry with its resource's model
        {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": report["issued"],
            "entry": [{"fullUrl": url, "resource": res} for url, res in entries],
        }
    )
    return json.loads(bundle.model_dump_json(exclude_none=True))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def bundle_filename(image_id: str, taken: set[str]) -> str:
    """A safe, unique file name for an image's Bundle: unsafe characters replaced, a counter if needed."""
    stem = _UNSAFE.sub("_", image_id).strip("._") or "image"
    stem = stem[:100]
    name, n = f"{stem}.fhir.json", 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}-{n}.fhir.json"
    taken.add(name.lower())
    return name


def write_bundle(bundle: dict[str, Any], out_dir: Path, image_id: str, taken: set[str]) -> Path:
    """Write one Bundle as OUT_DIR/<safe image id>.fhir.json and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / bundle_filename(image_id, taken)
    path.write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
    return path


def study_uid(path: Path) -> str | None:
    """The Study Instance UID of a DICOM file (header only); None for other images or a missing tag."""
    from dermlens.dicom import is_dicom_file, read_dataset

    if not is_dicom_file(path):
        return None
    return str(getattr(read_dataset(path, pixels=False), "StudyInstanceUID", "") or "") or None


class FhirWriter:
    """`dermlens predict --fhir DIR`: one Bundle file per scored image, named from its image id."""

    def __init__(self, device: ModelDevice, out_dir: Path) -> None:
        self.device, self.out_dir = device, out_dir
        self.taken: set[str] = set()
        self.written = 0

    def write(self, rows: list[Any]) -> None:
        """Write the Bundles of a batch of scored items (folder.Scored)."""
        for s in rows:
            bundle = build_bundle(
                s.prediction, self.device, image_id=s.item.image_id, study_uid=study_uid(s.item.path)
            )
            write_bundle(bundle, self.out_dir, s.item.image_id, self.taken)
            self.written += 1
