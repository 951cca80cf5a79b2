"""Readers: every supported layout becomes the canonical manifest (real shared data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_ham_subset
from dermlens.data import readers, registry
from dermlens.data.manifest import BASE_COLUMNS, DataError, read_manifest, write_manifest
from dermlens.data.pad_ufes20 import read_pad_ufes20


def _check_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    assert df["image_path"].map(os.path.isabs).all()
    assert df["age"].dtype == float
    assert set(df["sex"].dropna()) <= {"female", "male"}
    assert df["group_id"].notna().all()


def test_ham10000_shared_layout(ham_root):
    df = readers.read_ham10000(ham_root)
    _check_canonical(df)
    assert len(df) == 10015 and df["image_id"].is_unique
    assert df["lesion_id"].nunique() == 7470
    assert df["diagnosis"].value_counts().to_dict() == {
        "nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115
    }  # fmt: skip
    assert df["image_path"].map(os.path.isfile).all()
    assert df["mask_path"].map(os.path.isfile).all()
    row = df.set_index("image_id").loc["ISIC_0027419"]
    assert (row.lesion_id, row.diagnosis, row.coarse, row.age, row.sex, row.site, row.dx_type) == (
        "HAM_0000118", "bkl", "benign", 80.0, "male", "head/neck", "histopathology"
    )  # fmt: skip
    assert (df["coarse"] == "malignant").sum() == 1113 + 514 + 327
    assert df["age"].isna().sum() == 57 and df["site"].isna().sum() == 234
    assert (df["dataset"] == "ham10000").all()


def test_ham10000_official_part1_part2_layout(ham_root, tmp_path):
    root = make_ham_subset(ham_root, tmp_path / "ham", per_class=10, layout="parts")
    df = readers.read_ham10000(root)
    _check_canonical(df)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    assert df["image_id"].tolist() == meta["image_id"].tolist()
    folders = df["image_path"].map(lambda p: Path(p).parent.name)
    assert set(folders) == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert df["image_path"].map(os.path.isfile).all()
    assert "mask_path" not in df.columns  # no masks folder in this layout
    assert set(df["diagnosis"]) == set(readers.tx.HAM_CLASSES)


def test_ham10000_missing_image_still_listed(ham_root, tmp_path):
    root = make_ham_subset(ham_root, tmp_path / "ham", per_class=3)
    victim = sorted((root / "images").iterdir())[0]
    victim.unlink()
    df = readers.read_ham10000(root)
    row = df.set_index("image_id").loc[victim.stem]
    assert row.image_path == str(victim) and not os.path.exists(row.image_path)


def test_isic2019_bcn_thumbnails(data_root):
    root = data_root / "isic2019"
    df = readers.read_isic2019(root)
    _check_canonical(df)
    gt = pd.read_csv(root / "ISIC_2019_Training_GroundTruth.csv")
    assert len(gt) == 25331 and len(df) == 12539  # the other rows' images are in ham10000/isic2017
    assert "12792 ISIC 2019 rows have their images in ham10000/isic2017" in df.attrs["note"]
    expected = gt.set_index("image").iloc[:, :-1].idxmax(axis=1).map(readers.tx.fine_code)
    assert (df.set_index("image_id")["diagnosis"] == expected.loc[df["image_id"]]).all()
    assert df["image_path"].map(os.path.isfile).all()
    assert (df["diagnosis"] == "scc").sum() == 431 and (df["diagnosis"] == "nv").sum() == 4332
    no_lesion = df["lesion_id"].isna()
    assert no_lesion.sum() == 158
    assert (df.loc[~no_lesion, "group_id"] == df.loc[~no_lesion, "lesion_id"]).all()
    assert df["image_sha256"].notna().all() and set(df["site"].dropna()) <= set(readers.tx.SITES)


def test_isic2019_prepare_groups_lesions_and_identical_images(data_root, tmp_path):
    """Lesion-grouped split of the BCN thumbnails; identical pixels under two lesion ids share a group."""
    from dermlens.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        "isic2019", data_root / "isic2019", tmp_path, folds=0, build=False, check_images=False
    )
    done = prepare(opts, show=lambda _: None)
    df = pd.read_csv(done.manifest)
    assert len(df) == 12539 and df.groupby("group_id")["split"].nunique().max() == 1
    twins = df[df["lesion_id"].isin(["BCN_0003560", "BCN_0000237"])]
    assert len(twins) >= 4 and twins["group_id"].nunique() == 1
    shares = df["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.70) < 0.02 and abs(shares["test"] - 0.15) < 0.02
    assert done.record["leaking_groups"] == 0


def test_pad_ufes20_reader(data_root):
    root = data_root / "pad_ufes20"
    df = read_pad_ufes20(root)
    _check_canonical(df)
    assert len(df) == 685 and df["image_path"].map(os.path.isfile).all()
    assert "1613 metadata.csv rows have no photo" in df.attrs["note"]
    counts = df["diagnosis"].value_counts().to_dict()
    assert counts == {"bcc": 194, "nv": 182, "bkl": 130, "akiec": 114, "mel": 43, "scc": 22}
    assert df["patient_id"].nunique() == 537 and df["dataset"].eq("pad_ufes20").all()
    fitz = df["fitzpatrick"].value_counts().to_dict()
    assert fitz == {2.0: 234, 3.0: 122, 1.0: 44, 4.0: 27, 5.0: 3, 6.0: 1}
    assert set(df["site"].dropna()) <= set(readers.tx.SITES) and df["site"].notna().all()


def test_pad_ufes20_split_by_patient(data_root, tmp_path):
    """About 60/20/20 by patient, seeded and recorded; no patient in two splits."""
    from dermlens.data.prepare import PrepareOptions, prepare

    root = data_root / "pad_ufes20"
    done = prepare(PrepareOptions("pad_ufes20", root, tmp_path, folds=0, build=False), show=lambda _: None)
    df = pd.read_csv(done.manifest)
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    shares = df["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.6) < 0.03 and abs(shares["val"] - 0.2) < 0.03
    record = json.loads((tmp_path / "splits.json").read_text())
    assert record["seed"] == 42 and record["fractions"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    again = prepare(
        PrepareOptions("pad_ufes20", root, tmp_path / "b", folds=0, build=False), show=lambda _: None
    )
    assert pd.read_csv(again.manifest)["split"].tolist() == df["split"].tolist()


def test_isic2019_unk_rows(data_root, tmp_path):
    src = data_root / "isic2019"
    gt = pd.read_csv(src / "ISIC_2019_Training_GroundTruth.csv", nrows=6)
    gt.loc[0, gt.columns[1:]] = 0.0
    gt.loc[0, "UNK"] = 1.0
    gt.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.read_csv(src / "ISIC_2019_Training_Metadata.csv", nrows=6).to_csv(
        tmp_path / "ISIC_2019_Training_Metadata.csv", index=False
    )
    df = readers.read_isic2019(tmp_path)
    assert df.loc[0, "diagnosis"] == "unk" and df.loc[0, "coarse"] == "unk"
    assert (df.loc[1:, "diagnosis"] != "unk").all()


def test_isic2017(data_root):
    root = data_root / "isic2017"
    df = readers.read_isic2017(root)
    _check_canonical(df)
    lab = pd.read_csv(root / "ISIC-2017_labels.csv")
    assert len(df) == 2750 and df["image_path"].map(os.path.isfile).all()
    assert df["split"].value_counts().to_dict() == {"train": 2000, "test": 600, "val": 150}
    assert (df["diagnosis"] == "mel").sum() == (lab["melanoma"] == 1).sum()
    assert (df["diagnosis"] == "bkl").sum() == (lab["seborrheic_keratosis"] == 1).sum()
    val = df[df["split"] == "val"]
    assert set(val["diagnosis"]) == {"mel", "unk"}
    # benign-but-unknown-subtype rows: fine "unk", and coarse must say benign (melanoma=0 is known)
    assert (df.loc[df["diagnosis"] == "unk", "coarse"] == "benign").all()
    assert not ((df["split"] != "val") & (df["diagnosis"] == "unk")).any()
    assert df["age"].isna().sum() == 857  # "unknown" and empty test-split ages


def test_generic_csv_auto_detect_paths(ham_root, tmp_path):
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").head(20)
    table = pd.DataFrame(
        {
            "File": [f"sub/{i}.jpg" for i in meta["image_id"]],
            "Label": meta["dx"].str.upper(),
            "Age": meta["age"],
            "Gender": meta["sex"],
            "Location": meta["localization"],
            "lesion": meta["lesion_id"],
        }
    )
    (tmp_path / "sub").mkdir()
    for i in meta["image_id"]:
        os.symlink(ham_root / "images" / f"{i}.jpg", tmp_path / "sub" / f"{i}.jpg")
    table.to_csv(tmp_path / "labels.csv", index=False)
    df = readers.read_csv_dataset(tmp_path / "labels.csv")
    _check_canonical(df)
    assert df["image_id"].tolist() == meta["image_id"].tolist()
    assert df["diagnosis"].tolist() == meta["dx"].tolist()
    assert df["image_path"].map(os.path.isfile).all()
    assert df["lesion_id"].tolist() == meta["lesion_id"].tolist()
    assert df["site"].iloc[0] == "head/neck" and (df["dataset"] == "labels").all()


def test_generic_csv_ids_with_image_dir_and_explicit_columns(ham_root, tmp_path):
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").head(10)
    table = pd.DataFrame({"name": meta["image_id"], "truth": meta["dx"], "years": meta["age"]})
    table.to_csv(tmp_path / "mine.csv", index=False)
    df = readers.read_csv_dataset(
        tmp_path / "mine.csv",
        image_dir=ham_root / "images",
        columns={"image": "name", "diagnosis": "truth", "age": "years"},
    )
    assert df["image_path"].map(os.path.isfile).all()
    assert df["age"].tolist() == meta["age"].tolist()
    assert df["lesion_id"].isna().all() and (df["group_id"] == df["image_id"]).all()
    with pytest.raises(DataError, match="no diagnosis column"):
        readers.read_csv_dataset(tmp_path / "mine.csv", columns={"image": "name"})
    with pytest.raises(DataError, match="not in CSV columns"):
        readers.read_csv_dataset(tmp_path / "mine.csv", columns={"diagnosis": "nope"})


def test_unknown_label_kept_raw_for_validation(ham_root, tmp_path):
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").head(4)
    meta.loc[1, "dx"] = "Banana"
    meta.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    df = readers.read_ham10000(tmp_path, image_dir=ham_root / "images")
    assert df.loc[1, "diagnosis"] == "banana" and pd.isna(df.loc[1, "coarse"])


def test_reader_user_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        readers.read_ham10000(tmp_path / "nope")
    with pytest.raises(DataError, match="HAM10000_metadata.csv not found"):
        readers.read_ham10000(tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        registry.read_dataset("mnist", tmp_path)


def test_manifest_round_trip(ham_root, tmp_path):
    df = readers.read_ham10000(ham_root).head(50)
    write_manifest(df, tmp_path)
    back = read_manifest(tmp_path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert np.isnan(back["age"]).sum() == df["age"].isna().sum()


def test_generic_csv_through_cli_keeps_own_split(ham_root, tmp_path):
    from typer.testing import CliRunner

    from dermlens.cli.data import app

    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").iloc[::200].reset_index(drop=True)
    own = np.where(np.arange(len(meta)) % 5 == 0, "Validation", "training")
    table = pd.DataFrame({"isic_id": meta["image_id"], "dx": meta["dx"], "fold_name": own})
    table.to_csv(tmp_path / "mine.csv", index=False)
    out = tmp_path / "out"
    args = ["prepare", "--dataset", "csv", "--root", str(tmp_path / "mine.csv"),
            "--image-dir", str(ham_root / "images"), "--out", str(out),
            "--columns", "split=fold_name", "--workers", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    df = read_manifest(out)
    assert df["split"].tolist() == ["val" if s == "Validation" else "train" for s in own]
    assert (df["dataset"] == "mine").all() and df["image_path"].map(os.path.isfile).all()
    result = CliRunner().invoke(app, [*args, "--split", "grouped", "--fractions", "0.6,0.2,0.2"])
    assert result.exit_code == 0, result.output
    assert set(read_manifest(out)["split"]) == {"train", "val", "test"}
