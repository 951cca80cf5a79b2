"""Splits on the full shared HAM10000 (leak-free, duplicates together, class balance), folds, DermaMNIST,
and the prepared outputs (splits.json, image cache)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermlens.cli.data import app
from dermlens.data import splits as sp
from dermlens.data.cache import build_cache, cache_path, open_cache
from dermlens.data.manifest import DataError, read_manifest, write_manifest
from dermlens.preprocess import Preprocessing, load_rgb


def test_no_lesion_group_in_two_splits(ham_manifest):
    assert sp.leaking_groups(ham_manifest) == []
    assert ham_manifest.groupby("lesion_id")["split"].nunique().max() == 1
    assert set(ham_manifest["split"]) == {"train", "val", "test"}


def test_duplicate_pairs_share_group_and_split(ham_manifest, ham_root):
    pairs = sp.read_duplicate_pairs(ham_root / sp.DUPLICATES_CSV)
    assert len(pairs) == 18
    rows = ham_manifest.set_index("image_id")
    for a, b in pairs:
        assert rows.at[a, "group_id"] == rows.at[b, "group_id"], (a, b)
        assert rows.at[a, "split"] == rows.at[b, "split"], (a, b)
    assert ham_manifest["group_id"].nunique() == ham_manifest["lesion_id"].nunique() - 18


def test_class_shares_within_two_points(ham_manifest):
    overall = ham_manifest["diagnosis"].value_counts(normalize=True)
    for split, part in ham_manifest.groupby("split"):
        share = part["diagnosis"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert (share - overall).abs().max() <= 0.02, split
    sizes = ham_manifest["split"].value_counts(normalize=True)
    assert sizes["train"] == pytest.approx(0.70, abs=0.01)
    assert sizes["val"] == pytest.approx(0.15, abs=0.01) and sizes["test"] == pytest.approx(0.15, abs=0.01)


def test_splits_json_records_the_split(ham_prepared, ham_manifest):
    record = json.loads((ham_prepared / "splits.json").read_text())
    assert record["seed"] == 42 and record["method"] == "grouped" and record["folds"] == 5
    assert record["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    assert record["counts"] == sp.split_counts(ham_manifest)
    assert record["leaking_groups"] == 0 and record["duplicate_pairs"] == 18
    assert max(record["max_class_share_deviation_points"].values()) <= 2.0


def test_kfold_on_train_val(ham_manifest):
    trainval = ham_manifest["split"].isin(["train", "val"])
    assert set(ham_manifest.loc[trainval, "fold"]) == set(range(5))
    assert (ham_manifest.loc[~trainval, "fold"] == -1).all()
    tv = ham_manifest[trainval]
    assert tv.groupby("group_id")["fold"].nunique().max() == 1
    sizes = tv["fold"].value_counts(normalize=True)
    assert sizes.min() > 0.18 and sizes.max() < 0.22
    assert max(sp.max_deviation(tv["diagnosis"], tv["fold"]).values()) <= 0.02


@pytest.mark.slow
def test_split_is_seeded_and_deterministic(ham_manifest):
    df = ham_manifest.drop(columns=["split", "fold"])
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    a, info = sp.grouped_split(df, fractions, seed=42)
    assert (a == ham_manifest["split"]).all()  # same seed -> the saved split
    assert info["parts"] == 20 and info["max_deviation"] <= 0.02
    part = df.head(1500)
    b1, _ = sp.grouped_split(part, fractions, seed=7)
    b2, _ = sp.grouped_split(part, fractions, seed=7)
    c, _ = sp.grouped_split(part, fractions, seed=8)
    assert (b1 == b2).all() and (b1 != c).any()


def test_union_find_merges_chains():
    df = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "lesion_id": ["L2", "L1", "L3", None, "L4"]})
    groups = sp.assign_groups(df, [("a", "c"), ("c", "d"), ("zz", "e")])
    assert groups.tolist() == ["L2", "L1", "L2", "L2", "L4"]


def test_fraction_parts():
    assert sp._n_parts({"train": 0.7, "val": 0.15, "test": 0.15}) == (20, [14, 3, 3])
    assert sp._n_parts({"train": 0.8, "val": 0.1, "test": 0.1}) == (10, [8, 1, 1])
    with pytest.raises(DataError):
        sp._n_parts({"train": 0.8, "val": 0.3, "test": 0.1})


def test_dermamnist_alternative_warns_and_matches_official(ham_root, tmp_path):
    result = CliRunner().invoke(
        app,
        ["prepare", "--dataset", "ham10000", "--root", str(ham_root), "--out", str(tmp_path),
         "--split", "dermamnist", "--no-check-images", "--folds", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "leak" in result.output and "MedMNIST" in result.output
    df = read_manifest(tmp_path)
    official = pd.read_csv(ham_root / sp.DERMAMNIST_CSV).set_index("image_id")["split"]
    assert (df.set_index("image_id")["split"] == official.reindex(df["image_id"])).all()
    assert df["split"].value_counts().to_dict() == {"train": 7007, "test": 2005, "val": 1003}
    assert len(sp.leaking_groups(df)) > 0  # the reason for the warning
    record = json.loads((tmp_path / "splits.json").read_text())
    assert record["method"] == "dermamnist" and "leak" in record["warning"]
    assert "fold" not in df.columns


def test_small_prepared_cache_matches_decoding(ham_small_prepared):
    df = read_manifest(ham_small_prepared)
    prep = Preprocessing.default()
    cache = open_cache(ham_small_prepared, prep)
    assert isinstance(cache, np.memmap) and cache.dtype == np.uint8
    assert cache.shape == (len(df), prep.height, prep.width, 3)
    for i in (0, len(df) // 2, len(df) - 1):
        np.testing.assert_array_equal(cache[i], prep.resize(load_rgb(df.loc[i, "image_path"])))
    assert cache_path(ham_small_prepared, prep).name == f"images_{prep.height}x{prep.width}.npy"


def test_cache_rebuilt_when_manifest_changes(ham_small_prepared, tmp_path):
    df = read_manifest(ham_small_prepared).head(12)
    prep = Preprocessing.default()
    write_manifest(df, tmp_path)
    with pytest.raises(DataError, match="data prepare"):
        open_cache(tmp_path, prep)
    path = build_cache(df, tmp_path, prep, workers=1, progress=False)
    stamp = path.stat().st_mtime_ns
    assert build_cache(df, tmp_path, prep, workers=1, progress=False).stat().st_mtime_ns == stamp
    shuffled = df.iloc[::-1].reset_index(drop=True)
    write_manifest(shuffled, tmp_path)
    with pytest.raises(DataError):
        open_cache(tmp_path, prep)  # stale: rows changed order
    build_cache(shuffled, tmp_path, prep, workers=2, progress=False)
    np.testing.assert_array_equal(
        open_cache(tmp_path, prep)[0], prep.resize(load_rgb(shuffled.image_path[0]))
    )


def test_killed_build_leftovers_are_removed(ham_small_prepared, tmp_path):
    df = read_manifest(ham_small_prepared).head(4)
    prep = Preprocessing.default()
    orphan = cache_path(tmp_path, prep).with_name(f".images_{prep.height}x{prep.width}.999999999.tmp.npy")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a cache")
    build_cache(df, tmp_path, prep, workers=1, progress=False)
    assert sorted(os.listdir(orphan.parent)) == [
        f"images_{prep.height}x{prep.width}.{e}" for e in ("json", "npy")
    ]


def test_failed_cache_build_leaves_no_file(ham_small_prepared, tmp_path):
    df = read_manifest(ham_small_prepared).head(8)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    df.loc[5, "image_path"] = str(bad)
    with pytest.raises(DataError, match="broken.jpg"):
        build_cache(df, tmp_path, Preprocessing.default(), workers=1, progress=False)
    assert os.listdir(tmp_path / "cache") == []
