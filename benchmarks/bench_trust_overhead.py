"""Trust-layer cost per image at inference (numpy only): calibration, each OOD score, refer rule, CAM + PNG.

Usage: .venv/bin/python benchmarks/bench_trust_overhead.py [--bundle DIR] [-n 256]
Uses the bundle's trust.npz when given (real class means / precision / kNN bank), else random statistics
of the lite0 shapes (D=1280, 7 classes, 5x7 feature map, 2000-row kNN bank). Times are per image, one batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dermlens.infer.cam import cam, overlay_png, upsample
from dermlens.infer.state import TrustState


def _state(bundle: Path | None, d: int, c: int) -> TrustState:
    if bundle is not None:
        return TrustState.load(bundle / "trust.npz")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) / d
    return TrustState(
        ood_method="mahalanobis",
        ood_threshold=1.0,
        class_means=rng.normal(size=(c, d)),
        precision=a @ a.T + np.eye(d),
        knn_bank=rng.normal(size=(2000, d)).astype(np.float16),
        cam_weight=rng.normal(size=(c, d)).astype(np.float32),
        thresholds={"msp": 0.0},
    )


def _ms(fn, n: int, reps: int = 3) -> float:
    best = min(_timed(fn) for _ in range(reps))
    return best / n * 1000.0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("-n", type=int, default=256)
    a = ap.parse_args()
    state = _state(a.bundle, 1280, 7)
    d, c = state.class_means.shape[1], state.class_means.shape[0]
    rng = np.random.default_rng(1)
    logits, emb = rng.normal(size=(a.n, c)), rng.normal(size=(a.n, d)).astype(np.float32)
    fmap = rng.normal(size=(d, 5, 7)).astype(np.float32)
    rgb = rng.integers(0, 255, size=(450, 600, 3), dtype=np.uint8)
    rows = {
        **{
            f"ood {m}": _ms(lambda m=m: state.score(m, logits, emb), a.n)
            for m in ("msp", "energy", "mahalanobis", "knn")
        },
        "decide (calibration, OOD, sets, the refer rule)": _ms(lambda: state.decide(logits, emb), a.n),
        "cam [5x7]": _ms(lambda: cam(fmap, state.cam_weight, 0), 1),
        "cam upsample to 450x600": _ms(lambda: upsample(cam(fmap, state.cam_weight, 0), (450, 600)), 1),
        "overlay PNG 450x600": _ms(lambda: overlay_png(rgb, cam(fmap, state.cam_weight, 0)), 1),
    }
    for name, ms in rows.items():
        if ms is not None:
            print(f"{name:40s} {ms:9.4f} ms/image")


if __name__ == "__main__":
    main()
