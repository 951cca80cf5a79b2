"""The service's defences, each exercised against the real app, model and database: hostile formats, decoder
crashes, memory amplification, ambiguous input, long error bodies, Host/Origin checks, slow connections,
startup errors, and dynamic batching."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from _server import BackgroundServer
from dermlens.cli.main import app as cli_app
from dermlens.preprocess import ImageDecodeError, load_rgb, probe
from dermlens.serve.api import create_app
from dermlens.serve.batching import DynamicBatcher, QueueFull
from dermlens.serve.records import RecordStore
from dermlens.serve.settings import load_settings

FUZZ = Path(__file__).parent / "data" / "fuzz"
# Formats Pillow decodes that the service must refuse (each saved by Pillow from a synthetic image).
FORBIDDEN = [
    "EPS",
    "GIF",
    "PCX",
    "TGA",
    "SGI",
    "PPM",
    "ICO",
    "DDS",
    "QOI",
    "IM",
    "SPIDER",
    "JPEG2000",
    "ICNS",
]


@pytest.fixture(scope="module")
def images(ham_root: Path) -> list[Path]:
    return sorted((ham_root / "images").glob("*.jpg"))[:8]


def client_for(predictor, tmp_path: Path, **overrides) -> TestClient:
    settings = load_settings(records={"url": f"sqlite:///{tmp_path / 'r.db'}"}, **overrides)
    app = create_app(settings, predictor=predictor)
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def synthetic(fmt: str) -> bytes:
    """A 64x48 synthetic image saved by Pillow in `fmt`."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png16(width: int, height: int) -> bytes:
    """A small-file, large-canvas 16-bit grayscale PNG (a memory-amplification shape)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint16)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    return body["error"]


# ---- defect 1: only the documented formats reach a decoder ------------------------------------------------


@pytest.mark.parametrize("fmt", FORBIDDEN)
def test_forbidden_formats_never_reach_a_decoder(fmt, predictor, tmp_path, images):
    data = synthetic(fmt)
    with pytest.raises(ImageDecodeError) as e:
        load_rgb(data)
    assert e.value.code == "unsupported_format"
    with client_for(predictor, tmp_path) as c:
        err = error_of(c.post("/predict", files={"file": ("lesion.jpg", data, "image/jpeg")}), 400)
        assert err["code"] == "not_an_image" and "JPEG, PNG, TIFF, WEBP" in err["message"].replace(
            "BMP, ", ""
        )
        assert c.post("/predict", files={"file": (images[0].name, images[0].read_bytes())}).status_code == 200


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP"])
def test_allowed_formats_decode(fmt):
    assert load_rgb(synthetic(fmt)).shape == (48, 64, 3)


def test_predict_cli_refuses_forbidden_formats(tmp_path, images):
    from dermlens.cli.main import app

    (tmp_path / "lesion.jpg").write_bytes(synthetic("EPS"))
    (tmp_path / "ok.jpg").write_bytes(images[0].read_bytes())
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", str(tmp_path), "--out", str(out), "--workers", "1"])
    assert r.exit_code == 1, r.output
    assert "lesion.jpg: not a supported image format" in r.output
    assert len(out.read_text().splitlines()) == 2  # header + the good image


# ---- defect 2: every decoder failure is a 4xx; a batch answers per file; no record without an answer ------


@pytest.mark.parametrize("name", sorted(p.name for p in FUZZ.glob("*.bin")))
def test_fuzz_corpus_gets_4xx(name, predictor, tmp_path):
    data = (FUZZ / name).read_bytes()
    with pytest.raises(ImageDecodeError):
        load_rgb(data)
    with client_for(predictor, tmp_path) as c:
        err = error_of(c.post("/predict", files={"file": ("x.jpg", data)}), 400)
        assert err["code"] in {"not_an_image", "corrupt_image"}
        assert "Error" not in err["message"] and "PIL" not in err["message"]  # our words, not Pillow's


def test_batch_with_crashing_files_answers_per_file_and_stores_only_answers(predictor, tmp_path, images):
    fuzz = sorted(FUZZ.glob("*.bin"))[:3]
    files = [("files", (images[0].name, images[0].read_bytes()))]
    files += [("files", (p.name, p.read_bytes())) for p in fuzz]
    files += [("files", (images[1].name, images[1].read_bytes()))]
    with client_for(predictor, tmp_path) as c:
        resp = c.post("/predict/batch", files=files)
        assert resp.status_code == 200, resp.text
        items = resp.json()["results"]
    assert [i["ok"] for i in items] == [True, False, False, False, True]
    store = RecordStore(f"sqlite:///{tmp_path / 'r.db'}")
    assert store.count() == 2
    assert {store.get(i["result"]["record_id"]).image_sha256 for i in items if i["ok"]} == {
        items[0]["result"]["image_sha256"],
        items[4]["result"]["image_sha256"],
    }


# ---- defect 3: decode memory budget and bounded work in flight -------------------------------------------


def test_decoded_bytes_count_bit_depth_and_are_budgeted(predictor, tmp_path):
    data = png16(3000, 3000)
    assert len(data) < 100_000 and probe(data).mode == "I;16"
    assert probe(data).decoded_bytes == 3000 * 3000 * (2 + 3)
    with client_for(predictor, tmp_path, limits={"max_decoded_bytes": 40_000_000}) as c:
        err = error_of(c.post("/predict", files={"file": ("a.png", data)}), 413)
        assert err["code"] == "image_too_large" and "45,000,000" in err["message"]
    with client_for(predictor, tmp_path, limits={"memory_budget_bytes": 30_000_000}) as c:
        resp = c.post("/predict", files={"file": ("a.png", data)})
        assert error_of(resp, 503)["code"] == "unavailable" and resp.headers["retry-after"] == "1"
    assert RecordStore(f"sqlite:///{tmp_path / 'r.db'}").count() == 0


def test_sixteen_bit_images_decode_like_before(tmp_path):
    arr = np.random.default_rng(1).integers(0, 65535, (300, 257), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    expected = np.clip(arr.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(load_rgb(buf.getvalue())[..., 0], expected)


def test_in_flight_bound_answers_503(predictor, tmp_path, images):
    """Requests being worked on are bounded (503 + Retry-After); an upload still arriving holds no slot."""
    settings = load_settings(records={"url": f"sqlite:///{tmp_path / 'r.db'}"}, limits={"max_in_flight": 1})
    data = images[0].read_bytes()
    with BackgroundServer(create_app(settings, predictor=predictor)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))  # a request whose body never finishes
        slow.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        time.sleep(0.5)
        assert httpx.post(srv.url + "/predict", files={"file": ("a.jpg", data)}, timeout=60).is_success
        start, answers = threading.Barrier(6), []

        def one() -> None:
            start.wait()
            answers.append(httpx.post(srv.url + "/predict", files={"file": ("a.jpg", data)}, timeout=60))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        slow.close()
    busy = [r for r in answers if r.status_code == 503]
    assert busy and any(r.status_code == 200 for r in answers)
    assert all(error_of(r, 503)["code"] == "unavailable" and r.headers["retry-after"] == "1" for r in busy)
    assert RecordStore(settings.records.url).count() == 7 - len(busy)


# ---- defects 6 and 7: bounded error bodies; ambiguous input refused -------------------------------------


def test_error_bodies_are_bounded(predictor, tmp_path, images):
    with client_for(predictor, tmp_path) as c:
        files = {"file": ("a.jpg", images[0].read_bytes())}
        resp = c.post("/predict", files=files, data={"sex": "x" * 1_000_000})
        assert error_of(resp, 422)["code"] == "invalid_sex" and len(resp.content) < 1_000
        resp = c.post("/predict", files=files, data={"y" * 500: "1"})
        assert error_of(resp, 422)["code"] == "unknown_field" and len(resp.content) < 400


@pytest.mark.parametrize("age", ["٣٠", "３０", "4_2", "nan", "NaN", "1e2", "inf", "+40", " 40 x", "300"])
def test_ambiguous_ages_are_refused(age, predictor, tmp_path, images):
    with client_for(predictor, tmp_path) as c:
        resp = c.post("/predict", files={"file": ("a.jpg", images[0].read_bytes())}, data={"age": age})
        assert error_of(resp, 422)["code"] == "invalid_age"


def test_duplicate_parts_are_refused(predictor, tmp_path, images):
    a, b = images[0].read_bytes(), images[1].read_bytes()
    with client_for(predictor, tmp_path) as c:
        two_files = [("file", ("a.jpg", a)), ("file", ("b.jpg", b))]
        assert error_of(c.post("/predict", files=two_files), 422)["code"] == "duplicate_field"
        resp = c.post(
            "/predict", files=[("file", ("a.jpg", a)), ("age", (None, "30")), ("age", (None, "80"))]
        )
        assert error_of(resp, 422)["code"] == "duplicate_field"
        batch = [
            ("files", ("a.jpg", a)),
            ("files", ("b.jpg", b)),
            ("site", (None, "back")),
            ("site", (None, "face")),
        ]
        assert error_of(c.post("/predict/batch", files=batch), 422)["code"] == "duplicate_field"
        ok = c.post("/predict", files={"file": ("a.jpg", a)}, data={"age": "42.5", "site": "back"})
        assert ok.status_code == 200 and ok.json()["inputs"]["age"] == 42.5
    assert RecordStore(f"sqlite:///{tmp_path / 'r.db'}").count() == 1


@pytest.mark.parametrize(
    ("option", "value"), [("--age", "300"), ("--age", "٣٠"), ("--site", "elbow"), ("--sex", "x")]
)
def test_predict_cli_refuses_bad_metadata(option, value, images, tmp_path):
    from dermlens.cli.main import app

    r = CliRunner().invoke(app, ["predict", str(images[0]), option, value, "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and f"error: {option}" in r.output, r.output
    assert not (tmp_path / "p.csv").exists()


# ---- defect 9: Host, Origin and non-loopback binds --------------------------------------------------------


def test_host_and_origin_checks(predictor, tmp_path, images):
    files = {"file": ("a.jpg", images[0].read_bytes())}
    with client_for(predictor, tmp_path) as c:
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400
        resp = c.post("/predict", files=files, headers={"Origin": "https://evil.example"})
        assert error_of(resp, 403)["code"] == "cross_origin"
        resp = c.post("/predict", files=files, headers={"Sec-Fetch-Site": "cross-site"})
        assert error_of(resp, 403)["code"] == "cross_origin"
        assert c.post("/predict", files=files, headers={"Origin": "http://localhost"}).status_code == 200
    with client_for(predictor, tmp_path, cors_origins=["https://clinic.example"]) as c:
        resp = c.post("/predict", files=files, headers={"Origin": "https://clinic.example"})
        assert (
            resp.status_code == 200
            and resp.headers["access-control-allow-origin"] == "https://clinic.example"
        )
    assert RecordStore(f"sqlite:///{tmp_path / 'r.db'}").count() == 2


def test_serve_refuses_non_loopback_bind_without_token(monkeypatch):
    monkeypatch.delenv("DERMLENS_API_TOKEN", raising=False)
    r = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "refusing to serve on 0.0.0.0 without an API token" in r.output
    assert "Traceback" not in r.output


# ---- defect 10: header and keep-alive time-outs (real sockets) -----------------------------------------


def test_unfinished_headers_and_idle_connections_are_closed(predictor, tmp_path):
    settings = load_settings(
        records={"url": f"sqlite:///{tmp_path / 'r.db'}"}, http={"header_timeout_s": 1, "keep_alive_s": 1}
    )
    with BackgroundServer(create_app(settings, predictor=predictor), settings=settings) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(20)]
        t0 = time.monotonic()
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # headers never finish
            s.settimeout(10)
        assert all(s.recv(100) == b"" for s in socks)  # closed by the server
        assert time.monotonic() - t0 < 5
        idle = socket.create_connection((host, int(port)))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        idle.settimeout(10)
        t1, data = time.monotonic(), b""
        while chunk := idle.recv(4096):  # the response, then EOF when the keep-alive time-out closes it
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and time.monotonic() - t1 < 8
        big = socket.create_connection((host, int(port)))
        big.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000)  # still coming
        big.settimeout(10)
        assert big.recv(100).startswith(b"HTTP/1.1 400")  # over max_header_bytes
        for s in [*socks, idle, big]:
            s.close()


# ---- defect 11: one-line startup errors -----------------------------------------------------------------


def test_serve_startup_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path / "no_such_bundle")])
    assert r.exit_code == 2 and r.output.strip().startswith("error: model: no model bundle at")
    assert len(r.output.strip().splitlines()) == 1
    # A PostgreSQL URL where the driver is not installed names the extra to install.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg2'] = None\n"
        "from dermlens.cli.main import app; app()"
    )
    for args in (
        ["serve", "--records-url", "postgresql+psycopg://u@127.0.0.1/db"],
        ["records", "export", "--out", str(tmp_path / "x.csv"), "--url", "postgresql://u@127.0.0.1/db"],
    ):
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
        assert lines == [lines[0]] and "pip install 'dermlens[postgres]'" in lines[0], p.stderr
        assert "Traceback" not in p.stderr


# ---- dynamic batching ---------------------------------------------------------------------------------


def test_dynamic_batching_matches_single_predictions(predictor, tmp_path, images):
    settings = load_settings(
        records={"url": f"sqlite:///{tmp_path / 'r.db'}"},
        inference={"batching": {"enabled": True, "max_batch": 8, "max_wait_ms": 20}},
    )
    app = create_app(settings, predictor=predictor)
    results: dict[int, dict] = {}
    with BackgroundServer(app) as srv:

        def one(k: int) -> None:
            data = images[k].read_bytes()
            results[k] = httpx.post(srv.url + "/predict", files={"file": ("a.jpg", data)}, timeout=60).json()

        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert max(r["timing_ms"]["batch"] for r in results.values()) > 1  # some requests shared a call
    for k, r in results.items():
        direct = predictor.predict_bytes(images[k].read_bytes())
        np.testing.assert_allclose(
            [r["fine"][c] for c in predictor.classes], list(direct.fine.values()), atol=1e-5
        )
        assert r["refer"] == direct.refer
    assert RecordStore(settings.records.url).count() == 8


def test_batch_queue_is_bounded(predictor, images):
    batcher = DynamicBatcher(predictor, max_batch=2, max_wait_ms=0, max_queue=1)
    img = predictor.prep.resize(load_rgb(images[0]))
    futures, refused = [], 0
    for _ in range(50):
        try:
            futures.append(batcher.submit(img, {}, (200, 150)))
        except QueueFull:
            refused += 1
    assert refused > 0
    assert all(f.result(timeout=60).top_class in predictor.classes for f in futures)
    batcher.close()


def test_model_info_is_json(predictor, tmp_path):
    with client_for(predictor, tmp_path) as c:
        assert json.loads(c.get("/model").text)["limits"]["max_pixels"] > 0
