"""`dermlens predict --ray`: the same predictions as `run_batch`, on Ray Data.

Images are read, decoded and resized in parallel Ray tasks; the ONNX model (shipped to the cluster through
the object store, so workers need dermlens but not the bundle path) runs in a pool of actors, each
calling `Predictor.predict_arrays` like the single-process path. Rows come back in any order and are
written sorted by image id with the single-process CSV writers, so the files are identical.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from dermlens import config as configuration
from dermlens.bundle import TRUST, read_card
from dermlens.errors import RayUnavailable  # noqa: F401 (re-exported)
from dermlens.extras import install_hint
from dermlens.infer.prediction import Prediction
from dermlens.infer.predictor import Predictor
from dermlens.infer.session import PRECISIONS, cpu_count
from dermlens.predict.folder import (
    BatchSummary,
    Failure,
    Item,
    RowWriter,
    Scored,
    csv_row,
    failure_reason,
    isic_header,
    isic_row,
    prediction_header,
)

INSTALL_HINT = install_hint("ray")


@cache
def ray_config() -> dict:
    """Settings from configs/ray.yaml."""
    return configuration.load("ray")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray Data: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None) -> tuple[Any, bool]:
    """ray.init for `address` ('local'/None: a new local instance on this machine's cores); (ray, started)."""
    ray = _import_ray()
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return ray, False
    cfg = ray_config()
    kwargs: dict[str, Any] = {
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}},
    }
    try:
        if address in (None, "", "local"):
            wait = str(int(cfg["start_timeout_s"]))
            # read by the processes ray.init starts
            os.environ.setdefault("RAY_raylet_start_wait_time_s", wait)
            os.environ.setdefault("RAY_agent_register_timeout_ms", wait + "000")
            ray.init(
                num_cpus=int(cfg["local_cpus"] or cpu_count()),
                include_dashboard=False,
                object_store_memory=int(cfg["object_store_mb"]) * 1024 * 1024,
                **kwargs,
            )
        else:
            ray.init(address=address, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises bare Exception on startup timeouts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayUnavailable(f"cannot start or reach Ray at {address or 'local'}: {first}") from None
    return ray, True


def bundle_files(predictor: Predictor) -> dict[str, bytes]:
    """The files a worker needs to load the same model: card, trust statistics, one ONNX graph."""
    names = ["card.json", TRUST, PRECISIONS[predictor.precision]]
    return {n: (predictor.bundle_dir / n).read_bytes() for n in names}


def decode_row(row: dict[str, Any], prep: dict[str, Any]) -> dict[str, Any]:
    """Read + decode + resize one image (a Ray task); a failure travels as `error`, not as an exception."""
    from dermlens.preprocess import ImageDecodeError, Preprocessing, load_rgb

    prep = Preprocessing.from_dict(prep)
    height, width = prep.height, prep.width
    try:
        row["image"], row["error"] = prep.geometry.resize(load_rgb(row["path"])), ""  # CC: predict_arrays
    except ImageDecodeError as e:
        row["image"], row["error"] = (
            np.zeros((height, width, 3), np.uint8),
            failure_reason(e, Path(row["path"])),
        )
    except Exception as e:  # noqa: BLE001 - any decoder crash is one failed file, as in run_batch
        row["image"], row["error"] = np.zeros((height, width, 3), np.uint8), f"{type(e).__name__}: {e}"
    return row


class Scorer:
    """A Ray actor holding one Predictor; scores batches of decoded images like run_batch's flush."""

    def __init__(self, bundle: str | dict[str, bytes], precision: str, tta: bool | None) -> None:
        if isinstance(bundle, str):  # a local instance shares the driver's files
            self.dir = Path(bundle)
        else:  # a cluster: the bundle's bytes by file name
            self.dir = Path(tempfile.mkdtemp(prefix="dermlens-bundle-"))
            for name, data in bundle.items():
                (self.dir / name).write_bytes(data)
        self.predictor = Predictor.load(self.dir, precision, threads=int(ray_config()["actor_cpus"]))
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not e for e in batch["error"]], bool)
        n = len(ok)
        out: dict[str, Any] = {
            "image_id": batch["image_id"],
            "path": batch["path"],
            "error": batch["error"],
            "prediction": np.array([""] * n, object),  # Prediction JSON
        }
        if ok.any():
            idx = np.flatnonzero(ok)
            meta = [
                {"age": batch["age"][i], "sex": batch["sex"][i] or None, "site": batch["site"][i] or None}
                for i in idx
            ]
            res = self.predictor.predict_arrays(list(batch["image"][idx]), meta, tta=self.tta)
            for k, j in enumerate(idx):
                out["prediction"][j] = self.predictor.result_at(res, k, None, {}).model_dump_json()
        return out


def _input_rows(items: list[Item]) -> list[dict[str, Any]]:
    def meta(it: Item, key: str) -> Any:
        v = (it.meta or {}).get(key)
        return v if v is not None else (math.nan if key == "age" else "")

    rows = []
    for it in items:
        age = meta(it, "age")
        try:
            age = float(age)
        except (TypeError, ValueError):
            age = math.nan
        rows.append(
            {
                "image_id": it.image_id,
                "path": str(it.path),
                "age": age,
                "sex": str(meta(it, "sex")),
                "site": str(meta(it, "site")),
            }
        )
    return rows


def run_ray(
    predictor: Predictor,
    items: list[Item],
    address: str | None = None,
    out_csv: Path | None = None,
    isic_csv: Path | None = None,
    batch_size: int = 32,
    tta: bool | None = None,
    isic_format: str = "2018",
) -> BatchSummary:
    """Predict `items` on Ray Data; write the CSVs ordered by image id; keep finished rows on Ctrl-C."""
    read_card(predictor.bundle_dir)  # the bundle the driver loaded is the one shipped
    start = time.perf_counter()
    ray, started = connect(address)
    summary = BatchSummary(total=len(items))
    rows: list[Scored] = []
    try:
        bundle = str(predictor.bundle_dir) if started and address in (None, "", "local") else None
        ds = _dataset(ray, predictor, items, batch_size, tta, bundle)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += _collect(batch, summary)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        _write(predictor, rows, out_csv, isic_csv, isic_format)
        if started:
            ray.shutdown()
        summary.seconds = time.perf_counter() - start
    return summary


def _dataset(
    ray: Any, predictor: Predictor, items: list[Item], batch_size: int, tta: bool | None, bundle: str | None
) -> Any:
    """from_items -> map(decode_row) -> map_batches(Scorer actor pool); bundle: a path workers can read."""
    cfg = ray_config()
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    cpus = float(ray.cluster_resources().get("CPU", 1))
    actors = int(cfg["actors"] or max(1, int(cpus // 2)))
    blocks = max(1, min(len(items), actors * int(cfg["blocks_per_actor"])))
    ds = ray.data.from_items(_input_rows(items), override_num_blocks=blocks)
    ds = ds.map(decode_row, fn_kwargs={"prep": predictor.prep.to_dict()}, num_cpus=float(cfg["decode_cpus"]))
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "bundle": bundle or bundle_files(predictor),
            "precision": predictor.precision,
            "tta": tta,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=float(cfg["actor_cpus"]),
    )


def _collect(batch: dict[str, np.ndarray], summary: BatchSummary) -> list[Scored]:
    """Scored inputs of one output batch; failures go to the summary."""
    rows = []
    for i, err in enumerate(batch["error"]):
        if err:
            summary.failures.append(Failure(str(batch["path"][i]), str(err)))
            continue
        item = Item(Path(str(batch["path"][i])), str(batch["image_id"][i]))
        rows.append(Scored(item, Prediction.model_validate_json(str(batch["prediction"][i]))))
    summary.done += len(rows)
    summary.referred += sum(r.prediction.refer for r in rows)
    summary.ood += sum(r.prediction.ood for r in rows)
    return rows


def _write(
    predictor: Predictor, rows: list[Scored], out_csv: Path | None, isic_csv: Path | None, isic_format: str
) -> None:
    """The single-process writers, rows ordered by image id (then path)."""
    rows = sorted(rows, key=lambda r: (r.item.image_id, str(r.item.path)))
    if out_csv is not None:
        w = RowWriter(out_csv, prediction_header(predictor))
        w.write([csv_row(r) for r in rows])
        w.close()
    if isic_csv is not None:
        w = RowWriter(isic_csv, isic_header(isic_format))
        w.write([isic_row(r, isic_format) for r in rows])
        w.close()
