"""Self-supervised pretraining (SimCLR, from `lightly`) of a timm backbone on unlabelled dermoscopy images.

Output: <run_dir>/backbone.pt, a headless backbone state dict that `dermlens train model.init=PATH` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, RandomSampler

from dermlens.data.splits import holdout_rows
from dermlens.extras import require
from dermlens.model.weights import init_backbone
from dermlens.preprocess import Preprocessing
from dermlens.train.config import ConfigError, load_config, with_section
from dermlens.train.datamodule import preprocessing_from, read_prepared
from dermlens.train.engine import LAST, finished_before, fit, hardware, mark_finished, setup_run
from dermlens.train.module import lr_schedule

BACKBONE = "backbone.pt"
REPORT = "pretrain.json"


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """configs/pretrain.yaml (train.yaml's keys plus `ssl:`) <- a YAML file <- key=value overrides."""
    return load_config(path, overrides, defaults=with_section("pretrain.yaml", "ssl"))


def pool_rows(data_dir: str, prep: Preprocessing, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """A prepared folder's `train` rows (labels unused); the external validation hold-out is left out."""
    df, images = read_prepared(Path(data_dir).expanduser(), prep)
    ext = cfg["data"].get("external_val")
    if cfg["ssl"].get("exclude_external", True) and ext and Path(ext).resolve() == Path(data_dir).resolve():
        held = holdout_rows(df, float(cfg["data"].get("external_fraction") or 0.25), int(cfg.get("seed", 42)))
        df = df.drop(index=held)
    return images, np.asarray(df.index[df["split"] == "train"])  # manifest row = cache row


class ViewsDataset(Dataset):
    """Two augmented views of each cached uint8 image (lightly's SimCLRTransform on a PIL image)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, transform) -> None:
        self.images, self.rows, self.transform = images, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v0, v1 = self.transform(Image.fromarray(np.asarray(self.images[self.rows[i]])))
        return v0, v1


def simclr_transform(prep: Preprocessing, ssl: dict):
    """SimCLR views with dermoscopy-friendly settings, normalised like the model's Preprocessing."""
    from lightly.transforms import SimCLRTransform

    cj = float(ssl.get("color_jitter", 0.5))
    return SimCLRTransform(
        input_size=int(ssl.get("view_size", 96)),
        min_scale=float(ssl.get("min_scale", 0.3)),
        cj_strength=cj,
        cj_prob=0.8 if cj > 0 else 0.0,
        random_gray_scale=float(ssl.get("gray_prob", 0.1)),
        gaussian_blur=float(ssl.get("blur_prob", 0.3)),
        vf_prob=0.5,
        hf_prob=0.5,
        rr_prob=0.5,
        normalize={"mean": list(prep.mean), "std": list(prep.std)},
    )


class PoolData(L.LightningDataModule):
    """Loader over the unlabelled pool (every `ssl.pool` folder's train rows)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.prep = preprocessing_from(cfg)
        tf = simclr_transform(self.prep, cfg["ssl"])
        parts = [(d, *pool_rows(d, self.prep, cfg)) for d in cfg["ssl"]["pool"]]
        self.counts = {str(d): int(len(rows)) for d, _, rows in parts}
        self.pool = ConcatDataset([ViewsDataset(images, rows, tf) for _, images, rows in parts])

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        world = t.world_size if t is not None else 1
        sampler = (
            DistributedSampler(
                self.pool, num_replicas=world, rank=t.global_rank, seed=int(self.cfg.get("seed", 42))
            )
            if world > 1
            else RandomSampler(self.pool)
        )
        nw = int(self.cfg["data"].get("num_workers", 0))
        return DataLoader(
            self.pool,
            batch_size=int(self.cfg["data"]["batch_size"]),
            sampler=sampler,
            num_workers=nw,
            persistent_workers=nw > 0,
            drop_last=True,
        )


class SimCLRModule(L.LightningModule):
    """A headless timm backbone + projection head trained with the NT-Xent loss."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        import timm
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        m, ssl = cfg["model"], cfg["ssl"]
        self.cfg = cfg
        self.backbone = timm.create_model(m["arch"], pretrained=False, num_classes=0, global_pool="")
        self.init_note = init_backbone(self.backbone, m["arch"], str(m["init"]), m.get("weights_package"))
        self.backbone = self.backbone.to(memory_format=torch.channels_last)
        nf = int(self.backbone.num_features)
        self.head = SimCLRProjectionHead(nf, int(ssl["proj_hidden"]), int(ssl["proj_dim"]))
        self.loss = NTXentLoss(temperature=float(ssl["temperature"]), gather_distributed=True)
        self.epoch_losses: list[float] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled backbone features, as DermNet computes them."""
        return self.backbone.forward_features(x.contiguous(memory_format=torch.channels_last)).mean(
            dim=(2, 3)
        )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        v0, v1 = batch
        z = self.head(self.embed(torch.cat([v0, v1])).float())
        loss = self.loss(*z.chunk(2))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(v0))
        return loss

    def on_train_epoch_end(self) -> None:
        value = self.trainer.callback_metrics.get("train/loss_epoch")
        if value is not None:
            self.epoch_losses.append(float(value))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["epoch_losses"] = list(self.epoch_losses)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_losses = list(checkpoint.get("epoch_losses", []))

    def configure_optimizers(self):
        o = self.cfg["optim"]
        wd = float(o.get("weight_decay", 1e-4))
        groups = [
            {
                "params": self.backbone.parameters(),
                "lr": float(o.get("backbone_lr", o["lr"])),
                "weight_decay": wd,
            },
            {"params": self.head.parameters(), "lr": float(o["lr"]), "weight_decay": wd},
        ]
        opt = torch.optim.AdamW(groups)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": lr_schedule(self, opt, o), "interval": "step"},
        }


def write_outputs(
    run_dir: Path, module: SimCLRModule, dm: PoolData, cfg: dict, seconds: float, reason: str
) -> dict:
    """backbone.pt (fp32 state dict) and pretrain.json (loss per epoch, pool, time, hardware)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.backbone.state_dict().items()}
    torch.save(state, run_dir / BACKBONE)
    report = {
        "method": cfg["ssl"]["method"],
        "arch": cfg["model"]["arch"],
        "init": module.init_note,
        "pool": dm.counts,
        "images": int(sum(dm.counts.values())),
        "view_size": int(cfg["ssl"]["view_size"]),
        "batch_size": int(cfg["data"]["batch_size"]),
        "epochs": len(module.epoch_losses),
        "epoch_losses": [round(v, 4) for v in module.epoch_losses],
        "train_seconds": round(seconds, 1),
        "stop": reason,
        "hardware": hardware(),
        "backbone": str(run_dir / BACKBONE),
    }
    (run_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def pretrain(cfg: dict, resume: bool | None = None) -> dict | None:
    """Run (or resume) SimCLR pretraining; returns the report written to <run_dir>/pretrain.json."""
    require("lightly", "ssl", "self-supervised pretraining")
    if cfg["ssl"].get("method", "simclr") != "simclr":
        raise ConfigError(f"ssl.method {cfg['ssl']['method']!r} is not supported (simclr)")
    run_dir = setup_run(cfg)
    if finished_before(cfg, run_dir, resume):
        return json.loads((run_dir / REPORT).read_text())
    dm = PoolData(cfg)
    module = SimCLRModule(cfg)
    trainer, seconds, reason = fit(cfg, module, dm, run_dir, resume)
    if not trainer.is_global_zero:
        return None
    report = write_outputs(run_dir, module, dm, cfg, seconds, reason)
    mark_finished(run_dir, cfg, reason, run_dir / "checkpoints" / LAST)
    return report
