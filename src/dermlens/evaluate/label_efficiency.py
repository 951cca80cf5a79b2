"""Label efficiency: fine-tune from ImageNet and from an SSL encoder on 10-100% of the train lesions.

One resumable run per (init, fraction) under `run_root`; each is scored on HAM10000 val and test (lesion-level
bootstrap CIs) and on ISIC 2017 test (melanoma AUC). Configuration: configs/label_efficiency.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens import __version__
from dermlens import config as configuration
from dermlens.evaluate import EvaluateConfig, evaluate_arrays
from dermlens.evaluate.external import isic2017_scores
from dermlens.infer.calibration import softmax

EVAL = "label_eval.json"


def load_study(path: str | Path | None = None) -> dict:
    """configs/label_efficiency.yaml <- a user file with the same keys (the one config loader)."""
    return configuration.load("label_efficiency", path, what="label-efficiency study")


def run_config(study: dict, init_name: str, fraction: float) -> dict:
    """The training config of one (init, fraction) cell."""
    from dermlens.train.config import load_config

    init = str(study["inits"][init_name])
    epochs = int(study["epochs"][str(fraction)])
    name = f"{init_name}_{int(round(fraction * 100)):03d}"
    overrides = [
        *study["overrides"],
        f"model.init={init}",
        f"data.label_fraction={fraction}",
        f"trainer.max_epochs={epochs}",
        f"trainer.name=le_{name}",
        f"trainer.run_dir={Path(study['run_root']) / name}",
    ]
    return load_config(study.get("train_config"), overrides)


def predict_test(run_dir: Path, cfg: dict, data_dir: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Softmax probabilities of a run's model.pt on a prepared folder's test rows of known classes."""
    import torch

    from dermlens.model.network import build_network
    from dermlens.train.augment import TorchNormalize, eval_transform
    from dermlens.train.datamodule import CacheDataset, SplitData, preprocessing_from, read_prepared

    prep = preprocessing_from(cfg)
    classes = tuple(json.loads((run_dir / "metrics_val.json").read_text())["classes"])
    df, images = read_prepared(Path(data_dir).expanduser(), prep)
    df = df.assign(split=np.where(df["diagnosis"].isin(classes), df["split"], "-"))
    part = SplitData(df, "test", classes, None, 0)
    net = build_network({**cfg["model"], "init": "random"}, len(classes))
    net.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    norm = TorchNormalize(prep)
    loader = torch.utils.data.DataLoader(CacheDataset(images, part, eval_transform(prep)), batch_size=64)
    out = []
    with torch.no_grad():
        for image, meta, _, _ in loader:
            fine, _ = net.eval()(norm(image), meta)
            out.append(torch.softmax(fine.float(), dim=1).numpy())
    return np.concatenate(out), part.fine, df.iloc[part.rows]


def score_run(run_dir: Path, cfg: dict, study: dict) -> dict:
    """Val and test balanced accuracy (lesion-level CIs) and ISIC 2017 test melanoma AUC of one run."""
    from dermlens.data.manifest import read_manifest

    ecfg = EvaluateConfig.load(n_resamples=int(study["n_resamples"]))
    val = np.load(run_dir / "val_outputs.npz")
    classes = [str(c) for c in val["classes"]]
    manifest = read_manifest(Path(study["test"]["ham"])).set_index("image_id")
    val_groups = manifest.loc[[str(i) for i in val["image_ids"]], "group_id"].to_numpy()
    val_m = evaluate_arrays(
        softmax(val["fine_logits"]), val["fine_labels"], classes, groups=val_groups, config=ecfg
    )
    p, y, rows = predict_test(run_dir, cfg, study["test"]["ham"])
    test_m = evaluate_arrays(p, y, classes, groups=rows["group_id"].to_numpy(), config=ecfg)
    p, _, rows = predict_test(run_dir, cfg, study["test"]["isic2017"])
    ext = isic2017_scores(p, tuple(classes), rows["diagnosis"].tolist(), ecfg.n_resamples)
    return {
        "val_bal_acc": val_m["overall"]["balanced_accuracy"],
        "test_bal_acc": test_m["overall"]["balanced_accuracy"],
        "isic2017_test_mel_auc": ext["melanoma_auc"],
        "isic2017_test_bal_acc3": ext["three_class"]["balanced_accuracy"],
    }


def n_labelled(cfg: dict) -> int:
    """HAM10000 training images a cell's label fraction keeps."""
    from dermlens.data.manifest import read_manifest
    from dermlens.train.datamodule import label_subset

    df = read_manifest(Path(cfg["data"]["dir"]))
    df = label_subset(df, cfg["data"]["label_fraction"], int(cfg.get("seed", 42)))
    return int((df["split"] == "train").sum())


def run_cell(study: dict, init_name: str, fraction: float) -> dict:
    """Train (or skip, when finished) and score one cell; the score is kept in <run>/label_eval.json."""
    from dermlens.train.engine import train

    cfg = run_config(study, init_name, fraction)
    run_dir = Path(cfg["trainer"]["run_dir"])
    metrics = train(cfg)
    done = run_dir / EVAL
    if done.is_file():
        return json.loads(done.read_text())
    seconds = json.loads((run_dir / "train_seconds.json").read_text())["seconds"]
    cell = {
        "init": init_name,
        "fraction": fraction,
        "n_train_images": n_labelled(cfg),
        "epochs": int(cfg["trainer"]["max_epochs"]),
        "best_epoch": metrics.get("best_epoch"),
        "train_seconds": round(float(seconds), 1),
        **score_run(run_dir, cfg, study),
    }
    done.write_text(json.dumps(cell, indent=2) + "\n")
    return cell


def plot(cells: list[dict], path: Path) -> None:
    """Balanced accuracy (val, test) and ISIC 2017 melanoma AUC against the label fraction, with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("val_bal_acc", "HAM10000 val BA"),
        ("test_bal_acc", "HAM10000 test BA"),
        ("isic2017_test_mel_auc", "ISIC 2017 test melanoma AUC"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for init in sorted({c["init"] for c in cells}):
            rows = sorted((c for c in cells if c["init"] == init), key=lambda c: c["fraction"])
            x = [100 * c["fraction"] for c in rows]
            v = np.array([c[key]["value"] for c in rows])
            err = np.array(
                [[c[key]["value"] - c[key]["ci_low"], c[key]["ci_high"] - c[key]["value"]] for c in rows]
            ).T
            ax.errorbar(x, v, yerr=err, marker="o", capsize=3, label=init)
        ax.set_xscale("log")
        ax.set_xticks([10, 25, 50, 100], ["10%", "25%", "50%", "100%"])
        ax.set_xlabel("share of training lesions with labels")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(title="initialisation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(study: dict) -> dict:
    """Every (init, fraction) cell, then the results JSON and plot; re-running resumes where it stopped."""
    from dermlens.train.engine import hardware

    cells = [run_cell(study, i, float(f)) for i in study["inits"] for f in study["fractions"]]
    init_files = {k: str(v) for k, v in study["inits"].items()}
    ssl_report = Path(str(study["inits"].get("ssl", ""))).with_name("pretrain.json")
    out = {
        "experiment": "label efficiency: ImageNet vs SSL (SimCLR) initialisation",
        "dermlens_version": __version__,
        "inits": init_files,
        "pretrain": json.loads(ssl_report.read_text()) if ssl_report.is_file() else None,
        "recipe_overrides": list(study["overrides"]),
        "ci": f"95% percentile interval, lesion-level bootstrap ({study['n_resamples']} resamples)",
        "hardware": hardware(),
        "cells": cells,
    }
    Path(study["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(study["out"]).write_text(json.dumps(out, indent=2) + "\n")
    plot(cells, Path(study["plot"]))
    return out
