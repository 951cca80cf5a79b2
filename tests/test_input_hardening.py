"""Hostile and unusual inputs built from real HAM10000 images: DICOM deflate bombs, deep-bit images, dual-
personality DICOM, DICOM tags on the batch route, and `dermlens predict` on odd names, files and signals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.preprocess import load_rgb, probe
from dicom_files import write_deflated, write_photo  # tests/dicom_files.py

ROOT = Path(__file__).resolve().parents[1]
BOMB = 300_000_000  # zeros inflated from a ~350 kB file
META = {"age": 55, "sex": "female", "site": "lower extremity"}


@pytest.fixture(scope="module")
def jpegs(ham_root: Path) -> list[Path]:
    return sorted((ham_root / "images").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def bombs(jpegs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Deflated DICOMs of a real image with 300 MB of zeros before the pixels and after them."""
    out = tmp_path_factory.mktemp("bombs")
    return {at: write_deflated(jpegs[0], out / f"{at}.dcm", META, BOMB, at) for at in ("header", "trailer")}


def child_env() -> dict[str, str]:
    """This environment, with this checkout's src/ first on the path of a child interpreter."""
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def peak_rss_growth(code: str) -> dict:
    """Run `code` (it sets `result`) in a fresh interpreter; its result and its peak-RSS growth in MB."""
    script = (
        "import json, resource\n"
        "import dermlens.preprocess, dermlens.dicom, dermlens.data.dicom_meta, pydicom\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{code}\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "print(json.dumps({'result': result, 'grew_mb': grew}))\n"
    )
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("at", ["header", "trailer"])
def test_deflate_bomb_is_refused_before_inflating(bombs: dict[str, Path], at: str) -> None:
    path = bombs[at]
    assert path.stat().st_size < 1_000_000
    got = peak_rss_growth(
        "from dermlens.preprocess import ImageDecodeError, load_rgb\n"
        f"try:\n    load_rgb({str(path)!r}); result = 'decoded'\n"
        "except ImageDecodeError as e:\n    result = [e.code, str(e)]\n"
    )
    code, message = got["result"]
    assert code == "image_too_large" and "\n" not in message and "deflated DICOM" in message
    assert got["grew_mb"] < 50, got


def test_deflate_bomb_header_reads_are_bounded(bombs: dict[str, Path], jpegs: list[Path]) -> None:
    """Header-only reads (tags, probe) inflate a bounded prefix: refused for a header bomb, fine otherwise."""
    header, trailer = str(bombs["header"]), str(bombs["trailer"])
    got = peak_rss_growth(
        "from pathlib import Path\n"
        "from dermlens.data.dicom_meta import read_meta\n"
        "from dermlens.preprocess import ImageDecodeError, probe\n"
        f"result = [read_meta({trailer!r}), probe(Path({trailer!r}).read_bytes()).width]\n"
        f"try:\n    read_meta({header!r})\n"
        "except ImageDecodeError as e:\n    result.append(e.code)\n"
    )
    tags, width, refused = got["result"]
    assert tags == {"age": 55.0, "sex": "female", "site": "lower extremity"}
    assert width == load_rgb(jpegs[0]).shape[1]
    assert refused == "image_too_large" and got["grew_mb"] < 50, got


def test_deflated_dicom_of_a_real_image_decodes_to_its_pixels(jpegs: list[Path], tmp_path: Path) -> None:
    path = write_deflated(jpegs[1], tmp_path / "deflated.dcm", META)
    assert np.array_equal(load_rgb(path), load_rgb(jpegs[1]))
    assert probe(path.read_bytes()).width == load_rgb(jpegs[1]).shape[1]


def test_api_answers_a_deflate_bomb_413(bombs: dict[str, Path], api) -> None:
    for path in bombs.values():
        got = api.post("/predict", files={"file": ("bomb.dcm", path.read_bytes(), "application/dicom")})
        assert got.status_code == 413, got.text
        assert got.json()["error"]["code"] == "image_too_large"


# ---- deep images and dual-personality DICOM ---------------------------------------------------------------


def test_float_tiff_in_unit_range_is_not_black(jpegs: list[Path], tmp_path: Path) -> None:
    grey = np.asarray(Image.open(jpegs[0]).convert("L"))
    Image.fromarray(grey.astype(np.float32) / 255.0, "F").save(tmp_path / "unit.tif")
    got = load_rgb(tmp_path / "unit.tif")
    assert np.abs(got[..., 0].astype(int) - grey).max() <= 1


def test_twelve_bit_png_is_scaled_as_twelve_bit(jpegs: list[Path], tmp_path: Path) -> None:
    grey = np.asarray(Image.open(jpegs[0]).convert("L")).astype(np.uint32)
    twelve = (grey * 4095 // 255).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    assert Image.open(tmp_path / "twelve.png").mode.startswith("I")
    got = load_rgb(tmp_path / "twelve.png")
    assert np.abs(got[..., 0].astype(int) - grey).max() <= 1
    full = (grey * 257).astype(np.uint16)  # full 16-bit range still maps to the same 8-bit values
    Image.fromarray(full).save(tmp_path / "sixteen.png")
    assert np.abs(load_rgb(tmp_path / "sixteen.png")[..., 0].astype(int) - grey).max() <= 1


def test_dicom_whose_preamble_is_a_tiff_header_is_read_as_dicom(jpegs: list[Path], tmp_path: Path) -> None:
    data = bytearray(write_photo(jpegs[2], tmp_path / "plain.dcm", "rgb").read_bytes())
    data[:8] = b"II*\x00\x08\x00\x00\x00"  # a TIFF header in the 128-byte preamble (dual-personality file)
    (tmp_path / "dual.dcm").write_bytes(bytes(data))
    assert np.array_equal(load_rgb(tmp_path / "dual.dcm"), load_rgb(jpegs[2]))


def test_dicom_and_image_modules_import_without_ignored_cycles() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    ignored = [i for c in contracts for i in c.get("ignore_imports", [])]
    assert not [i for i in ignored if "dermlens.dicom" in i], ignored


# ---- the API: DICOM tags on both prediction routes ---------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app
    from dermlens.serve.settings import load_settings

    predictor = Predictor.load(bundle_dir(), threads=1)
    url = f"sqlite:///{tmp_path_factory.mktemp('records') / 'records.db'}"
    app = create_app(load_settings(records={"url": url}), predictor=predictor)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client


def test_batch_route_uses_dicom_tags_like_the_single_route(jpegs: list[Path], tmp_path: Path, api) -> None:
    dcm = write_photo(jpegs[3], tmp_path / "tagged.dcm", "jpeg", META).read_bytes()
    single = api.post("/predict", files={"file": ("a.dcm", dcm, "application/dicom")})
    assert single.status_code == 200, single.text
    jpeg = ("b.jpg", jpegs[4].read_bytes(), "image/jpeg")
    files = [("files", ("a.dcm", dcm, "application/dicom")), ("files", jpeg)]
    batch = api.post("/predict/batch", files=files)
    assert batch.status_code == 200, batch.text
    first, second = (r["result"] for r in batch.json()["results"])
    want = {"age": 55.0, "sex": "female", "site": "lower extremity"}
    assert single.json()["inputs"] == first["inputs"] == want
    assert second["inputs"] == {"age": None, "sex": None, "site": None}
    for c in HAM_CLASSES:
        assert first["fine"][c] == pytest.approx(single.json()["fine"][c], abs=1e-6)


# ---- `dermlens predict`: names, duplicates, non-files, formulas, signals ---------------------------------


def predict(*args: str):
    from dermlens.cli.main import app

    return CliRunner().invoke(app, ["predict", *args, "--model", str(bundle_dir()), "--threads", "1"])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def test_non_utf8_file_name_gets_its_row(jpegs: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/l\xe9sion\xff.jpg"  # Latin-1 bytes: not UTF-8
    with open(raw, "wb") as fh:
        fh.write(jpegs[0].read_bytes())
    out = tmp_path / "p.csv"
    res = predict(str(folder), "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = read_rows(out)
    assert len(rows) == 1 and os.fsencode(rows[0]["path"]) == raw
    assert out.read_bytes().count(b"l\xe9sion\xff") == 2  # id and path: the name's own bytes


def test_formula_ids_duplicates_and_non_files(jpegs: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    evil = '=HYPERLINK("evil.example","open")'
    (folder / f"{evil}.jpg").write_bytes(jpegs[0].read_bytes())
    (folder / "a" / "same.jpg").write_bytes(jpegs[1].read_bytes())
    (folder / "b" / "same.jpg").write_bytes(jpegs[2].read_bytes())
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    os.mkfifo(folder / "pipe.jpg")
    out, isic, cams = tmp_path / "p.csv", tmp_path / "i.csv", tmp_path / "cams"
    res = predict(str(folder), "--out", str(out), "--isic-csv", str(isic), "--cam", str(cams))
    assert res.exit_code == 1, res.output  # the two non-files are failures
    assert "gone.jpg: dangling symbolic link" in res.output
    assert "pipe.jpg: not a regular file (FIFO" in res.output
    rows = read_rows(out)
    ids = [r["image_id"] for r in rows]
    assert "'" + evil in ids and evil not in ids
    assert next(r for r in rows if r["image_id"] == "'" + evil)["path"].endswith(f"/{evil}.jpg")
    assert all(not c.startswith(("=", "+", "@")) for r in rows for c in r.values())
    same = sorted(i for i in ids if i.startswith("same_"))
    assert len(same) == 2 and same[0] != same[1] and len(set(ids)) == len(ids) == 3
    assert {r[0] for r in csv.reader(isic.open())} >= set(same)
    assert {p.name for p in cams.iterdir()} >= {f"{i}_cam.png" for i in same}


def test_formula_paths_are_escaped(jpegs: list[Path], tmp_path: Path) -> None:
    """A relative path starting with '-' or '+' is escaped too; negative numbers are not text."""
    from dermlens.predict.folder import safe_cell

    assert safe_cell("-0.25") == "-0.25" and safe_cell("+cmd|' /C calc'!A0") == "'+cmd|' /C calc'!A0"
    assert safe_cell("\t=1") == "'\t=1" and safe_cell("@SUM(A1)") == "'@SUM(A1)" and safe_cell("nv") == "nv"


def test_sigterm_leaves_a_partial_csv_and_exits_nonzero(ham_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for src in sorted((ham_root / "images").glob("*.jpg")):  # 10,015: far more than run before the signal
        (folder / src.name).symlink_to(src)
    out = tmp_path / "preds.csv"
    partial = out.with_name("preds.csv.partial")
    env = child_env()
    cmd = [sys.executable, "-c", "from dermlens.cli.main import app; app()", "predict", str(folder)]
    cmd += ["--out", str(out)]
    cmd += ["--model", str(bundle_dir()), "--threads", "1", "--workers", "1", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") > 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not out.exists() and partial.exists()
    rows = pd.read_csv(partial)
    assert 8 <= len(rows) < 10_000
    assert "interrupted" in err and str(partial) in err.replace("\n", "")
