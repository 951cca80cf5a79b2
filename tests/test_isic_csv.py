"""ISIC / dermlens CSV reading, writing, validation and the CLI's handling of bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermlens.data.taxonomy import HAM_CLASSES, ISIC2019_CLASSES
from dermlens.evaluate.isic_csv import (
    PredictionFileError,
    align,
    one_hot,
    read_dermlens_csv,
    read_image_table,
    read_isic_csv,
    read_predictions,
    read_truth,
    write_dermlens_csv,
    write_isic_csv,
)
from dermlens.settings import data_root

ISIC2018_HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"


@pytest.fixture(scope="module")
def ham_rows():
    """200 real HAM10000 image ids and diagnoses, with seeded Dirichlet probabilities."""
    meta = pd.read_csv(data_root() / "ham10000" / "HAM10000_metadata.csv").head(200)
    probs = np.random.default_rng(0).dirichlet(np.ones(7), size=len(meta))
    return meta["image_id"].tolist(), meta["dx"].tolist(), probs


def _write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("style", ["2018", "2019"])
def test_isic_round_trip(tmp_path, ham_rows, style):
    images, _, probs = ham_rows
    path = write_isic_csv(tmp_path / "p.csv", images, probs, HAM_CLASSES, style=style)
    header = path.read_text().splitlines()[0]
    assert header == (ISIC2018_HEADER if style == "2018" else "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK")
    table = read_predictions(path)
    expected = HAM_CLASSES if style == "2018" else (*ISIC2019_CLASSES, "unk")
    assert table.images == tuple(images) and table.classes == expected
    np.testing.assert_allclose(table.values[:, :7], probs, atol=1e-9)
    assert not table.values[:, 7:].any()


def test_dermlens_round_trip_and_autodetect(tmp_path, ham_rows):
    images, _, probs = ham_rows
    path = write_dermlens_csv(tmp_path / "p.csv", images, probs, HAM_CLASSES)
    assert path.read_text().splitlines()[0] == "image_id,p_mel,p_nv,p_bcc,p_akiec,p_bkl,p_df,p_vasc"
    a, b = read_dermlens_csv(path), read_predictions(path)
    assert a.images == b.images == tuple(images) and a.classes == HAM_CLASSES
    np.testing.assert_allclose(b.values, probs, atol=1e-9)


def test_real_isic2019_truth():
    t = read_truth(data_root() / "isic2019" / "ISIC_2019_Training_GroundTruth.csv")
    assert t.classes == (*ISIC2019_CLASSES, "unk")
    assert len(t.images) == 25331
    counts = np.bincount(t.labels(), minlength=9)
    assert counts[0] == 4522 and counts[1] == 12875 and counts[8] == 0  # MEL, NV, UNK
    # a 2019 truth with an empty UNK column aligned with 8-class predictions: unk leaves the class space
    p = one_hot(t.images[:10], ["nv"] * 10, ISIC2019_CLASSES)
    sub = type(t)(t.images[:10], t.classes, t.values[:10], t.source)
    tt, pp = align(sub, p)
    assert tt.classes == ISIC2019_CLASSES == pp.classes


def test_truth_from_ham_labels_round_trip(tmp_path, ham_rows):
    images, dx, _ = ham_rows
    truth = one_hot(images, dx)
    path = write_isic_csv(tmp_path / "t.csv", truth.images, truth.values, truth.classes, style="2018")
    back = read_truth(path)
    assert [HAM_CLASSES[i] for i in back.labels()] == dx


def test_unk_prediction_column_joins_the_class_space(tmp_path, ham_rows):
    images, dx, probs = ham_rows
    truth = write_isic_csv(
        tmp_path / "t.csv", images, one_hot(images, dx).values, HAM_CLASSES, unk_column=False
    )
    p9 = np.hstack([probs * 0.9, np.zeros((len(images), 1)), np.full((len(images), 1), 0.1)])
    pred = write_isic_csv(tmp_path / "p.csv", images, p9, (*ISIC2019_CLASSES, "unk"))
    t, p = align(read_truth(truth), read_predictions(pred))
    assert t.classes == p.classes == (*ISIC2019_CLASSES, "unk")
    assert p.values[:, -1] == pytest.approx(0.1)


def test_predictions_reordered_to_truth_and_jpg_suffix_dropped(tmp_path, ham_rows):
    images, dx, probs = ham_rows
    truth = write_isic_csv(tmp_path / "t.csv", images, one_hot(images, dx).values, HAM_CLASSES, style="2018")
    rev = [f"{i}.jpg" for i in images[::-1]]
    pred = write_isic_csv(tmp_path / "p.csv", rev, probs[::-1], HAM_CLASSES, style="2018")
    t, p = align(read_truth(truth), read_predictions(pred))
    np.testing.assert_allclose(p.values, probs, atol=1e-9)


BAD_PREDICTIONS = {
    "missing column": ("image,MEL,NV,BCC,AKIEC,DF,VASC\nISIC_1,0.2,0.2,0.2,0.2,0.1,0.1\n", "BKL"),
    "unknown column": (f"{ISIC2018_HEADER},FOO\nISIC_1,0.2,0.2,0.2,0.2,0.1,0.05,0.05,0\n", "FOO"),
    "mixed styles": (
        "image,MEL,NV,BCC,AKIEC,AK,BKL,DF,VASC,SCC\nISIC_1,.2,.2,.2,.1,.1,.1,.05,.05,0\n",
        "mixes",
    ),
    "non-numeric": (f"{ISIC2018_HEADER}\nISIC_1,0.2,abc,0.2,0.2,0.1,0.2,0.1\n", "NV"),
    "missing value": (
        f"{ISIC2018_HEADER}\nISIC_1,0.2,,0.2,0.2,0.1,0.2,0.1\nISIC_2,1,0,0,0,0,0,0\n",
        "ISIC_1",
    ),
    "out of range": (f"{ISIC2018_HEADER}\nISIC_1,1.5,-0.5,0,0,0,0,0\nISIC_2,1,0,0,0,0,0,0\n", "ISIC_1"),
    "row sum": (f"{ISIC2018_HEADER}\nISIC_1,1,0,0,0,0,0,0\nISIC_7,0.9,0.9,0,0,0,0,0\n", "ISIC_7 (sum 1.8)"),
    "all zero row": (f"{ISIC2018_HEADER}\nISIC_1,1,0,0,0,0,0,0\nISIC_8,0,0,0,0,0,0,0\n", "ISIC_8"),
    "duplicate ids": (f"{ISIC2018_HEADER}\nISIC_1,1,0,0,0,0,0,0\nISIC_1.jpg,1,0,0,0,0,0,0\n", "duplicate"),
    "no image column": ("img,MEL\nISIC_1,1\n", "no 'image_id' column"),
    "empty": (f"{ISIC2018_HEADER}\n", "no rows"),
    "dermlens unknown class": ("image_id,p_mel,p_xyz\nISIC_1,0.5,0.5\n", "p_xyz"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREDICTIONS))
def test_bad_prediction_files_raise_clear_errors(tmp_path, case):
    text, fragment = BAD_PREDICTIONS[case]
    path = _write(tmp_path, "p.csv", text)
    with pytest.raises(PredictionFileError) as err:
        read_predictions(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_bad_truth_and_mismatched_files(tmp_path, ham_rows):
    images, dx, probs = ham_rows
    bad = _write(tmp_path, "t.csv", f"{ISIC2018_HEADER}\nISIC_1,1,1,0,0,0,0,0\nISIC_2,0,1,0,0,0,0,0\n")
    with pytest.raises(PredictionFileError, match="one-hot.*ISIC_1"):
        read_truth(bad)
    truth = read_truth(
        write_isic_csv(tmp_path / "t2.csv", images, one_hot(images, dx).values, HAM_CLASSES, style="2018")
    )
    fewer = read_predictions(
        write_isic_csv(tmp_path / "p1.csv", images[1:], probs[1:], HAM_CLASSES, style="2018")
    )
    with pytest.raises(PredictionFileError, match=f"no prediction for 1 truth image.*{images[0]}"):
        align(truth, fewer)
    more = read_predictions(
        write_isic_csv(
            tmp_path / "p2.csv",
            [*images, "ISIC_9999999"],
            np.vstack([probs, probs[:1]]),
            HAM_CLASSES,
            style="2018",
        )
    )
    with pytest.raises(PredictionFileError, match="not in the truth: ISIC_9999999"):
        align(truth, more)
    scc = read_predictions(
        write_isic_csv(
            tmp_path / "p3.csv",
            images,
            np.hstack([probs * 0.5, np.full((len(images), 1), 0.5)]),
            (*HAM_CLASSES, "scc"),
            style="2019",
            unk_column=False,
        )
    )
    with pytest.raises(PredictionFileError, match="scc"):
        align(truth, scc)
    with pytest.raises(PredictionFileError, match="file not found"):
        read_isic_csv(tmp_path / "nope.csv")


def test_image_table_from_manifest_and_isic_metadata(tmp_path):
    man = _write(
        tmp_path,
        "manifest.csv",
        "image_id,lesion_id,group_id,split,diagnosis,image_path\n"
        "ISIC_1,L1,G1,test,mel,/x/ISIC_1.jpg\nISIC_2,L2,G1,train,nv,/x/ISIC_2.jpg\n",
    )
    t = read_image_table(man)
    assert t["group"].tolist() == ["G1", "G1"] and t["split"].tolist() == ["test", "train"]
    meta = read_image_table(data_root() / "isic2019" / "ISIC_2019_Training_Metadata.csv")
    assert meta["image"].iloc[0] == "ISIC_0000000" and "group" in meta.columns
    assert meta["group"].notna().sum() == 23247


def _run(args: list[str]):
    from dermlens.cli.main import app

    return CliRunner().invoke(app, ["evaluate", *args])


def test_cli_reports_bad_csv_without_traceback(tmp_path, ham_rows):
    images, dx, probs = ham_rows
    truth = write_isic_csv(tmp_path / "t.csv", images, one_hot(images, dx).values, HAM_CLASSES, style="2018")
    pred = write_isic_csv(tmp_path / "p.csv", images[:-3], probs[:-3], HAM_CLASSES, style="2018")
    res = _run(["--predictions", str(pred), "--truth", str(truth), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "error:" in res.output and "no prediction for 3 truth image(s)" in res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    res = _run(["--truth", str(truth), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--predictions and --truth" in res.output
    broken = _write(tmp_path, "b.csv", "image,MEL\nISIC_1,zz\n")
    res = _run(["--predictions", str(broken), "--truth", str(truth), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing ISIC 2018 column" in res.output
    assert not (tmp_path / "o" / "metrics.json").exists()
