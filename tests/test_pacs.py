"""A real PACS (Debian's Orthanc with its DICOMweb plugin) and the DICOM SR: `dermlens predict --dicomweb`
finds (QIDO-RS), fetches (WADO-RS) and predicts real HAM10000 images stored as Dermoscopic Photography, and
stores SNOMED-coded SRs back (STOW-RS) without duplicates on a re-run; `serve --dicomweb` stores an upload's
SR after its record; SR sources that cannot make an SR are one failure line (CLI) or a 4xx, no record (API).

Orthanc: $DERMLENS_ORTHANC_URL (CI starts it with .ci/orthanc.sh); otherwise the tests start one with that
script when Orthanc is installed, or skip saying so. Under CI=true a missing Orthanc fails.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
from pathlib import Path

import highdicom as hd
import pandas as pd
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.data.taxonomy import HAM_CLASSES, site_general, site_snomed
from dicom_files import coded, dciodvfy_errors  # tests/dicom_files.py
from dicom_files import write_photo as write_vl_photo

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """The Orthanc base URL: $DERMLENS_ORTHANC_URL, or one started here with .ci/orthanc.sh."""
    url = os.environ.get("DERMLENS_ORTHANC_URL")
    if url:
        yield url.rstrip("/")
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI: DERMLENS_ORTHANC_URL is unset; .ci/run starts Orthanc with .ci/orthanc.sh")
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed: `bash .ci/orthanc.sh` installs Debian's orthanc and starts it")
    root = tmp_path_factory.mktemp("orthanc")
    env = {**os.environ, "DERMLENS_ORTHANC_PORT": str(_free_port()), "DERMLENS_ORTHANC_DIR": str(root)}
    out = subprocess.run(["bash", str(REPO / ".ci" / "orthanc.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    try:
        yield out.stdout.strip().split("=", 1)[1]
    finally:
        subprocess.run(["kill", (root / "orthanc.pid").read_text().strip()], check=False)


@pytest.fixture(scope="module")
def ham_rows(ham_root: Path) -> pd.DataFrame:
    """Two HAM10000 images with complete metadata, of two classes."""
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    meta = meta[meta["age"].notna() & meta["sex"].isin(["female", "male"])]
    meta = meta[meta["localization"].map(site_general).notna()]
    rows = meta[meta["dx"].isin(["mel", "nv"])].groupby("dx").head(1).sort_values("image_id")
    return rows.assign(
        site=rows["localization"].map(site_general),
        path=rows["image_id"].map(lambda i: ham_root / "images" / f"{i}.jpg"),
    ).reset_index(drop=True)


def cli(*args: str):
    from dermlens.cli.main import app

    return CliRunner().invoke(app, list(args))


def predict(*args: str):
    return cli("predict", *args, "--model", str(bundle_dir()), "--threads", "1")


def upload(orthanc: str, path: Path) -> None:
    """The docs' upload step: Orthanc's REST API takes a DICOM file as the request body."""
    done = subprocess.run(
        ["curl", "-fsS", "-X", "POST", f"{orthanc}/instances", "--data-binary", f"@{path}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def study_instances(orthanc: str, study: str) -> list[dict]:
    return DICOMwebClient(f"{orthanc}/dicom-web").search_for_instances(study_instance_uid=study)


def test_predict_dicomweb_stores_coded_srs_once(orthanc: str, ham_rows: pd.DataFrame, tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    files = []
    for i, r in ham_rows.iterrows():
        out = tmp_path / f"lesion{i}.dcm"
        got = cli(
            "data", "to-dicom", str(r["path"]), str(out), "--age", str(int(r["age"])), "--sex", r["sex"],
            "--site", r["site"], "--patient-id", "PACS-TEST", "--study-uid", study,
        )  # fmt: skip
        assert got.exit_code == 0, got.output
        assert dciodvfy_errors(out) == []  # a valid Dermoscopic Photography image
        upload(orthanc, out)
        files.append(out)
    assert len(study_instances(orthanc, study)) == 2  # QIDO-RS finds the uploaded images

    csv = tmp_path / "pacs.csv"
    res = predict("--dicomweb", f"{orthanc}/dicom-web", "--study", study, "--out", str(csv))
    assert res.exit_code == 0, res.output
    assert "2 photograph(s) found" in res.output and "stored 2 DICOM SR(s)" in res.output
    rows = pd.read_csv(csv).set_index("image_id")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    srcs = {uid: r for uid, (_, r) in zip(uids, ham_rows.iterrows(), strict=True)}
    assert set(rows.index) == set(srcs)

    found = study_instances(orthanc, study)
    srs = [i for i in found if i["00080016"]["Value"][0] == pydicom.uid.ComprehensiveSRStorage]
    assert len(found) == 4 and len(srs) == 2
    client = DICOMwebClient(f"{orthanc}/dicom-web")
    for inst in srs:
        ds = client.retrieve_instance(study, inst["0020000E"]["Value"][0], inst["00080018"]["Value"][0])
        path = tmp_path / "sr.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        ref = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        source = ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        check_coded_sr(hd.sr.srread(path), rows.loc[source], srcs[source]["site"])

    # a re-run stores the same SR instances again: Orthanc keeps one of each
    again = predict("--dicomweb", f"{orthanc}/dicom-web", "--since", "2000-01-01")
    assert again.exit_code == 0, again.output
    assert "skipped" in again.output and "Comprehensive SR Storage" in again.output
    assert len(study_instances(orthanc, study)) == 4


def check_coded_sr(sr, row: pd.Series, site: str) -> None:
    """The SR's findings are SNOMED CT coded and carry the CSV's numbers."""
    groups = sr.content.get_image_measurement_groups()
    lesion = next(g for g in groups if g.finding_type.value == "95324001")  # SCT Skin lesion
    evals = {q.name.value: q.value for q in lesion.get_qualitative_evaluations()}
    top = evals["121073"]  # DCM Impression: the most probable diagnosis
    assert (top.value, top.scheme_designator) == coded(row["top_class"])
    assert [s.value.value for s in lesion.finding_sites] == [site_snomed(site)]
    values = {m.name.value: m.value for m in lesion.get_measurements()}
    assert values["111047"] == pytest.approx(row["p_malignant"], abs=1e-5)  # DCM Probability of cancer
    by_finding = {g.finding_type.value: g for g in groups if g is not lesion}
    assert coded("mel")[1] == "SCT" and coded("nv")[1] == "SCT"
    for code in HAM_CLASSES:  # one group per diagnosis: its SNOMED CT code and DCM Probability
        (m,) = by_finding[coded(code)[0]].get_measurements()
        assert m.name.value == "122157" and m.value == pytest.approx(row[f"p_{code}"], abs=1e-5)
    texts = dict(walk_text(sr))  # the algorithm identification: name, version and the card's SHA-256
    assert (texts["111001"], texts["111003"]) == (row["model_name"], row["model_version"])
    params = [t for code, t in walk_text(sr) if code == "111002"]  # DCM Algorithm Parameters
    assert any(p.startswith("card_sha256=") and len(p) == len("card_sha256=") + 64 for p in params)


def walk_text(item) -> list[tuple[str, str]]:
    """(concept code, text) of every TEXT content item in an SR tree."""
    out = []
    for child in getattr(item, "ContentSequence", []):
        if child.ValueType == "TEXT":
            out.append((child.ConceptNameCodeSequence[0].CodeValue, child.TextValue))
        out += walk_text(child)
    return out


def test_serve_stores_the_sr_after_the_record(orthanc: str, ham_rows: pd.DataFrame, tmp_path: Path) -> None:
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app
    from dermlens.serve.records import RecordStore
    from dermlens.serve.settings import load_settings

    predictor = Predictor.load(bundle_dir(), threads=1)
    url = f"sqlite:///{tmp_path / 'records.db'}"
    r = ham_rows.iloc[0]
    dcm = write_vl_photo(r["path"], tmp_path / "x.dcm", "jpeg", {"age": r["age"], "sex": r["sex"]})
    study = pydicom.dcmread(dcm, stop_before_pixels=True).StudyInstanceUID
    data = {"store_sr": "true"}
    for pacs, stored in ((f"{orthanc}/dicom-web", True), ("http://127.0.0.1:1/dicom-web", False)):
        settings = load_settings(records={"url": url}, dicomweb={"url": pacs})
        with TestClient(create_app(settings, predictor=predictor), base_url="http://localhost") as client:
            got = client.post("/predict", files={"file": ("x.dcm", dcm.read_bytes())}, data=data)
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["sr_stored"] is stored and body["record_id"]
        if not stored:
            assert "cannot connect" in body["sr_store_error"]
    assert len(study_instances(orthanc, study)) == 1  # the SR (the image itself was never uploaded)
    app = create_app(load_settings(records={"url": url}), predictor=predictor)
    with TestClient(app, base_url="http://localhost") as client:
        got = client.post("/predict", files={"file": ("x.dcm", dcm.read_bytes())}, data=data)
        jpeg = client.post("/predict", files={"file": ("x.jpg", r["path"].read_bytes())}, data=data)
    assert got.status_code == 422 and got.json()["error"]["code"] == "no_pacs"  # no --dicomweb
    assert jpeg.status_code == 422 and jpeg.json()["error"]["code"] == "store_sr_needs_dicom"
    store = RecordStore(url)
    assert store.count() == 2  # the record is kept when the PACS fails; nothing stored for a 422
    store.close()


# ---- SR sources that cannot make an SR ----------------------------------------------------------------

BROKEN = {  # tag -> value that makes the SR impossible (None: the tag is removed)
    "PatientSex": "U",
    "StudyDate": "2026-01-15",
    "StudyInstanceUID": None,
    "SOPInstanceUID": "../../escaped-sr",
}


def broken_sources(ham_root: Path, out: Path) -> dict[str, Path]:
    """Real HAM images as DICOM, one per defect in BROKEN, plus two good ones sharing one SOPInstanceUID."""
    images = sorted((ham_root / "images").glob("ISIC_00243*.jpg"))[:7]
    files = {}
    for (tag, value), img in zip(BROKEN.items(), images, strict=False):
        path = write_vl_photo(img, out / f"{tag}.dcm")
        ds = pydicom.dcmread(path)
        if value is None:
            del ds[tag]
        else:
            setattr(ds, tag, value)
        ds.save_as(path)
        files[tag] = path
    twin_a = write_vl_photo(images[4], out / "twin_a.dcm")
    twin_b = write_vl_photo(images[5], out / "twin_b.dcm")
    ds = pydicom.dcmread(twin_b)
    ds.SOPInstanceUID = pydicom.dcmread(twin_a).SOPInstanceUID
    ds.save_as(twin_b)
    files["twin_a"], files["twin_b"] = twin_a, twin_b
    files["good"] = write_vl_photo(images[6], out / "good.dcm")
    return files


def test_dicom_sr_folder_writes_what_it_can(ham_root: Path, tmp_path: Path) -> None:
    files = broken_sources(ham_root, tmp_path / "in" / "deep")
    sr_dir, csv = tmp_path / "in" / "deep" / "sr", tmp_path / "p.csv"
    res = predict(str(tmp_path / "in" / "deep"), "--out", str(csv), "--dicom-sr", str(sr_dir))
    assert res.exit_code == 1, res.output  # listed failures, no traceback
    assert "Traceback" not in res.output
    assert len(pd.read_csv(csv)) == len(files)  # every image predicted and written
    written = sorted(sr_dir.glob("*.sr.dcm"))
    assert len(written) == 2 and f"wrote 2 DICOM SR(s) to {sr_dir}" in res.output  # twin_a and good
    assert all(dciodvfy_errors(p) == [] for p in written)
    assert not list(tmp_path.rglob("escaped-sr*"))
    for tag in BROKEN:
        assert f"{files[tag]}: no DICOM SR: " in res.output, tag
    assert "'U' is not a valid PatientSex" in res.output and "'2026-01-15' to 'DA'" in res.output
    assert (
        "lacks StudyInstanceUID" in res.output and "invalid SOPInstanceUID '../../escaped-sr'" in res.output
    )
    assert f"{files['twin_b']}: no DICOM SR: SOPInstanceUID" in res.output and "twin_a.dcm's" in res.output


def test_api_refuses_sources_without_an_sr_and_stores_nothing(ham_root: Path, tmp_path: Path) -> None:
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app
    from dermlens.serve.records import RecordStore
    from dermlens.serve.settings import load_settings

    files = broken_sources(ham_root, tmp_path)
    url = f"sqlite:///{tmp_path / 'records.db'}"
    settings = load_settings(records={"url": url})
    app = create_app(settings, predictor=Predictor.load(bundle_dir(), threads=1))
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        for tag in BROKEN:
            got = client.post(
                "/predict", files={"file": ("x.dcm", files[tag].read_bytes())}, data={"dicom_sr": "true"}
            )
            assert got.status_code == 400, (tag, got.text)
            assert got.json()["error"]["code"] == "unsupported_dicom", tag
        good = files["good"].read_bytes()
        ok = client.post("/predict", files={"file": ("g.dcm", good)}, data={"dicom_sr": "true"})
        assert ok.status_code == 200, ok.text
        sr = base64.b64decode(ok.json()["dicom_sr_base64"])  # an SR sent as the image: refused in one line
        bad = client.post("/predict", files={"file": ("sr.dcm", sr)})
        assert bad.status_code == 400, bad.text
        assert "a Comprehensive SR Storage object" in bad.json()["error"]["message"]
    store = RecordStore(url)
    assert store.count() == 1  # only the answered prediction
    store.close()


def test_a_failed_stow_is_one_line_per_image(ham_rows: pd.DataFrame, tmp_path: Path) -> None:
    """A PACS that does not answer STOW-RS: each image gets one failure line; nothing raises."""
    from dermlens.bundle import card_sha256
    from dermlens.infer.predictor import Predictor
    from dermlens.predict.dicomweb import Pacs, SrStore
    from dermlens.predict.folder import Item, run_batch

    predictor = Predictor.load(bundle_dir(), threads=1)
    items = [
        Item(write_vl_photo(r["path"], tmp_path / f"{i}.dcm"), f"img{i}") for i, r in ham_rows.iterrows()
    ]
    store = SrStore(Pacs("http://127.0.0.1:1/dicom-web"), card_sha256(predictor.bundle_dir), {})
    summary = run_batch(predictor, items, out_csv=tmp_path / "p.csv", on_rows=store)
    assert summary.done == len(items) and len(pd.read_csv(tmp_path / "p.csv")) == len(items)
    assert store.stored == 0 and [f.path for f in store.failures] == ["img0", "img1"]
    for f in store.failures:
        assert "\n" not in f.reason and "STOW-RS store of" in f.reason and "cannot connect" in f.reason
