"""Training clock (survives resume) and wall-clock budget driving a time-based cosine schedule."""

from __future__ import annotations

import time

import lightning as L


class TrainClock(L.Callback):
    """Training time summed over sessions: its state is saved in every checkpoint."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.start: float | None = None
        self.epoch_start: float | None = None
        self.last_epoch = 0.0  # the next epoch is predicted from the last one (a slow first epoch on a busy
        self.validated = False  # machine must not cut the run short)

    def elapsed(self) -> float:
        return self.offset + (time.time() - self.start if self.start is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.time()
        self.validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.epoch_start is not None:
            self.validated = True
            self.epoch_end(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_start is not None and not self.validated:  # runs without validation
            self.epoch_end(trainer)

    def epoch_end(self, trainer: L.Trainer) -> None:
        """An epoch (with its validation, if any) has ended."""
        self.last_epoch = time.time() - (self.epoch_start or time.time())

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed(), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.offset = float(state.get("elapsed", 0.0))
        self.last_epoch = float(state.get("last_epoch", state.get("longest_epoch", 0.0)))  # older checkpoints


class TimeBudget(TrainClock):
    """A TrainClock that stops at the last epoch boundary that fits in the budget."""

    def __init__(self, minutes: float) -> None:
        super().__init__()
        self.budget = float(minutes) * 60.0
        self.stopped_early = False

    def progress(self) -> float:
        """Fraction of the budget used, 0..1."""
        return min(1.0, self.elapsed() / self.budget)

    def epoch_end(self, trainer: L.Trainer) -> None:
        super().epoch_end(trainer)
        if self.elapsed() + 0.9 * self.last_epoch > self.budget:
            trainer.should_stop = True
            self.stopped_early = trainer.current_epoch + 1 < trainer.max_epochs
