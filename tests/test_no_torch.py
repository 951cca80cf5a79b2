"""Prediction works where only the core + `serve` extra are installed: no torch, timm, lightning or onnx.

Uses $DERMLENS_CORE_PYTHON when it names an interpreter (CI builds .venv-core with `pip install .[serve]`);
otherwise builds such a venv once under .venv-core-test-<hash of pyproject.toml, constraints.txt + src/>
(about a minute), with the pinned versions of constraints.txt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bundles import bundle_dir  # tests/bundles.py

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _source_key() -> str:
    """Hash of what the core venv installs: pyproject.toml, constraints.txt, every file in src/dermlens."""
    h = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "constraints.txt").read_bytes())
    for f in sorted((REPO / "src" / "dermlens").rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _build_core_venv() -> Path:
    venv = REPO / f".venv-core-test-{_source_key()}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    for old in REPO.glob(".venv-core-test-*"):
        shutil.rmtree(old, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        + ["-c", str(REPO / "constraints.txt"), f"{REPO}[serve]"],
        check=True,
        timeout=900,
    )
    (venv / ".complete").write_text("ok\n")
    return python


@pytest.fixture(scope="module")
def core_python() -> Path:
    env = os.environ.get("DERMLENS_CORE_PYTHON")
    if env and Path(env).is_file():
        return Path(env)
    return _build_core_venv()


def _run(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def _model_args() -> list[str]:
    """--model only for a test bundle; otherwise the core venv must find its own packaged release model."""
    bundle_dir()  # skip while no bundle exists
    return ["--model", os.environ["DERMLENS_TEST_BUNDLE"]] if os.environ.get("DERMLENS_TEST_BUNDLE") else []


def test_train_extra_is_absent(core_python: Path, tmp_path: Path) -> None:
    for module in ("torch", "timm", "lightning", "onnx"):
        res = _run(core_python, "-c", f"import {module}", cwd=tmp_path)
        assert res.returncode != 0 and "No module named" in res.stderr, (
            f"{module} importable in the core venv"
        )
    res = _run(core_python, "-c", "import dermlens, sys; print(dermlens.__file__)", cwd=tmp_path)
    assert res.returncode == 0 and "site-packages" in res.stdout, (
        res.stdout + res.stderr
    )  # installed, not the tree


def test_predict_cli_without_torch(core_python: Path, ham_root: Path, tmp_path: Path) -> None:
    images = sorted((ham_root / "images").glob("*.jpg"))[:3]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out, isic = tmp_path / "preds.csv", tmp_path / "isic.csv"
    dermlens = core_python.parent / "dermlens"
    res = subprocess.run(
        [
            str(dermlens),
            "predict",
            *map(str, images),
            str(tmp_path / "broken.jpg"),
            "--out",
            str(out),
            "--isic-csv",
            str(isic),
            *_model_args(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 1, res.stdout + res.stderr  # the broken file is reported...
    assert "broken.jpg" in res.stderr and "not a medical device" in res.stderr
    df = pd.read_csv(out)  # ...and every readable image still has its row
    assert list(df["image_id"]) == [p.stem for p in images]
    assert isic.read_text().splitlines()[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"


def test_predictor_never_imports_torch(core_python: Path, ham_root: Path, tmp_path: Path) -> None:
    image = sorted((ham_root / "images").glob("*.jpg"))[0]
    bundle = os.environ.get("DERMLENS_TEST_BUNDLE")
    script = f"""
import json, sys
from typer.testing import CliRunner
from dermlens.cli.main import app
from dermlens.infer.predictor import Predictor
p = Predictor.load({bundle!r}, precision="fp32", threads=1)
r = p.predict_file({str(image)!r}, cam=True)
cli = CliRunner().invoke(app, ["predict", {str(image)!r}, *{_model_args()!r}])
assert cli.exit_code == 0, cli.output
heavy = [m for m in ("torch", "timm", "lightning", "onnx", "sklearn", "scipy") if m in sys.modules]
print(json.dumps({{"fine": r.fine, "cam": len(r.cam_png or b""), "heavy": heavy}}))
"""
    res = _run(core_python, "-c", script, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["cam"] > 0
    from dermlens.infer.predictor import Predictor  # same answer as this (full) environment

    ref = Predictor.load(bundle, precision="fp32", threads=1).predict_file(image)
    np.testing.assert_allclose([got["fine"][c] for c in ref.fine], list(ref.fine.values()), atol=1e-4)
