"""Prediction records on SQLite and a real PostgreSQL server: durability, private files, stored images,
CSV export (formula-escaped), schema upgrades (Alembic), locked databases (503), and surviving kill -9."""

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
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.cli.records import app as records_app
from dermlens.infer.prediction import Prediction
from dermlens.serve.migrations import current_revision, head_revision
from dermlens.serve.records import NewRecord, RecordStore, RecordsUnavailable, export_csv
from dermlens.serve.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
PG_ENV = "DERMLENS_TEST_PG_URL"  # set by .ci/run (bash .ci/postgres.sh starts the server)


def _pg_database(name: str) -> str:
    """A fresh database on the test PostgreSQL server; fails in CI, skips elsewhere, if there is none."""
    base = os.environ.get(PG_ENV)
    if not base:
        reason = f'no PostgreSQL server: set {PG_ENV} (eval "$(bash .ci/postgres.sh)")'
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base).set(database=name).render_as_string(hide_password=False)


def _drop_pg_database(url: str) -> None:
    admin = create_engine(os.environ[PG_ENV], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def records_url(request, tmp_path):
    """A fresh, empty records database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'records.db'}"
        return
    url = _pg_database(f"dermlens_t_{os.getpid()}_{abs(hash(request.node.name)) % 10**8}")
    yield url
    _drop_pg_database(url)


def new_record(**kw) -> NewRecord:
    """A record of a prediction; keyword arguments override the request's or the prediction's fields."""
    envelope = dict(image_sha256="ab" * 32, image_bytes=123, filename="x.jpg", age=40.0, sex="female")
    envelope["site"] = "head/neck"
    pred = dict(
        model_name="m",
        model_version="1.0",
        fine={"mel": 0.7, "nv": 0.3},
        coarse={"benign": 0.3, "malignant": 0.7},
        p_malignant=0.7,
        top_class="mel",
        top_class_name="melanoma",
        confidence=0.7,
        calibration_condition="meta",
        ood_score=0.1,
        ood=False,
        not_dermoscopy=False,
        refer=True,
        refer_codes=["low_confidence"],
        refer_reason="low confidence",
        precision="fp32",
    )
    for key, value in kw.items():
        (envelope if key in envelope else pred)[key] = value
    return NewRecord(**envelope, prediction=Prediction(**pred))


def test_store_is_durable_and_round_trips(records_url):
    store = RecordStore(records_url)
    if records_url.startswith("sqlite"):
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    else:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    assert current_revision(store.engine) == head_revision()
    before = datetime.now(UTC)
    row = store.add(new_record(), image=b"\xff\xd8\xffjpeg")
    got = store.get(row.id)
    assert got is not None and got.top_class == "mel" and got.refer and got.image_path is None
    assert got.filename is None  # client file names are kept only when configured
    assert before - timedelta(seconds=5) <= got.created_at.replace(tzinfo=UTC) <= datetime.now(UTC)
    assert store.count() == 1 and not store.image_dir.exists()
    store.close()


def test_records_and_images_are_private(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'data' / 'r.db'}", store_images=True)
    data = b"\x89PNG\r\n\x1a\n fake png bytes"
    row = store.add(new_record(image_sha256=hashlib.sha256(data).hexdigest()), image=data)
    files = [tmp_path / "data" / n for n in ("r.db", "r.db-wal", "r.db-shm")] + [Path(row.image_path)]
    folders = [tmp_path / "data", store.image_dir, Path(row.image_path).parent]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}, files
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o700"}
    out = tmp_path / "export.csv"
    export_csv(store, out)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    store.close()


def _legacy_table(metadata: MetaData) -> Table:
    """The `predictions` table exactly as dermlens 0.1 created it (create_all, no Alembic)."""
    return Table(
        "predictions",
        metadata,
        Column("id", String(32), primary_key=True),
        Column("created_at", DateTime(timezone=True), index=True, nullable=False),
        Column("image_sha256", String(64), index=True, nullable=False),
        Column("image_bytes", Integer, nullable=False),
        Column("image_width", Integer),
        Column("image_height", Integer),
        Column("image_path", Text),
        Column("filename", Text),
        Column("age", Float),
        Column("sex", String(16)),
        Column("site", String(32)),
        Column("model_name", String(128), nullable=False),
        Column("model_version", String(64), index=True, nullable=False),
        Column("fine_probs", Text, nullable=False),
        Column("coarse_probs", Text, nullable=False),
        Column("top_class", String(16), nullable=False),
        Column("confidence", Float, nullable=False),
        Column("ood_score", Float),
        Column("ood", Boolean, nullable=False),
        Column("refer", Boolean, nullable=False),
        Column("refer_reason", Text),
        Column("latency_ms", Float),
    )


def test_previous_schema_upgrades_cleanly(records_url):
    if records_url.startswith("sqlite"):
        Path(make_url(records_url).database).parent.mkdir(parents=True)
    engine = create_engine(records_url)
    metadata = MetaData()
    legacy = _legacy_table(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            legacy.insert().values(
                id="old1",
                created_at=datetime.now(UTC),
                image_sha256="cd" * 32,
                image_bytes=1,
                filename="o.jpg",
                model_name="m",
                model_version="0.1",
                fine_probs='{"mel": 1.0}',
                coarse_probs='{"malignant": 1.0}',
                top_class="mel",
                confidence=1.0,
                ood=False,
                refer=False,
            )
        )
    engine.dispose()
    store = RecordStore(records_url)  # opening stamps the baseline and upgrades to head
    assert current_revision(store.engine) == head_revision()
    assert store.get("old1").filename == "o.jpg" and store.count() == 1
    store.add(new_record())
    assert store.count() == 2 and "alembic_version" in inspect(store.engine).get_table_names()
    store.close()
    result = CliRunner().invoke(records_app, ["upgrade", "--url", records_url])
    assert result.exit_code == 0 and f"revision {head_revision()}" in result.output, result.output


def test_locked_database_is_503_and_nothing_acknowledged(records_url, tmp_path, ham_root):
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app

    RecordStore(records_url).close()  # create the schema
    locker = create_engine(records_url)
    conn = locker.connect()
    if records_url.startswith("sqlite"):
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
    settings = load_settings(records={"url": records_url, "lock_timeout_s": 0.5})
    image = sorted((ham_root / "images").glob("*.jpg"))[0]
    app = create_app(settings, predictor=Predictor.load(bundle_dir(), threads=1))
    try:
        with TestClient(app, base_url="http://localhost") as client:
            t0 = time.monotonic()
            resp = client.post("/predict", files={"file": (image.name, image.read_bytes())})
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1" and resp.json()["error"]["code"] == "unavailable"
            assert "record_id" not in resp.text and time.monotonic() - t0 < 8
            conn.rollback()
            assert (
                client.post("/predict", files={"file": (image.name, image.read_bytes())}).status_code == 200
            )
    finally:
        conn.close()
        locker.dispose()
    store = RecordStore(records_url)
    assert store.count() == 1  # only the acknowledged prediction
    store.close()


def test_store_reports_a_locked_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RecordStore(url, lock_timeout_s=0.2)
    locker = create_engine(url).connect()
    locker.exec_driver_sql("BEGIN EXCLUSIVE")
    with pytest.raises(RecordsUnavailable):
        store.add(new_record())
    locker.rollback()
    locker.close()
    assert store.count() == 0
    store.close()


def test_store_images_when_configured(tmp_path):
    store = RecordStore(f"sqlite:///{tmp_path / 'r.db'}", store_images=True)
    data = b"\x89PNG\r\n\x1a\n fake png bytes"
    sha = hashlib.sha256(data).hexdigest()
    row = store.add(new_record(image_sha256=sha), image=data)
    assert Path(row.image_path) == tmp_path / "images" / sha[:2] / f"{sha}.png"
    assert Path(row.image_path).read_bytes() == data
    store.close()


def test_export_csv_via_cli(records_url, tmp_path, monkeypatch):
    url = records_url
    store = RecordStore(url, store_filename=True)
    store.add(new_record(filename="a.jpg"))
    store.add(new_record(filename="b, c.jpg", fine={"mel": 0.1, "nv": 0.8, "bcc": 0.1}, age=None))
    store.close()
    monkeypatch.setenv("DERMLENS_RECORDS_URL", url)
    out = tmp_path / "out" / "records.csv"
    result = CliRunner().invoke(records_app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 records" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["filename"] for r in rows] == ["a.jpg", "b, c.jpg"]
    assert {"p_mel", "p_nv", "p_bcc", "coarse_benign", "p_malignant", "image_sha256", "model_version"} <= set(
        rows[0]
    )
    assert rows[0]["refer_codes"] == "low_confidence" and rows[0]["precision"] == "fp32"
    assert rows[0]["p_bcc"] == "" and float(rows[1]["p_bcc"]) == 0.1 and rows[1]["age"] == ""
    assert datetime.fromisoformat(rows[0]["created_at"]).tzinfo is not None
    again = RecordStore(url)
    assert export_csv(again, tmp_path / "again.csv") == 2
    again.close()


@pytest.mark.parametrize(
    "name", ["@SUM(1+1)*cmd|' /C calc'!A0", '=HYPERLINK("x")', "+1", "-2+3", "\tTAB", "\rCR", "\x01ctl"]
)
def test_export_escapes_formula_cells(name, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RecordStore(url, store_filename=True)
    store.add(new_record(filename=name, refer_reason="=1+1"))
    out = tmp_path / "r.csv"
    export_csv(store, out)
    row = next(csv.DictReader(out.open(newline="")))
    assert row["filename"] == "'" + name and row["refer_reason"] == "'=1+1"
    assert row["age"] == "40.0" and float(row["p_mel"]) == 0.7  # numbers stay numbers
    store.close()


def test_records_cli_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(
        records_app, ["export", "--out", str(tmp_path / "x.csv"), "--url", "nonsense://"]
    )
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


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
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app

    predictor = Predictor.load(bundle_dir(), threads=1)
    settings = load_settings(
        records={"url": f"sqlite:///{tmp_path / 'r.db'}", "store_images": True, "store_filename": True}
    )
    image = sorted((ham_root / "images").glob("*.jpg"))[0]
    with TestClient(create_app(settings, predictor=predictor), base_url="http://localhost") as client:
        r = client.post("/predict", files={"file": (image.name, image.read_bytes())}).json()
    row = RecordStore(settings.records.url).get(r["record_id"])
    assert Path(row.image_path).read_bytes() == image.read_bytes() and row.filename == image.name
    assert row.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest() == r["image_sha256"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_acknowledged_prediction_survives_kill_9(records_url, tmp_path, ham_root):
    """Start `dermlens serve` (torch-free venv if DERMLENS_CORE_PYTHON is set), kill -9 after a 200."""
    bundle = bundle_dir()
    port = _free_port()
    python = os.environ.get("DERMLENS_CORE_PYTHON") or sys.executable
    if records_url.startswith("postgresql"):
        probe = subprocess.run([python, "-c", "import psycopg"], capture_output=True)
        if probe.returncode != 0:
            python = sys.executable  # the core venv has no PostgreSQL driver (the `postgres` extra)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("records:\n  store_filename: true\n")
    cmd = [python, "-m", "dermlens.cli.serve", "--port", str(port), "--records-url", records_url]
    cmd += ["--config", str(cfg)]
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
    store = RecordStore(records_url)
    row = store.get(resp.json()["record_id"])
    assert row is not None, "the acknowledged prediction was lost"
    assert row.age == 70.0 and row.filename == image.name and row.top_class == resp.json()["top_class"]
    store.close()


def test_records_keep_every_field_the_api_returns(records_url, predictor, ham_root, tmp_path, monkeypatch):
    """What the API answered is what `records export` gives back, field by field (the audit trail)."""
    from dermlens.serve.api import create_app

    settings = load_settings(records={"url": records_url})
    image = sorted((ham_root / "images").glob("*.jpg"))[3]
    with TestClient(create_app(settings, predictor=predictor), base_url="http://localhost") as client:
        answer = client.post(
            "/predict", files={"file": (image.name, image.read_bytes())}, data={"age": "50", "sex": "female"}
        ).json()
    monkeypatch.setenv("DERMLENS_RECORDS_URL", records_url)
    out = tmp_path / "records.csv"
    assert CliRunner().invoke(records_app, ["export", "--out", str(out)]).exit_code == 0
    (row,) = list(csv.DictReader(out.open()))
    assert (row["id"], row["image_sha256"], row["sex"]) == (
        answer["record_id"],
        answer["image_sha256"],
        "female",
    )
    expected = Prediction.model_validate(answer).row()
    assert set(expected) <= set(row), set(expected) - set(row)
    for key, value in expected.items():
        if isinstance(value, bool):
            assert row[key] == str(value).lower(), key
        elif isinstance(value, float):
            assert float(row[key]) == pytest.approx(value, rel=1e-9), key
        else:
            assert row[key] == ("" if value is None else str(value)), key
    assert {"refer_codes", "prediction_set", "not_dermoscopy_score", "precision"} <= set(row)
