"""The release build's first and last stages: the prepared data it trains on (prepared, cached and the
external hold-out materialised, each skipped when already there), and shipping the chosen bundle (copied,
sealed, its test splits scored once, the figures written beside it)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens.settings import data_root

Log = Callable[[str], None]


def prepare_sources(sources: list[dict[str, Any]], log: Log) -> list[str]:
    """`dermlens data prepare` + the image cache for each source not yet prepared; returns their folders."""
    from dermlens.data.prepare import PrepareOptions, prepare

    done = []
    for s in sources:
        out = Path(s["out"])
        if (out / "manifest.csv").is_file():
            log(f"data {s['dataset']}: prepared earlier ({out}), skipped")
        else:
            log(f"data {s['dataset']}: preparing {out}")
            root = Path(s.get("root") or data_root() / s["dataset"])
            prepare(PrepareOptions(dataset=s["dataset"], root=root, out=out, method=s.get("split", "auto")))
        if s.get("cache"):
            build_model_cache(out, s["cache"], log)
        done.append(str(out))
    return done


def build_model_cache(folder: Path, size: dict[str, Any], log: Log) -> None:
    """The decoded-image cache at the model's input definition (height, width, colour constancy)."""
    from dermlens.data.cache import build_cache
    from dermlens.data.manifest import read_manifest
    from dermlens.preprocess import Preprocessing

    prep = Preprocessing.from_dict({**Preprocessing.default().to_dict(), **size})
    if (folder / "cache" / prep.cache_name).is_file():
        log(f"cache {folder / 'cache' / prep.cache_name}: built earlier, skipped")
        return
    log(f"cache {folder}: {prep.height}x{prep.width}, {prep.color_constancy}")
    build_cache(read_manifest(folder), folder, prep)


def holdout(source: str | Path, out: str | Path, fraction: float, seed: int, log: Log) -> str:
    """The external hold-out that training keeps aside, as its own prepared folder (skipped when there)."""
    from dermlens.data.splits import materialise_holdout

    if (Path(out) / "manifest.csv").is_file():
        log(f"hold-out {out}: materialised earlier, skipped")
    else:
        log(f"hold-out {out}: {materialise_holdout(source, out, fraction, seed)} rows of {source}")
    return str(out)


def ship(bundle: Path, to: Path, log: Log) -> str:
    """Copy the chosen bundle to `to` (the packaged model's folder), re-sealed; returns the manifest."""
    from dermlens.bundle import open_bundle, seal

    open_bundle(bundle)  # refuse to ship a bundle that fails its own integrity check
    if to.exists():
        shutil.rmtree(to)
    shutil.copytree(bundle, to)
    manifest = seal(to)
    log(f"shipped {bundle} -> {to}")
    return str(manifest)


def evaluate_tests(bundle: Path, tests: list[dict[str, Any]], out: Path, log: Log) -> dict[str, Any]:
    """Score the shipped bundle once on each test split, with and without metadata (the test figures)."""
    from dermlens.evaluate.external import score_isic2017
    from dermlens.evaluate.runner import EvaluateRequest, run_evaluation

    results: dict[str, Any] = {}
    for t in tests:
        for metadata in (True, False):
            name = f"{t['name']}{'' if metadata else '_no_metadata'}"
            where = out / name
            if t.get("kind") == "isic2017":
                scores, _ = score_isic2017(Path(t["manifest"]), where, "test", bundle, 1000, metadata)
                results[name] = scores
            else:
                req = EvaluateRequest(
                    out=where, manifest=Path(t["manifest"]), split="test", model=bundle, metadata=metadata
                )
                results[name] = run_evaluation(req)[0]
            log(f"evaluated {name} -> {where}")
    return results
