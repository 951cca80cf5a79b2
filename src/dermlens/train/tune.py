"""Hyper-parameter search: an Optuna study over named config keys, pruned on val balanced accuracy.

The objective is the best value of the trials' `trainer.monitor` (val/bal_acc by default; val/select
averages it with the external validation set's balanced accuracy when data.external_val is set).

The search space is YAML (config key -> distribution). Trials are ordinary training runs (one folder per
parameter set, so an interrupted trial resumes from its last.ckpt and a finished one is never retrained);
the study lives in SQLite, so rerunning the same command continues it. Results: a table (CSV, markdown,
JSON) and Optuna's matplotlib plots.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens import config as configuration
from dermlens.extras import require
from dermlens.settings import cpu_name
from dermlens.train.config import ConfigError, apply_override, load_config
from dermlens.train.runs import finished, train_run

Log = Callable[[str], None]
MONITOR = "val/bal_acc"
DISTRIBUTIONS = ("float", "int", "categorical")


def load_study_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """configs/tune.yaml <- a study file <- overrides; the space is checked against the training config."""
    layers = [("command-line options", overrides or {})]
    cfg = configuration.load("tune", path, layers=layers, what="tune study file")  # a `space` replaces
    check_space(cfg)
    return cfg


def check_space(cfg: dict[str, Any]) -> None:
    """Every space key must be a training config key and every distribution well formed (one-line errors)."""
    space = cfg.get("space") or {}
    if not space:
        raise ConfigError("the tune study has an empty `space`: name at least one config key to search")
    base = load_config(cfg.get("base_config"), list(cfg.get("overrides") or []))
    for key, dist in space.items():
        if not isinstance(dist, dict) or dist.get("type") not in DISTRIBUTIONS:
            raise ConfigError(f"space key {key!r}: give `type:` one of {DISTRIBUTIONS}")
        if dist["type"] == "categorical":
            if not dist.get("choices"):
                raise ConfigError(f"space key {key!r}: categorical needs a non-empty `choices:` list")
            sample = dist["choices"][0]
        else:
            if "low" not in dist or "high" not in dist or float(dist["low"]) >= float(dist["high"]):
                raise ConfigError(f"space key {key!r}: {dist['type']} needs `low:` < `high:`")
            sample = dist["low"]
        apply_override(copy.deepcopy(base), f"{key}={json.dumps(sample)}")  # raises on unknown keys


def monitor_of(cfg: dict[str, Any]) -> str:
    """The metric the study maximizes: the trials' trainer.monitor."""
    base = load_config(cfg.get("base_config"), list(cfg.get("overrides") or []))
    return str(base["trainer"].get("monitor") or MONITOR)


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """Sample one value per space key with Optuna's trial.suggest_*."""
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d["type"] == "float":
            out[key] = trial.suggest_float(
                key, float(d["low"]), float(d["high"]), log=bool(d.get("log", False)), step=d.get("step")
            )
        elif d["type"] == "int":
            out[key] = trial.suggest_int(
                key, int(d["low"]), int(d["high"]), step=int(d.get("step", 1)), log=bool(d.get("log", False))
            )
        else:
            out[key] = trial.suggest_categorical(key, list(d["choices"]))
    return out


def params_key(params: dict[str, Any]) -> str:
    """Stable short hash of a parameter set (its run folder name)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trial_config(study_cfg: dict[str, Any], params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Base config + proxy overrides + the trial's parameters, in its own run folder."""
    over = [*(study_cfg.get("overrides") or []), *(f"{k}={json.dumps(v)}" for k, v in params.items())]
    key = params_key(params)
    over += [f"trainer.run_dir={out / 'trials' / key}", f"trainer.name=trial-{key}"]
    return load_config(study_cfg.get("base_config"), over)


def make_sampler(cfg: dict[str, Any]):
    optuna = require("optuna", "train")

    s = cfg.get("sampler") or {}
    name, seed = str(s.get("type", "tpe")).lower(), s.get("seed")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(s.get("n_startup_trials", 5)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler.type must be tpe or random, not {name!r}")


def make_pruner(cfg: dict[str, Any]):
    optuna = require("optuna", "train")

    p = cfg.get("pruner") or {}
    name = str(p.get("type", "median")).lower()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(p.get("n_startup_trials", 3)), n_warmup_steps=int(p.get("n_warmup_steps", 1))
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner.type must be median, hyperband or none, not {name!r}")


def open_study(cfg: dict[str, Any], out: Path):
    """The study in OUT/study.db (created, or loaded to continue)."""
    optuna = require("optuna", "train")

    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.get("storage") or f"sqlite:///{(out / 'study.db').resolve()}"
    return optuna.create_study(
        study_name=str(cfg["study"]),
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
    )


def requeue_interrupted(study: Any, log: Log) -> int:
    """Trials left RUNNING by a killed process: mark them failed and enqueue their parameters again (the new
    trial finds the same run folder and resumes from its last.ckpt)."""
    TrialState = require("optuna.trial", "train").TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}  # enqueued + sampled so far
        attrs = {k: v for k, v in t.user_attrs.items() if k == "base_recipe"}  # still the base recipe
        study.enqueue_trial(params, user_attrs={**attrs, "resumes_trial": t.number})
        log(f"trial {t.number} was interrupted: queued again with the same parameters (resumes its run)")
        n += 1
    return n


def base_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The base config's own value of every space key (after the proxy overrides)."""
    base = load_config(cfg.get("base_config"), list(cfg.get("overrides") or []))
    out = {}
    for key in cfg["space"]:
        value: Any = base
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def in_space(value: Any, dist: dict[str, Any]) -> bool:
    """Whether a value is one the distribution can give."""
    if dist["type"] == "categorical":
        return value in dist["choices"]
    return isinstance(value, int | float) and float(dist["low"]) <= float(value) <= float(dist["high"])


def enqueue_base(study: Any, cfg: dict[str, Any], log: Log) -> None:
    """A new study's first trial is the base recipe itself, so every other trial is judged against it."""
    if not cfg.get("start_from_base", True) or study.trials:
        return
    params = base_params(cfg)
    outside = [k for k, v in params.items() if not in_space(v, cfg["space"][k])]
    if outside:
        log(f"the base recipe's {', '.join(outside)} lie outside the space: trial 0 is sampled like the rest")
        return
    study.enqueue_trial(params, user_attrs={"base_recipe": True})
    log(f"trial 0 is the base recipe: {json.dumps(params, default=str)}")


def objective_for(cfg: dict[str, Any], out: Path, log: Log) -> Callable[[Any], float]:
    """The Optuna objective: train one configuration, report val balanced accuracy per epoch, prune."""

    def objective(trial: Any) -> float:
        pruning_callback = require("optuna_integration", "train").PyTorchLightningPruningCallback

        params = suggest(trial, cfg["space"])
        tcfg = trial_config(cfg, params, out)
        run_dir = Path(tcfg["trainer"]["run_dir"])
        trial.set_user_attr("run_dir", str(run_dir))
        log(f"trial {trial.number}: {json.dumps(params, default=str)}")
        monitor = str(tcfg["trainer"].get("monitor") or MONITOR)
        done = finished(run_dir, tcfg)
        if done is not None:
            log(f"trial {trial.number}: the same parameters finished in {run_dir}, result reused")
        else:
            cb = pruning_callback(trial, monitor=monitor)
            done = train_run(tcfg, log, callbacks=[cb])
        trial.set_user_attr("val_bal_acc", done["metrics"]["bal_acc"])
        best = (done.get("monitor") or {}).get("best")
        return float(best if best is not None else done["metrics"]["bal_acc"])

    return objective


def run_study(cfg: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """Run (or continue) the study until it holds cfg['n_trials'] finished trials; write the results."""
    optuna = require("optuna", "train")
    TrialState = require("optuna.trial", "train").TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()  # its handler keeps the stderr of the first caller: propagate
    optuna.logging.enable_propagation()
    out = Path(cfg["out"])
    study = open_study(cfg, out)
    requeue_interrupted(study, log)
    enqueue_base(study, cfg, log)
    ended = (TrialState.COMPLETE, TrialState.PRUNED)
    have = len(study.get_trials(deepcopy=False, states=ended))
    todo = max(0, int(cfg["n_trials"]) - have)
    log(f"study {cfg['study']} in {out}: {have} trials finished, {todo} to run")
    if todo:
        study.optimize(
            objective_for(cfg, out, log),
            n_trials=todo,
            timeout=float(cfg["timeout_min"]) * 60 if cfg.get("timeout_min") else None,
            catch=(),
        )
    return write_results(study, cfg, out, log)


def run_figures(run_dir: str | None) -> dict[str, Any]:
    """A finished trial run's other final-pass figures: val BA without metadata, external 3-class BA."""
    path = Path(run_dir) / "metrics_val.json" if run_dir else None
    if path is None or not path.is_file():
        return {"val_bal_acc_no_metadata": None, "external_bal_acc3": None, "train_seconds": None}
    m = json.loads(path.read_text())
    return {
        "val_bal_acc_no_metadata": (m.get("no_metadata") or {}).get("bal_acc"),
        "external_bal_acc3": (m.get("external") or {}).get("bal_acc3"),
        "train_seconds": m.get("train_seconds"),
    }


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, figures of its run, seconds, parameters, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "val_bal_acc": t.user_attrs.get("val_bal_acc"),
                **run_figures(t.user_attrs.get("run_dir") if t.state.name == "COMPLETE" else None),
                "epochs_reported": len(t.intermediate_values),
                "base_recipe": bool(t.user_attrs.get("base_recipe")),
                "seconds": round(secs, 1) if secs is not None else None,
                **{f"param:{k}": v for k, v in t.params.items()},
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table of the trial rows, best first."""
    if not rows:
        return "(no trials)\n"
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "run_dir"]
    key = lambda r: -(r["value"] if isinstance(r["value"], float) else -math.inf)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=key):
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(study: Any, out: Path, log: Log) -> list[str]:
    """Optuna's matplotlib optimization history (+ parameter importances with >= 2 finished trials)."""
    matplotlib = require("matplotlib", "train")

    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "train")
    TrialState = require("optuna.trial", "train").TrialState
    ovm = require("optuna.visualization", "train").matplotlib

    written = []
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        plots += [("param_importances.png", ovm.plot_param_importances)]
    for name, fn in plots:
        try:
            ax = fn(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances with constant values
            log(f"plot {name} skipped: {e}")
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def write_results(study: Any, cfg: dict[str, Any], out: Path, log: Log) -> dict[str, Any]:
    """results.csv, results.md, results.json and the plots in OUT; returns the JSON summary."""
    import pandas as pd

    TrialState = require("optuna.trial", "train").TrialState

    rows = trial_rows(study)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = {
        "study": cfg["study"],
        "storage": str(out / "study.db"),
        "objective": f"best {monitor_of(cfg)}",
        "proxy_overrides": list(cfg.get("overrides") or []),
        "base_config": cfg.get("base_config"),
        "space": cfg["space"],
        "counts": {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState},
        "best": (
            {"trial": best.number, "value": best.value, "params": best.params, **best.user_attrs}
            if best
            else None
        ),
        "trials": rows,
        "cpu": cpu_name(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    summary["plots"] = write_plots(study, out, log)
    best_line = (
        f"best: trial {best.number}, {summary['objective']} {best.value:.4f}, {json.dumps(best.params)}\n"
        if best
        else "no finished trial yet\n"
    )
    confirm = (
        "confirm the winner with a full run (without the proxy overrides):\n\n    dermlens train --config "
        f"{cfg.get('base_config')} " + " ".join(f"{k}={json.dumps(v)}" for k, v in best.params.items()) + "\n"
        if best
        else ""
    )
    (out / "results.md").write_text(
        f"# Study {cfg['study']}\n\n{best_line}\n{confirm}\n{markdown_table(rows)}"
    )
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
