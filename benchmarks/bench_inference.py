"""Inference throughput: onnxruntime fp32 and int8 (the runtime's sessions) against PyTorch eager fp32,
and OpenVINO (`pip install 'dermlens[openvino]'`) on the same ONNX files, which is what a user would try
instead. OpenVINO runs at f32 precision (its CPU default on AMX/bf16 CPUs is bf16, which changes the
logits: reported separately with its largest logit difference); the int8 graph is tried and reported.

Same model (the bundle's; PyTorch loads its model.pt), same real HAM10000 images at the model input size,
same batch and thread count. Usage:

    .venv/bin/python benchmarks/bench_inference.py [--bundle DIR] [--threads 2] [--batch 32] [--seconds 12]
        [--json docs/results/bench_inference.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from machine import cpu_name  # benchmarks/machine.py


def window(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Images/s of repeated fn() calls over at least `seconds` (and two calls)."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 2:
        fn()
        n += 1
    return n * batch / elapsed


def measure_all(
    engines: dict[str, Callable[[], object]], batch: int, seconds: float, rounds: int
) -> dict[str, float]:
    """Round-robin timing windows, best window per engine: fair when other jobs share the machine."""
    for fn in engines.values():  # warm-up
        fn()
        fn()
    best = dict.fromkeys(engines, 0.0)
    for _ in range(rounds):
        for name, fn in engines.items():
            best[name] = max(best[name], window(fn, batch, seconds / rounds))
    return best


def openvino_engines(engines: dict, bundle: Path, x: np.ndarray, meta: np.ndarray, threads: int) -> dict:
    """Add OpenVINO engines on the bundle's ONNX files (when installed); returns notes on what differs."""
    from dermlens.bundle import ONNX_FP32, ONNX_INT8
    from dermlens.infer.session import OnnxModel

    try:
        import openvino as ov
    except ImportError:
        return {"openvino": "not installed: pip install 'dermlens[openvino]'"}
    notes, core = {}, ov.Core()
    ref = OnnxModel(bundle / ONNX_FP32, threads=threads).run(x, meta, feature_map=False)["fine_logits"]
    for file, tag in ((ONNX_FP32, "fp32"), (ONNX_INT8, "int8")):
        for precision in ("f32", "bf16"):
            name = f"openvino_{tag}" + ("" if precision == "f32" else "_bf16")
            cfg = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
            try:
                compiled = core.compile_model(str(bundle / file), "CPU", cfg)
            except RuntimeError as e:
                failed = [ln for ln in str(e).splitlines() if "failed for" in ln] or str(e).splitlines()[:1]
                notes[name] = f"OpenVINO {ov.__version__} cannot convert {file}: {failed[0].strip()[:160]}"
                break
            req = compiled.create_infer_request()
            out = compiled.output("fine_logits")
            diff = float(np.abs(req.infer([x, meta])[out] - ref).max())
            notes[name + "_max_logit_diff"] = (
                f"{name}: largest fine-logit difference to onnxruntime fp32 {diff:.2g}"
            )
            engines[name] = lambda r=req: r.infer([x, meta])
    return notes


def main() -> None:
    import onnxruntime as ort
    import torch

    from dermlens.bundle import ONNX_FP32, ONNX_INT8, TORCH_WEIGHTS, read_card, release_dir
    from dermlens.export.checkpoint import load_checkpoint
    from dermlens.infer.session import OnnxModel
    from dermlens.metadata import META_DIM
    from dermlens.preprocess import load_rgb
    from dermlens.settings import data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the packaged release)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=12.0, help="timed seconds per engine")
    ap.add_argument(
        "--rounds", type=int, default=4, help="round-robin timing windows per engine (best is kept)"
    )
    ap.add_argument(
        "--spin", action="store_true", help="let onnxruntime threads spin-wait (off in the runtime)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    bundle = args.bundle or release_dir()
    card = read_card(bundle)
    prep = card.preprocessing
    paths = sorted((data_root() / "ham10000" / "images").glob("*.jpg"))[: args.batch]
    images = np.stack([prep.resize(load_rgb(p)) for p in paths])
    x = prep.normalize(images)
    meta = np.zeros((len(x), META_DIM), np.float32)

    torch.set_num_threads(args.threads)
    net = load_checkpoint(bundle / TORCH_WEIGHTS).net.eval()
    xt, mt = torch.from_numpy(x), torch.from_numpy(meta) if net.uses_metadata else None
    xt_cl = xt.contiguous(memory_format=torch.channels_last)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)

    def eager() -> object:
        with torch.inference_mode():
            return net(xt, mt)

    def eager_cl() -> object:
        with torch.inference_mode():
            return net_cl(xt_cl, mt)

    engines: dict[str, Callable[[], object]] = {
        "pytorch_eager_fp32": eager,
        "pytorch_eager_fp32_channels_last": eager_cl,
    }
    for name, file in (("onnxruntime_fp32", ONNX_FP32), ("onnxruntime_int8", ONNX_INT8)):
        model = OnnxModel(bundle / file, threads=args.threads, spin=args.spin)
        engines[name] = lambda m=model: m.run(x, meta, feature_map=False)
    notes = openvino_engines(engines, bundle, x, meta, args.threads)
    results = measure_all(engines, len(x), args.seconds, args.rounds)
    base = results["pytorch_eager_fp32"]
    print(
        f"dermlens inference benchmark: model {card.name} {card.version}, input {prep.height}x{prep.width}, "
        f"batch {len(x)}, {args.threads} threads, onnxruntime {ort.__version__} (spin={args.spin}), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    for name, rate in results.items():
        print(f"  {name:34s} {rate:8.1f} img/s   {rate / base:5.2f}x eager")
    print(f"  int8 / fp32 onnxruntime: {results['onnxruntime_int8'] / results['onnxruntime_fp32']:.2f}x")
    for note in notes.values():
        print(f"  note: {note}")
    ov = {k: v for k, v in results.items() if k.startswith("openvino") and "bf16" not in k}
    best_ort = max(results["onnxruntime_int8"], results["onnxruntime_fp32"])
    winner = "openvino" if ov and max(ov.values()) > best_ort else "onnxruntime"
    print(f"  faster exact engine on this CPU: {winner} (the runtime keeps onnxruntime unless it loses)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "bench_inference",
                    "model": f"{card.name} {card.version}",
                    "cpu": cpu_name(),
                    "threads": args.threads,
                    "batch": len(x),
                    "img_per_s": results,
                    "faster_exact_engine": winner,
                    "notes": notes,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
