"""Prediction records: durable SQLite settings, stored images, CSV export, and surviving kill -9."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.cli.records import app as records_app
from dermlens.serve.records import NewRecord, RecordStore, export_csv
from dermlens.serve.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def new_record(**kw) -> NewRecord:
    base = dict(
        image_sha256="ab" * 32,
        image_bytes=123,
        filename="x.jpg",
        age=40.0,
        sex="female",
        site="head/neck",
        model_name="m",
        model_version="1.0",
        fine_probs={"mel": 0.7, "nv": 0.3},
        coarse_probs={"benign": 0.3, "malignant": 0.7},
        top_class="mel",
        confidence=0.7,
        ood_score=0.1,
        ood=False,
        refer=True,
        refer_reason="low confidence",
    )
    return NewRecord(**{**base, **kw})


def test_sqlite_store_is_durable_and_round_trips(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'sub' / 'r.db'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    before = datetime.now(UTC)
    row = store.add(new_record(), image=b"\xff\xd8\xffjpeg")
    got = store.get(row.id)
    assert got is not None and got.top_class == "mel" and got.refer and got.image_path is None
    assert before - timedelta(seconds=5) <= got.created_at.replace(tzinfo=UTC) <= datetime.now(UTC)
    assert store.count() == 1 and not store.image_dir.exists()
    store.close()


def test_store_images_when_configured(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'r.db'}", store_images=True)
    data = b"\x89PNG\r\n\x1a\n fake png bytes"
    sha = hashlib.sha256(data).hexdigest()
    row = store.add(new_record(image_sha256=sha), image=data)
    assert Path(row.image_path) == tmp_path / "images" / sha[:2] / f"{sha}.png"
    assert Path(row.image_path).read_bytes() == data
    store.close()


def test_export_csv_via_cli(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RecordStore(url)
    store.add(new_record(filename="a.jpg"))
    store.add(new_record(filename="b, c.jpg", fine_probs={"mel": 0.1, "nv": 0.8, "bcc": 0.1}, age=None))
    store.close()
    monkeypatch.setenv("DERMLENS_RECORDS_URL", url)
    out = tmp_path / "out" / "records.csv"
    result = CliRunner().invoke(records_app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 records" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["filename"] for r in rows] == ["a.jpg", "b, c.jpg"]
    assert {"p_mel", "p_nv", "p_bcc", "p_benign", "p_malignant", "image_sha256", "model_version"} <= set(
        rows[0]
    )
    assert rows[0]["p_bcc"] == "" and float(rows[1]["p_bcc"]) == 0.1 and rows[1]["age"] == ""
    assert datetime.fromisoformat(rows[0]["created_at"]).tzinfo is not None
    assert export_csv(RecordStore(url), tmp_path / "again.csv") == 2


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DERMLENS_RECORDS_URL", "postgresql+psycopg://u:p@db/dermlens")
    monkeypatch.setenv("DERMLENS_API_TOKEN", "tok")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9001\nrecords:\n  store_images: true\nlimits:\n  max_pixels: 1000\n")
    s = load_settings(cfg, port=9002)
    assert (s.port, s.api_token, s.records.store_images, s.limits.max_pixels) == (9002, "tok", True, 1000)
    assert s.records.url == "postgresql+psycopg://u:p@db/dermlens"
    assert s.limits.max_upload_bytes == 20_000_000  # untouched keys keep the packaged defaults


def test_api_stores_image_bytes_when_configured(tmp_path, ham_root):
    from dermlens.serve.api import create_app
    from dermlens.serve.runtime import Predictor

    predictor = Predictor.load(bundle_dir(), threads=1)
    settings = load_settings(records={"url": f"sqlite:///{tmp_path / 'r.db'}", "store_images": True})
    image = sorted((ham_root / "images").glob("*.jpg"))[0]
    with TestClient(create_app(settings, predictor=predictor), base_url="http://localhost") as client:
        r = client.post("/predict", files={"file": (image.name, image.read_bytes())}).json()
    row = RecordStore(settings.records.url).get(r["record_id"])
    assert Path(row.image_path).read_bytes() == image.read_bytes()
    assert row.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest() == r["image_sha256"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_acknowledged_prediction_survives_kill_9(tmp_path, ham_root):
    """Start `dermlens serve` (torch-free venv if DERMLENS_CORE_PYTHON is set), kill -9 after a 200."""
    bundle = bundle_dir()
    db = tmp_path / "records.db"
    port = _free_port()
    python = os.environ.get("DERMLENS_CORE_PYTHON") or sys.executable
    cmd = [python, "-m", "dermlens.cli.serve", "--port", str(port), "--records-url", f"sqlite:///{db}"]
    if os.environ.get("DERMLENS_TEST_BUNDLE"):
        cmd += ["--model", str(bundle)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DERMLENS_API_TOKEN", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        image = sorted((ham_root / "images").glob("*.jpg"))[3]
        resp = httpx.post(
            url + "/predict", files={"file": (image.name, image.read_bytes())}, data={"age": "70"}
        )
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no checkpoint, no buffered writes flushed
        assert resp.status_code == 200, resp.text
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = RecordStore(f"sqlite:///{db}")
    row = store.get(resp.json()["record_id"])
    assert row is not None, "the acknowledged prediction was lost"
    assert row.age == 70.0 and row.filename == image.name and row.top_class == resp.json()["top_class"]
    store.close()
