"""Trust figures for a model bundle: calibration, OOD refusal, selective prediction, TTA, CAM vs lesion masks.

    python benchmarks/trust_measure.py --bundle DIR --manifest DIR --out DIR [--n-val N --n-test N ...]

Runs the bundle's ONNX model (torch-free) on the prepared manifest's val/test images and on the probe sets,
and writes trust_report.json + trust_report.md to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlens.bundle import TRUST, read_card
from dermlens.infer import cam as camlib
from dermlens.infer import tta
from dermlens.infer.calibration import mean_softmax, softmax
from dermlens.infer.state import TrustState
from dermlens.metadata import encode_metadata, encode_rows
from dermlens.metrics import aurc, auroc, balanced_accuracy, ece, reliability, risk_coverage
from dermlens.preprocess import Preprocessing, load_rgb
from dermlens.settings import data_root
from dermlens.trust import cam as cam_measure
from dermlens.trust import ood, probes, selective
from dermlens.trust.calibration import nll
from dermlens.trust.outputs import coarse_from_fine, fit_trust, fit_tta, trust_config

OUTPUTS = ("fine_logits", "coarse_logits", "embedding", "feature_map")


class BundleModel:
    """A bundle's ONNX graph via the runtime's OnnxModel: uint8 NHWC images (+ metadata) -> raw outputs."""

    def __init__(self, bundle: Path, threads: int = 1, precision: str | None = None) -> None:
        from dermlens.infer.session import PRECISIONS, OnnxModel

        self.card = read_card(bundle)
        self.prep: Preprocessing = self.card.preprocessing
        self.precision = (precision or self.card.extra.get("default_precision") or "fp32").lower()
        self.model = OnnxModel(Path(bundle) / PRECISIONS[self.precision], threads)

    def run(
        self,
        images: np.ndarray,
        meta: np.ndarray | None = None,
        outputs: tuple[str, ...] = OUTPUTS[:3],
        batch: int = 32,
    ) -> dict[str, np.ndarray]:
        """Model outputs for uint8 NxHxWx3 images at the model size, in batches."""
        out = self.model.run_images(images, self.prep, meta, batch, feature_map="feature_map" in outputs)
        return {k: out[k] for k in outputs}


def _images(df: pd.DataFrame, manifest_dir: Path, prep: Preprocessing) -> np.ndarray:
    """uint8 NHWC model-size images for manifest rows (from the prepared cache when it is current)."""
    try:
        from dermlens.data.cache import cache_is_current, cache_path
        from dermlens.data.manifest import read_manifest

        full = read_manifest(manifest_dir)
        if cache_is_current(manifest_dir, full, prep):
            arr = np.load(cache_path(manifest_dir, prep), mmap_mode="r")
            pos = pd.Series(np.arange(len(full)), index=full["image_id"].values)
            return np.ascontiguousarray(arr[pos.loc[df["image_id"].values].values])
    except (ImportError, OSError, ValueError, KeyError):
        pass
    return np.stack([prep.resize(load_rgb(p)) for p in df["image_path"]])


def _subset(df: pd.DataFrame, split: str, n: int | None, seed: int) -> pd.DataFrame:
    part = df[df["split"] == split]
    if n is not None and n < len(part):
        part = part.sample(n=n, random_state=seed).sort_index()
    return part


def _meta(df: pd.DataFrame) -> np.ndarray:
    return encode_rows(list(df["age"]), list(df["sex"]), list(df["site"]))


def _no_meta(n: int) -> np.ndarray:
    """Metadata rows with every field missing, as the runtime encodes an upload without metadata."""
    return np.repeat(encode_metadata()[None], n, axis=0)


def ece_ci(probs: np.ndarray, labels: np.ndarray, bins: int, n_boot: int = 200, seed: int = 0) -> list[float]:
    """95% bootstrap interval (image resampling) of the top-label ECE."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    vals = [ece(probs[i], labels[i], bins) for i in idx]
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]


def _calibration(
    out: dict[str, np.ndarray], labels: np.ndarray, state: TrustState, bins: int
) -> dict[str, Any]:
    fine, coarse = out["fine_logits"], out["coarse_logits"]
    clab = coarse_from_fine(labels, fine.shape[1])
    return {
        "n": len(labels),
        "fine": {
            "ece_before": ece(softmax(fine), labels, bins),
            "ece_after": ece(softmax(fine, state.temperature_fine), labels, bins),
            "ece_after_ci95": ece_ci(softmax(fine, state.temperature_fine), labels, bins),
            "nll_before": nll(fine, labels),
            "nll_after": nll(fine, labels, state.temperature_fine),
            "accuracy": float((fine.argmax(1) == labels).mean()),
            "balanced_accuracy": balanced_accuracy(fine.argmax(1), labels),
        },
        "coarse": {
            "ece_before": ece(softmax(coarse), clab, bins),
            "ece_after": ece(softmax(coarse, state.temperature_coarse), clab, bins),
            "nll_before": nll(coarse, clab),
            "nll_after": nll(coarse, clab, state.temperature_coarse),
        },
    }


def _ood(model: BundleModel, state: TrustState, test_out: dict, test_images: np.ndarray, seed: int) -> dict:
    """AUROC, FPR@95%TPR and refusal rate per probe set and score; the test split is in-distribution."""
    sets = probes.probe_sets(model.prep, probes.SETS, seed=seed)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_images), min(150, len(test_images)), replace=False)
    sets["ham_corrupted"] = probes.ham_corrupted(test_images[np.sort(pick)], seed=seed)
    methods = [m for m in ood.METHODS if m in state.thresholds]
    id_scores = {m: state.score(m, test_out["fine_logits"], test_out["embedding"]) for m in methods}
    res: dict[str, Any] = {
        "in_distribution": {
            "set": "test split",
            "n": len(test_out["fine_logits"]),
            "keep_rate": {m: float((id_scores[m] <= state.thresholds[m]).mean()) for m in methods},
        },
        "sets": {},
    }
    far: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for name, imgs in sets.items():
        out = model.run(imgs, _no_meta(len(imgs)))
        row: dict[str, Any] = {"n": len(imgs)}
        for m in methods:
            s = state.score(m, out["fine_logits"], out["embedding"])
            if name in probes.SETS:
                far[m].append(s)
            row[m] = {
                "auroc": auroc(id_scores[m], s),
                "fpr_at_95tpr": ood.fpr_at_tpr(id_scores[m], s),
                "refused": float((s > state.thresholds[m]).mean()),
            }
        res["sets"][name] = row
    res["all_far"] = {
        m: {
            "auroc": auroc(id_scores[m], np.concatenate(far[m])),
            "refused": float((np.concatenate(far[m]) > state.thresholds[m]).mean()),
            "n": int(sum(len(x) for x in far[m])),
        }
        for m in methods
    }
    return res


def _view_logits(model: BundleModel, images: np.ndarray, meta: np.ndarray) -> dict[str, np.ndarray]:
    """Fine and coarse logits of every TTA view, [V, N, C] each."""
    outs = [model.run(v, meta, outputs=("fine_logits", "coarse_logits")) for v in tta.tta_views(images)]
    return {k: np.stack([o[k] for o in outs]) for k in ("fine_logits", "coarse_logits")}


def _tta(
    model: BundleModel,
    state: TrustState,
    views: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    images: np.ndarray,
    bins: int,
) -> dict[str, Any]:
    """Balanced accuracy, accuracy, ECE without and with 4-view TTA on val and test, and the time cost.

    With TTA, per-view probabilities use the state's TTA temperature (fitted here on val if it has none)."""
    fitted_here = state.temperature_fine_tta is None
    if fitted_here:
        fit_tta(
            state,
            {
                "labels": labels["val"],
                "fine_logits": views["val"]["fine_logits"][0],
                "fine_logits_views": views["val"]["fine_logits"],
                "coarse_logits_views": views["val"]["coarse_logits"],
            },
        )
    t0 = time.perf_counter()
    model.run(images[:64], None, outputs=("fine_logits",))
    t_per = (time.perf_counter() - t0) / min(64, len(images))
    res: dict[str, Any] = {
        "views": list(tta.VIEWS),
        "temperature_fine_tta": state.temperature_fine_tta,
        "temperature_coarse_tta": state.temperature_coarse_tta,
        "tta_temperature_source": "fitted here on val" if fitted_here else "bundle trust.npz",
        "seconds_per_image": {"single": t_per, "tta": t_per * len(tta.VIEWS)},
        "cost_factor": len(tta.VIEWS),
    }
    for split, v in views.items():
        y = labels[split]
        p_one = softmax(v["fine_logits"][0], state.temperature_fine)
        p_same_t = mean_softmax(v["fine_logits"], state.temperature_fine)
        p_tta = state.tta_probs(v["fine_logits"])
        res[split] = {
            "n": len(y),
            "balanced_accuracy": {
                "single": balanced_accuracy(p_one.argmax(1), y),
                "tta": balanced_accuracy(p_tta.argmax(1), y),
            },
            "accuracy": {
                "single": float((p_one.argmax(1) == y).mean()),
                "tta": float((p_tta.argmax(1) == y).mean()),
            },
            "ece": {
                "single": ece(p_one, y, bins),
                "tta_single_view_T": ece(p_same_t, y, bins),
                "tta": ece(p_tta, y, bins),
            },
        }
    return res


def _mask(image_id: str, row: pd.Series) -> np.ndarray | None:
    path = row.get("mask_path") if "mask_path" in row.index else None
    p = (
        Path(path)
        if isinstance(path, str) and path
        else data_root() / "ham10000" / "masks" / f"{image_id}_segmentation.png"
    )
    if not p.is_file():
        return None
    from PIL import Image

    return np.asarray(Image.open(p).convert("L")) > 127


def _center_heat(shape: tuple[int, int]) -> np.ndarray:
    """A centred Gaussian (sigma = 1/4 of each side): the 'lesions are in the middle' baseline."""
    y = (np.arange(shape[0]) - (shape[0] - 1) / 2) / (shape[0] / 4)
    x = (np.arange(shape[1]) - (shape[1] - 1) / 2) / (shape[1] / 4)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def _cam(
    model: BundleModel,
    state: TrustState,
    df: pd.DataFrame,
    images: np.ndarray,
    meta: np.ndarray,
    tol_frac: float,
    out_dir: Path,
) -> dict[str, Any]:
    """CAM heat inside the lesion mask and pointing game, with mask-area, chance and centre baselines."""
    if state.cam_weight is None:
        return {"skipped": "trust state has no cam_weight"}
    out = model.run(images, meta, outputs=("fine_logits", "feature_map"), batch=16)
    keys = ("in_mask", "hit", "area", "chance_hit", "center_in", "center_hit", "tol")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    examples = []
    for i, (_, row) in enumerate(df.iterrows()):
        mask = _mask(str(row["image_id"]), row)
        if mask is None:
            continue
        tol = tol_frac * mask.shape[1]
        rows["tol"].append(tol)
        cls = int(out["fine_logits"][i].argmax())
        heat = camlib.upsample(camlib.cam(out["feature_map"][i], state.cam_weight, cls), mask.shape)
        center = _center_heat(mask.shape)
        rows["in_mask"].append(cam_measure.heat_in_mask(heat, mask))
        rows["hit"].append(float(cam_measure.pointing_hit(heat, mask, tol)))
        rows["area"].append(float(mask.mean()))
        rows["chance_hit"].append(cam_measure.dilated_fraction(mask, tol))
        rows["center_in"].append(cam_measure.heat_in_mask(center, mask))
        rows["center_hit"].append(float(cam_measure.pointing_hit(center, mask, tol)))
        if len(examples) < 4:
            name = f"cam_{row['image_id']}.png"
            (out_dir / name).write_bytes(camlib.overlay_png(images[i], heat))
            examples.append(name)
    n = len(rows["hit"])
    if n == 0:
        return {"skipped": "no lesion masks found for these images"}
    mean = {k: float(np.nanmean(v)) for k, v in rows.items()}
    return {
        "n": n,
        "class": "predicted",
        "pointing_tolerance_px": mean["tol"],
        "pointing_tolerance_fraction_of_width": tol_frac,
        "heat_in_lesion": mean["in_mask"],
        "pointing_hit_rate": mean["hit"],
        "baseline_mask_area_fraction": mean["area"],
        "baseline_random_point_hit": mean["chance_hit"],
        "baseline_center_gaussian_in_lesion": mean["center_in"],
        "baseline_center_point_hit": mean["center_hit"],
        "examples": examples,
    }


def measure(
    bundle: Path,
    manifest_dir: Path,
    out_dir: Path,
    n_val: int | None = None,
    n_test: int | None = None,
    n_train: int | None = 3000,
    n_cam: int = 300,
    refit: bool = False,
    do_tta: bool = True,
    threads: int = 1,
    seed: int = 0,
    precision: str | None = None,
) -> dict[str, Any]:
    """Compute every trust figure for a bundle; writes trust_report.json and trust_report.md to out_dir."""
    from dermlens.data.manifest import read_manifest

    cfg = trust_config()
    bins = int(cfg["calibration"]["ece_bins"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model = BundleModel(bundle, threads, precision)
    classes = list(model.card.classes)
    df = read_manifest(manifest_dir)
    df = df[df["diagnosis"].isin(classes)]
    val_df, test_df = _subset(df, "val", n_val, seed), _subset(df, "test", n_test, seed)
    lab = {
        s: np.array([classes.index(d) for d in d_["diagnosis"]])
        for s, d_ in (("val", val_df), ("test", test_df))
    }
    imgs = {
        "val": _images(val_df, manifest_dir, model.prep),
        "test": _images(test_df, manifest_dir, model.prep),
    }
    meta = {"val": _meta(val_df), "test": _meta(test_df)}
    outs = {s: model.run(imgs[s], meta[s]) for s in ("val", "test")}
    report: dict[str, Any] = {
        "precision": model.precision,
        "bundle": str(bundle),
        "model": model.card.name,
        "version": model.card.version,
        "architecture": model.card.architecture,
        "manifest": str(manifest_dir),
    }
    trust_file = Path(bundle) / TRUST
    if trust_file.is_file() and not refit:
        state, report["trust_state"] = TrustState.load(trust_file), "bundle trust.npz"
    else:
        train_df = _subset(df, "train", n_train, seed)
        train_out = model.run(
            _images(train_df, manifest_dir, model.prep), _meta(train_df), outputs=("embedding",)
        )
        cam_w = None
        if trust_file.is_file():
            cam_w = TrustState.load(trust_file).cam_weight
        elif (Path(bundle) / "cam_weight.npy").is_file():
            cam_w = np.load(Path(bundle) / "cam_weight.npy")
        val = {**outs["val"], "labels": lab["val"]}
        train_labels = np.array([classes.index(d) for d in train_df["diagnosis"]])
        state = fit_trust(val, train_out["embedding"], train_labels, cam_weight=cam_w)
        state.save(out_dir / TRUST)
        report["trust_state"] = (
            f"refit here on val (+{len(train_df)} train embeddings); saved to {out_dir / TRUST}"
        )
    report["temperature"] = {"fine": state.temperature_fine, "coarse": state.temperature_coarse}
    report["calibration"] = {s: _calibration(outs[s], lab[s], state, bins) for s in ("val", "test")}
    report["reliability_test"] = reliability(
        softmax(outs["test"]["fine_logits"], state.temperature_fine), lab["test"], bins
    )
    report["ood"] = {
        "default_method": state.ood_method,
        "thresholds": state.thresholds,
        "keep_target": state.keep_target,
        **_ood(model, state, outs["test"], imgs["test"], seed),
    }
    p_test = softmax(outs["test"]["fine_logits"], state.temperature_fine)
    _, risk = risk_coverage(p_test, lab["test"])
    refer = state.decide(outs["test"]["fine_logits"], outs["test"]["embedding"], probs=p_test)["refer"]
    report["selective_test"] = {
        "aurc": aurc(p_test, lab["test"]),
        "min_confidence": state.min_confidence,
        "risk_at_coverage": {
            f"{c:.2f}": float(risk[max(0, int(c * len(risk)) - 1)]) for c in (0.5, 0.7, 0.8, 0.9, 1.0)
        },
        "refer_rule": selective.selective_summary(p_test, lab["test"], refer),
    }
    if do_tta:
        views = {s: _view_logits(model, imgs[s], meta[s]) for s in ("val", "test")}
        report["tta"] = _tta(model, state, views, lab, imgs["val"], bins)
    cam_df = _subset(df, "test", n_cam, seed)
    report["cam_test"] = _cam(
        model,
        state,
        cam_df,
        _images(cam_df, manifest_dir, model.prep),
        _meta(cam_df),
        float(cfg["cam"]["pointing_tolerance"]),
        out_dir,
    )
    if "refit here" in report["trust_state"]:
        state.save(out_dir / TRUST)  # again: now with the TTA temperatures
    (out_dir / "trust_report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "trust_report.md").write_text(markdown(report))
    return report


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def markdown(r: dict[str, Any]) -> str:
    """Human-readable summary of a trust report."""
    lines = [
        f"# Trust report: {r['model']} {r['version']} ({r['architecture']})",
        "",
        f"Trust state: {r['trust_state']}. Temperatures: fine {r['temperature']['fine']:.3f}, "
        f"coarse {r['temperature']['coarse']:.3f}.",
        "",
        "## Calibration (top-label ECE, 15 bins)",
        "",
        "| split | n | head | ECE before | ECE after | NLL before | NLL after |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, c in r["calibration"].items():
        for head in ("fine", "coarse"):
            h = c[head]
            lines.append(
                f"| {s} | {c['n']} | {head} | {_f(h['ece_before'])} | {_f(h['ece_after'])} | "
                f"{_f(h['nll_before'])} | {_f(h['nll_after'])} |"
            )
    t = r["calibration"]["test"]["fine"]
    lo, hi = t["ece_after_ci95"]
    lines += [
        "",
        f"Test fine-head ECE after scaling {_f(t['ece_after'])} (95% bootstrap interval {_f(lo)}-{_f(hi)}). "
        f"Test accuracy {_f(t['accuracy'])}, balanced accuracy {_f(t['balanced_accuracy'])}.",
        "",
    ]
    rel = r["reliability_test"]
    lines += ["Reliability (test, fine head, calibrated): confidence bin: n, mean confidence, accuracy", ""]
    lines += [
        f"- {lo:.2f}-{hi:.2f}: {n}, {_f(c)}, {_f(a)}"
        for lo, hi, n, c, a in zip(
            rel["lower"], rel["upper"], rel["count"], rel["confidence"], rel["accuracy"], strict=True
        )
        if n
    ]
    o = r["ood"]
    methods = list(o["thresholds"])
    lines += [
        "",
        f"## Out-of-distribution refusal (default score: {o['default_method']})",
        "",
        f"In-distribution: {o['in_distribution']['set']} (n={o['in_distribution']['n']}); thresholds keep "
        f"{o['keep_target']:.0%} of validation. Test keep rate: "
        + ", ".join(f"{m} {v:.3f}" for m, v in o["in_distribution"]["keep_rate"].items())
        + ".",
        "",
        "AUROC (refused share at the threshold):",
        "",
        "| probe set | n | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for name, row in {
        **o["sets"],
        "ALL far-OOD sets": {**o["all_far"], "n": o["all_far"][methods[0]]["n"]},
    }.items():
        cells = [f"{_f(row[m]['auroc'])} ({_f(row[m]['refused'], 2)})" for m in methods]
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ham_corrupted is near-OOD (inverted / jigsaw-shuffled / blurred test images), not in ALL.",
        "",
    ]
    s = r["selective_test"]
    lines += [
        "## Selective prediction (test)",
        "",
        f"AURC {_f(s['aurc'], 4)}; min_confidence {_f(s['min_confidence'])}; refer rule answers "
        f"{_f(s['refer_rule']['coverage'])} of test images with accuracy "
        f"{_f(s['refer_rule']['accuracy_answered'])} (all images: {_f(s['refer_rule']['accuracy_all'])}).",
        "",
        "Risk at coverage: " + ", ".join(f"{k}: {_f(v)}" for k, v in s["risk_at_coverage"].items()),
        "",
    ]
    if "tta" in r:
        t = r["tta"]
        lines += [
            "## Test-time augmentation (4 views: identity, hflip, vflip, rot180)",
            "",
            f"Cost x{t['cost_factor']} ({t['seconds_per_image']['single'] * 1000:.1f} ms -> "
            f"{t['seconds_per_image']['tta'] * 1000:.1f} ms per image, 1 CPU thread). TTA temperature "
            f"{_f(t['temperature_fine_tta'])} ({t['tta_temperature_source']}).",
            "",
            "| split | n | bal. acc single | bal. acc TTA | acc single | acc TTA | ECE single "
            "| ECE TTA (same T) | ECE TTA (TTA T) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for split in ("val", "test"):
            v = t[split]
            cells = [v["balanced_accuracy"]["single"], v["balanced_accuracy"]["tta"], v["accuracy"]["single"]]
            cells += [
                v["accuracy"]["tta"],
                v["ece"]["single"],
                v["ece"]["tta_single_view_T"],
                v["ece"]["tta"],
            ]
            lines.append(f"| {split} | {v['n']} | " + " | ".join(_f(x) for x in cells) + " |")
        lines.append("")
    c = r["cam_test"]
    lines += ["## Class activation maps vs lesion masks (test, predicted class)", ""]
    if "skipped" in c:
        lines.append(f"Skipped: {c['skipped']}")
    else:
        lines += [
            f"n={c['n']}. Heat inside lesion {_f(c['heat_in_lesion'])} (mask area "
            f"{_f(c['baseline_mask_area_fraction'])}; centred Gaussian "
            f"{_f(c['baseline_center_gaussian_in_lesion'])}). Pointing game {_f(c['pointing_hit_rate'])} "
            f"(tolerance {c['pointing_tolerance_px']:.0f} px of the mask; random point "
            f"{_f(c['baseline_random_point_hit'])}; image centre {_f(c['baseline_center_point_hit'])}).",
            "",
            "Examples: " + ", ".join(c["examples"]),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument(
        "--manifest", type=Path, required=True, help="prepared data dir (manifest.csv with split)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=3000, help="train embeddings for a refit")
    ap.add_argument("--n-cam", type=int, default=300)
    ap.add_argument(
        "--refit", action="store_true", help="fit the trust state here even if the bundle has one"
    )
    ap.add_argument("--no-tta", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "int8"], default=None, help="default: the card's")
    a = ap.parse_args(argv)
    measure(
        a.bundle,
        a.manifest,
        a.out,
        a.n_val,
        a.n_test,
        a.n_train,
        a.n_cam,
        a.refit,
        not a.no_tta,
        a.threads,
        a.seed,
        a.precision,
    )
    print((a.out / "trust_report.md").read_text())


if __name__ == "__main__":
    main()
