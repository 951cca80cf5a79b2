"""The public Python API: `dermlens.load()` opens a model bundle for images and folders."""

from __future__ import annotations

from pathlib import Path

from dermlens.errors import BatchInputError
from dermlens.infer.predictor import Predictor
from dermlens.predict.folder import BatchSummary, Scored, collect_inputs, run_batch


class Lens(Predictor):
    """A Predictor that also scores folders: `.predict()` one image, `.predict_folder()` many."""

    last_failures: list = []  # the inputs the last predict_folder() could not score, with the reason

    def predict_folder(
        self, folder: str | Path, out_csv: str | Path | None = None, batch_size: int = 32
    ) -> list[Scored]:
        """Every image under `folder` (recursive), in path order; writes the predictions CSV when asked."""
        items, failures = collect_inputs([Path(folder)])
        if not items:
            raise BatchInputError(failures[0].reason if failures else f"{folder}: no images")
        scored: list[Scored] = []
        summary: BatchSummary = run_batch(
            self,
            items,
            out_csv=None if out_csv is None else Path(out_csv),
            batch_size=batch_size,
            on_rows=scored.extend,
        )
        self.last_failures = failures + summary.failures
        return scored


def load(bundle: str | Path | None = None, precision: str | None = None, threads: int | None = None) -> Lens:
    """Open a model bundle (None: the packaged release) for prediction."""
    return Lens.load(bundle, precision, threads)
