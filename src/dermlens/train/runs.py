"""Run bookkeeping: a training run's identity (config hash), whether it finished with a given config, its
val summary, and training one run that is skipped when finished and resumed from last.ckpt otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens.errors import EnsembleError

Log = Callable[[str], None]
SUMMARY_KEYS = ("bal_acc", "macro_auc", "accuracy", "n", "best_epoch", "train_seconds", "arch")


def val_metrics(run_dir: Path) -> dict[str, Any]:
    """The summary fields of a run's metrics_val.json."""
    metrics = json.loads((Path(run_dir) / "metrics_val.json").read_text())
    return {k: metrics.get(k) for k in SUMMARY_KEYS}


def config_hash(cfg: dict[str, Any]) -> str:
    """The engine's identity of a resolved config (what its finished.json records)."""
    from dermlens.train.engine import config_hash as engine_hash

    return engine_hash(cfg)


def monitored_best(run_dir: Path, monitor: str) -> float | None:
    """Best (max) logged value of the monitored metric over all sessions' CSV logs of a run."""
    import pandas as pd

    best = None
    for f in sorted((Path(run_dir) / "logs" / "csv").glob("metrics*.csv")):
        df = pd.read_csv(f)
        if monitor in df.columns and df[monitor].notna().any():
            v = float(df[monitor].max())
            best = v if best is None else max(best, v)
    return best


def finished(run_dir: Path, cfg: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A finished run's summary (the engine's finished.json + metrics_val.json), None while unfinished or
    (when cfg is given) when it finished with another config: the engine then resumes it from last.ckpt."""
    from dermlens.train.engine import FINISHED

    path = Path(run_dir) / FINISHED
    if not path.is_file() or not (Path(run_dir) / "metrics_val.json").is_file():
        return None
    record = json.loads(path.read_text())
    if cfg is not None and record.get("config") != config_hash(cfg):
        return None
    monitor = str((cfg or {}).get("trainer", {}).get("monitor") or "val/bal_acc")
    return {
        "config_hash": record.get("config"),
        "reason": record.get("reason"),
        "metrics": val_metrics(run_dir),
        "monitor": {"name": monitor, "best": monitored_best(run_dir, monitor)},
    }


def train_run(cfg: dict[str, Any], log: Log = print, **engine_kwargs: Any) -> dict[str, Any]:
    """Train one run with the engine: skipped when it finished with this config, else resumed from
    last.ckpt when there is one. Returns finished()'s summary."""
    from dermlens.train.engine import LAST, run_dir_for, train

    run_dir = run_dir_for(cfg)
    done = finished(run_dir, cfg)
    if done is not None:
        log(f"{run_dir}: finished earlier (val balanced accuracy {done['metrics']['bal_acc']:.4f}), skipped")
        return done
    last = run_dir / "checkpoints" / LAST
    log(f"{run_dir}: {'resuming from ' + str(last) if last.is_file() else 'training'}")
    if train(cfg, **engine_kwargs) is None:  # not rank 0 under DDP
        return {}
    done = finished(run_dir, cfg)
    if done is None:
        raise EnsembleError(f"{run_dir} did not record a finished run")
    log(f"{run_dir}: done, val balanced accuracy {done['metrics']['bal_acc']:.4f}")
    return done
