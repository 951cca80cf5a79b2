"""API throughput and latency under concurrency, with and without dynamic batching, against batch predict.

In one run: starts `dermlens serve` (subprocess, 127.0.0.1, records in a temporary SQLite file with an
fsync per commit as in production) once per server mode, and measures POST /predict of real HAM10000
images upscaled to 600x450 JPEG from 1, 8 and 32 concurrent clients: req/s, p50 and p99. Modes: dynamic
batching on (the default), off (one onnxruntime call per request), and, with --before-src, the server of
an older checkout (e.g. dermlens 0.1, for before/after figures). Next to them: `dermlens predict`-style
batch throughput (serve.batch.run_batch: decode threads + batches of 32) on the same images, the ceiling
the API aims at (at 8 clients >= 70% of it, p99 <= 3x p50).

    .venv/bin/python benchmarks/bench_api.py [--clients 1,8,32] [--per-client 40] [--before-src DIR]
        [--json docs/results/bench_api.json]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as `dermlens serve` does
    os.environ.setdefault(_var, "1")

import argparse
import io
import json
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
from machine import cpu_name, load_average, model_version  # benchmarks/machine.py

SRC = Path(__file__).resolve().parents[1] / "src"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    port: int, tmp: Path, config: str, src: Path, records_url: str | None = None
) -> subprocess.Popen:
    """`dermlens serve` from `src` on 127.0.0.1:port with the YAML `config`; waits for /health."""
    (tmp / "serve.yaml").write_text(config)
    cmd = [sys.executable, "-m", "dermlens.cli.serve", "--port", str(port), "--log-level", "warning"]
    cmd += ["--records-url", records_url or f"sqlite:///{tmp / 'records.db'}"]
    env = {**os.environ, "PYTHONPATH": str(src), "DERMLENS_SERVE_CONFIG": str(tmp / "serve.yaml")}
    env.pop("DERMLENS_API_TOKEN", None)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp)
    deadline = time.monotonic() + 180
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


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MB."""
    with open(f"/proc/{pid}/status") as fh:
        kb = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM"))
    return kb / 1024


def load(url: str, images: list[bytes], total: int, clients: int) -> dict:
    """`clients` threads share `total` requests; req/s, latency percentiles and status counts."""
    lock, latencies, statuses, counter = threading.Lock(), [], {}, [0]

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as h:
            while True:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= total:
                    return
                t0 = time.perf_counter()
                r = h.post("/predict", files={"file": (f"{i}.jpg", images[i % len(images)], "image/jpeg")})
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p99 = np.percentile(latencies, [50, 99])
    return {
        "clients": clients,
        "requests": total,
        "req_per_s": round(total / wall, 1),
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def batch_predict_rate(images: list[bytes], tmp: Path, n: int) -> float:
    """img/s of `dermlens predict`'s engine (run_batch: decode threads, batches of 32) on the same JPEGs."""
    from dermlens.infer.predictor import Predictor
    from dermlens.predict.folder import collect_inputs, run_batch

    folder = tmp / "predict_images"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(images[i % len(images)])
    predictor = Predictor.load()
    items, _ = collect_inputs([folder])
    run_batch(predictor, items[:64])  # warm-up
    summary = run_batch(predictor, items)
    return summary.done / summary.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--per-client", type=int, default=40, help="requests per client (at least --min)")
    ap.add_argument("--min", type=int, default=200, help="fewest requests per measurement")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-images", type=int, default=512, help="images for the batch-predict figure")
    ap.add_argument("--before-src", type=Path, default=None, help="src/ of an older checkout to compare")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    clients = [int(c) for c in args.clients.split(",")]
    images = payloads(args.images)
    kb = np.mean([len(b) for b in images]) / 1e3
    print(f"{len(images)} HAM10000 images upscaled to 600x450 JPEG (mean {kb:.0f} kB); {cpu_name()}")
    modes = {
        "batching_on": (SRC, "inference:\n  batching:\n    enabled: true\n"),
        "batching_off": (SRC, "inference:\n  batching:\n    enabled: false\n"),
    }
    if args.before_src:
        modes = {"before": (args.before_src.resolve(), "inference:\n  max_concurrent: 2\n"), **modes}
    results: dict[str, list[dict]] = {}
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_root:
        for mode, (src, config) in modes.items():
            tmp = Path(tmp_root) / mode
            tmp.mkdir()
            port = free_port()
            proc = start_server(port, tmp, config, src)
            url = f"http://127.0.0.1:{port}"
            try:
                load(url, images, 40, 4)  # warm-up
                results[mode] = []
                for c in clients:
                    r = load(url, images, max(args.min, c * args.per_client), c)
                    results[mode].append(r)
                    print(
                        f"{mode:13s} {c:3d} clients: {r['req_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                        f"p99 {r['p99_ms']:7.1f} ms   statuses {r['statuses']}"
                    )
                peaks[mode] = round(peak_rss_mb(proc.pid), 1)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        rate = batch_predict_rate(images, Path(tmp_root), args.batch_images)
    print(f"batch predict (run_batch, batch 32): {rate:7.1f} img/s on the same images")
    summary = {}
    for mode, rows in results.items():
        at8 = next((r for r in rows if r["clients"] == 8), None)
        if at8:
            summary[mode] = {
                "req_per_s_8_clients_over_batch_img_per_s": round(at8["req_per_s"] / rate, 3),
                "p99_over_p50_8_clients": round(at8["p99_ms"] / at8["p50_ms"], 2),
                "peak_rss_mb": peaks.get(mode),
            }
            s = summary[mode]
            print(
                f"{mode:13s} at 8 clients: {s['req_per_s_8_clients_over_batch_img_per_s']:.0%} of batch "
                f"throughput (aim >= 70%), p99/p50 {s['p99_over_p50_8_clients']:.2f} (aim <= 3); "
                f"server peak RSS {s['peak_rss_mb']} MB"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "benchmark": "bench_api",
            "command": "benchmarks/bench_api.py " + " ".join(sys.argv[1:]),
            "model": model_version(),
            "cpu": cpu_name(),
            "load_average_at_end": load_average(),
            "images": f"{len(images)} HAM10000 images upscaled to 600x450 JPEG, mean {kb:.0f} kB",
            "batch_predict_img_per_s": round(rate, 1),
            "api": results,
            "summary": summary,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
