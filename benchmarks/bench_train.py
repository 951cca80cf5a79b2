"""Training throughput: the default configuration (bf16 autocast + channels_last) against plain fp32 NCHW.

Usage: python benchmarks/bench_train.py [--data work/ham10000] [--steps 30] [--workers 0] [key=value ...]
Runs the real DataModule + DermModule training step (augmentation, loss, AdamW step) for a few dozen steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def measure(cfg: dict, steps: int, bf16: bool, warmup: int = 3) -> float:
    """Training images/second over `steps` optimizer steps (after `warmup` untimed steps)."""
    from dermlens.train.datamodule import DermDataModule
    from dermlens.train.module import DermModule

    dm = DermDataModule(cfg)
    module = DermModule(cfg, list(dm.classes), dm.class_counts().tolist(), dm.prep.to_dict())
    module.train()
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    it = iter(dm.train_dataloader())
    n_img, t0 = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            n_img, t0 = 0, time.perf_counter()
        image, meta, y, yc = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fine, coarse = module(image, meta)
            loss = module._loss(fine, coarse, y, yc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_img += len(y)
    return n_img / (time.perf_counter() - t0)


def main() -> None:
    from dermlens.train.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.overrides + ([f"data.dir={a.data}"] if a.data else []))
    cfg["data"]["limit_train"] = max(int(cfg["data"]["batch_size"]) * (a.steps + 4), 64)
    default = measure(cfg, a.steps, bf16=True)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg["model"]["channels_last"] = False
    plain = measure(plain_cfg, a.steps, bf16=False)
    arch, bs = cfg["model"]["arch"], cfg["data"]["batch_size"]
    print(f"{arch}, batch {bs}, {a.threads} threads, {a.steps} steps each (train step incl. augmentation)")
    print(f"default (bf16 autocast + channels_last): {default:7.1f} img/s")
    print(f"plain fp32 NCHW:                         {plain:7.1f} img/s")
    print(f"speed-up: {default / plain:.2f}x")


if __name__ == "__main__":
    main()
