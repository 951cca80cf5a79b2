"""Shared fixtures: the real data root, HAM10000 paths, and prepared manifests (full and small)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from dermlens.preprocess import Preprocessing
from dermlens.settings import data_root as _data_root

# benchmarks/_ham.py and benchmarks/_server.py are test and benchmark helpers shared by both folders
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared datasets folder (DERMLENS_DATA or ../shared/data). Fails, never skips, if absent."""
    root = _data_root()
    assert (root / "ham10000" / "HAM10000_metadata.csv").is_file(), f"shared data not found at {root}"
    return root


@pytest.fixture(scope="session")
def predictor():
    """The packaged release bundle, loaded once for the whole run at the precision this CPU is served
    (int8, or fp32 on an x86 CPU without VNNI). Thread-safe: tests share it."""
    from bundles import bundle_dir
    from dermlens.infer.predictor import Predictor

    return Predictor.load(bundle_dir(), threads=1)


@pytest.fixture(scope="session")
def ham_root(data_root: Path) -> Path:
    """The shared HAM10000 copy (metadata CSV, images/, masks/, duplicates and DermaMNIST CSVs)."""
    return data_root / "ham10000"


def _prepare(args: list[str]) -> None:
    from typer.testing import CliRunner

    from dermlens.cli.data import app

    result = CliRunner().invoke(app, ["prepare", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def ham_prepared(ham_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR of the full HAM10000 prepared with defaults (grouped split, seed 42, 5 folds), without cache."""
    out = tmp_path_factory.mktemp("ham_prepared")
    _prepare(["--dataset", "ham10000", "--root", str(ham_root), "--out", str(out), "--no-cache"])
    return out


@pytest.fixture(scope="session")
def ham_manifest(ham_prepared: Path) -> pd.DataFrame:
    """The prepared full HAM10000 manifest."""
    from dermlens.data.manifest import read_manifest

    return read_manifest(ham_prepared)


def make_ham_subset(ham_root: Path, out: Path, per_class: int, layout: str = "images") -> Path:
    """A HAM10000-layout folder with whole lesions of each class (~per_class images), images symlinked.

    layout "images": one images/ folder; "parts": HAM10000_images_part_1/ and _part_2/ (alternating).
    """
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    keep = []
    for _, rows in meta.groupby("dx", sort=True):
        lesions = rows.drop_duplicates("lesion_id")["lesion_id"]
        counts = rows["lesion_id"].value_counts()
        total = 0
        for les in lesions:
            keep.append(les)
            total += counts[les]
            if total >= per_class:
                break
    subset = meta[meta["lesion_id"].isin(keep)]
    out.mkdir(parents=True, exist_ok=True)
    subset.to_csv(out / "HAM10000_metadata.csv", index=False)
    folders = ["images"] if layout == "images" else ["HAM10000_images_part_1", "HAM10000_images_part_2"]
    for f in folders:
        (out / f).mkdir(exist_ok=True)
    for i, image_id in enumerate(subset["image_id"]):
        target = out / folders[i % len(folders)] / f"{image_id}.jpg"
        os.symlink(ham_root / "images" / f"{image_id}.jpg", target)
    return out


@pytest.fixture(scope="session")
def ham_small_prepared(ham_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR of a ~40-images-per-class HAM10000 subset, prepared WITH the image cache (fast for model tests)."""
    base = tmp_path_factory.mktemp("ham_small")
    root = make_ham_subset(ham_root, base / "root", per_class=40)
    out = base / "prepared"
    _prepare(["--dataset", "ham10000", "--root", str(root), "--out", str(out), "--workers", "1"])
    return out


# A 64x80 model input for fast training tests.
SMALL = Preprocessing.from_dict({**Preprocessing.default().to_dict(), "height": 64, "width": 80})


@pytest.fixture(scope="session")
def tiny_dir(ham_small_prepared: Path) -> Path:
    """The small prepared HAM subset plus a 64x80 cache built with the data layer."""
    from dermlens.data.cache import build_cache
    from dermlens.data.manifest import read_manifest

    build_cache(read_manifest(ham_small_prepared), ham_small_prepared, SMALL, workers=1, progress=False)
    return ham_small_prepared


@pytest.fixture(scope="session")
def bcn_tiny(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder named `bcn`: 12 real ISIC 2019-BCN thumbnails per class (scc included), split by
    lesion, with the 64x80 cache of the fast model tests."""
    from dermlens.data.cache import build_cache
    from dermlens.data.manifest import read_manifest
    from dermlens.data.readers import read_isic2019

    df = read_isic2019(data_root / "isic2019").dropna(subset=["lesion_id"])
    df = df.sample(frac=1.0, random_state=0)
    df = df[df.groupby("diagnosis").cumcount() < 12]
    base = tmp_path_factory.mktemp("bcn_tiny")
    cols = ["image_path", "diagnosis", "lesion_id", "age", "sex", "site"]
    df[cols].to_csv(base / "bcn.csv", index=False)
    out = base / "bcn"
    _prepare(["--dataset", "csv", "--root", str(base / "bcn.csv"), "--out", str(out), "--split", "grouped"])
    build_cache(read_manifest(out), out, SMALL, workers=1, progress=False)
    return out
