"""DICOM in and out on real HAM10000 images: decoding (RGB/YBR, compressed or not), tags -> metadata,
`dermlens predict` (+ --dicom-sr), the API upload and SR option, and `data prepare --dataset csv`."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.sr.codedict import codes
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens import DISCLAIMER, dicom
from dermlens.data.dicom_meta import read_meta
from dermlens.data.taxonomy import HAM_CLASSES, SNOMED_SITES, site_general
from dermlens.preprocess import ImageDecodeError, load_rgb
from dicom_files import (
    SYNTAXES,
    coded,
    dciodvfy_errors,
    write_ct_slice,
    write_multiframe,
    write_photo,
)  # tests/dicom_files.py

N_IMAGES = 10


@pytest.fixture(scope="module")
def ham_rows(ham_root: Path) -> pd.DataFrame:
    """Ten HAM10000 images with complete metadata, spread over classes and sites."""
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    meta = meta[meta["age"].notna() & meta["sex"].isin(["female", "male"])]
    meta = meta[meta["localization"].map(site_general).notna()]
    rows = meta.groupby("dx").head(2).sort_values("image_id").head(N_IMAGES)
    rows = rows.assign(
        site=rows["localization"].map(site_general),
        path=rows["image_id"].map(lambda i: ham_root / "images" / f"{i}.jpg"),
    )
    return rows.reset_index(drop=True)


@pytest.fixture(scope="module")
def dicom_dir(ham_rows: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DICOM per HAM image, transfer syntaxes in rotation, patient tags from the HAM metadata."""
    out = tmp_path_factory.mktemp("dicom")
    for i, r in ham_rows.iterrows():
        meta = {"age": r["age"], "sex": r["sex"], "site": r["site"]}
        write_photo(r["path"], out / f"{r['image_id']}.dcm", SYNTAXES[i % len(SYNTAXES)], meta)
    return out


def run_predict(*args: str):
    from dermlens.cli.main import app

    return CliRunner().invoke(app, ["predict", *args, "--model", str(bundle_dir()), "--threads", "1"])


def test_every_syntax_decodes_to_the_jpeg_pixels(ham_rows: pd.DataFrame, tmp_path: Path) -> None:
    src = ham_rows["path"].iloc[0]
    rgb = load_rgb(src)
    for syntax in SYNTAXES:
        path = write_photo(src, tmp_path / f"{syntax}.dcm", syntax)
        got = load_rgb(path)  # the one decoding function, recognising the DICM preamble
        assert got.dtype == np.uint8 and got.shape == rgb.shape, syntax
        # 8-bit YBR_FULL storage rounds (RGB -> YCbCr -> RGB): at most one level; the rest is exact
        tol = 1 if syntax == "ybr" else 0
        assert np.abs(got.astype(int) - rgb).max() <= tol, syntax
        np.testing.assert_array_equal(load_rgb(path.read_bytes()), got, err_msg=syntax)
    renamed = tmp_path / "no_extension"
    renamed.write_bytes((tmp_path / "jpeg.dcm").read_bytes())
    np.testing.assert_array_equal(load_rgb(renamed), rgb)


def test_tags_map_to_metadata(dicom_dir: Path, ham_rows: pd.DataFrame) -> None:
    for _, r in ham_rows.iterrows():
        meta = read_meta(dicom_dir / f"{r['image_id']}.dcm")
        assert meta == {"age": float(int(r["age"])), "sex": r["sex"], "site": r["site"]}
    assert dicom.parse_age("045Y") == 45 and dicom.parse_age("006M") == 0.5 and dicom.parse_age("") is None
    assert dicom.merge_meta({"age": 30, "sex": None}, {"age": 45, "sex": "male", "site": "torso"}) == {
        "age": 30,
        "sex": "male",
        "site": "torso",
    }


def test_snomed_codes_mean_what_the_map_says() -> None:
    """Every code pydicom's SNOMED dictionary knows has the meaning the site map's comment gives."""
    by_value = {}
    for name in dir(codes.SCT):
        code = getattr(codes.SCT, name, None)
        if hasattr(code, "value"):
            by_value.setdefault(code.value, set()).add(code.meaning.lower())
    known = [c for c in SNOMED_SITES if c in by_value]
    assert len(known) >= len(SNOMED_SITES) - 2
    source = (Path(dicom.__file__).parent / "data" / "taxonomy.py").read_text()
    for code in known:
        comment = source.split(f'"{code}": ')[1].split("# ")[1].split("\n")[0].lower()
        assert any(m in comment or comment.split(" /")[0] in m for m in by_value[code]), (code, comment)


def test_non_photographs_are_refused_in_one_line(ham_rows: pd.DataFrame, tmp_path: Path) -> None:
    ct = write_ct_slice(tmp_path / "ct.dcm")
    cine = write_multiframe(ham_rows["path"].iloc[0], tmp_path / "cine.dcm")
    with pytest.raises(ImageDecodeError, match=r"ct\.dcm: not a colour photograph \(modality CT"):
        load_rgb(ct)
    with pytest.raises(ImageDecodeError, match=r"multi-frame DICOM \(3 frames"):
        load_rgb(cine)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes((tmp_path / "ct.dcm").read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match="broken.dcm"):
        load_rgb(broken)


def test_jpeg_lossless_is_refused_in_one_line(tmp_path: Path) -> None:
    """JPEG Lossless (Process 14) has no permissively licensed decoder: a one-line refusal naming the syntax
    (pydicom's own GDCM-written RGB test file), from the loader and from `dermlens predict`."""
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1 and ds.SamplesPerPixel == 3
    with pytest.raises(ImageDecodeError, match=r"JPEG Lossless, .* pixel data is not supported") as err:
        load_rgb(path)
    assert "\n" not in str(err.value) and "JPEG 2000" in str(err.value)
    res = run_predict(str(path), "--out", str(tmp_path / "out.csv"))
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "SC_rgb_jpeg_gdcm.dcm: JPEG Lossless" in res.output


@pytest.mark.slow
def test_predict_dicom_equals_jpeg_with_tag_metadata_and_writes_sr(
    dicom_dir: Path, ham_rows: pd.DataFrame, tmp_path: Path
) -> None:
    write_ct_slice(dicom_dir.parent / "ct_slice.dcm")
    meta_csv = tmp_path / "meta.csv"
    ham_rows.assign(image_path=ham_rows["path"].astype(str))[["image_path", "age", "sex", "site"]].to_csv(
        meta_csv, index=False
    )
    jpeg_out, dcm_out, bare_out, sr_dir = (tmp_path / n for n in ("jpeg.csv", "dcm.csv", "bare.csv", "sr"))
    res = run_predict(str(meta_csv), "--out", str(jpeg_out))
    assert res.exit_code == 0, res.output
    res = run_predict(
        str(dicom_dir),
        str(dicom_dir.parent / "ct_slice.dcm"),
        "--out",
        str(dcm_out),
        "--dicom-sr",
        str(sr_dir),
    )
    assert res.exit_code == 1, res.output  # the CT slice is listed, the photographs are all predicted
    assert (
        "ct_slice.dcm: not a colour photograph" in res.output and f"wrote {N_IMAGES} DICOM SR" in res.output
    )
    jpeg, dcm = pd.read_csv(jpeg_out), pd.read_csv(dcm_out)
    cols = [f"p_{c}" for c in HAM_CLASSES] + ["p_malignant", "confidence", "ood_score"]
    assert list(dcm["image_id"]) == list(jpeg["image_id"])
    exact = np.array([SYNTAXES[i % len(SYNTAXES)] != "ybr" for i in range(len(dcm))])
    np.testing.assert_allclose(dcm[cols][exact], jpeg[cols][exact], rtol=1e-5, atol=1e-6)
    # YBR_FULL pixels are off by one level at most: probabilities move by well under 0.05
    assert np.abs(dcm[cols[:8]][~exact].to_numpy() - jpeg[cols[:8]][~exact].to_numpy()).max() < 0.05
    assert (dcm["top_class"] == jpeg["top_class"]).all()

    # the tags reach the model: the same JPEGs without metadata score differently
    run_predict(*map(str, ham_rows["path"]), "--out", str(bare_out))
    bare = pd.read_csv(bare_out)
    assert np.abs(bare[cols[:7]].to_numpy() - dcm[cols[:7]].to_numpy()).max() > 1e-3
    # the command line wins over the tags, field by field
    one = dicom_dir / f"{ham_rows['image_id'].iloc[0]}.dcm"
    override = tmp_path / "override.csv"
    assert run_predict(str(one), "--age", "5", "--out", str(override)).exit_code == 0
    r0 = ham_rows.iloc[0]
    expect = tmp_path / "expect.csv"
    run_predict(str(r0["path"]), "--age", "5", "--sex", r0["sex"], "--site", r0["site"], "--out", str(expect))
    np.testing.assert_allclose(pd.read_csv(override)[cols], pd.read_csv(expect)[cols], rtol=1e-5)

    check_srs(sr_dir, dicom_dir, dcm)


def check_srs(sr_dir: Path, dicom_dir: Path, preds: pd.DataFrame) -> None:
    """Each SR reads back with pydicom, parses with highdicom and carries the CSV's numbers."""
    from dermlens.infer.predictor import Predictor

    version = Predictor.load(bundle_dir(), threads=1).version
    files = sorted(sr_dir.glob("*.sr.dcm"))
    assert len(files) == len(preds)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dicom_dir.glob("*.dcm")}
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and ds.Modality == "SR"
        assert path.name == f"{ds.SOPInstanceUID}.sr.dcm"  # named by the SR's own (derived) UID
        ref = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        src_path = by_uid[ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        src = pydicom.dcmread(src_path, stop_before_pixels=True)
        assert (ds.StudyInstanceUID, ds.PatientID) == (src.StudyInstanceUID, src.PatientID)
        sr = hd.sr.srread(path)  # highdicom parses and validates the IOD and the TID 1500 content
        assert dciodvfy_errors(path) == []  # and dicom3tools finds no error
        groups = {g.finding_type.value: g for g in sr.content.get_image_measurement_groups()}
        group = groups["95324001"]  # SNOMED CT Skin lesion
        row = preds.set_index("image_id").loc[src_path.stem]
        for c in HAM_CLASSES:  # one group per diagnosis (SNOMED CT where it has a code), DCM Probability
            (m,) = groups[coded(c)[0]].get_measurements()
            assert (m.name.value, m.value) == ("122157", pytest.approx(row[f"p_{c}"], abs=1e-5))
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["111047"] == pytest.approx(row["p_malignant"], abs=1e-5)
        evals = {q.name.value: q.value for q in group.get_qualitative_evaluations()}
        assert (evals["121073"].value, evals["121073"].scheme_designator) == coded(row["top_class"])
        assert evals["REFER"].value == ("373066001" if row["refer"] else "373067005")
        texts = [i.TextValue for i in ds.ContentSequence if i.ValueType == "TEXT"]
        assert DISCLAIMER in texts
        assert ("Algorithm Version", version) in set(walk_text(ds))


def walk_text(item) -> list[tuple[str, str]]:
    """(concept name, text) of every TEXT content item in an SR tree."""
    out = []
    for child in getattr(item, "ContentSequence", []):
        if child.ValueType == "TEXT":
            out.append((child.ConceptNameCodeSequence[0].CodeMeaning, child.TextValue))
        out += walk_text(child)
    return out


def test_api_dicom_upload_and_sr(dicom_dir: Path, ham_rows: pd.DataFrame, tmp_path: Path) -> None:
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app
    from dermlens.serve.records import RecordStore
    from dermlens.serve.settings import load_settings

    predictor = Predictor.load(bundle_dir(), threads=1)
    url = f"sqlite:///{tmp_path / 'records.db'}"
    settings = load_settings(records={"url": url})
    r = ham_rows.iloc[1]
    dcm = (dicom_dir / f"{r['image_id']}.dcm").read_bytes()
    with TestClient(
        create_app(settings, predictor=predictor), base_url="http://localhost", raise_server_exceptions=False
    ) as client:
        got = client.post(
            "/predict", files={"file": ("x.dcm", dcm, "application/dicom")}, data={"dicom_sr": "true"}
        )
        assert got.status_code == 200, got.text
        body = got.json()
        want = client.post(
            "/predict",
            files={"file": ("x.jpg", Path(r["path"]).read_bytes(), "image/jpeg")},
            data={"age": str(r["age"]), "sex": r["sex"], "site": r["site"]},
        ).json()
        assert body["inputs"] == {"age": float(int(r["age"])), "sex": r["sex"], "site": r["site"]}
        for c in HAM_CLASSES:
            assert body["fine"][c] == pytest.approx(want["fine"][c], abs=1e-5)
        sr = pydicom.dcmread(io.BytesIO(base64.b64decode(body["dicom_sr_base64"])))
        (tmp_path / "api.sr.dcm").write_bytes(base64.b64decode(body["dicom_sr_base64"]))
        assert dciodvfy_errors(tmp_path / "api.sr.dcm") == []
        assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
        assert body["disclaimer"] == DISCLAIMER

        jpeg_sr = client.post(
            "/predict",
            files={"file": ("x.jpg", Path(r["path"]).read_bytes(), "image/jpeg")},
            data={"dicom_sr": "true"},
        )
        assert jpeg_sr.status_code == 422 and jpeg_sr.json()["error"]["code"] == "dicom_sr_needs_dicom"
        ct = write_ct_slice(tmp_path / "ct.dcm").read_bytes()
        bad = client.post("/predict", files={"file": ("ct.dcm", ct, "application/dicom")})
        assert bad.status_code == 400, bad.text
        assert "not a colour photograph" in bad.json()["error"]["message"]
        assert client.get("/health").status_code == 200
    store = RecordStore(url)
    rows = list(store.iter_records())
    store.close()
    assert len(rows) == 2 and rows[0].age == float(int(r["age"])) and rows[0].site == r["site"]


def test_prepare_csv_reads_dicom_images_and_tags(
    dicom_dir: Path, ham_rows: pd.DataFrame, tmp_path: Path
) -> None:
    from dermlens.cli.data import app
    from dermlens.data.manifest import read_manifest

    csv = tmp_path / "labels.csv"
    pd.DataFrame({"file": [f"{i}.dcm" for i in ham_rows["image_id"]], "dx": ham_rows["dx"]}).to_csv(
        csv, index=False
    )
    out = tmp_path / "prepared"
    res = CliRunner().invoke(
        app,
        [
            "prepare",
            "--dataset",
            "csv",
            "--root",
            str(csv),
            "--image-dir",
            str(dicom_dir),
            "--out",
            str(out),
            "--split",
            "grouped",
            "--fractions",
            "0.6,0.2,0.2",
            "--folds",
            "0",
            "--workers",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    df = read_manifest(out).set_index("image_id")
    want = ham_rows.set_index("image_id")
    assert (df.loc[want.index, "sex"] == want["sex"]).all() and (
        df.loc[want.index, "site"] == want["site"]
    ).all()
    np.testing.assert_array_equal(df.loc[want.index, "age"], want["age"].astype(int).astype(float))
    cache = np.load(next((out / "cache").glob("images_*.npy")), mmap_mode="r")
    assert cache.shape[0] == len(ham_rows) and cache.max() > 0
