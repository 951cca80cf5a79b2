"""Frozen-feature proxy ablation: imbalance handling x metadata fusion, scored on the validation split.

Extracts frozen ImageNet backbone features once (train: plain + h-flip views; val: plain), then trains the
real FusionHead with each option. It is a PROXY for fine-tuning: it ranks options cheaply, it does not
predict fine-tuned accuracy. Usage: python benchmarks/ablate.py [--config FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dermlens.model.network import DermNet, FusionHead
from dermlens.train.losses import ImbalanceLoss
from dermlens.train.sampling import sample_weights

OPTIONS: dict[str, tuple[str, str]] = {  # name -> (loss, sampler)
    "ce": ("ce", "none"),
    "weighted_ce": ("weighted_ce", "none"),
    "focal": ("focal", "none"),
    "label_smoothing": ("label_smoothing", "none"),
    "logit_adjust": ("logit_adjust", "none"),
    "ce+sqrt_sampler": ("ce", "sqrt"),
    "ce+inverse_sampler": ("ce", "inverse"),
}


@torch.no_grad()
def extract(net: DermNet, loader: DataLoader, flip: bool = False) -> np.ndarray:
    """Pooled image features [N, D] with bf16 autocast + channels_last (optionally of h-flipped images)."""
    from dermlens.train.augment import TorchNormalize

    norm = TorchNormalize(loader.dataset.prep)
    feats = []
    for image, *_ in loader:
        x = norm(image.flip(-1) if flip else image).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats.append(net.embedding(x).float())
    return torch.cat(feats).numpy()


def features(cfg: dict, out: Path) -> dict[str, np.ndarray]:
    """Load cached features or extract them from the prepared data."""
    from dermlens.train.augment import eval_transform
    from dermlens.train.datamodule import CacheDataset, DermDataModule

    path = out / "features.npz"
    dm = DermDataModule(cfg)
    if path.is_file():
        f = dict(np.load(path))
        if len(f["val_y"]) == len(dm.val) and len(f["train_y"]) == len(dm.train):
            return f
    net = DermNet(cfg["model"]["arch"], len(dm.classes), False, cfg["model"].get("init", "imagenet")).eval()
    net = net.to(memory_format=torch.channels_last)
    res: dict[str, np.ndarray] = {"classes": np.array(dm.classes)}
    for name, split in (("train", dm.train), ("val", dm.val)):
        ds = CacheDataset(dm.images, split, eval_transform(dm.prep))
        ds.prep = dm.prep
        loader = DataLoader(ds, batch_size=64, shuffle=False)
        t0 = time.time()
        res[f"{name}_x"] = extract(net, loader)
        if name == "train":
            res["train_xflip"] = extract(net, loader, flip=True)
        print(f"  {name}: {len(split)} images, features in {time.time() - t0:.0f}s", flush=True)
        res[f"{name}_y"], res[f"{name}_yc"], res[f"{name}_meta"] = split.fine, split.coarse, split.meta
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, **res)
    return res


def fit_head(f: dict, loss: str, sampler: str, metadata: bool, seed: int, epochs: int = 12) -> dict:
    """Train a FusionHead on frozen features; score the final epoch on val (no val-based selection)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    torch.manual_seed(seed)
    x = torch.tensor(np.concatenate([f["train_x"], f["train_xflip"]]))
    y = torch.tensor(np.concatenate([f["train_y"], f["train_y"]]))
    yc = torch.tensor(np.concatenate([f["train_yc"], f["train_yc"]]))
    meta = torch.tensor(np.concatenate([f["train_meta"], f["train_meta"]]))
    n_cls = len(f["classes"])
    counts = np.bincount(f["train_y"], minlength=n_cls)
    ccounts = np.bincount(f["train_yc"], minlength=2)
    head = FusionHead(x.shape[1], n_cls, metadata)
    lf, lc = ImbalanceLoss(loss, counts), ImbalanceLoss(loss, ccounts)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    bs, n = 512, len(y)
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    w = torch.tensor(sample_weights(y.numpy(), sampler)) if sampler != "none" else None
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        order = (
            torch.multinomial(w, n, True, generator=g) if w is not None else torch.randperm(n, generator=g)
        )
        for i in range(n // bs):
            idx = order[i * bs : (i + 1) * bs]
            fine, coarse = head(x[idx], meta[idx])
            total = lf(fine, y[idx]) + 0.5 * lc(coarse, yc[idx])
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        fine, coarse = head(torch.tensor(f["val_x"]), torch.tensor(f["val_meta"]))
    p = fine.softmax(1).numpy()
    vy = f["val_y"]
    return {
        "bal_acc": float(balanced_accuracy_score(vy, p.argmax(1))),
        "macro_auc": float(
            roc_auc_score(vy, p, multi_class="ovr", average="macro", labels=list(range(n_cls)))
        ),
        "coarse_auc": float(roc_auc_score(f["val_yc"], coarse.softmax(1)[:, 1].numpy())),
    }


def run(cfg: dict, out: Path, seeds: int = 2) -> dict:
    """All options x metadata off/on, averaged over seeds; writes results.json and results.md."""
    t0 = time.time()
    f = features(cfg, out)
    t_feat = time.time() - t0
    torch.set_num_threads(1)  # tiny head updates: one thread avoids oversubscription on a shared CPU
    rows = []
    for meta in (False, True):
        for name, (loss, sampler) in OPTIONS.items():
            scores = [fit_head(f, loss, sampler, meta, s) for s in range(seeds)]
            row = {"option": name, "metadata": meta, "loss": loss, "sampler": sampler}
            for k in scores[0]:
                vals = [s[k] for s in scores]
                row[k], row[f"{k}_sd"] = float(np.mean(vals)), float(np.std(vals))
            rows.append(row)
            print(
                f"  {name:20s} meta={meta!s:5s} BA={row['bal_acc']:.4f} AUC={row['macro_auc']:.4f}",
                flush=True,
            )
    best = max(rows, key=lambda r: r["bal_acc"])
    by_meta = {m: float(np.mean([r["bal_acc"] for r in rows if r["metadata"] == m])) for m in (False, True)}
    result = {
        "proxy": "frozen ImageNet features + trained FusionHead (NOT fine-tuning); ranks options only",
        "arch": cfg["model"]["arch"],
        "n_train": int(len(f["train_y"])),
        "n_val": int(len(f["val_y"])),
        "seeds": seeds,
        "feature_seconds": round(t_feat, 1),
        "total_seconds": round(time.time() - t0, 1),
        "rows": rows,
        "best": best,
        "mean_bal_acc_by_metadata": {"off": by_meta[False], "on": by_meta[True]},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    """The ablation as a markdown table."""
    lines = [
        "# Imbalance x metadata ablation (frozen-feature proxy)",
        "",
        f"**This is a frozen-feature proxy**: {r['arch']} ImageNet features are extracted once",
        "(train: plain + h-flip), then only the fusion heads are trained.",
        "It ranks options; it does not measure fine-tuning.",
        f"Validation split, n_train={r['n_train']}, n_val={r['n_val']}, mean ± sd over {r['seeds']} seeds, "
        f"final epoch (no selection on val). Runtime {r['total_seconds']:.0f}s.",
        "",
        "| option | metadata | val balanced acc | val macro AUC | val benign/malignant AUC |",
        "|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['option']} | {'on' if x['metadata'] else 'off'} | "
            f"{x['bal_acc']:.4f} ± {x['bal_acc_sd']:.4f} | "
            f"{x['macro_auc']:.4f} ± {x['macro_auc_sd']:.4f} | {x['coarse_auc']:.4f} |"
        )
    b = r["best"]
    lines += [
        "",
        f"Best balanced accuracy: **{b['option']}**, metadata {'on' if b['metadata'] else 'off'} "
        f"({b['bal_acc']:.4f}). Mean BA over options: "
        f"metadata off {r['mean_bal_acc_by_metadata']['off']:.4f}, "
        f"on {r['mean_bal_acc_by_metadata']['on']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from dermlens.settings import work_dir
    from dermlens.train.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", default=str(work_dir() / "ablation"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    torch.set_num_threads(int(cfg["trainer"].get("threads") or os.cpu_count() or 1))
    r = run(cfg, Path(a.out), a.seeds)
    print(markdown(r))


if __name__ == "__main__":
    main()
