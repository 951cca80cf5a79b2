"""Memory amplification: server peak RSS for hostile uploads, before (an older checkout's server) and
after, each case on a freshly started `dermlens serve` (peak = VmHWM of the server process).

Cases: one /predict/batch of 16 large (~19 MB) PNG files; 4 such batches at once; one 6300x6300 16-bit
PNG of ~80 kB (inside the pixel limit); 4 of those at once. Uploads are generated here (noise and flat
images), never dataset images.

    .venv/bin/python benchmarks/bench_memory.py [--before-src DIR] [--json docs/results/bench_memory.json]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench_api import SRC, free_port, peak_rss_mb, start_server
from machine import cpu_name, load_average, model_version


def big_png(side: int = 2500) -> bytes:
    """A noise RGB PNG of side x side (~19 MB at 2500: incompressible, under the 20 MB upload limit)."""
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def deep_png(side: int = 6300) -> bytes:
    """A flat 16-bit grayscale PNG, side x side: a few tens of kB that decode to side^2 x 2 bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 1234, np.uint16)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS")) / 1024


def fire(url: str, route: str, files: list, copies: int) -> list[int]:
    """`copies` identical requests at once; their status codes."""
    statuses: list[int] = []

    def one() -> None:
        try:
            statuses.append(httpx.post(url + route, files=files, timeout=600).status_code)
        except httpx.TransportError:
            statuses.append(0)

    threads = [threading.Thread(target=one) for _ in range(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-src", type=Path, default=None, help="src/ of an older checkout to compare")
    ap.add_argument("--cases", default=None, help="comma-separated subset of the cases (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    big, deep = big_png(), deep_png()
    small = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(
        small, "JPEG"
    )
    small = small.getvalue()
    print(f"big PNG {len(big) / 1e6:.1f} MB; 16-bit 6300x6300 PNG {len(deep) / 1e3:.0f} kB; {cpu_name()}")
    batch = [("files", (f"{i}.png", big, "image/png")) for i in range(16)]
    cases = {
        "batch_16x19MB": ("/predict/batch", batch, 1),
        "4_batches_16x19MB": ("/predict/batch", batch, 4),
        "png16_6300": ("/predict", [("file", ("deep.png", deep, "image/png"))], 1),
        "4x_png16_6300": ("/predict", [("file", ("deep.png", deep, "image/png"))], 4),
    }
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    modes = {"after": SRC}
    if args.before_src:
        modes = {"before": args.before_src.resolve(), **modes}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_root:
        for mode, src in modes.items():
            results[mode] = {}
            for case, (route, files, copies) in cases.items():
                tmp = Path(tmp_root) / f"{mode}_{case}"
                tmp.mkdir()
                port = free_port()
                proc = start_server(port, tmp, "{}\n", src)
                try:
                    url = f"http://127.0.0.1:{port}"
                    fire(url, "/predict", [("file", ("w.jpg", small, "image/jpeg"))], 1)  # warm-up
                    time.sleep(0.5)
                    idle = rss_mb(proc.pid)
                    t0 = time.perf_counter()
                    statuses = fire(url, route, files, copies)
                    row = {
                        "idle_rss_mb": round(idle, 1),
                        "peak_rss_mb": round(peak_rss_mb(proc.pid), 1),
                        "seconds": round(time.perf_counter() - t0, 1),
                        "statuses": statuses,
                    }
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                results[mode][case] = row
                print(
                    f"{mode:6s} {case:18s} RSS {row['idle_rss_mb']:.0f} -> peak {row['peak_rss_mb']:.0f} MB "
                    f"in {row['seconds']:5.1f} s, statuses {statuses}"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "benchmark": "bench_memory",
            "command": "benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
            "model": model_version(),
            "cpu": cpu_name(),
            "load_average_at_end": load_average(),
            "uploads": {"big_png_bytes": len(big), "png16_6300_bytes": len(deep)},
            "results": results,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
