"""Training throughput: the default configuration (bf16 autocast + channels_last) against plain fp32 NCHW.

Usage: python benchmarks/bench_train.py [--data work/ham10000] [--steps 30] [--workers 0] [key=value ...]
Runs the real DataModule + DermModule training step (augmentation, loss, AdamW step) for a few dozen steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


class Runner:
    """One configuration's real training step (DataModule batches, DermModule loss, AdamW step)."""

    def __init__(self, cfg: dict, bf16: bool) -> None:
        from dermlens.train.datamodule import DermDataModule
        from dermlens.train.module import DermModule

        dm = DermDataModule(cfg)
        self.module = DermModule(cfg, list(dm.classes), dm.class_counts().tolist(), dm.prep.to_dict()).train()
        self.opt = torch.optim.AdamW(self.module.net.parameters(), lr=1e-4)
        self.loader, self.bf16 = dm.train_dataloader(), bf16
        self.it = iter(self.loader)

    def steps(self, n: int) -> float:
        """Run n steps; images/second."""
        n_img, t0 = 0, time.perf_counter()
        for _ in range(n):
            try:
                image, meta, y, yc = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                image, meta, y, yc = next(self.it)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                fine, coarse = self.module(image, meta)
                loss = self.module._loss(fine, coarse, y, yc)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            n_img += len(y)
        return n_img / (time.perf_counter() - t0)


def main() -> None:
    from dermlens.train.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.overrides + ([f"data.dir={a.data}"] if a.data else []))
    cfg["data"]["limit_train"] = int(cfg["data"]["batch_size"]) * 16
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg["model"]["channels_last"] = False
    runners = {
        "default": Runner(cfg, bf16=True),
        "fp32_cl": Runner(cfg, bf16=False),
        "plain": Runner(plain_cfg, bf16=False),
    }
    for r in runners.values():
        r.steps(2)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, a.steps // a.rounds)
    for _ in range(a.rounds):  # interleaved rounds: a shared machine's load drifts, both see the same drift
        for k, r in runners.items():
            rates[k].append(r.steps(per_round))
    default, plain = (statistics.median(rates[k]) for k in ("default", "plain"))
    arch, bs = cfg["model"]["arch"], cfg["data"]["batch_size"]
    print(f"{arch}, batch {bs}, {a.threads} threads, {a.rounds} interleaved rounds x {per_round} steps each")
    labels = {
        "default": "default (bf16 autocast + channels_last)",
        "fp32_cl": "fp32 + channels_last (release precision)",
        "plain": "plain fp32 NCHW",
    }
    for k, label in labels.items():
        med, best = statistics.median(rates[k]), max(rates[k])
        print(
            f"{label:42s} median {med:6.1f}  best {best:6.1f} img/s  rounds {[round(x, 1) for x in rates[k]]}"
        )
    best_ratio = max(rates["default"]) / max(rates["plain"])
    print(f"speed-up default / plain: {default / plain:.2f}x (medians), {best_ratio:.2f}x (best rounds)")


if __name__ == "__main__":
    main()
