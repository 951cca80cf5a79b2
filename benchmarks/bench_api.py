"""API latency: p50/p99 of POST /predict for 600x450 JPEGs from concurrent clients, against a real server.

Starts `dermlens serve` in a subprocess on 127.0.0.1 (records in a temporary SQLite file, fsync per
prediction as in production), uploads real HAM10000 images upscaled x3 from N client threads, and prints
the latency next to a baseline: the same Predictor called in-process on the same bytes, so the ratio
shows what HTTP, multipart parsing, queueing and the durable record add.

    .venv/bin/python benchmarks/bench_api.py [--requests 400] [--clients 8] [--model DIR] [--precision int8]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# As `dermlens serve` does: one BLAS thread, so the in-process baseline is measured like the server.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from dermlens.settings import data_root


def payloads(n: int) -> list[bytes]:
    """n real HAM10000 images (stored at 200x150) upscaled x3 to 600x450, JPEG quality 90, in memory."""
    paths = sorted((data_root() / "ham10000" / "images").glob("*.jpg"))[:n]
    out = []
    for p in paths:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((600, 450), Image.Resampling.BICUBIC).save(
            buf, "JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


def stats(ms: list[float]) -> str:
    p50, p90, p99 = np.percentile(np.asarray(ms), [50, 90, 99])
    return f"p50 {p50:6.1f} ms   p90 {p90:6.1f} ms   p99 {p99:6.1f} ms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline(images: list[bytes], n: int, model: str | None, precision: str | None, threads: int | None):
    """In-process Predictor.predict_bytes latency, one call at a time."""
    from dermlens.serve.runtime import Predictor

    pred = Predictor.load(model, precision=precision, threads=threads)
    for data in images[:5]:
        pred.predict_bytes(data)
    ms = []
    for i in range(n):
        t0 = time.perf_counter()
        pred.predict_bytes(images[i % len(images)])
        ms.append((time.perf_counter() - t0) * 1000)
    return pred, ms


def start_server(port: int, db: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "dermlens.cli.serve",
        "--port",
        str(port),
        "--records-url",
        f"sqlite:///{db}",
    ]
    cmd += ["--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.precision:
        cmd += ["--precision", args.precision]
    env = {**os.environ}
    env.pop("DERMLENS_API_TOKEN", None)
    if args.threads:
        env["DERMLENS_SERVE_CONFIG"] = str(db.parent / "serve.yaml")
        (db.parent / "serve.yaml").write_text(
            f"inference:\n  threads: {args.threads}\n  max_concurrent: {args.max_concurrent}\n"
        )
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def load_test(url: str, images: list[bytes], total: int, clients: int) -> tuple[list[float], int, float]:
    """`clients` threads share `total` requests; returns per-request latencies, error count, wall time."""
    lock, latencies, errors, counter = threading.Lock(), [], [0], [0]

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as h:
            while True:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= total:
                    return
                data = images[i % len(images)]
                t0 = time.perf_counter()
                r = h.post("/predict", files={"file": (f"{i}.jpg", data, "image/jpeg")})
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    errors[0] += r.status_code != 200

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--model", default=None, help="bundle folder (default: the release bundle)")
    ap.add_argument("--precision", default=None, help="fp32 | int8 (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads per prediction")
    ap.add_argument("--max-concurrent", type=int, default=2, help="predictions at once in the server")
    args = ap.parse_args()

    images = payloads(args.images)
    kb = np.mean([len(b) for b in images]) / 1e3
    print(f"{len(images)} HAM10000 images upscaled to 600x450 JPEG, mean {kb:.0f} kB")
    pred, base = baseline(images, min(args.requests, 200), args.model, args.precision, args.threads)
    print(f"model {pred.card.name} v{pred.card.version} ({pred.precision}), {os.cpu_count()} CPUs")
    print(f"baseline  in-process Predictor.predict_bytes, 1 caller   : {stats(base)}")
    del pred

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_server(port, Path(tmp) / "records.db", args)
        url = f"http://127.0.0.1:{port}"
        try:
            load_test(url, images, 20, 2)  # warm-up
            one, err1, _ = load_test(url, images, min(args.requests, 200), 1)
            print(f"API       POST /predict, 1 client                      : {stats(one)}   errors {err1}")
            many, errs, wall = load_test(url, images, args.requests, args.clients)
            print(
                f"API       POST /predict, {args.clients} concurrent clients         : {stats(many)}   "
                f"errors {errs}   {len(many) / wall:.1f} req/s"
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    p50_base, p50_one = np.percentile(base, 50), np.percentile(one, 50)
    ratio = p50_one / p50_base
    print(f"API overhead at 1 client: p50 {p50_one - p50_base:+.1f} ms ({ratio:.2f}x the in-process call)")
    p50 = float(np.percentile(many, 50))
    print(
        f"target p50 <= 50 ms at {args.clients} clients: {'met' if p50 <= 50 else 'NOT met'} ({p50:.1f} ms)"
    )


if __name__ == "__main__":
    main()
