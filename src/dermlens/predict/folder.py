"""Batch prediction over files, folders and manifest CSVs: decode in threads, score with onnxruntime, and
write result rows as each batch finishes (so an unreadable file or Ctrl-C never loses finished work).

A CSV is written as `NAME.partial` and renamed to NAME only when the run completes; an interrupted run
leaves `NAME.partial`. Text cells that a spreadsheet would run as a formula are prefixed with `'`.
The inputs (files, folders, manifest CSVs) are collected by `dermlens.predict.inputs`.
"""

from __future__ import annotations

import csv
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dermlens.data.taxonomy import HAM_CLASSES, ISIC2018_COLUMNS, ISIC2019_COLUMNS
from dermlens.errors import BatchInputError  # noqa: F401 (re-exported)
from dermlens.infer.prediction import Prediction
from dermlens.infer.predictor import Predictor
from dermlens.infer.session import cpu_count
from dermlens.predict.inputs import (  # noqa: F401 (re-exported)
    Failure,
    Item,
    apply_dicom_meta,
    collect_inputs,
    read_manifest_csv,
    read_metadata_csv,
)
from dermlens.preprocess import ImageDecodeError, load_rgb


@dataclass(frozen=True)
class Scored:
    """An input with its prediction."""

    item: Item
    prediction: Prediction


@dataclass
class BatchSummary:
    """What a batch run did."""

    total: int
    done: int = 0
    failures: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    referred: int = 0
    ood: int = 0


# ---- outputs --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet treat a cell as a formula


def safe_cell(value: str) -> str:
    """A text cell a spreadsheet would run as a formula (`=HYPERLINK(...)`), prefixed with `'`; numbers
    (`-0.5`) and other text unchanged."""
    if not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


class RowWriter:
    """A CSV written one row at a time to `PATH.partial`, flushed after each batch, and renamed to PATH by
    `close(complete=True)`; an incomplete run leaves `PATH.partial` (and no stale PATH).

    File names that are not valid UTF-8 are written back as their original bytes (surrogateescape)."""

    def __init__(self, path: Path, header: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.partial = path, partial_path(path)
        path.unlink(missing_ok=True)
        self.fh: TextIO = open(  # noqa: SIM115 - closed in close()
            self.partial, "w", newline="", encoding="utf-8", errors="surrogateescape"
        )
        self.writer = csv.writer(self.fh)
        self.writer.writerow(header)

    def write(self, rows: list[list[str]]) -> None:
        self.writer.writerows([[safe_cell(c) if isinstance(c, str) else c for c in r] for r in rows])
        self.fh.flush()

    def close(self, complete: bool = True) -> None:
        """Close the file; rename it to its final name if the run is complete."""
        self.fh.close()
        if complete:
            os.replace(self.partial, self.path)


def partial_path(path: Path) -> Path:
    """Where a CSV is written until its run completes: PATH.partial."""
    return path.with_name(path.name + ".partial")


def prediction_header(predictor: Predictor) -> list[str]:
    """Columns of the dermlens predictions CSV: the input, then every stored field of a Prediction."""
    return ["image_id", "path", *Prediction.columns(predictor.classes, predictor.coarse_classes)]


def csv_row(scored: Scored) -> list[str]:
    """One CSV row of a scored image (numbers to 6 significant digits, booleans lower-case)."""
    cells = [scored.item.image_id, str(scored.item.path)]
    for value in scored.prediction.row().values():
        if isinstance(value, bool):
            cells.append(str(value).lower())
        elif isinstance(value, float):
            cells.append(_fmt(value))
        else:
            cells.append("" if value is None else str(value))
    return cells


ISIC_FORMATS = ("2018", "2019")


def isic_row(scored: Scored, style: str = "2018") -> list[str]:
    """One ISIC submission row (columns of isic_header): 2018 merges scc into AKIEC; 2019 adds SCC and UNK,
    where a referred image gets UNK 0.5 and every class probability halved (UNK tops the row, the
    ranking among the classes is kept), any other image UNK 0."""
    fine = dict(scored.prediction.fine)
    if style == "2018":
        fine["akiec"] = fine.get("akiec", 0.0) + fine.pop("scc", 0.0)
        return [scored.item.image_id, *(_fmt(fine[c]) for c in HAM_CLASSES)]
    scale, unk = (0.5, 0.5) if scored.prediction.refer else (1.0, 0.0)
    cells = (_fmt(scale * fine.get(c, 0.0)) for c in ISIC2019_COLUMNS)
    return [scored.item.image_id, *cells, _fmt(unk)]


def isic_header(style: str = "2018") -> list[str]:
    """ISIC 2018 Task 3 (image,MEL,...,VASC) or ISIC 2019 (image,MEL,...,SCC,UNK) submission columns."""
    if style not in ISIC_FORMATS:
        raise BatchInputError(f"the ISIC CSV format is 2018 or 2019, not {style!r}")
    if style == "2018":
        return ["image", *(ISIC2018_COLUMNS[c] for c in HAM_CLASSES)]
    return ["image", *ISIC2019_COLUMNS.values(), "UNK"]


# ---- running ----------------------------------------------------------------------------------------------


def _decode(
    item: Item, prep_resize: Callable[[np.ndarray], np.ndarray], keep: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    rgb = load_rgb(item.path)
    return prep_resize(rgb), (rgb if keep else None)


def _decoded(
    items: list[Item], predictor: Predictor, workers: int, keep: bool, window: int
) -> Iterator[tuple[Item, Any]]:
    """(item, (resized, original) or Exception) in input order, decoding up to `window` images ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dermlens-decode") as pool:
        queue: deque[tuple[Item, Future]] = deque()
        it = iter(items)
        try:
            for item in it:
                queue.append((item, pool.submit(_decode, item, predictor.prep.geometry.resize, keep)))
                if len(queue) >= window:
                    break
            while queue:
                item, fut = queue.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    queue.append((nxt, pool.submit(_decode, nxt, predictor.prep.geometry.resize, keep)))
                try:
                    yield item, fut.result()
                except ImageDecodeError as e:
                    yield item, e
                except Exception as e:  # noqa: BLE001 - any decoder crash is one failed file, not a failed run
                    yield item, ImageDecodeError(f"{item.path}: {type(e).__name__}: {e}")
        finally:
            for _, fut in queue:
                fut.cancel()


def run_batch(
    predictor: Predictor,
    items: list[Item],
    out_csv: Path | None = None,
    isic_csv: Path | None = None,
    isic_format: str = "2018",
    cam_dir: Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    tta: bool | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_rows: Callable[[list[Scored]], None] | None = None,
) -> BatchSummary:
    """Score every item; write rows after each batch; collect failures; stop cleanly on KeyboardInterrupt."""
    import time

    start = time.perf_counter()
    summary = BatchSummary(total=len(items))
    out_w = RowWriter(out_csv, prediction_header(predictor)) if out_csv else None
    isic_w = RowWriter(isic_csv, isic_header(isic_format)) if isic_csv else None
    writers = [w for w in (out_w, isic_w) if w is not None]
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, int(workers or cpu_count()))
    pending: list[tuple[Item, np.ndarray, np.ndarray | None]] = []

    def flush() -> None:
        if not pending:
            return
        res = predictor.predict_arrays(
            [p[1] for p in pending], [p[0].meta for p in pending], cam=cam_dir is not None, tta=tta
        )
        rows = scored_items(predictor, [p[0] for p in pending], res)
        if out_w:
            out_w.write([csv_row(r) for r in rows])
        if isic_w:
            isic_w.write([isic_row(r, isic_format) for r in rows])
        if cam_dir is not None:
            for (item, _, orig), heat in zip(pending, res["cam"], strict=True):
                (cam_dir / f"{item.image_id}_cam.png").write_bytes(predictor.cam_overlay(orig, heat))
        summary.done += len(rows)
        summary.referred += int(np.sum(res["refer"]))
        summary.ood += int(np.sum(res["ood"]))
        if on_rows:
            on_rows(rows)
        if on_progress:
            on_progress(len(rows))
        pending.clear()

    finished = False
    try:
        for item, got in _decoded(
            items, predictor, workers, cam_dir is not None, window=max(2 * batch_size, 4 * workers)
        ):
            if isinstance(got, Exception):
                summary.failures.append(Failure(str(item.path), failure_reason(got, item.path)))
                if on_progress:
                    on_progress(1)
                continue
            pending.append((item, got[0], got[1]))
            if len(pending) >= batch_size:
                flush()
        flush()
        finished = True
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        for w in writers:
            w.close(complete=finished)
        summary.seconds = time.perf_counter() - start
    return summary


def failure_reason(err: Exception, path: Path) -> str:
    """The decode error's message without the repeated file name."""
    msg = str(err)
    for prefix in (f"{path}: ", f"{path.name}: "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def scored_items(predictor: Predictor, items: list[Item], res: dict[str, Any]) -> list[Scored]:
    """Each item of a predict_arrays() batch with its Prediction."""
    return [Scored(it, predictor.result_at(res, i, None, {})) for i, it in enumerate(items)]
