"""Size and speed of an ensemble bundle against a single model (the baseline, timed in the same process).

The ensemble is either an existing bundle (--ensemble DIR, e.g. from `dermlens train ensemble`) or, by
default,
K members built from the single bundle's own weights (model.pt, each copy perturbed by ~1e-6 so the
exporter cannot share their tensors) into ONE EnsembleNet graph and exported like `dermlens train ensemble`
does (fp32 + int8): its size and speed are those of any K-member ensemble of that architecture; its
accuracy is meaningless (the members are near-identical). Usage:

    .venv/bin/python benchmarks/bench_ensemble.py [--bundle DIR] [--members 3] [--ensemble DIR]
        [--threads 2] [--batch 32] [--seconds 8] [--json docs/results/bench_ensemble.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def window(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Images/s of repeated fn() calls over at least `seconds` (and two calls)."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 2:
        fn()
        n += 1
    return n * batch / elapsed


def best_rate(engines: dict[str, Callable[[], object]], batch: int, seconds: float, rounds: int) -> dict:
    """Round-robin windows, best per engine (fair when other jobs share the machine)."""
    for fn in engines.values():
        fn()
    best = dict.fromkeys(engines, 0.0)
    for _ in range(rounds):
        for name, fn in engines.items():
            best[name] = max(best[name], window(fn, batch, seconds / rounds))
    return best


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine()


def replicated_ensemble(bundle: Path, k: int, out: Path, calib: np.ndarray) -> Path:
    """K copies of the bundle's network as one EnsembleNet, exported to OUT/model.onnx + model.int8.onnx."""
    from dermlens.bundle import ONNX_FP32, ONNX_INT8, TORCH_WEIGHTS
    from dermlens.export.checkpoint import load_checkpoint
    from dermlens.export.graph import export_onnx
    from dermlens.export.quantize import quantize_int8
    from dermlens.export.stage import export_config
    from dermlens.metadata import META_DIM
    from dermlens.model.ensemble_net import EnsembleNet

    loaded = load_checkpoint(bundle / TORCH_WEIGHTS)
    import torch

    members = [copy.deepcopy(loaded.net) for _ in range(k)]
    with torch.no_grad():
        for i, m in enumerate(members):
            m.model_cfg = dict(loaded.model_cfg)
            for p in m.parameters():  # distinct tensors: the exporter would share identical initializers
                p.add_(torch.randn_like(p) * 1e-6 * i)
    net = EnsembleNet(members, "mean_prob", "mean").eval()
    export_onnx(net, out / ONNX_FP32, loaded.prep)
    q = export_config()["int8"]
    q = {**q, "exclude": [*q.get("exclude", []), "MatMul"]}
    meta = np.zeros((len(calib), META_DIM), np.float32)
    quantize_int8(out / ONNX_FP32, out / ONNX_INT8, calib, meta, loaded.prep, q)
    return out


def main() -> None:
    from dermlens.bundle import ONNX_FP32, ONNX_INT8, read_card, release_dir
    from dermlens.infer.session import OnnxModel
    from dermlens.metadata import META_DIM
    from dermlens.preprocess import load_rgb
    from dermlens.settings import data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="single-model bundle (default: the release)")
    ap.add_argument("--ensemble", type=Path, default=None, help="an ensemble bundle to compare instead")
    ap.add_argument("--members", type=int, default=3, help="members of the replicated ensemble")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per engine and batch size")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    load_at_start = round(os.getloadavg()[0], 2)

    single = args.bundle or release_dir()
    card = read_card(single)
    prep = card.preprocessing
    paths = sorted((data_root() / "ham10000" / "images").glob("*.jpg"))[: max(args.batch, 64)]
    images = np.stack([prep.resize(load_rgb(p)) for p in paths])
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        ens = args.ensemble or replicated_ensemble(single, args.members, Path(tmp), images[:64])
        x = prep.normalize(images[: args.batch])
        meta = np.zeros((len(x), META_DIM), np.float32)
        models = {
            f"{name}_{prec}": OnnxModel(b / f, threads=args.threads)
            for name, b in (("single", single), ("ensemble", ens))
            for prec, f in (("fp32", ONNX_FP32), ("int8", ONNX_INT8))
        }
        batch = {n: (lambda m=m: m.run(x, meta, feature_map=False)) for n, m in models.items()}
        one = {n: (lambda m=m: m.run(x[:1], meta[:1], feature_map=False)) for n, m in models.items()}
        rate = best_rate(batch, args.batch, args.seconds, args.rounds)
        rate1 = best_rate(one, 1, args.seconds / 2, args.rounds)
        sizes = {
            n: {f: (b / f).stat().st_size for f in (ONNX_FP32, ONNX_INT8)}
            for n, b in (("single", single), ("ensemble", ens))
        }
        ens_card = read_card(ens) if (ens / "card.json").is_file() else None
    result = {
        "benchmark": "bench_ensemble",
        "cpu": cpu_name(),
        "threads": args.threads,
        "single": {"bundle": str(single), "version": card.version, "architecture": card.architecture},
        "ensemble": {
            "bundle": str(args.ensemble)
            if args.ensemble
            else f"{args.members} replicated members (temporary)",
            "architecture": ens_card.architecture
            if ens_card
            else f"ensemble({args.members}x {card.architecture})",
        },
        "input": [prep.height, prep.width],
        "img_per_s_batch": {k: round(v, 1) for k, v in rate.items()},
        "img_per_s_single_image": {k: round(v, 1) for k, v in rate1.items()},
        "size_bytes": sizes,
        "ensemble_vs_single": {  # x times slower / x times larger than the single model
            "slower_fp32_batch": round(rate["single_fp32"] / rate["ensemble_fp32"], 2),
            "slower_int8_batch": round(rate["single_int8"] / rate["ensemble_int8"], 2),
            "slower_int8_single_image": round(rate1["single_int8"] / rate1["ensemble_int8"], 2),
            "larger_fp32": round(sizes["ensemble"][ONNX_FP32] / sizes["single"][ONNX_FP32], 2),
            "larger_int8": round(sizes["ensemble"][ONNX_INT8] / sizes["single"][ONNX_INT8], 2),
        },
        "load_average_1min_at_start": load_at_start,  # other jobs on the machine lower both rates alike
        "note": "best of round-robin windows",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
