"""Drift monitoring on a real shift: serve HAM10000 test-split images, then ISIC 2017 images (other clinics),
through the real API into a real record store; test each window against the model's reference.

    PYTHONPATH=src python benchmarks/monitor_shift.py --n 1503 --out docs/results/monitor_shift.json

Writes the JSON summary (both windows, every signal) and, with --report-dir, the two HTML reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pandas as pd  # noqa: E402


def ham_test(n: int) -> list[tuple[Path, dict]]:
    """HAM10000 test-split images (release split, seed 42) with their metadata."""
    from dermlens.data import splits as sp
    from dermlens.data.manifest import data_config
    from dermlens.data.readers import read_ham10000
    from dermlens.settings import data_root

    root = data_root() / "ham10000"
    df = read_ham10000(root)
    df["group_id"] = sp.assign_groups(df, sp.read_duplicate_pairs(root / sp.DUPLICATES_CSV))
    cfg = data_config()["split"]
    fractions = {k: float(v) for k, v in cfg["fractions"].items()}
    df["split"], _ = sp.grouped_split(
        df, fractions, int(cfg["seed"]), int(cfg["attempts"]), float(cfg["max_deviation"])
    )
    test = df[df["split"] == "test"].sample(frac=1.0, random_state=0).head(n)
    return [
        (Path(p), {"age": a, "sex": s, "site": g})
        for p, a, s, g in zip(test["image_path"], test["age"], test["sex"], test["site"], strict=True)
    ]


def isic2017(n: int) -> list[tuple[Path, dict]]:
    """ISIC 2017 images (all splits, shuffled) with age and sex from its labels CSV."""
    from dermlens.settings import data_root

    root = data_root() / "isic2017"
    lab = pd.read_csv(root / "ISIC-2017_labels.csv").sample(frac=1.0, random_state=0).head(n)
    return [
        (root / "images" / f"{i}.jpg", {"age": a, "sex": s, "site": None})
        for i, a, s in zip(lab["image_id"], lab["age_approximate"], lab["sex"], strict=True)
    ]


def _form(meta: dict) -> dict:
    return {k: str(v) for k, v in meta.items() if v is not None and not (isinstance(v, float) and v != v)}


def record(client, images: list[tuple[Path, dict]]) -> None:
    """POST every image to /predict (each prediction lands in the record store)."""
    for path, meta in images:
        r = client.post(
            "/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, data=_form(meta)
        )
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")


def run(n: int, db: Path, report_dir: Path | None = None) -> dict:
    """Serve both windows, then test each; returns the two summaries."""
    from fastapi.testclient import TestClient

    from dermlens.infer.predictor import Predictor
    from dermlens.monitor.drift import compare, records_frame, select_window
    from dermlens.monitor.reference import Reference
    from dermlens.monitor.report import write_report
    from dermlens.serve.api import create_app
    from dermlens.serve.records import RecordStore
    from dermlens.serve.settings import load_settings

    predictor = Predictor.load(threads=1)
    url = f"sqlite:///{db}"
    ham, other = ham_test(n), isic2017(n)
    app = create_app(load_settings(records={"url": url}), predictor=predictor)
    with TestClient(app, base_url="http://localhost") as client:  # the allowed host
        t0 = datetime.now(UTC)
        record(client, ham)
        t1 = datetime.now(UTC)
        record(client, other)
    ref = Reference.load(predictor.bundle_dir)
    store = RecordStore(url)
    history = records_frame(store, ref.model_version)
    store.close()
    out = {}
    for name, since, until in (("ham10000_test", t0, t1), ("isic2017", t1, None)):
        window = select_window(history, since, until)
        summary = compare(window, ref)
        out[name] = {
            "since": since.isoformat(),
            "until": until.isoformat() if until else None,
            **summary.to_dict(),
        }
        if report_dir is not None:
            write_report(report_dir / f"monitor_{name}.html", summary, window, history, ref)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1503, help="images per window")
    ap.add_argument("--out", type=Path, default=Path("docs/results/monitor_shift.json"))
    ap.add_argument("--report-dir", type=Path, default=None)
    args = ap.parse_args()
    from dermlens.infer.predictor import Predictor

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        windows = run(args.n, Path(tmp) / "records.db", args.report_dir)
    version = Predictor.load(threads=1).version
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?"
    )
    result = {
        "command": f"PYTHONPATH=src python benchmarks/monitor_shift.py --n {args.n}",
        "model_version": version,
        "cpu": f"{model_name}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - start, 1),
        "windows": windows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, w in windows.items():
        signals = ", ".join(
            f"{r['signal']} p={r['p_value']:.2g} effect={r['effect']:.3f}{' ALERT' if r['alert'] else ''}"
            for r in w["results"]
        )
        print(f"{name}: n={w['n_window']} alert={w['alert']} :: {signals}")


if __name__ == "__main__":
    main()
