"""Batch prediction over files, folders and manifest CSVs: decode in threads, score with onnxruntime, and
write result rows as each batch finishes (so an unreadable file or Ctrl-C never loses finished work)."""

from __future__ import annotations

import csv
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dermlens.data.taxonomy import HAM_CLASSES, ISIC2018_COLUMNS
from dermlens.errors import BatchInputError  # noqa: F401 (re-exported)
from dermlens.infer.prediction import Prediction
from dermlens.infer.predictor import Predictor
from dermlens.infer.session import cpu_count
from dermlens.preprocess import ImageDecodeError, find_image, image_suffixes, load_rgb

IMAGE_EXTENSIONS: frozenset[str] = frozenset(image_suffixes())
# Column names tried (case-insensitive) when reading a manifest or metadata CSV; the first present wins.
IMAGE_COLUMNS = ("image_path", "path", "file", "filename", "image", "image_id", "isic_id", "id")
AGE_COLUMNS = ("age", "age_approx", "age_approximate")
SEX_COLUMNS = ("sex", "gender")
SITE_COLUMNS = ("site", "anatom_site_general", "localization", "location")


@dataclass
class Item:
    """One image to score."""

    path: Path
    image_id: str
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class Scored:
    """An input with its prediction."""

    item: Item
    prediction: Prediction


@dataclass
class Failure:
    """An input that could not be scored, with the reason."""

    path: str
    reason: str


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


# ---- inputs ---------------------------------------------------------------------------------------------


def _pick(columns: Iterable[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _clean(value: Any) -> Any:
    """NaN / empty -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return None if isinstance(value, str) and not value.strip() else value


def _row_meta(row: dict[str, Any], cols: dict[str, str | None]) -> dict[str, Any] | None:
    meta = {k: _clean(row.get(c)) if c else None for k, c in cols.items()}
    return meta if any(v is not None for v in meta.values()) else None


def _meta_columns(columns: Iterable[str]) -> dict[str, str | None]:
    columns = list(columns)
    return {
        "age": _pick(columns, AGE_COLUMNS),
        "sex": _pick(columns, SEX_COLUMNS),
        "site": _pick(columns, SITE_COLUMNS),
    }


def _resolve_image(value: str, base: Path) -> Path:
    """A manifest cell (absolute or relative path, or an id without extension) -> an image path."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, p]
    if not p.suffix:
        candidates += [f for f in (find_image(folder, p.name) for folder in (base, base / "images")) if f]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_manifest_csv(path: Path) -> list[Item]:
    """Images listed in a CSV (first image-like column), with age/sex/site columns as metadata."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BatchInputError(f"{path}: not a readable CSV ({e})") from e
    col = _pick(df.columns, IMAGE_COLUMNS)
    if col is None:
        raise BatchInputError(f"{path}: no image column (tried {', '.join(IMAGE_COLUMNS)})")
    mcols = _meta_columns(df.columns)
    items = []
    for row in df.to_dict("records"):
        value = str(row[col]).strip()
        if value:
            img = _resolve_image(value, path.parent)
            items.append(Item(img, img.stem, _row_meta(row, mcols)))
    return items


def read_metadata_csv(path: Path) -> dict[str, dict[str, Any]]:
    """Per-image metadata keyed by image id (file name without extension) from a CSV."""
    items = read_manifest_csv(path)
    return {it.image_id: it.meta for it in items if it.meta}


def apply_dicom_meta(items: list[Item]) -> int:
    """Fill each DICOM item's missing age/sex/site from its tags (given values win); returns the count.

    Reads headers only; a file whose header is unreadable is left alone (decoding reports it).
    """
    from dermlens.dicom import is_dicom_file, merge_meta, read_meta

    n = 0
    for it in items:
        if is_dicom_file(it.path):
            try:
                it.meta = merge_meta(it.meta, read_meta(it.path))
                n += 1
            except ImageDecodeError:
                continue
    return n


def collect_inputs(inputs: list[Path]) -> tuple[list[Item], list[Failure]]:
    """Expand files, folders (recursive, image extensions) and manifest CSVs into items, in order."""
    items: list[Item] = []
    failures: list[Failure] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not files:
                failures.append(
                    Failure(
                        str(p), "folder holds no image files (" + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
                    )
                )
            items += [Item(f, f.stem) for f in files]
        elif p.suffix.lower() == ".csv" and p.is_file():
            items += read_manifest_csv(p)
        elif p.exists():
            items.append(Item(p, p.stem))
        else:
            failures.append(Failure(str(p), "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for it in items:
        key = it.path.absolute()
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return unique, failures


# ---- outputs --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


class RowWriter:
    """A CSV file written one row at a time and flushed after each batch."""

    def __init__(self, path: Path, header: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: TextIO = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.fh)
        self.writer.writerow(header)

    def write(self, rows: list[list[str]]) -> None:
        self.writer.writerows(rows)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


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


def isic_row(scored: Scored) -> list[str]:
    """One ISIC 2018 Task 3 row: the image id and the seven probabilities in ISIC column order."""
    return [scored.item.image_id, *(_fmt(scored.prediction.fine[c]) for c in HAM_CLASSES)]


def isic2018_header() -> list[str]:
    """ISIC 2018 Task 3 submission columns."""
    return ["image", *(ISIC2018_COLUMNS[c] for c in HAM_CLASSES)]


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
    cam_dir: Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    tta: bool | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_rows: Callable[[list[Scored]], None] | None = None,
) -> BatchSummary:
    """Score every item; write rows after each batch; collect failures; stop cleanly on KeyboardInterrupt."""
    import time

    if isic_csv is not None and tuple(predictor.classes) != HAM_CLASSES:
        raise BatchInputError(
            f"--isic-csv writes ISIC 2018 columns, but the model's classes are {predictor.classes}"
        )
    start = time.perf_counter()
    summary = BatchSummary(total=len(items))
    out_w = RowWriter(out_csv, prediction_header(predictor)) if out_csv else None
    isic_w = RowWriter(isic_csv, isic2018_header()) if isic_csv else None
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
            isic_w.write([isic_row(r) for r in rows])
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
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        for w in writers:
            w.close()
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
