"""The service against abuse and failure, on a real uvicorn server on 127.0.0.1 with raw sockets: stalled
uploads, oversized or ambiguous HTTP, failed-token floods, a hung records database (PostgreSQL frozen by
SIGSTOP, SQLite locked by another writer) and servers upgrading one database at once."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from _server import BackgroundServer
from bundles import bundle_dir  # tests/bundles.py
from dermlens.serve.api import create_app
from dermlens.serve.records import RecordStore
from dermlens.serve.settings import load_settings
from test_records import _drop_pg_database, _pg_database

OTHER_CLIENT = "127.0.0.2"  # a second client address on the loopback network


@pytest.fixture(scope="module")
def predictor():
    from dermlens.infer.predictor import Predictor

    return Predictor.load(bundle_dir(), threads=1)


@pytest.fixture(scope="module")
def image(ham_root: Path) -> bytes:
    return sorted((ham_root / "images").glob("*.jpg"))[0].read_bytes()


def serve(predictor, url: str, **overrides) -> BackgroundServer:
    settings = load_settings(records={"url": url, **overrides.pop("records", {})}, **overrides)
    return BackgroundServer(create_app(settings, predictor=predictor), settings=settings)


def address(srv: BackgroundServer) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").split(":")
    return host, int(port)


def client(local: str = "127.0.0.1", timeout: float = 30) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=local), timeout=timeout)


def read_all(sock: socket.socket, limit_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (bounded by `limit_s`)."""
    sock.settimeout(limit_s)
    data, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open after {limit_s} s: {data[:200]!r}")


def stalled_upload(addr: tuple[str, int]) -> socket.socket:
    """A /predict that sends its headers and 4 kB of a 100 kB body, then nothing."""
    s = socket.create_connection(addr)
    s.sendall(
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; '
        b'filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + b"x" * 4096
    )
    return s


def predict(c: httpx.Client, url: str, image: bytes, **kw) -> httpx.Response:
    return c.post(url + "/predict", files={"file": ("a.jpg", image)}, **kw)


# ---- stalled uploads ----------------------------------------------------------------------------------


def test_stalled_uploads_do_not_lock_out_other_clients(predictor, image, tmp_path, caplog):
    http = {"body_grace_s": 1.5, "min_body_rate_bytes_s": 10000, "body_timeout_s": 3}
    with serve(predictor, f"sqlite:///{tmp_path / 'r.db'}", http=http) as srv:
        stalled = [stalled_upload(address(srv)) for _ in range(64)]
        time.sleep(0.5)
        t0 = time.monotonic()
        with client(OTHER_CLIENT) as c:
            resp = predict(c, srv.url, image)
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - t0 < 5
        answers = [read_all(s, 8) for s in stalled]  # every stalled upload is answered and closed
    cap = load_settings().limits.max_uploads_per_client
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
    assert len(refused) == 64 - cap and b'"too_many_uploads"' in refused[0]
    timed_out = [a for a in answers if not a.startswith(b"HTTP/1.1 429")]
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in timed_out)
    assert any(a.startswith(b"HTTP/1.1 408") for a in timed_out)
    for s in stalled:
        s.close()
    assert not [r for r in caplog.records if r.exc_info]  # one warning line per closed upload


def test_slow_upload_is_closed_after_the_body_deadline(predictor, tmp_path):
    """A body trickling in above the minimum rate still ends at body_timeout_s."""
    http = {"body_grace_s": 0.5, "min_body_rate_bytes_s": 100, "body_timeout_s": 2}
    with serve(predictor, f"sqlite:///{tmp_path / 'r.db'}", http=http) as srv:
        s = stalled_upload(address(srv))
        t0 = time.monotonic()
        s.settimeout(0.2)
        answer = b""
        while time.monotonic() - t0 < 6 and not answer:
            try:
                s.sendall(b"y" * 200)  # ~1 kB/s: over the minimum rate
                answer = s.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        assert 1.5 < time.monotonic() - t0 < 4
        s.close()


# ---- HTTP protocol ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health?" + b"a" * 17_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 17_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["line-17kB", "header-17kB", "header-60kB", "content-length-and-chunked"],
)
def test_oversized_or_ambiguous_requests_get_400_and_close(request_bytes, predictor, tmp_path):
    with serve(predictor, f"sqlite:///{tmp_path / 'r.db'}") as srv:
        s = socket.create_connection(address(srv))
        s.sendall(request_bytes)
        answer = read_all(s, 5)  # the server closes the connection
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
        s.close()


@pytest.mark.parametrize("token", [None, "s3cret"], ids=["before-the-answer", "after-a-401"])
def test_malformed_chunked_body_logs_one_line(token, predictor, image, tmp_path, caplog):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with serve(predictor, f"sqlite:///{tmp_path / 'r.db'}", api_token=token) as srv:
            s = socket.create_connection(address(srv))
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            )
            time.sleep(0.3)  # the app is answering (401) or waiting for the body
            s.sendall(b"5\r\n--b\r\n\r\nZZZ\r\n\r\n")  # "ZZZ" is no chunk size
            answer = read_all(s, 5)
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 401")), answer[:100]
            s.close()
            with client() as c:
                auth = {"Authorization": f"Bearer {token}"} if token else {}
                assert predict(c, srv.url, image, headers=auth).status_code == 200
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    logged = records + caplog.records
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged]
    assert not [r for r in logged if "unhandled error" in r.getMessage()]


# ---- failed API tokens ------------------------------------------------------------------------------


def test_failed_tokens_are_rate_limited_per_client(predictor, image, tmp_path):
    limits = {"max_auth_failures": 5, "auth_failure_window_s": 60}
    with serve(predictor, f"sqlite:///{tmp_path / 'r.db'}", api_token="s3cret", limits=limits) as srv:
        with client() as c:
            bad = {"Authorization": "Bearer wrong"}
            codes = [predict(c, srv.url, image, headers=bad).status_code for _ in range(8)]
            assert codes == [401] * 5 + [429] * 3
            resp = predict(c, srv.url, image, headers={"Authorization": "Bearer s3cret"})
            assert resp.status_code == 429 and int(resp.headers["retry-after"]) > 0
            assert resp.json()["error"]["code"] == "too_many_auth_failures"
        with client(OTHER_CLIENT) as c:  # another address is not affected
            assert predict(c, srv.url, image, headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ---- a hung records database ---------------------------------------------------------------------------


def _stuck_requests(srv: BackgroundServer, image: bytes, n: int) -> list[tuple[int, str | None, float]]:
    """`n` concurrent /predict calls: (status, Retry-After, seconds) of each."""
    out: list[tuple[int, str | None, float]] = []

    def one() -> None:
        t0 = time.monotonic()
        with client(timeout=60) as c:
            r = predict(c, srv.url, image)
        out.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    with client() as c:
        t0 = time.monotonic()
        c.get(srv.url + "/health", timeout=5)  # while the requests wait on the database
        assert time.monotonic() - t0 < 1.0, "/health waited on the database"
        for t in threads:
            t.join(timeout=60)
        t0 = time.monotonic()
        health = c.get(srv.url + "/health", timeout=5)  # answered 503, the database still hung
        assert time.monotonic() - t0 < 1.0, "/health waited on the database"
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert health.json()["records"] == "unavailable"
    return out


def _assert_503_fast(results: list[tuple[int, str | None, float]]) -> None:
    assert [r[0] for r in results] == [503] * len(results)
    assert all(r[1] == "1" for r in results)
    assert max(r[2] for r in results) < 3.5, results


def _await_healthy(srv: BackgroundServer, limit_s: float = 15) -> None:
    t0 = time.monotonic()
    with client() as c:
        while c.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() - t0 < limit_s, "/health did not recover"
            time.sleep(0.2)


def test_frozen_postgres_is_503_fast_and_stores_nothing_unanswered(predictor, image):
    url = _pg_database(f"dermlens_t_{os.getpid()}_frozen")
    frozen: list[int] = []
    try:
        with serve(predictor, url, records={"lock_timeout_s": 1}) as srv:
            with client() as c:
                assert predict(c, srv.url, image).status_code == 200  # opens the pooled connection
            admin = create_engine(os.environ["DERMLENS_TEST_PG_URL"], isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                q = "SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
                frozen = [r[0] for r in conn.execute(text(q), {"d": url.rsplit("/", 1)[1]})]
            admin.dispose()
            assert frozen, "no backend to freeze"
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            _assert_503_fast(_stuck_requests(srv, image, 8))
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            frozen = []
            _await_healthy(srv)
            with client() as c:
                assert predict(c, srv.url, image).status_code == 200
        store = RecordStore(url)
        assert store.count() == 2  # the two answered predictions; none of the 503'd ones
        store.close()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        _drop_pg_database(url)


def test_locked_sqlite_is_503_fast_and_health_degraded(predictor, image, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    RecordStore(url).close()
    locker = create_engine(url).connect()
    try:
        with serve(predictor, url, records={"lock_timeout_s": 1}) as srv:
            locker.exec_driver_sql("BEGIN EXCLUSIVE")
            _assert_503_fast(_stuck_requests(srv, image, 6))
            locker.rollback()
            _await_healthy(srv)
            with client() as c:
                assert predict(c, srv.url, image).status_code == 200
    finally:
        locker.close()
    store = RecordStore(url)
    assert store.count() == 1
    store.close()


# ---- two servers opening one fresh database -------------------------------------------------------------

_OPEN = (
    "import sys; from dermlens.serve.records import RecordStore\n"
    "print('ready', flush=True); sys.stdin.readline()\n"
    "RecordStore(sys.argv[1]).close()\n"
)


def _open_together(urls: list[str]) -> list[subprocess.CompletedProcess]:
    """Two processes per URL open a RecordStore at the same moment (once all have imported)."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, url], **pipes) for url in urls for _ in range(2)]
    for p in procs:
        assert p.stdout.readline() == b"ready\n", p.stderr.read().decode()[-2000:]
    for p in procs:
        p.stdin.write(b"go\n")
        p.stdin.flush()
    return [subprocess.CompletedProcess(p.args, p.wait(60), *p.communicate()) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_servers_starting_together_upgrade_one_at_a_time(backend, tmp_path):
    if backend == "sqlite":
        urls = [f"sqlite:///{tmp_path / str(i) / 'r.db'}" for i in range(4)]
    else:
        urls = [_pg_database(f"dermlens_t_{os.getpid()}_race{i}") for i in range(4)]
    try:
        for p in _open_together(urls):
            assert p.returncode == 0, p.stderr.decode()[-2000:]
        for url in urls:
            store = RecordStore(url)
            assert store.count() == 0
            store.close()
    finally:
        if backend == "postgresql":
            for url in urls:
                _drop_pg_database(url)
