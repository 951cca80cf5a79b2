"""How a training run shows progress: a Rich or tqdm bar, or (`none`) one plain line per epoch."""

from __future__ import annotations

import sys
import time

import lightning as L

from dermlens.config import ConfigError

MODES = ("rich", "tqdm", "none")
SHOWN = ("val/bal_acc", "val/auc", "ext/bal_acc3", "val/select")


def check_mode(mode: str) -> str:
    """trainer.progress must be one of MODES (one line when it is not)."""
    if mode not in MODES:
        raise ConfigError(f"trainer.progress must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class EpochLine(L.Callback):
    """After each validation, one line: epoch, the validation figures and the epoch's minutes."""

    def __init__(self) -> None:
        self.start = time.time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = trainer.callback_metrics
        sources = sorted(k for k in m if k.startswith("val_") and k.endswith("/bal_acc"))
        keys = [*SHOWN[:3], *sources, SHOWN[3]]
        shown = ", ".join(f"{k} {float(m[k]):.3f}" for k in keys if k in m)
        minutes = (time.time() - self.start) / 60
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {shown} ({minutes:.1f} min)",
            file=sys.stderr,
            flush=True,
        )


def progress_callbacks(mode: str) -> list[L.Callback]:
    """The callbacks that show a run's progress in the given mode."""
    if check_mode(mode) == "rich":
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar(leave=True)]
    if mode == "tqdm":
        from lightning.pytorch.callbacks import TQDMProgressBar

        return [TQDMProgressBar(refresh_rate=10)]
    return [EpochLine()]
