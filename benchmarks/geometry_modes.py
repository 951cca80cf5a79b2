"""Balanced accuracy of the shipped bundle under each geometry fit (squash, crop, pad, ...), per source.

    python benchmarks/geometry_modes.py [--ham work/ham10000] [--isic2017 work/isic2017]
        [--isic2019 work/isic2019] [--out docs/results/geometry_modes.json]

Runs the packaged release bundle torch-free (dermlens.infer.predictor.Predictor) without metadata on each
source's validation images; the only change between variants is the bundle's `Preprocessing.fit` (and, for
`crop70`, a centre crop to 70% of each side first). Balanced accuracy with lesion-grouped bootstrap CIs and
the paired difference to `squash` (the bundle's own geometry). Classes the model cannot predict are dropped.
ISIC 2017 is scored on the share of its train rows the release held out (its val split is mostly unknown).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens.data.manifest import read_manifest
from dermlens.data.splits import holdout_rows
from dermlens.evaluate.bootstrap import bootstrap
from dermlens.infer.predictor import Predictor
from dermlens.metrics import EvalData, decision_metrics
from dermlens.preprocess import load_rgb
from dermlens.settings import cpu_name

# variant -> (fit, share of each side kept by a centre crop before the fit)
VARIANTS: dict[str, tuple[str, float]] = {
    "squash": ("squash", 1.0),
    "crop": ("crop", 1.0),
    "pad": ("pad", 1.0),
    "pad_mean": ("pad_mean", 1.0),
    "crop70": ("crop", 0.7),
}


def centre_share(rgb: np.ndarray, share: float) -> np.ndarray:
    """The centred window keeping `share` of each side."""
    if share >= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    return rgb[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]


def val_rows(prepared: Path, split: str, classes: tuple[str, ...], lesion_prefix: str = "") -> pd.DataFrame:
    """Rows of `split` whose diagnosis the model knows (optionally only lesions starting with a prefix)."""
    df = read_manifest(prepared)
    keep = (df["split"] == split) & df["diagnosis"].isin(classes)
    if lesion_prefix:
        keep &= df["lesion_id"].astype(str).str.startswith(lesion_prefix)
    return df[keep].reset_index(drop=True)


def external_rows(prepared: Path, classes: tuple[str, ...], fraction: float, seed: int) -> pd.DataFrame:
    """The external validation rows training held out (data.external_val): a seeded, lesion-grouped share
    of the `train` rows with a known class, exactly as the data module draws it."""
    df = read_manifest(prepared)
    known = df["diagnosis"].isin(classes) & (df["split"] == "train")
    df = df.assign(split=np.where(known, "train", "-"))
    return df.loc[holdout_rows(df, fraction, seed)].reset_index(drop=True)


def variant_probs(predictor: Predictor, paths: list[str], chunk: int = 64) -> dict[str, np.ndarray]:
    """Calibrated probabilities [N, C] per variant; each image is decoded once."""
    base = predictor.prep
    out: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
    for s in range(0, len(paths), chunk):
        rgbs = [load_rgb(p) for p in paths[s : s + chunk]]
        for name, (fit, share) in VARIANTS.items():
            prep = replace(base, fit=fit)
            batch = np.stack([prep.resize(centre_share(im, share)) for im in rgbs])
            out[name].append(predictor.predict_arrays(batch, prepared=True, tta=False)["probs"])
    return {k: np.concatenate(v) for k, v in out.items()}


def score(probs: dict[str, np.ndarray], truth: np.ndarray, groups: pd.Series, classes) -> dict:
    """Balanced accuracy per variant and its paired difference to squash, with lesion-bootstrap 95% CIs."""
    names = list(probs)
    data = {k: EvalData.build(v, truth, classes) for k, v in probs.items()}

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        ba = {k: decision_metrics(d, w)["balanced_accuracy"] for k, d in data.items()}
        return {**ba, **{f"{k}-squash": ba[k] - ba["squash"] for k in names if k != "squash"}}

    res = bootstrap(fn, len(truth), groups.tolist(), n_resamples=1000, seed=0)
    row = lambda k: [round(float(x), 4) for x in (res.point[k], res.low[k], res.high[k])]  # noqa: E731
    return {
        "n_images": len(truth),
        "n_lesions": res.n_groups,
        "classes_present": sorted({classes[i] for i in truth}),
        "balanced_accuracy": {k: row(k) for k in names},
        "difference_to_squash": {k: row(f"{k}-squash") for k in names if k != "squash"},
    }


def measure(predictor: Predictor, df: pd.DataFrame) -> dict:
    classes = predictor.classes
    t0 = time.perf_counter()
    probs = variant_probs(predictor, df["image_path"].tolist())
    truth = np.array([classes.index(d) for d in df["diagnosis"]])
    groups = df["group_id"].where(df["group_id"].astype(str) != "", df["lesion_id"])
    out = score(probs, truth, groups, classes)
    h, w = load_rgb(df["image_path"].iloc[0]).shape[:2]
    return {**out, "first_image_size": f"{w}x{h}", "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ham", type=Path, default=Path("work/ham10000"))
    ap.add_argument("--isic2017", type=Path, default=Path("work/isic2017"))
    ap.add_argument("--isic2019", type=Path, default=Path("work/isic2019"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/geometry_modes.json"))
    args = ap.parse_args()
    predictor = Predictor.load()
    classes = predictor.classes
    sources = {
        "ham10000_val": val_rows(args.ham, "val", classes),
        "isic2017_heldout_train": external_rows(args.isic2017, classes, 0.25, 42),
        "isic2019_bcn_val": val_rows(args.isic2019, "val", classes, lesion_prefix="BCN_"),
    }
    results = {}
    for name, df in sources.items():
        results[name] = measure(predictor, df)
        print(name, json.dumps(results[name]["balanced_accuracy"]), flush=True)
    report = {
        "what": "balanced accuracy of the release bundle per geometry fit, val splits, no metadata, no TTA; "
        "[point, 95% CI low, high] from 1000 lesion-grouped bootstrap resamples; crop70 = centre 70% of "
        "each side, then crop; ISIC 2017: the 25% of its train rows the release held out as external "
        "validation (its own val split is 120 unknown + 30 mel); ISIC 2019 BCN: the grouped val split, "
        "scc left out (the 7-class model cannot predict it)",
        "bundle": f"{predictor.card.name} {predictor.version}",
        "bundle_fit": predictor.prep.fit,
        "precision": predictor.precision,
        "cpu": cpu_name(),
        "variants": {k: {"fit": f, "centre_share": s} for k, (f, s) in VARIANTS.items()},
        "sources": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
