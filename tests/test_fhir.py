"""FHIR R4 output: every resource of the Bundle parses back with fhir.resources (R4B models), references
resolve inside the Bundle, and the CLI (--fhir) and the API (?format=fhir, Accept) write it for real
predictions of real HAM10000 images, DICOM sources referencing their ImagingStudy."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom.sr.codedict import codes
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens import DISCLAIMER
from dermlens.cli.main import app as cli_app
from dermlens.data.taxonomy import FINE_SNOMED
from dermlens.predict.fhir import SNOMED, ModelDevice, build_bundle, bundle_filename
from dermlens.serve.api import create_app
from dermlens.serve.records import RecordStore
from dermlens.serve.settings import load_settings
from dicom_files import write_photo

MODELS = {"DiagnosticReport": DiagnosticReport, "Observation": Observation, "Device": Device}


@pytest.fixture(scope="module")
def predictor():
    from dermlens.infer.predictor import Predictor

    return Predictor.load(bundle_dir(), threads=1)


@pytest.fixture(scope="module")
def images(ham_root: Path) -> list[Path]:
    return sorted((ham_root / "images").glob("*.jpg"))[:4]


def parsed(bundle: dict) -> dict[str, list]:
    """Every entry parsed back with its fhir.resources model; references checked against fullUrls."""
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    urls = {e["fullUrl"] for e in bundle["entry"]}
    assert all(u.startswith("urn:uuid:") for u in urls) and len(urls) == len(bundle["entry"])
    out: dict[str, list] = {}
    for e in bundle["entry"]:
        res = e["resource"]
        out.setdefault(res["resourceType"], []).append(MODELS[res["resourceType"]].model_validate(res))
    report = out["DiagnosticReport"][0]
    assert {r.reference for r in report.result} == {e["fullUrl"] for e in _entries(bundle, "Observation")}
    assert all(o.device.reference in urls for o in out["Observation"])
    return out


def _entries(bundle: dict, kind: str) -> list[dict]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _value(obs, code: str):
    return next(o for o in obs if o.code.coding[0].code == code)


def test_bundle_of_real_predictions_validates(predictor, images: list[Path]) -> None:
    device = ModelDevice.from_bundle(predictor.bundle_dir, predictor.card.name, predictor.version)
    card_hash = hashlib.sha256((predictor.bundle_dir / "card.json").read_bytes()).hexdigest()
    for path in images:
        pred = predictor.predict_file(path)
        res = parsed(build_bundle(pred, device, image_id=path.stem))
        report, obs = res["DiagnosticReport"][0], res["Observation"]
        assert report.status == ("preliminary" if pred.refer else "final")
        assert DISCLAIMER in report.conclusion and pred.top_class_name.split(" (")[0] in report.conclusion
        codings = {(c.system, c.code) for c in report.conclusionCode[0].coding}
        if pred.top_class in FINE_SNOMED:
            assert (SNOMED, FINE_SNOMED[pred.top_class][0]) in codings
        assert report.identifier[0].value == path.stem and not report.imagingStudy
        probs = {c: _value(obs, f"p-{c}").valueQuantity for c in pred.fine}
        assert all(q.unit == "%" and q.system == "http://unitsofmeasure.org" for q in probs.values())
        assert sum(float(q.value) for q in probs.values()) == pytest.approx(100.0, abs=0.01)
        assert float(_value(obs, "p-malignant").valueQuantity.value) == pytest.approx(
            100 * pred.p_malignant, abs=1e-3
        )
        refer = _value(obs, "refer")
        assert refer.valueBoolean is pred.refer
        assert [c.valueCodeableConcept.coding[0].code for c in refer.component or []] == pred.refer_codes
        if pred.prediction_set is not None:
            members = _value(obs, "prediction-set").component
            assert [m.valueCodeableConcept.coding[-1].code for m in members] == pred.prediction_set
        (dev,) = res["Device"]
        assert [v.value for v in dev.version] == [predictor.version, card_hash]


def test_snomed_codes_are_pydicoms() -> None:
    """Every FINE_SNOMED code that pydicom's SNOMED CT dictionary knows carries pydicom's meaning."""
    known = {c.value: c.meaning for c in (codes.SCT.MalignantMelanoma, codes.SCT.ActinicKeratosis)}
    known[codes.SCT.SquamousCellCarcinoma.value] = codes.SCT.SquamousCellCarcinoma.meaning
    for sct, display in FINE_SNOMED.values():
        if sct in known:
            assert display.lower() == known[sct].lower()
    assert {"mel", "akiec", "scc"} <= set(FINE_SNOMED)


def test_bundle_file_names_are_safe_and_unique() -> None:
    taken: set[str] = set()
    names = [bundle_filename(i, taken) for i in ("../../etc/passwd", "a b?", "A_B", "a_b", "", "x" * 300)]
    assert names[0] == "etc_passwd.fhir.json" and len(set(n.lower() for n in names)) == len(names)
    assert all("/" not in n and len(n) < 120 for n in names)


def test_predict_cli_writes_one_bundle_per_image(images: list[Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a b.jpg").symlink_to(images[0])
    (src / "sub" / "a b.jpg").symlink_to(images[1])  # the same image id twice: two files
    dcm = write_photo(images[2], src / "study.dcm")
    out = tmp_path / "fhir"
    result = CliRunner().invoke(
        cli_app, ["predict", str(src), "--fhir", str(out), "--model", str(bundle_dir()), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and files[-1] == "study.fhir.json"  # the two "a b" files get distinct names
    assert all(n.startswith("a_b") for n in files[:2]) and files[0] != files[1]
    study = parsed(json.loads((out / "study.fhir.json").read_text()))["DiagnosticReport"][0]
    uid = pydicom.dcmread(dcm).StudyInstanceUID
    assert study.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
    assert study.imagingStudy[0].identifier.system == "urn:dicom:uid"
    for name in files[:2]:
        assert not parsed(json.loads((out / name).read_text()))["DiagnosticReport"][0].imagingStudy


def test_api_answers_fhir_on_request(predictor, images: list[Path], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'records.db'}"
    app = create_app(load_settings(records={"url": url}), predictor=predictor)
    dcm = write_photo(images[3], tmp_path / "x.dcm").read_bytes()
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        jpg = {"file": (images[0].name, images[0].read_bytes(), "image/jpeg")}
        plain = client.post("/predict", files=jpg)
        assert plain.status_code == 200 and "record_id" in plain.json()
        by_query = client.post("/predict?format=fhir", files=jpg)
        by_accept = client.post(
            "/predict",
            files={"file": ("x.dcm", dcm, "application/dicom")},
            headers={"Accept": "application/fhir+json"},
        )
        bad = client.post("/predict?format=xml", files=jpg)
    assert bad.status_code == 422
    for resp in (by_query, by_accept):
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/fhir+json")
    store = RecordStore(url)
    try:
        assert store.count() == 3  # the 422 stored nothing
        report = parsed(by_query.json())["DiagnosticReport"][0]
        record = store.get(report.identifier[0].value)
        assert record is not None and record.top_class == report.conclusionCode[0].coding[-1].code
    finally:
        store.close()
    dicom_report = parsed(by_accept.json())["DiagnosticReport"][0]
    uid = pydicom.dcmread(io.BytesIO(dcm)).StudyInstanceUID
    assert dicom_report.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
