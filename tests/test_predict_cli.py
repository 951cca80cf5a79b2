"""`dermlens predict` on real images: files, folders, manifest CSVs, metadata, CAMs, bad files, ISIC CSVs."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens import DISCLAIMER
from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.evaluate.isic_csv import read_predictions
from dermlens.infer.prediction import Prediction

ISIC_HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"


def run(*args: str) -> object:
    from dermlens.cli.main import app

    return CliRunner().invoke(app, ["predict", *args, "--model", str(bundle_dir()), "--threads", "1"])


@pytest.fixture(scope="module")
def image_folder(ham_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real HAM images as JPEG / PNG / WebP / TIFF, two in a subfolder, plus a non-image note."""
    root = tmp_path_factory.mktemp("images")
    src = sorted((ham_root / "images").glob("*.jpg"))[:5]
    shutil.copy(src[0], root / src[0].name)
    shutil.copy(src[1], root / src[1].name)
    Image.open(src[2]).save(root / f"{src[2].stem}.png")
    (root / "sub").mkdir()
    Image.open(src[3]).save(root / "sub" / f"{src[3].stem}.webp")
    Image.open(src[4]).convert("RGBA").save(root / "sub" / f"{src[4].stem}.tif")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_to_csv_and_isic(image_folder: Path, tmp_path: Path) -> None:
    out, isic = tmp_path / "preds.csv", tmp_path / "isic.csv"
    res = run(str(image_folder), "--out", str(out), "--isic-csv", str(isic))
    assert res.exit_code == 0, res.output
    assert DISCLAIMER.split(".")[0] in res.output
    df = pd.read_csv(out)
    assert list(df.columns) == ["image_id", "path", *Prediction.columns(HAM_CLASSES, ("benign", "malignant"))]
    assert {"refer", "refer_codes", "prediction_set", "not_dermoscopy_score", "precision"} <= set(df.columns)
    assert len(df) == 5 and df["image_id"].str.startswith("ISIC_").all()
    probs = df[[f"p_{c}" for c in HAM_CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert (df["top_class"] == [HAM_CLASSES[i] for i in probs.argmax(1)]).all()
    assert df["p_malignant"].between(0, 1).all() and set(df["refer"]) <= {True, False}
    assert isic.read_text().splitlines()[0] == ISIC_HEADER
    table = read_predictions(isic)  # the evaluate layer's validating reader
    assert sorted(table.images) == sorted(df["image_id"])
    isic_df = pd.read_csv(isic)
    np.testing.assert_allclose(isic_df.iloc[:, 1:].to_numpy(), probs, atol=1e-5)


def test_bad_files_are_listed_and_finished_rows_kept(image_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "garbage.png").write_bytes(b"this is not a png")
    good = sorted(image_folder.glob("*.jpg"))
    data = good[0].read_bytes()
    (bad / "half.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "preds.csv"
    res = run(
        str(good[0]),
        str(bad),
        str(good[1]),
        str(tmp_path / "missing.jpg"),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--workers",
        "2",
    )
    assert res.exit_code == 1, res.output
    assert "4 input(s) could not be predicted" in res.output
    for name, reason in [
        ("empty.jpg", "empty"),
        ("garbage.png", "not a supported image format"),
        ("half.jpg", "truncated"),
        ("missing.jpg", "no such file"),
    ]:
        line = next(ln for ln in res.output.splitlines() if name in ln)
        assert reason in line, line
    df = pd.read_csv(out)
    assert list(df["image_id"]) == [good[0].stem, good[1].stem]  # input order kept


def test_manifest_csv_with_metadata_and_cam(ham_root: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").head(4)
    manifest = tmp_path / "list.csv"
    pd.DataFrame(
        {
            "image_path": [str(ham_root / "images" / f"{i}.jpg") for i in meta["image_id"]],
            "age": meta["age"],
            "sex": meta["sex"],
            "localization": meta["localization"],
        }
    ).to_csv(manifest, index=False)
    cams = tmp_path / "cams"
    res = run(str(manifest), "--cam", str(cams))
    assert res.exit_code == 0, res.output
    for image_id in meta["image_id"]:
        assert image_id in res.output  # one human-readable line per image without --out
        png = Image.open(cams / f"{image_id}_cam.png")
        assert png.format == "PNG" and png.size == (200, 150)
    ids_only = tmp_path / "ids.csv"  # ids without extension, resolved beside the CSV's images/ folder
    (tmp_path / "images").mkdir()
    shutil.copy(ham_root / "images" / f"{meta['image_id'][0]}.jpg", tmp_path / "images")
    pd.DataFrame({"image": [meta["image_id"][0]]}).to_csv(ids_only, index=False)
    assert run(str(ids_only)).exit_code == 0


def test_metadata_options(image_folder: Path, tmp_path: Path) -> None:
    res = run(str(image_folder), "--metadata", str(tmp_path / "m.csv"), "--age", "50")
    assert res.exit_code == 2 and "either --metadata" in res.output
    mcsv = tmp_path / "m.csv"
    ids = [p.stem for p in sorted(image_folder.rglob("*")) if p.suffix in (".jpg", ".png", ".webp", ".tif")]
    pd.DataFrame({"image_id": ids, "age": 60, "sex": "female", "site": "back"}).to_csv(mcsv, index=False)
    out_a, out_b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(str(image_folder), "--metadata", str(mcsv), "--out", str(out_a)).exit_code == 0
    res = run(str(image_folder), "--age", "25", "--sex", "male", "--site", "face", "--out", str(out_b))
    assert res.exit_code == 0, res.output
    a, b = pd.read_csv(out_a), pd.read_csv(out_b)
    from dermlens.bundle import read_card

    uses = read_card(bundle_dir()).uses_metadata
    assert np.allclose(a["p_mel"], b["p_mel"]) != uses
    if not uses:
        assert "does not use patient metadata" in res.output


def test_no_images_is_a_usage_error(tmp_path: Path) -> None:
    res = run(str(tmp_path))
    assert res.exit_code == 2 and "no images" in res.output


def test_interrupt_keeps_finished_rows(image_folder: Path, tmp_path: Path) -> None:
    """Ctrl-C after the first batch: that batch's rows are on disk, in files marked incomplete (.partial)."""
    from dermlens.infer.predictor import Predictor
    from dermlens.predict.folder import collect_inputs, run_batch

    items, _ = collect_inputs([image_folder])
    seen = []

    def stop(n: int) -> None:
        seen.append(n)
        raise KeyboardInterrupt

    out, isic = tmp_path / "p.csv", tmp_path / "i.csv"
    pred = Predictor.load(bundle_dir(), threads=1)
    summary = run_batch(pred, items, out_csv=out, isic_csv=isic, batch_size=2, workers=1, on_progress=stop)
    assert summary.interrupted and summary.done == 2
    assert not out.exists() and not isic.exists()
    assert len(pd.read_csv(f"{out}.partial")) == 2 and len(pd.read_csv(f"{isic}.partial")) == 2


@pytest.mark.release
def test_isic2017_folder_to_isic_csv(data_root: Path, tmp_path: Path) -> None:
    """The whole ISIC 2017 image folder (2,750 images) -> a valid ISIC 2018 submission CSV."""
    from dermlens.cli.main import app

    folder = data_root / "isic2017" / "images"
    n = len([p for p in folder.iterdir() if p.suffix.lower() == ".jpg"])
    out = tmp_path / "isic2017.csv"
    start = time.perf_counter()
    res = CliRunner().invoke(
        app, ["predict", str(folder), "--isic-csv", str(out), "--model", str(bundle_dir())]
    )
    seconds = time.perf_counter() - start
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(out.open()))
    assert ",".join(rows[0]) == ISIC_HEADER and len(rows) == n + 1 == 2751
    assert all(not r[0].endswith(".jpg") for r in rows[1:])
    table = read_predictions(out)
    assert len(set(table.images)) == n
    print(f"ISIC 2017: {n} images in {seconds:.1f} s ({n / seconds:.0f} img/s)")


def test_isic_2019_format_adds_scc_and_unk_from_the_refer_decision(
    image_folder: Path, tmp_path: Path
) -> None:
    isic = tmp_path / "isic2019.csv"
    res = run(
        str(image_folder), "--out", str(tmp_path / "p.csv"), "--isic-csv", str(isic), "--isic-format", "2019"
    )
    assert res.exit_code == 0, res.output
    df, preds = pd.read_csv(isic), pd.read_csv(tmp_path / "p.csv").set_index("image_id")
    assert list(df.columns) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    np.testing.assert_allclose(df.iloc[:, 1:].sum(axis=1), 1, atol=1e-4)
    referred = preds.loc[df["image"], "refer"].to_numpy(bool)
    assert (df["UNK"].to_numpy()[referred] == 0.5).all() and (df["UNK"].to_numpy()[~referred] == 0).all()
    assert (df.iloc[:, 1:].to_numpy().argmax(1)[referred] == 8).all()  # UNK tops a referred row
    table = read_predictions(isic)  # the evaluate layer reads it back as an ISIC 2019 file
    assert "unk" in table.classes and "scc" in table.classes


def test_isic_2018_format_merges_scc_into_akiec(predictor, ham_root: Path) -> None:
    from dermlens.predict.folder import Item, Scored, isic_header, isic_row

    path = sorted((ham_root / "images").glob("*.jpg"))[0]
    pred = predictor.predict(path)
    fine = {**pred.fine, "akiec": 0.1, "scc": 0.2}
    fine["nv"] -= 0.3 - pred.fine["akiec"] - pred.fine.get("scc", 0.0)
    scored = Scored(Item(path=path, image_id=path.stem), pred.model_copy(update={"fine": fine}))
    row = dict(zip(isic_header("2018"), isic_row(scored, "2018"), strict=True))
    assert float(row["AKIEC"]) == pytest.approx(0.3) and "SCC" not in row
    assert sum(float(v) for k, v in row.items() if k != "image") == pytest.approx(1, abs=1e-4)


def test_unknown_isic_format_is_one_line(image_folder: Path, tmp_path: Path) -> None:
    res = run(str(image_folder), "--isic-csv", str(tmp_path / "x.csv"), "--isic-format", "2020")
    assert res.exit_code == 2 and "2018 or 2019" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.csv").exists()
