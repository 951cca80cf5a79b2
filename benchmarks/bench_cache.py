"""Images/s: reading from the decoded-image cache vs decoding+resizing the JPEGs, in one run, one process.

Usage: .venv/bin/python benchmarks/bench_cache.py [--dir work/ham10000] [-n 2000] [--seed 0]
Needs a prepared DIR (`dermlens data prepare`). Both paths read the same N random manifest rows, in the
same shuffled order a training epoch would use, and produce the same uint8 HxWx3 arrays. The cache is
read twice: the first pass may hit the disk, the second shows the page-cached rate later epochs get.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dermlens.data.cache import open_cache
from dermlens.data.manifest import read_manifest
from dermlens.preprocess import Preprocessing, load_rgb


def bench(out_dir: str, n: int, seed: int) -> dict[str, float]:
    """Time N random reads from the cache and N load_rgb+resize decodes; return images/s and the ratio."""
    prep = Preprocessing.default()
    df = read_manifest(out_dir)
    cache = open_cache(out_dir, prep)
    idx = np.random.default_rng(seed).choice(len(df), size=min(n, len(df)), replace=False)
    paths = df["image_path"].to_numpy()[idx]

    def read_cache() -> tuple[float, int]:
        t0, checksum = time.perf_counter(), 0
        for i in idx:
            img = np.array(cache[i])  # copy the whole image out of the memmap, as a data loader does
            checksum += int(img[75, 100].sum())
        return time.perf_counter() - t0, checksum

    t_first, checksum_cache = read_cache()  # cold if the file is not in the OS page cache yet
    t_cache, _ = read_cache()  # warm: what every later epoch sees

    t0 = time.perf_counter()
    checksum_jpeg = 0
    for p in paths:
        img = prep.resize(load_rgb(p))
        checksum_jpeg += int(img[75, 100].sum())
    t_jpeg = time.perf_counter() - t0

    assert checksum_cache == checksum_jpeg, "cache and decoded images differ"
    return {
        "n": float(len(idx)),
        "cache_first_img_s": len(idx) / t_first,
        "cache_img_s": len(idx) / t_cache,
        "jpeg_img_s": len(idx) / t_jpeg,
        "ratio": t_jpeg / t_cache,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="work/ham10000", help="prepared dataset folder")
    ap.add_argument("-n", type=int, default=2000, help="images to read on each path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = bench(args.dir, args.n, args.seed)
    print(f"images: {int(r['n'])} random rows of {args.dir}")
    print(f"cache, first pass         : {r['cache_first_img_s']:10.0f} images/s (cold if not in page cache)")
    print(f"cache, second pass        : {r['cache_img_s']:10.0f} images/s")
    print(f"JPEG load_rgb + resize    : {r['jpeg_img_s']:10.0f} images/s")
    print(f"cache speed-up (2nd pass) : {r['ratio']:10.1f}x")


if __name__ == "__main__":
    main()
