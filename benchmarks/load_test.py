"""Bounded load test: N requests (default 10,000) from C clients (default 8) against `dermlens serve` on
127.0.0.1, about 10% of them malformed (not images, forbidden formats, fuzz-corpus crashers, truncated or
empty files, bad or duplicate form fields). Passes when no response is a 5xx and no record is lost: every
acknowledged prediction (HTTP 200 with a record_id) is in the database, and the database holds nothing else.

Bounded: the server is started here on a loopback port (nothing else is contacted), the request count is
capped at 10,000 and the run stops after --max-seconds.

    .venv/bin/python benchmarks/load_test.py [--requests 10000] [--clients 8] [--records-url URL]
        [--json docs/results/load_test.json]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import io
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench_api import SRC, free_port, payloads, peak_rss_mb, start_server
from machine import cpu_name, load_average, model_version

MAX_REQUESTS = 10_000
FUZZ = Path(__file__).resolve().parents[1] / "tests" / "data" / "fuzz"


def malformed_cases(good: bytes) -> list[tuple[str, list, dict]]:
    """(kind, multipart files, form data) of bad requests, each of which must get a 4xx."""
    eps, gif = io.BytesIO(), io.BytesIO()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    img.save(eps, "EPS")
    img.save(gif, "GIF")
    cases = [
        ("not_an_image", [("file", ("a.jpg", b"hello, not an image"))], {}),
        ("empty", [("file", ("a.jpg", b""))], {}),
        ("truncated_jpeg", [("file", ("a.jpg", good[: len(good) // 3]))], {}),
        ("eps_named_jpg", [("file", ("lesion.jpg", eps.getvalue()))], {}),
        ("gif", [("file", ("lesion.gif", gif.getvalue()))], {}),
        ("bad_age", [("file", ("a.jpg", good))], {"age": "٣٠"}),
        ("huge_field", [("file", ("a.jpg", good))], {"sex": "x" * 100_000}),
        ("duplicate_file", [("file", ("a.jpg", good)), ("file", ("b.jpg", good))], {}),
    ]
    cases += [
        (f"fuzz_{p.stem}", [("file", ("x.jpg", p.read_bytes()))], {}) for p in sorted(FUZZ.glob("*.bin"))
    ]
    return cases


def run(url: str, images: list[bytes], total: int, clients: int, deadline: float) -> dict:
    """Send `total` requests (every 10th malformed) from `clients` threads; collect statuses and ids."""
    bad = malformed_cases(images[0])
    lock, counter = threading.Lock(), [0]
    statuses: dict[int, int] = {}
    by_kind: dict[str, dict[int, int]] = {}
    acknowledged: list[str] = []
    latencies: list[float] = []
    transport_errors = [0]

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as h:
            while time.monotonic() < deadline:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= total:
                    return
                if i % 10 == 9:
                    kind, files, data = bad[(i // 10) % len(bad)]
                else:
                    kind, files, data = "good", [("file", (f"{i}.jpg", images[i % len(images)]))], {}
                t0 = time.perf_counter()
                try:
                    r = h.post("/predict", files=files, data=data)
                except httpx.TransportError:
                    with lock:
                        transport_errors[0] += 1
                    continue
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    k = by_kind.setdefault(kind, {})
                    k[r.status_code] = k.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        acknowledged.append(r.json()["record_id"])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0)
    return {
        "sent": min(counter[0], total),
        "seconds": round(wall, 1),
        "req_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "statuses_by_kind": {
            k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(by_kind.items())
        },
        "transport_errors": transport_errors[0],
        "acknowledged": acknowledged,
    }


def check_records(url: str, acknowledged: list[str]) -> dict:
    """Every acknowledged record is stored, and nothing else is."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        stored = {row[0] for row in conn.execute(text("SELECT id FROM predictions"))}
    engine.dispose()
    ack = set(acknowledged)
    return {
        "acknowledged": len(ack),
        "stored": len(stored),
        "lost": len(ack - stored),
        "stored_but_not_acknowledged": len(stored - ack),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=MAX_REQUESTS)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=1200.0, help="stop sending after this long")
    ap.add_argument("--records-url", default=None, help="SQLAlchemy URL (default: a temporary SQLite file)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    total = min(args.requests, MAX_REQUESTS)
    images = payloads(32)
    with tempfile.TemporaryDirectory() as tmp:
        db_url = args.records_url or f"sqlite:///{Path(tmp) / 'records.db'}"
        port = free_port()
        config = f"records:\n  url: {json.dumps(db_url)}\n"
        proc = start_server(port, Path(tmp), config, SRC, records_url=db_url)
        try:
            result = run(
                f"http://127.0.0.1:{port}", images, total, args.clients, time.monotonic() + args.max_seconds
            )
            result["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid), 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        records = check_records(db_url, result.pop("acknowledged"))
    fivexx = sum(n for s, n in result["statuses"].items() if s.startswith("5"))
    passed = fivexx == 0 and records["lost"] == 0 and records["stored_but_not_acknowledged"] == 0
    print(
        f"{result['sent']} requests, {args.clients} clients, {result['seconds']} s "
        f"({result['req_per_s']} req/s, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms); statuses {result['statuses']}"
    )
    print(f"5xx: {fivexx}; records {records}; {'PASS' if passed else 'FAIL'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "benchmark": "load_test",
            "command": "benchmarks/load_test.py " + " ".join(sys.argv[1:]),
            "model": model_version(),
            "cpu": cpu_name(),
            "load_average_at_end": load_average(),
            "clients": args.clients,
            "records_backend": db_url.split(":", 1)[0],
            **result,
            "responses_5xx": fivexx,
            "records": records,
            "passed": passed,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
