"""The HTTP API with the real Predictor, the real release bundle and a real SQLite record store."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from _server import BackgroundServer
from dermlens import DISCLAIMER
from dermlens.data.taxonomy import FINE_NAMES, SITES
from dermlens.serve.api import create_app
from dermlens.serve.records import RecordStore
from dermlens.serve.settings import load_settings


@pytest.fixture(scope="module")
def images(ham_root: Path) -> list[Path]:
    return sorted((ham_root / "images").glob("*.jpg"))[:8]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'records.db'}"


def make_client(predictor, db_url: str, **overrides) -> TestClient:
    settings = load_settings(records={"url": db_url}, **overrides)
    app = create_app(settings, predictor=predictor)
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


@pytest.fixture
def client(predictor, db_url):
    with make_client(predictor, db_url) as c:
        yield c


def post_image(client, path: Path, **fields):
    return client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, data=fields)


def assert_error(resp, status: int, code: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression-bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_health_model_and_openapi(client, predictor):
    health = client.get("/health").json()
    assert (
        health["status"] == "ok"
        and health["model_loaded"]
        and health["model_version"] == predictor.card.version
    )
    info = client.get("/model").json()
    assert [c["code"] for c in info["classes"]] == list(predictor.classes)
    assert all(c["name"] == FINE_NAMES[c["code"]] for c in info["classes"])
    assert info["sites"] == list(SITES) and info["sexes"] == ["female", "male"]
    assert info["disclaimer"] == DISCLAIMER and info["auth_required"] is False
    assert info["card"]["version"] == predictor.card.version and info["precision"] == predictor.precision
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/model", "/predict", "/predict/batch"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_predict_matches_the_predictor_and_is_recorded(client, predictor, images, db_url):
    path = images[0]
    resp = post_image(client, path, age="45", sex="Male", site="back")
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["disclaimer"] == DISCLAIMER
    assert r["inputs"] == {"age": 45.0, "sex": "male", "site": "posterior torso"}
    assert list(r["fine"]) == list(predictor.classes) and list(r["coarse"]) == ["benign", "malignant"]
    assert abs(sum(r["fine"].values()) - 1) < 1e-5 and abs(sum(r["coarse"].values()) - 1) < 1e-5
    assert (
        r["top_class"] == max(r["fine"], key=r["fine"].get)
        and r["top_class_name"] == FINE_NAMES[r["top_class"]]
    )
    assert r["confidence"] == pytest.approx(r["fine"][r["top_class"]])
    assert r["cam_png_base64"] is None and r["model_version"] == predictor.card.version
    assert r["timing_ms"]["total"] >= r["timing_ms"]["model"] > 0
    direct = predictor.predict_bytes(path.read_bytes(), {"age": 45, "sex": "male", "site": "posterior torso"})
    np.testing.assert_allclose(
        [r["fine"][c] for c in predictor.classes], list(direct.fine.values()), atol=1e-6
    )
    assert (r["ood"], r["refer"], r["refer_codes"]) == (direct.ood, direct.refer, direct.refer_codes)
    assert r["ood_score"] == pytest.approx(direct.ood_score, abs=1e-6)

    store = RecordStore(db_url)
    row = store.get(r["record_id"])
    assert row is not None and row.image_sha256 == r["image_sha256"] and row.filename is None
    assert (row.age, row.sex, row.site, row.top_class) == (45.0, "male", "posterior torso", r["top_class"])
    assert row.image_path is None and (row.image_width, row.image_height) == Image.open(path).size
    store.close()


def test_cam_overlay_png(client, images):
    r = post_image(client, images[1], cam="true").json()
    png = Image.open(io.BytesIO(base64.b64decode(r["cam_png_base64"])))
    assert png.format == "PNG" and png.size == Image.open(images[1]).size


@pytest.mark.parametrize(
    ("files", "data", "status", "code"),
    [
        ({"file": ("a.jpg", b"this is not an image", "image/jpeg")}, {}, 400, "not_an_image"),
        ({"file": ("a.jpg", b"", "image/jpeg")}, {}, 400, "empty_file"),
        ("TRUNCATED", {}, 400, "corrupt_image"),
        ({"image": ("a.jpg", b"x", "image/jpeg")}, {}, 422, "validation_error"),
        ("GOOD", {"age": "abc"}, 422, "invalid_age"),
        ("GOOD", {"age": "130"}, 422, "invalid_age"),
        ("GOOD", {"age": "-1"}, 422, "invalid_age"),
        ("GOOD", {"sex": "robot"}, 422, "invalid_sex"),
        ("GOOD", {"site": "elbow pit"}, 422, "invalid_site"),
        ("GOOD", {"cam": "maybe"}, 422, "validation_error"),
        ("GOOD", {"agee": "40"}, 422, "unknown_field"),
        (None, {}, 422, "validation_error"),
    ],
)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, images, files, data, status, code):
    good = images[2].read_bytes()
    if files == "GOOD":
        files = {"file": ("lesion.jpg", good, "image/jpeg")}
    elif files == "TRUNCATED":
        files = {"file": ("cut.jpg", good[: len(good) // 3], "image/jpeg")}
    assert_error(client.post("/predict", files=files, data=data), status, code)
    assert post_image(client, images[2]).status_code == 200


def test_other_http_errors_are_json(client):
    assert_error(client.get("/predict"), 405, "method_not_allowed")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.post("/predict", json={"file": "x"}), 422, "validation_error")


def jpeg(path: Path, size: tuple[int, int] = (600, 450), quality: int = 90) -> bytes:
    """A real HAM image (stored at 200x150) upscaled to `size`, JPEG-encoded in memory."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_upload_and_pixel_limits(predictor, db_url, images):
    limits = {"max_upload_bytes": 20_000, "max_pixels": 600 * 450, "max_batch_files": 2}
    with make_client(predictor, db_url, limits=limits) as c:
        big = jpeg(images[0], quality=95)
        assert len(big) > 20_000
        resp = c.post("/predict", files={"file": ("big.jpg", big, "image/jpeg")})
        assert_error(resp, 413, "file_too_large")
        huge = big + bytes(100_000)  # over the whole-body limit: refused before the form is parsed
        assert_error(c.post("/predict", files={"file": ("huge.jpg", huge)}), 413, "payload_too_large")
        wide = jpeg(images[0], (601, 450), quality=30)
        assert_error(c.post("/predict", files={"file": ("wide.jpg", wide)}), 413, "image_too_large")
        bomb = png_header_bomb(100_000, 100_000)
        assert len(bomb) < 200
        assert_error(
            c.post("/predict", files={"file": ("bomb.png", bomb, "image/png")}), 413, "image_too_large"
        )
        ok = jpeg(images[0], quality=30)
        assert len(ok) < 20_000
        assert c.post("/predict", files={"file": ("ok.jpg", ok, "image/jpeg")}).status_code == 200
        three = [("files", (f"{i}.jpg", ok, "image/jpeg")) for i in range(3)]
        assert_error(c.post("/predict/batch", files=three), 413, "too_many_files")
        # In a batch within the body limit, one oversized file fails alone.
        pair = [("files", ("ok.jpg", ok, "image/jpeg")), ("files", ("big.jpg", big[:30_000], "image/jpeg"))]
        items = c.post("/predict/batch", files=pair).json()["results"]
        assert [i["ok"] for i in items] == [True, False] and items[1]["error"]["code"] == "file_too_large"


def test_default_pixel_limit_refuses_a_bomb(client, images):
    assert_error(
        client.post("/predict", files={"file": ("b.png", png_header_bomb(50_000, 50_000), "image/png")}), 413
    )
    assert post_image(client, images[0]).status_code == 200


def test_batch_reports_per_file_results_and_errors(client, images, db_url):
    files = [
        ("files", (images[0].name, images[0].read_bytes(), "image/jpeg")),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", (images[1].name, images[1].read_bytes(), "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
    ]
    resp = client.post("/predict/batch", files=files, data={"age": "60", "site": "face"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["disclaimer"] == DISCLAIMER
    assert [i["ok"] for i in body["results"]] == [True, False, True, False]
    assert [i["filename"] for i in body["results"]] == [
        images[0].name,
        "notes.txt",
        images[1].name,
        "empty.jpg",
    ]
    assert body["results"][1]["error"]["code"] == "not_an_image"
    assert body["results"][3]["error"]["code"] == "empty_file"
    assert body["results"][2]["result"]["inputs"]["site"] == "head/neck"
    assert RecordStore(db_url).count() == 2


def test_api_token(predictor, db_url, images, monkeypatch):
    monkeypatch.setenv("DERMLENS_API_TOKEN", "s3cret-token")
    with make_client(predictor, db_url) as c:
        assert c.get("/model").json()["auth_required"] is True
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            resp = c.post("/predict", files={"file": ("a.jpg", images[0].read_bytes())}, headers=headers)
            assert_error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"
            assert_error(c.post("/predict/batch", files=[("files", ("a.jpg", b"x"))], headers=headers), 401)
        good = {"Authorization": "Bearer s3cret-token"}
        assert post_image(c, images[0]).status_code == 401
        resp = c.post("/predict", files={"file": ("a.jpg", images[0].read_bytes())}, headers=good)
        assert resp.status_code == 200, resp.text
    assert RecordStore(db_url).count() == 1


def test_concurrent_clients_on_a_real_server(predictor, db_url, images):
    """8 clients at once over real HTTP; also a chunked oversized upload that must be cut off with 413."""
    settings = load_settings(records={"url": db_url}, inference={"max_concurrent": 2})
    payloads = [jpeg(p) for p in images]
    statuses: list[int] = []
    with BackgroundServer(create_app(settings, predictor=predictor)) as srv:

        def client_loop(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as h:
                for j in range(3):
                    data = payloads[(k + j) % len(payloads)]
                    statuses.append(h.post("/predict", files={"file": ("x.jpg", data)}).status_code)

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        def endless():  # a well-formed multipart file part that never ends (no Content-Length)
            yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            for _ in range(40):
                yield bytes(1_000_000)

        with httpx.Client(base_url=srv.url, timeout=60) as h:
            headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
            assert_error(h.post("/predict", content=endless(), headers=headers), 413, "payload_too_large")
            assert h.post("/predict", files={"file": ("x.jpg", payloads[0])}).status_code == 200
    assert statuses == [200] * 24
    assert RecordStore(db_url).count() == 25
