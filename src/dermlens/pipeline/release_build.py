"""The release build, the one path that builds what ships (`dermlens release`, `make release`): the
prepared data -> members -> ensemble bundle -> distilled student -> student bundle -> the choice (the
student ships only if its int8 val BA is within `choose.max_drop` of the ensemble's) -> the chosen bundle
copied into the package and its test splits scored once.

Every stage can be interrupted and the same command rerun: training runs resume from last.ckpt and a
finished run (finished.json) is never retrained; the ensemble and export stages leave a marker in
OUT/stages/<stage>.json keyed by their inputs and are skipped while their inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens import config as configuration
from dermlens.pipeline.bundle import build_bundle
from dermlens.pipeline.ensemble_bundle import build_ensemble
from dermlens.pipeline.release_data import evaluate_tests, holdout, prepare_sources, ship
from dermlens.settings import cpu_name
from dermlens.train.config import ConfigError
from dermlens.train.members import train_members
from dermlens.train.runs import config_hash, finished

Log = Callable[[str], None]


def load_build_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """configs/release_build.yaml <- a recipe file; `overrides` (training key=value) go to every run."""
    r = configuration.load("release_build", path, what="release build recipe")
    out = Path(r["out"])
    common = [*(r.get("overrides") or []), *(overrides or [])]
    ens = configuration.load("ensemble", layers=[("release build `ensemble`", r.get("ensemble") or {})])
    ens["out"] = str(out / "ensemble")
    ens["overrides"] = [*common, *(ens.get("overrides") or [])]
    dis = configuration.load("distill", layers=[("release build `distill`", r.get("distill") or {})])
    dis["teacher"] = str(out / "ensemble" / "bundle")
    dis["overrides"] = [
        *common,
        *(dis.get("overrides") or []),
        f"trainer.run_dir={out / 'student'}",
        "trainer.name=student",
    ]
    return {**r, "out": str(out), "ensemble": ens, "distill": dis}


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(out: Path, name: str, key: str, fn: Callable[[], dict[str, Any]], log: Log) -> dict[str, Any]:
    """Run fn unless OUT/stages/<name>.json holds the same input key; store its result there."""
    marker = out / "stages" / f"{name}.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            log(f"stage {name}: finished earlier, skipped ({marker})")
            return saved["result"]
        log(f"stage {name}: its inputs changed since the last build, running it again")
    log(f"stage {name}: running")
    result = fn()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "result": result}, indent=2, default=float) + "\n")
    return result


def bundle_size(bundle: Path) -> dict[str, int]:
    """Bytes of every file in a bundle folder."""
    return {p.name: p.stat().st_size for p in sorted(Path(bundle).iterdir()) if p.is_file()}


def choose(ens: dict[str, Any], student: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """The release rule: the student is the default when its val BA is within max_drop of the ensemble's."""
    e, s = ens["val"]["int8"]["bal_acc"], student["val"]["int8"]["bal_acc"]
    default = "student" if e - s <= max_drop else "ensemble"
    return {
        "default": default,
        "rule": f"student if val BA(ensemble) - val BA(student) <= {max_drop} (int8 bundles)",
        "val_bal_acc_int8": {"ensemble": e, "student": s},
    }


def build_release(recipe: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """members -> ensemble -> distil -> export; returns (and writes OUT/release_build.json) the summary."""
    import os
    import time

    from dermlens.export.checkpoint import find_checkpoint
    from dermlens.export.stage import export_config
    from dermlens.train.distill import distill, student_config

    start = time.time()
    out = Path(recipe["out"])
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_sources(list(recipe.get("data") or []), log)
    if hold := recipe.get("holdout"):
        data.append(holdout(hold["from"], hold["out"], hold["fraction"], hold["seed"], log))
    ens = recipe["ensemble"]
    log("stage members: training (each resumes from last.ckpt; finished members are skipped)")
    members = train_members(ens, log)
    ens_key = _key([[config_hash(m.cfg) for m in members], ens["combine"], ens["features"], ens["stack"]])
    ensemble = run_stage(out, "ensemble", ens_key, lambda: build_ensemble(ens, log=log, members=members), log)

    dis = recipe["distill"]
    log("stage student: training (resumes from last.ckpt; skipped when finished)")
    done = distill(dis, log=log)
    scfg = student_config(dis)
    student_dir = Path(scfg["trainer"]["run_dir"])
    sbundle = out / "student_bundle"
    ecfg = export_config()
    for k, v in (recipe.get("export") or {}).items():
        ecfg[k] = {**ecfg[k], **v} if isinstance(ecfg.get(k), dict) and isinstance(v, dict) else v

    def export_student() -> dict[str, Any]:
        card = build_bundle(find_checkpoint(student_dir), Path(scfg["data"]["dir"]), sbundle, ecfg, log)
        return {"bundle": str(sbundle), "version": card["version"], "val": card["metrics"]["val"]}

    student = run_stage(
        out, "student_export", _key([done["config_hash"], ensemble["version"]]), export_student, log
    )
    if finished(student_dir) is None:
        raise ConfigError(f"student run {student_dir} did not finish")
    summary = {
        "data": data,
        "ensemble": {**ensemble, "size_bytes": bundle_size(Path(ensemble["bundle"]))},
        "student": {**student, "train": done["metrics"], "size_bytes": bundle_size(sbundle)},
        "choice": choose(ensemble, student, float(recipe["choose"]["max_drop"])),
    }
    if shipping := recipe.get("ship"):
        chosen = Path(summary[summary["choice"]["default"]]["bundle"])
        to = Path(shipping["to"])
        summary["shipped"] = {"bundle": str(chosen), "to": str(to), "manifest": ship(chosen, to, log)}
        tests = list(shipping.get("evaluate") or [])
        summary["test"] = evaluate_tests(to, tests, Path(shipping.get("results", out / "test")), log)
    summary.update(
        this_invocation_seconds=round(time.time() - start, 1), cpu=cpu_name(), cpu_count=os.cpu_count()
    )
    (out / "release_build.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    log(
        f"ensemble val BA (int8) {summary['choice']['val_bal_acc_int8']['ensemble']:.4f}, student "
        f"{summary['choice']['val_bal_acc_int8']['student']:.4f}: default = {summary['choice']['default']}"
    )
    return summary
