"""One-at-a-time lever ablations of a training recipe: train each variant, then tabulate its val effect."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlens import config as configuration
from dermlens.settings import cpu_name
from dermlens.train.config import ConfigError, load_config
from dermlens.train.datamodule import source_val_names

Log = Callable[[str], None]


def load_levers(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """configs/levers.yaml <- a recipe file; `overrides` (training key=value) go to every lever."""
    r = configuration.load("levers", path, what="levers recipe")
    r["overrides"] = [*(r.get("overrides") or []), *(overrides or [])]
    names = [str(lever.get("name", "")) for lever in r["levers"]]
    if "base" not in names or len(set(names)) != len(names) or not all(names):
        raise ConfigError("levers recipe: each lever needs a unique name, and one must be `base`")
    return r


def _lever(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    found = {str(lever["name"]): lever for lever in recipe["levers"]}
    if name not in found:
        raise ConfigError(f"no lever named {name!r} (known: {', '.join(found)})")
    return found[name]


def run_dir(recipe: dict[str, Any], name: str) -> Path:
    """Where a lever's run lives: OUT/<name>, or the finished run it names with `run:` (not trained here)."""
    lever = _lever(recipe, name)
    return Path(lever["run"]) if lever.get("run") else Path(recipe["out"]) / name


def _overrides(recipe: dict[str, Any], name: str) -> list[str]:
    own = list(_lever(recipe, name).get("overrides") or [])
    return [
        *recipe["overrides"],
        *own,
        f"trainer.run_dir={run_dir(recipe, name)}",
        f"trainer.name=lever-{name}",
    ]


def check(recipe: dict[str, Any], names: list[str]) -> None:
    """Fail on a bad lever name, override or `versus` before any training."""
    for name in names:
        lever = _lever(recipe, name)
        _lever(recipe, str(lever.get("versus", "base")))
        if not lever.get("run"):
            lever_config(recipe, name)
            distill_config(recipe, name)


def lever_config(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    """The training config of one lever: base recipe <- shared overrides <- the lever's own."""
    return load_config(recipe["base_config"], _overrides(recipe, name))


def distill_config(recipe: dict[str, Any], name: str) -> dict[str, Any] | None:
    """configs/distill.yaml for a lever with a `teacher:` bundle (the student is the lever), else None."""
    teacher = _lever(recipe, name).get("teacher")
    if not teacher:
        return None
    base = {"teacher": str(teacher), "config": recipe["base_config"], "overrides": _overrides(recipe, name)}
    return configuration.load("distill", layers=[(f"lever {name}", base)])


def train_levers(recipe: dict[str, Any], names: list[str], log: Log) -> None:
    """Train the named levers in turn (finished runs are skipped, interrupted ones resume); a lever with a
    `teacher:` trains its student by distillation from that bundle."""
    from dermlens.train.distill import distill
    from dermlens.train.engine import train

    for name in names:
        if _lever(recipe, name).get("run"):
            log(f"lever {name}: the finished run {run_dir(recipe, name)} (not trained here)")
            continue
        log(f"lever {name}: training")
        dcfg = distill_config(recipe, name)
        if dcfg is None:
            train(lever_config(recipe, name))
        else:
            distill(dcfg, log=log)


def _row(name: str, lever: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    one_condition = None if metrics["uses_metadata"] else metrics["bal_acc"]  # image-only: no second one
    return {
        "lever": name,
        "overrides": _changes(lever),
        "versus": str(lever.get("versus", "base")),
        "run": lever.get("run"),
        "val_bal_acc": metrics["bal_acc"],
        "val_bal_acc_no_metadata": metrics.get("no_metadata", {}).get("bal_acc", one_condition),
        "external_bal_acc3": metrics.get("external", {}).get("bal_acc3"),
        "external_mel_auc": metrics.get("external", {}).get("mel_auc"),
        "sources_val_bal_acc_no_metadata": {
            name: m["no_metadata"]["bal_acc"] for name, m in (metrics.get("sources") or {}).items()
        },
        "val_per_class_recall": metrics.get("per_class_recall"),
        "best_epoch": metrics["best_epoch"],
        "train_seconds": metrics["train_seconds"],
        "arch": metrics["arch"],
        "uses_metadata": metrics["uses_metadata"],
        "precision": metrics["precision"],
        "torch_threads": metrics["hardware"].get("torch_threads"),
        "cpu": metrics["hardware"].get("cpu"),
    }


def _changes(lever: dict[str, Any]) -> list[str]:
    """What a lever changes: its overrides, its teacher when it is distilled, its described `changes`."""
    teacher = [f"teacher={lever['teacher']}"] if lever.get("teacher") else []
    return [*(lever.get("overrides") or []), *teacher, *(lever.get("changes") or [])]


def paired_delta(
    base_run: Path,
    run: Path,
    groups: pd.Series,
    seed: int = 0,
    outputs: str = "val_outputs.npz",
    among_present: bool = False,
) -> list[float] | None:
    """95% CI of (lever - base) balanced accuracy on one validation set's saved `outputs` (val_outputs.npz:
    HAM10000 val with metadata; _ext: the hold-out; _<source>_no_metadata: a source's val): both scored on
    the same lesion resamples, so the interval reflects the difference, not each model's own spread. The
    argmax is over all the model's classes, or (`among_present`, as the external and source figures are)
    among the classes the set has. `groups`: lesion group by image id. None if the images differ or either
    run's outputs are not on this machine."""
    from scipy.special import softmax

    if not ((base_run / outputs).is_file() and (run / outputs).is_file()):
        return None

    from dermlens.evaluate.bootstrap import bootstrap
    from dermlens.metrics import EvalData, decision_metrics
    from dermlens.pipeline.source_figures import Figure, restricted

    with np.load(base_run / outputs) as a, np.load(run / outputs) as b:
        if not np.array_equal(a["image_ids"], b["image_ids"]):
            return None
        ids, sets = a["image_ids"], []
        for z in (a, b):
            classes, truth = [str(c) for c in z["classes"]], z["fine_labels"]
            names = [classes[k] for k in sorted(set(truth.tolist()))] if among_present else classes
            fig = Figure(tuple(names))
            p = restricted(softmax(z["fine_logits"].astype(np.float64), 1), tuple(classes), fig)
            sets.append(EvalData(p, np.array([names.index(classes[k]) for k in truth]), fig.classes))
    base, other = sets
    lesions = groups.loc[ids].to_numpy()

    def delta(w: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "d": decision_metrics(other, w)["balanced_accuracy"]
            - decision_metrics(base, w)["balanced_accuracy"]
        }

    r = bootstrap(delta, len(ids), lesions, n_resamples=1000, seed=seed)
    return [float(r.low["d"]), float(r.high["d"])]


def lesion_groups(cfg: dict[str, Any]) -> pd.Series:
    """Lesion group by image id over every validation set of a training config (data.dir, the external
    hold-out, each data.source_val)."""
    from dermlens.data.manifest import read_manifest

    d = cfg["data"]
    dirs = [d["dir"], *([d["external_val"]] if d.get("external_val") else []), *(d.get("source_val") or [])]
    frames = [read_manifest(x)[["image_id", "group_id"]] for x in dirs]
    both = pd.concat(frames).drop_duplicates("image_id")
    return both.set_index("image_id")["group_id"]


def paired_deltas(base_run: Path, run: Path, groups: pd.Series, sources: list[str]) -> dict[str, Any]:
    """The paired CIs of a lever's difference on every validation set its runs saved."""
    out = {
        "val": paired_delta(base_run, run, groups),
        "ext": paired_delta(base_run, run, groups, 0, "val_outputs_ext.npz", among_present=True),
    }
    for name in sources:
        out[name] = paired_delta(base_run, run, groups, 0, f"val_outputs_{name}_no_metadata.npz", True)
    return out


def summarise(recipe: dict[str, Any], earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each finished lever's val figures and its difference from the lever it is compared with (`versus`,
    default `base`). A lever whose run is not on this machine keeps its row from `earlier` (the table written
    before, marked `carried`); levers in neither are listed as not run."""
    before = {str(r["lever"]): r for r in (earlier or {}).get("levers", [])}
    rows, fresh, missing = {}, [], []
    for lever in recipe["levers"]:
        name = str(lever["name"])
        path = run_dir(recipe, name) / "metrics_val.json"
        if path.is_file():
            rows[name] = _row(name, lever, json.loads(path.read_text()))
            fresh.append(name)
        elif name in before:
            rows[name] = {"cpu": (earlier or {}).get("cpu"), **before[name], "carried": True}
        else:
            missing.append(name)
    groups, sources = None, []
    if fresh:  # the manifests are read once, for every lever's lesion resamples
        base_cfg = lever_config(recipe, "base")
        groups = lesion_groups(base_cfg)
        sources = source_val_names(base_cfg)
    for name in fresh:
        r = rows[name]
        ref = rows.get(r["versus"])
        runs = run_dir(recipe, r["versus"]), run_dir(recipe, name)
        cis = paired_deltas(*runs, groups, sources) if ref is not None else {}
        r["delta_val_bal_acc_ci95"] = cis.get("val")
        r["delta_external_bal_acc3_ci95"] = cis.get("ext")
        for key in ("val_bal_acc", "val_bal_acc_no_metadata", "external_bal_acc3"):
            ok = ref is not None and r[key] is not None and ref[key] is not None
            r[f"delta_{key}"] = r[key] - ref[key] if ok else None
        for src, value in r["sources_val_bal_acc_no_metadata"].items():
            theirs = (ref or {}).get("sources_val_bal_acc_no_metadata", {}).get(src)
            r.setdefault("delta_sources_no_metadata", {})[src] = {
                "delta": None if theirs is None else value - theirs,
                "ci95": cis.get(src),
            }
    return {
        "recipe": {k: recipe[k] for k in ("base_config", "overrides")},
        "levers": list(rows.values()),
        "not_run": missing,
        "cpu": cpu_name(),
        "note": "val = HAM10000 lesion-grouped val; external = the ISIC 2017 train hold-out (3-class BA); "
        "sources = each data.source_val set's lesion-grouped val, no metadata (BA over its classes); "
        "rows marked carried come from an earlier table (their runs are not on the machine that wrote this)",
    }
