"""`dermlens predict --ray` on a local Ray instance: a few hundred real HAM10000 images give CSVs identical
(byte for byte) to the single-process run; unreadable files are listed, not fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py

pytestmark = pytest.mark.slow  # starts a local Ray instance (~10 s) and scores 300 images twice

N_IMAGES = 300


@pytest.fixture(scope="module")
def folder(ham_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N real images (symlinks, so single-process row order = image id order) plus one corrupt file."""
    out = tmp_path_factory.mktemp("ray_images")
    for src in sorted((ham_root / "images").glob("*.jpg"))[::30][:N_IMAGES]:
        os.symlink(src, out / src.name)
    (out / "ISIC_9999999.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return out


def run(*args: str):
    from dermlens.cli.main import app

    return CliRunner().invoke(app, ["predict", *args, "--model", str(bundle_dir())])


def test_ray_csvs_identical_to_single_process(folder: Path, tmp_path: Path) -> None:
    one, ray = tmp_path / "one", tmp_path / "ray"
    single = run(str(folder), "--out", str(one / "p.csv"), "--isic-csv", str(one / "isic.csv"))
    assert single.exit_code == 1, single.output  # the corrupt file
    res = run(str(folder), "--ray", "--out", str(ray / "p.csv"), "--isic-csv", str(ray / "isic.csv"))
    assert res.exit_code == 1, res.output
    assert f"{N_IMAGES} of {N_IMAGES + 1} image(s) predicted on Ray" in res.output
    assert "ISIC_9999999.jpg" in res.output and "Traceback" not in res.output
    for name in ("p.csv", "isic.csv"):
        assert (ray / name).read_bytes() == (one / name).read_bytes(), name
    lines = (ray / "p.csv").read_text().splitlines()
    ids = [ln.split(",")[0] for ln in lines[1:]]
    assert len(ids) == N_IMAGES and ids == sorted(ids)


def test_ray_refuses_outputs_it_does_not_write(folder: Path, tmp_path: Path) -> None:
    cam = run(str(folder), "--ray", "--out", str(tmp_path / "p.csv"), "--cam", str(tmp_path / "cam"))
    assert cam.exit_code == 2 and "--cam/--dicom-sr" in cam.output
    nothing = run(str(folder), "--ray")
    assert nothing.exit_code == 2 and "--out" in nothing.output
