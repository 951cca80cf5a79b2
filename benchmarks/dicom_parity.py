"""DICOM vs JPEG prediction difference: HAM10000 test-split images wrapped as DICOM photographs in every
transfer syntax dermlens reads, scored with their patient tags, against the JPEGs scored with the same
metadata given directly. Usage:

    PYTHONPATH=src:tests python benchmarks/dicom_parity.py [--n 300] [--out docs/results/dicom_parity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def main() -> None:
    from dermlens.data.dicom_meta import read_meta
    from dermlens.infer.predictor import Predictor
    from dermlens.preprocess import load_rgb
    from dicom_files import SYNTAXES, write_photo  # tests/dicom_files.py: real VL Photographic images
    from monitor_shift import ham_test

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("docs/results/dicom_parity.json"))
    args = ap.parse_args()
    images = [(p, m) for p, m in ham_test(10**6) if m["age"] == m["age"] and m["sex"] and m["site"]][: args.n]
    predictor = Predictor.load(threads=1)
    jpeg_meta = [{**m, "age": float(int(m["age"]))} for _, m in images]
    jpeg = predictor.predict_arrays([load_rgb(p) for p, _ in images], jpeg_meta)
    bare = predictor.predict_arrays([load_rgb(p) for p, _ in images], None)
    per_syntax = {}
    with tempfile.TemporaryDirectory() as tmp:
        for syntax in SYNTAXES:
            paths = [
                write_photo(p, Path(tmp) / f"{syntax}_{i}.dcm", syntax, m) for i, (p, m) in enumerate(images)
            ]
            pixels = [load_rgb(p) for p in paths]
            pix_diff = max(
                int(np.abs(a.astype(int) - load_rgb(src)).max())
                for a, (src, _) in zip(pixels, images, strict=True)
            )
            got = predictor.predict_arrays(pixels, [read_meta(p) for p in paths])
            diff = np.abs(got["probs"] - jpeg["probs"])
            per_syntax[syntax] = {
                "max_abs_prob_diff": float(diff.max()),
                "mean_abs_prob_diff": float(diff.mean()),
                "top1_agreement": float(np.mean(got["top_class"] == jpeg["top_class"])),
                "refer_agreement": float(np.mean(got["refer"] == jpeg["refer"])),
                "max_pixel_diff": pix_diff,
            }
    meta_effect = np.abs(bare["probs"] - jpeg["probs"])
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {
        "command": f"PYTHONPATH=src:tests python benchmarks/dicom_parity.py --n {args.n}",
        "model_version": predictor.version,
        "precision": predictor.precision,
        "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?"
        ),
        "python": platform.python_version(),
        "images": len(images),
        "baseline": "the same HAM10000 test JPEGs, age/sex/site given directly (age in whole years)",
        "per_transfer_syntax": per_syntax,
        "metadata_effect": {
            "note": "JPEG with metadata vs without: what the tags must carry to match",
            "mean_abs_prob_diff": float(meta_effect.mean()),
            "top1_changed": float(np.mean(bare["top_class"] != jpeg["top_class"])),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
