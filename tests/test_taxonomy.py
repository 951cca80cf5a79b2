"""The label taxonomy against the real label vocabularies of HAM10000, ISIC 2019 and ISIC 2017."""

from __future__ import annotations

import pandas as pd
import pytest

from dermlens.data import taxonomy as tx


def test_every_ham_dx_maps_to_its_own_code(ham_root):
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    assert set(meta["dx"]) == set(tx.HAM_CLASSES)
    assert all(tx.fine_code(d) == d for d in meta["dx"].unique())
    assert tx.HAM_CLASSES == ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")


def test_isic2019_columns_map_in_submission_order(data_root):
    gt = pd.read_csv(data_root / "isic2019" / "ISIC_2019_Training_GroundTruth.csv", nrows=2)
    cols = [c for c in gt.columns if c != "image"]
    assert [tx.fine_code(c) for c in cols] == [*tx.ISIC2019_CLASSES, tx.UNKNOWN]
    assert [tx.ISIC2019_COLUMNS[c] for c in tx.ISIC2019_CLASSES] == cols[:-1]
    assert [tx.ISIC2018_COLUMNS[c] for c in tx.HAM_CLASSES] == [
        "MEL",
        "NV",
        "BCC",
        "AKIEC",
        "BKL",
        "DF",
        "VASC",
    ]


@pytest.mark.parametrize(
    ("label", "code"),
    [
        ("melanoma", "mel"),
        ("seborrheic_keratosis", "bkl"),
        ("Seborrheic keratosis", "bkl"),
        ("nevus", "nv"),
        ("AK", "akiec"),
        ("UNK", "unk"),
        (" basal cell carcinoma ", "bcc"),
        ("solar lentigo", "bkl"),
    ],
)
def test_legacy_and_isic2017_names(label, code):
    assert tx.fine_code(label) == code


def test_unknown_label_raises():
    for bad in ("banana", "", float("nan"), None):
        with pytest.raises(tx.UnknownLabelError):
            tx.fine_code(bad)
    with pytest.raises(tx.UnknownLabelError):
        tx.coarse_label("banana")


def test_malignant_set_and_coarse():
    assert {"mel", "bcc", "akiec", "scc"} == tx.MALIGNANT
    assert [tx.coarse_label(c) for c in tx.FINE_CODES] == [
        "malignant", "benign", "malignant", "malignant", "benign", "benign", "benign", "malignant"
    ]  # fmt: skip
    assert tx.coarse_label(tx.UNKNOWN) == tx.UNKNOWN
    assert tx.COARSE_CLASSES == ("benign", "malignant")


def test_every_ham_site_maps_and_unknown_is_none(ham_root):
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    for loc in meta["localization"].unique():
        site = tx.site_general(loc)
        assert (site is None) == (loc == "unknown"), loc
        assert site is None or site in tx.SITES
    expected = {"back": "posterior torso", "abdomen": "anterior torso", "chest": "anterior torso",
                "trunk": "torso", "face": "head/neck", "scalp": "head/neck", "ear": "head/neck",
                "hand": "upper extremity", "foot": "lower extremity", "acral": "palms/soles",
                "genital": "oral/genital"}  # fmt: skip
    assert {k: tx.site_general(k) for k in expected} == expected


def test_isic2019_sites_are_already_general(data_root):
    meta = pd.read_csv(data_root / "isic2019" / "ISIC_2019_Training_Metadata.csv")
    for site in meta["anatom_site_general"].dropna().unique():
        assert tx.site_general(site) == site
    assert tx.site_general(float("nan")) is None


def test_sex_and_confirm_type():
    assert [tx.sex_value(v) for v in ("male", "Female", "unknown", None, float("nan"))] == [
        "male", "female", None, None, None
    ]  # fmt: skip
    assert tx.confirm_type("histo") == "histopathology"
    assert tx.confirm_type("Follow_up") == "serial imaging showing no change"
    assert tx.confirm_type("consensus") == "single image expert consensus"
    assert tx.confirm_type("confocal") == "confocal microscopy with consensus dermoscopy"
    assert tx.confirm_type("histopathology") == "histopathology"
    assert tx.confirm_type("") is None


def test_label_space():
    assert tx.label_space({"mel", "nv", "unk"}) == tx.HAM_CLASSES
    assert tx.label_space({"mel", "scc"}) == tx.ISIC2019_CLASSES
