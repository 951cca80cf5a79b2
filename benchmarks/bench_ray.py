"""`dermlens predict --ray` (Ray Data on a local instance) against the single-process `predict`, on the
2,750 ISIC 2017 images. Both runs write CSVs; the benchmark checks they are identical, then reports wall
time, throughput and the ratio (Ray / single process), with Ray's start-up time separately. Usage:

    PYTHONPATH=src python benchmarks/bench_ray.py [--limit N] [--out docs/results/bench_ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as `dermlens predict` does before numpy loads


def main() -> None:
    import ray

    from dermlens.infer.predictor import Predictor
    from dermlens.infer.session import cpu_count
    from dermlens.predict.folder import collect_inputs, run_batch
    from dermlens.predict.ray import connect, run_ray
    from dermlens.settings import cpu_name, data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all 2,750)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/bench_ray.json"))
    args = ap.parse_args()

    items, _ = collect_inputs([data_root() / "isic2017" / "images"])
    items = items[: args.limit] if args.limit else items
    predictor = Predictor.load()
    print(
        f"model {predictor.card.name} {predictor.version} ({predictor.precision}), {len(items)} images, "
        f"{cpu_count()} CPUs used, {cpu_name()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        single = run_batch(predictor, items, out_csv=tmp / "single.csv")
        single_s = time.perf_counter() - t
        print(
            f"single process: {single.done} images in {single_s:.1f} s ({single.done / single_s:.1f} img/s)"
        )  # noqa: E501

        t = time.perf_counter()
        connect("local")  # started here so its start-up is timed apart from the run
        startup_s = time.perf_counter() - t
        print(f"local Ray instance started in {startup_s:.1f} s")
        t = time.perf_counter()
        on_ray = run_ray(predictor, items, "local", out_csv=tmp / "ray.csv")
        ray_s = time.perf_counter() - t
        ray.shutdown()
        identical = (tmp / "single.csv").read_bytes() == (tmp / "ray.csv").read_bytes()
    result = {
        "command": "PYTHONPATH=src python benchmarks/bench_ray.py"
        + (f" --limit {args.limit}" if args.limit else ""),
        "model": f"{predictor.card.name} {predictor.version}",
        "precision": predictor.precision,
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "images": len(items),
        "single_process": {"seconds": round(single_s, 2), "img_per_s": round(single.done / single_s, 1)},
        "ray_local": {
            "startup_seconds": round(startup_s, 2),
            "run_seconds": round(ray_s, 2),
            "img_per_s_run": round(on_ray.done / ray_s, 1),
            "img_per_s_with_startup": round(on_ray.done / (ray_s + startup_s), 1),
        },
        "ratio_ray_over_single": round((on_ray.done / ray_s) / (single.done / single_s), 3),
        "ratio_with_startup": round((on_ray.done / (ray_s + startup_s)) / (single.done / single_s), 3),
        "csv_identical": identical,
        "machine_note": "2 CPUs shared with other jobs (load varies); rerun on a quiet or larger machine",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
