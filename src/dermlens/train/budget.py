"""Wall-clock training budget: drives a time-based cosine schedule and stops at an epoch boundary in time."""

from __future__ import annotations

import time

import lightning as L


class TimeBudget(L.Callback):
    """Tracks training time (survives resume via checkpoint state) and stops before the budget runs out."""

    def __init__(self, minutes: float) -> None:
        self.budget = float(minutes) * 60.0
        self.offset = 0.0
        self.start: float | None = None
        self.epoch_start: float | None = None
        self.longest_epoch = 0.0

    def elapsed(self) -> float:
        return self.offset + (time.time() - self.start if self.start is not None else 0.0)

    def progress(self) -> float:
        """Fraction of the budget used, 0..1."""
        return min(1.0, self.elapsed() / self.budget)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.epoch_start is None:
            return
        self.longest_epoch = max(self.longest_epoch, time.time() - self.epoch_start)
        if self.elapsed() + 0.9 * self.longest_epoch > self.budget:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed(), "longest_epoch": self.longest_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.offset = float(state.get("elapsed", 0.0))
        self.longest_epoch = float(state.get("longest_epoch", 0.0))
