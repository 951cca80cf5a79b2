"""Decoded-image cache: every manifest image resized once into DIR/cache/images_{H}x{W}.npy (uint8 NHWC).

Built with `Preprocessing.resize(load_rgb(path))` by a process pool; written under a temporary name and
renamed, so a killed build never leaves a half cache. A JSON sidecar stores the manifest hash and the
preprocessing, and the cache is rebuilt when either changes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens.data.manifest import DataError, data_config, manifest_hash, read_manifest
from dermlens.preprocess import ImageDecodeError, Preprocessing, load_rgb


def cache_path(out_dir: str | Path, prep: Preprocessing) -> Path:
    """DIR/cache/images_{H}x{W}.npy for this preprocessing."""
    return Path(out_dir) / "cache" / prep.cache_name


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _fingerprint(df: pd.DataFrame, prep: Preprocessing) -> dict:
    return {"manifest_hash": manifest_hash(df), "n": len(df), "preprocessing": prep.to_dict()}


def cache_is_current(out_dir: str | Path, df: pd.DataFrame, prep: Preprocessing) -> bool:
    """True when the cache exists and was built from this manifest's images with this preprocessing."""
    path = cache_path(out_dir, prep)
    meta = _sidecar(path)
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        stored = json.loads(meta.read_text())
        stored["preprocessing"] = Preprocessing.from_dict(stored["preprocessing"]).to_dict()
        return stored == _fingerprint(df, prep)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering range(n) in steps of `size`."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def pool_map(
    fn: Callable, tasks: Sequence[tuple], workers: int, sizes: Sequence[int], description: str, progress: bool
) -> list:
    """Run fn(*task) for each task on `workers` spawned processes (inline if 1) with a rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    results: list = [None] * len(tasks)
    with Progress(*columns, disable=not progress, transient=False) as bar:
        job = bar.add_task(description, total=sum(sizes))
        if workers <= 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                results[i] = fn(*task)
                bar.advance(job, sizes[i])
            return results
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(fn, *task): i for i, task in enumerate(tasks)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                bar.advance(job, sizes[i])
    return results


def _fill(npy_path: str, start: int, paths: list[str], prep_dict: dict) -> None:
    """Worker: decode+resize `paths` into rows start.. of the open .npy file."""
    prep = Preprocessing.from_dict(prep_dict)
    out = np.load(npy_path, mmap_mode="r+")
    for i, path in enumerate(paths):
        out[start + i] = prep.resize(load_rgb(path))
    out.flush()
    del out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_orphans(path: Path) -> None:
    """Delete temporaries left by killed builds (their process is gone)."""
    for tmp in path.parent.glob(f".{path.stem}.*.tmp.npy"):
        pid = tmp.name.split(".")[-3]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def build_cache(
    df: pd.DataFrame,
    out_dir: str | Path,
    prep: Preprocessing | None = None,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Decode the manifest's images into the cache (kept if current, unless `force`); return its path."""
    prep = prep or Preprocessing.default()
    cfg = data_config()["cache"]
    workers = int(workers or cfg["workers"])
    path = cache_path(out_dir, prep)
    if not force and cache_is_current(out_dir, df, prep):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(df), prep.height, prep.width, 3)
    )
    del arr
    paths = df["image_path"].astype(str).tolist()
    ranges = list(chunks(len(paths), int(cfg["chunk"])))
    tasks = [(str(tmp), a, paths[a:b], prep.to_dict()) for a, b in ranges]
    try:
        pool_map(_fill, tasks, workers, [b - a for a, b in ranges], "caching images", progress)
        _sidecar(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except ImageDecodeError as e:
        raise DataError(f"cannot build the image cache: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar(path).write_text(json.dumps(_fingerprint(df, prep), indent=2) + "\n")
    return path


def open_cache(out_dir: str | Path, prep: Preprocessing | None = None) -> np.ndarray:
    """The cache for DIR's manifest as a read-only uint8 NxHxWx3 memmap in manifest row order."""
    prep = prep or Preprocessing.default()
    df = read_manifest(out_dir)
    path = cache_path(out_dir, prep)
    if not cache_is_current(out_dir, df, prep):
        raise DataError(
            f"no current image cache at {path} for {Path(out_dir) / 'manifest.csv'}: "
            f"run `dermlens data prepare` (or dermlens.data.cache.build_cache)"
        )
    return np.load(path, mmap_mode="r")
