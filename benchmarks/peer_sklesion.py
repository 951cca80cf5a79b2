"""A public peer side by side: sklesion 0.2.2 (Keras Xception, 254 px, HAM10000 only) vs the shipped dermlens
bundle on the same images of the visible external test splits, metadata withheld from both.

    PYTHONPATH=src python benchmarks/peer_sklesion.py [--limit 50] [--out docs/results/peer_sklesion.json]

Needs prepared manifests (`dermlens data prepare --dataset D --root DATA/D --out work/D --no-cache` for
ham10000, isic2017 and isic2019). The peer runs in its own venv (work/peer-venv, created on first use with
pinned TensorFlow CPU; never a dermlens dependency) through benchmarks/_sklesion_worker.py; its weights come
in its wheel and its runs have no proxy route out. Predictions are cached per split under work/peer/.
Splits: ISIC 2017 test (mel, SK -> bkl, nevus -> nv, scored as dermlens.evaluate.external does), ISIC 2019
BCN_20000 thumbnails (84 px) of the grouped test split, scc left out for both (neither model has the class),
and the HAM10000 grouped test split (the peer trained on HAM10000 with its own split: it has seen part of it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.evaluate.bootstrap import bootstrap
from dermlens.evaluate.external import ISIC2017_CLASSES
from dermlens.metrics import EvalData, MetricSettings, decision_metrics, ranking_metrics

PEER = "sklesion==0.2.2"
# The wheel pins tensorflow==2.17.0, pandas==2.2.3 and numpy==1.26.4; tensorflow-cpu is the same release
# without the GPU parts, so the peer is installed --no-deps on top of these.
PEER_REQUIREMENTS = ("tensorflow-cpu==2.17.0", "keras==3.15.1", "pandas==2.2.3", "numpy==1.26.4")
WORKER = Path(__file__).with_name("_sklesion_worker.py")
NO_ROUTE = "http://127.0.0.1:9"  # any download attempt by the peer fails instead of reaching the network
SPLITS = ("isic2017", "isic2019_bcn", "ham10000")
METRICS = ("balanced_accuracy", "melanoma_auc")
# What each model saw in training, per split (dermlens: its card's lineage; the peer: its package text).
SEEN = {
    "isic2017": {
        "dermlens": "the ISIC 2017 train split (other images of the same challenge)",
        "peer": "nothing from ISIC 2017",
    },
    "isic2019_bcn": {"dermlens": "nothing from BCN_20000", "peer": "nothing from BCN_20000"},
    "ham10000": {
        "dermlens": "the other splits only (lesion-grouped, seed 42)",
        "peer": "HAM10000 with its own split (unpublished): part of this test split likely in its training",
    },
}


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python, creating the venv with the pinned TensorFlow CPU and sklesion if missing."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *PEER_REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", PEER], check=True)
    return python


def split_rows(name: str, work: Path) -> pd.DataFrame:
    """Labelled test rows of one split (image_id, image_path, diagnosis, group_id)."""
    manifest = work / name.split("_")[0] / "manifest.csv"
    if not manifest.exists():
        sys.exit(f"error: {manifest} missing; run `dermlens data prepare` for {name.split('_')[0]} first")
    df = pd.read_csv(manifest)
    rows = df[df["split"] == "test"]
    if name == "isic2019_bcn":
        rows = rows[rows["lesion_id"].astype(str).str.startswith("BCN_")]
    classes = ISIC2017_CLASSES if name == "isic2017" else HAM_CLASSES
    rows = rows[rows["diagnosis"].isin(classes)]
    return rows[["image_id", "image_path", "diagnosis", "group_id"]].reset_index(drop=True)


def to_ham7(probs: np.ndarray, peer_classes: list[str]) -> np.ndarray:
    """Reorder the peer's probability columns into dermlens's HAM class order (same seven codes)."""
    if sorted(peer_classes) != sorted(HAM_CLASSES):
        raise ValueError(f"peer classes {peer_classes} are not the seven HAM10000 classes")
    return np.asarray(probs, np.float64)[:, [list(peer_classes).index(c) for c in HAM_CLASSES]]


def restrict(probs: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """HAM7 probabilities renormalised over a subset of classes (ISIC 2017: mel, bkl, nv)."""
    p = probs[:, [HAM_CLASSES.index(c) for c in classes]]
    return p / p.sum(axis=1, keepdims=True)


def accuracy(probs: np.ndarray, diagnosis: list[str], classes: tuple[str, ...]) -> float:
    """Share of images whose top class over `classes` is their diagnosis."""
    truth = np.array([classes.index(d) for d in diagnosis])
    return float((restrict(probs, classes).argmax(axis=1) == truth).mean())


def model_metrics(probs: np.ndarray, truth: np.ndarray, classes: tuple[str, ...], w: np.ndarray) -> dict:
    """Balanced accuracy over `classes` and melanoma-vs-rest AUC of HAM7 probabilities, per weight row."""
    data = EvalData.build(restrict(probs, classes), truth, classes)
    mel = ranking_metrics(
        probs[:, HAM_CLASSES.index("mel")], truth == classes.index("mel"), w, MetricSettings()
    )
    return {"balanced_accuracy": decision_metrics(data, w)["balanced_accuracy"], "melanoma_auc": mel["auc"]}


def paired_scores(
    ours: np.ndarray,
    peer: np.ndarray,
    diagnosis: list[str],
    groups: list,
    classes: tuple[str, ...],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Both models' metrics and the paired difference (dermlens - peer) with one lesion-grouped bootstrap."""
    truth = np.array([classes.index(d) for d in diagnosis])

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        a, b = model_metrics(ours, truth, classes, w), model_metrics(peer, truth, classes, w)
        out = {f"dermlens.{k}": a[k] for k in METRICS} | {f"peer.{k}": b[k] for k in METRICS}
        return out | {f"difference.{k}": a[k] - b[k] for k in METRICS}

    r = bootstrap(fn, len(truth), groups, n_resamples=n_resamples, seed=seed)
    out: dict = {"n_images": len(truth), "n_lesions": r.n_groups, "n_resamples": n_resamples, "seed": seed}
    out["class_counts"] = {c: int((truth == i).sum()) for i, c in enumerate(classes)}
    for key in r.point:
        side, metric = key.split(".")
        value = {"value": float(r.point[key]), "ci_low": float(r.low[key]), "ci_high": float(r.high[key])}
        out.setdefault(side, {})[metric] = value
    return out


def _cached(path: Path, ids: list[str], key: str) -> dict | None:
    """A cached prediction file for exactly these images and this model, or None."""
    if not path.exists():
        return None
    d = np.load(path, allow_pickle=False)
    if str(d["key"]) != key or d["image_ids"].tolist() != ids:
        return None
    return {"probs": d["probs"], "seconds": float(d["seconds"])}


def dermlens_probs(rows: pd.DataFrame, lens, cache: Path) -> dict:
    """HAM7 probabilities of the shipped bundle without metadata (cached) and the seconds it took."""
    from dermlens.preprocess import load_rgb

    ids, key = rows["image_id"].astype(str).tolist(), f"dermlens {lens.card.version}"
    if (hit := _cached(cache, ids, key)) is not None:
        return hit
    start = time.perf_counter()
    paths = rows["image_path"].tolist()
    parts = [
        lens.predict_arrays([load_rgb(p) for p in paths[i : i + 32]])["probs"]
        for i in range(0, len(paths), 32)
    ]
    probs = np.concatenate(parts)
    seconds = time.perf_counter() - start
    probs = probs[:, [list(lens.classes).index(c) for c in HAM_CLASSES]]
    np.savez(cache, probs=probs, seconds=seconds, image_ids=np.array(ids), key=key)
    return {"probs": probs, "seconds": seconds}


def peer_probs(rows: pd.DataFrame, python: Path, cache: Path) -> dict:
    """HAM7 probabilities of the peer (its own venv, no metadata; cached) and the seconds it took."""
    ids = rows["image_id"].astype(str).tolist()
    if (hit := _cached(cache, ids, PEER)) is not None:
        return hit
    listing, raw = cache.with_suffix(".txt"), cache.with_suffix(".raw.npz")
    listing.write_text("\n".join(rows["image_path"].astype(str)) + "\n")
    env = os.environ | {"HTTP_PROXY": NO_ROUTE, "HTTPS_PROXY": NO_ROUTE, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    subprocess.run([str(python), str(WORKER), str(listing), str(raw)], check=True, env=env)
    d = np.load(raw)
    probs, seconds = to_ham7(d["probs"], d["classes"].tolist()), float(d["seconds"])
    np.savez(cache, probs=probs, seconds=seconds, image_ids=np.array(ids), key=PEER)
    return {"probs": probs, "seconds": seconds}


def peer_versions(python: Path) -> dict:
    """Installed versions in the peer venv (sklesion, TensorFlow, Keras), the test figures its package reports
    for itself (cr_test.pkl, HAM10000) and the hash of the wheel's model file."""
    code = (
        "import importlib.metadata as m, json, sklesion, os, pickle;"
        "d=os.path.dirname(sklesion.__file__); r=pickle.load(open(os.path.join(d,'cr_test.pkl'),'rb'));"
        "own={'n_images': r['support']['accuracy'], 'accuracy': r['f1-score']['accuracy'],"
        "'balanced_accuracy': r['recall']['macro avg']};"
        "v={k: m.version(k) for k in ('sklesion','tensorflow-cpu','keras')};"
        "print(json.dumps(v | {'own_reported_test': own, 'model': os.path.join(d,'model.keras')}))"
    )
    out = json.loads(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    )
    out["model_keras_sha256"] = hashlib.sha256(Path(out.pop("model")).read_bytes()).hexdigest()
    return out


def split_record(prepared: Path) -> dict:
    """How a prepared manifest was split (method, seed, fractions), from its splits.json."""
    rec = json.loads((prepared / "splits.json").read_text())
    return {k: rec.get(k) for k in ("method", "seed", "fractions", "manifest_hash")} | {
        "rows": "test split, lesion_id BCN_*, scc left out (neither model has the class)"
    }


def run_split(name: str, args, lens, python: Path) -> dict:
    """Predict one split with both models and score them paired."""
    rows = split_rows(name, args.work)
    if args.limit:
        rows = rows.sample(n=min(args.limit, len(rows)), random_state=0).reset_index(drop=True)
    cache = args.work / "peer"
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{name}_{len(rows)}"
    ours = dermlens_probs(rows, lens, cache / f"{tag}_dermlens.npz")
    peer = peer_probs(rows, python, cache / f"{tag}_peer.npz")
    classes = ISIC2017_CLASSES if name == "isic2017" else HAM_CLASSES
    out = paired_scores(
        ours["probs"],
        peer["probs"],
        rows["diagnosis"].tolist(),
        rows["group_id"].tolist(),
        classes,
        args.n_bootstrap,
    )
    out["classes"] = list(classes)
    out["seen_in_training"] = SEEN[name]
    out["accuracy"] = {
        "dermlens": accuracy(ours["probs"], rows["diagnosis"].tolist(), classes),
        "peer": accuracy(peer["probs"], rows["diagnosis"].tolist(), classes),
    }
    out["seconds_per_image"] = {
        "dermlens": ours["seconds"] / len(rows),
        "peer": peer["seconds"] / len(rows),
    }
    return out


def print_table(results: dict) -> None:
    """Per split: both models' figures with 95% CIs and the paired difference."""

    def fmt(v: dict) -> str:
        return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"

    print(
        f"{'split':14} {'n':>5} {'metric':18} {'dermlens':>22} {'sklesion':>22} {'dermlens - sklesion':>26}"
    )
    for name, r in results["splits"].items():
        for m in METRICS:
            cells = [fmt(r[side][m]) for side in ("dermlens", "peer", "difference")]
            print(f"{name:14} {r['n_images']:>5} {m:18} {cells[0]:>22} {cells[1]:>22} {cells[2]:>26}")
        s = r["seconds_per_image"]
        print(
            f"{'':14} {'':>5} {'ms / image':18} {s['dermlens'] * 1e3:>22.1f} {s['peer'] * 1e3:>22.1f}"
            f" {'peer / dermlens ' + format(s['peer'] / s['dermlens'], '.1f') + 'x':>26}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--venv", type=Path, default=Path("work/peer-venv"))
    ap.add_argument("--limit", type=int, default=None, help="score this many images per split (smoke test)")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: none with --limit)")
    args = ap.parse_args()
    import dermlens
    from dermlens.settings import cpu_name, machine

    python = ensure_peer_venv(args.venv)
    lens = dermlens.load()
    results = {
        "dermlens_bundle_version": lens.card.version,
        "dermlens_precision": lens.precision,
        "peer": {"package": PEER, **peer_versions(python)},
        "metadata": "withheld from both",
        "cpu": cpu_name(),
        "machine": machine(),
        "limit": args.limit,
        "isic2019_split": split_record(args.work / "isic2019"),
        "splits": {name: run_split(name, args, lens, python) for name in SPLITS},
    }
    print_table(results)
    out = args.out or (None if args.limit else Path("docs/results/peer_sklesion.json"))
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
