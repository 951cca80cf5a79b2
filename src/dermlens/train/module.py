"""LightningModule: two-level loss, AdamW with per-step warm-up + cosine, optional EMA, val balanced acc."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from dermlens.data.taxonomy import MALIGNANT as _MAL
from dermlens.extras import require
from dermlens.model.network import DermNet, build_network
from dermlens.preprocess import Preprocessing
from dermlens.train.augment import TorchNormalize
from dermlens.train.datamodule import train_source_names, val_set_names
from dermlens.train.losses import build_loss


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def cosine_at(progress: float, min_ratio: float) -> float:
    """Cosine decay from 1 to min_ratio as progress goes 0 -> 1."""
    t = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def external_scores(parts: list[tuple[torch.Tensor, torch.Tensor]], classes: tuple[str, ...]) -> dict:
    """Balanced accuracy over the external set's own classes (argmax among them) and melanoma AUC."""
    probs = torch.cat([p for p, _ in parts]).numpy()
    y = torch.cat([t for _, t in parts]).numpy()
    present = sorted(set(y.tolist()))
    sub = probs[:, present].argmax(1)
    pred = np.asarray(present)[sub]
    out = {"bal_acc3": float(np.mean([(pred[y == c] == c).mean() for c in present]))}
    if "mel" in classes and 0 < (y == classes.index("mel")).sum() < len(y):
        roc_auc_score = require("sklearn.metrics", "train").roc_auc_score

        mel = classes.index("mel")
        out["mel_auc"] = float(roc_auc_score(y == mel, probs[:, mel]))
    return out


SELECT_RULES = ("mean", "worst")
ValBatch = tuple[torch.Tensor, torch.Tensor]  # (probabilities, labels) of one validation batch


def select_figure(figures: list[float], rule: str) -> float:
    """val/select from the per-source val balanced accuracies: their mean, or the worst (lowest) one."""
    if rule not in SELECT_RULES:
        raise ValueError(f"trainer.select must be one of {', '.join(SELECT_RULES)}, not {rule!r}")
    return float(np.mean(figures)) if rule == "mean" else float(min(figures))


def batch_mixer(aug: dict, n_classes: int):
    """timm's Mixup (mixup and/or cutmix on a batch, soft targets), or None when both alphas are 0."""
    mixup, cutmix = float(aug.get("mixup_alpha", 0) or 0), float(aug.get("cutmix_alpha", 0) or 0)
    if mixup <= 0 and cutmix <= 0:
        return None
    Mixup = require("timm.data", "train").Mixup
    prob = float(aug.get("mix_prob", 1.0))
    return Mixup(mixup, cutmix, prob=prob, label_smoothing=0.0, num_classes=n_classes)


def lr_schedule(module: L.LightningModule, opt, o: dict):
    """Warm-up then cosine per step, or cosine over wall-clock progress when a TimeBudget is set."""
    from dermlens.train.budget import TimeBudget

    trainer = module.trainer
    total = int(trainer.estimated_stepping_batches)
    warmup = int(float(o.get("warmup_epochs", 0.5)) * total / max(1, trainer.max_epochs))
    min_ratio = float(o.get("min_lr_ratio", 0.01))
    budget = next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)
    if budget is None:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, min_ratio))

    def time_lambda(s: int) -> float:  # adapts to the machine's (shared) speed
        return (
            warmup_cosine(s, warmup, total, min_ratio)
            if s < warmup
            else cosine_at(budget.progress(), min_ratio)
        )

    return torch.optim.lr_scheduler.LambdaLR(opt, time_lambda)


class DermModule(L.LightningModule):
    """Trains a DermNet on (image uint8, meta, fine, coarse) batches."""

    def __init__(self, cfg: dict, classes: list[str], counts: list[int], prep: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        prep = Preprocessing.from_dict(prep)
        self.cfg, self.classes = cfg, tuple(classes)
        self.net: DermNet = build_network(cfg["model"], len(classes))
        self.normalize = TorchNormalize(prep)
        self.channels_last = bool(cfg["model"].get("channels_last", True))
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        counts = np.asarray(counts)
        coarse_counts = np.array(
            [
                counts[[i for i, c in enumerate(classes) if c not in _MAL]].sum(),
                counts[[i for i, c in enumerate(classes) if c in _MAL]].sum(),
            ]
        )
        self.fine_loss = build_loss(cfg["loss"], counts)
        self.coarse_loss = build_loss(cfg["loss"], coarse_counts)
        self.coarse_weight = float(cfg["loss"].get("coarse_weight", 0.5))
        self.mix = batch_mixer(cfg.get("augment", {}), len(classes))
        self.dro_eta = float(cfg["loss"].get("group_dro_eta", 0) or 0)
        self.sources = train_source_names(cfg)
        n_src = len(self.sources)
        # GroupDRO weight of each training source (not in checkpoints: a resumed run starts it afresh)
        self.register_buffer("dro_q", torch.full((n_src,), 1.0 / n_src), persistent=False)
        malignant = torch.tensor([c in _MAL for c in classes])
        self.register_buffer("malignant", malignant, persistent=False)  # soft fine -> soft coarse targets
        decay = float(cfg["optim"].get("ema", 0.0) or 0.0)
        self.ema = None
        if decay > 0:
            ModelEmaV3 = require("timm.utils", "train").ModelEmaV3

            self.ema = ModelEmaV3(self.net, decay=decay, use_warmup=True)
            self.ema.requires_grad_(False)
        n = len(classes)
        # per-class recall, averaged over the classes val has (an eight-class model on seven-class val)
        self.val_recall = MulticlassAccuracy(num_classes=n, average=None)
        self.register_buffer("val_support", torch.zeros(n, dtype=torch.long), persistent=False)
        self.val_auc = MulticlassAUROC(num_classes=n, average="macro")
        self.val_coarse_auc = MulticlassAUROC(num_classes=2, average="macro")

    # -- helpers -------------------------------------------------------------------------------
    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        x = self.normalize(image)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def eval_net(self) -> DermNet:
        """The network used for validation and export: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.net

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(self.prepare(image), meta)

    def _loss(self, fine, coarse, y, yc) -> torch.Tensor:
        return self.fine_loss(fine, y) + self.coarse_weight * self.coarse_loss(coarse, yc)

    # -- freezing ------------------------------------------------------------------------------
    def _frozen_now(self) -> bool:
        return self.current_epoch < int(self.cfg["trainer"].get("freeze_epochs", 0) or 0)

    def on_train_epoch_start(self) -> None:
        blocks = int(self.cfg["trainer"].get("freeze_blocks", -1))
        self.net.freeze_stages(blocks if self._frozen_now() else 0)
        self.net.train()  # Lightning keeps per-module modes across epochs: undo last epoch's frozen-BN eval()
        if self._frozen_now():  # keep frozen BatchNorm statistics fixed too
            for m in self.net.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters()
                ):
                    m.eval()

    # -- steps ---------------------------------------------------------------------------------
    def _dro_loss(self, fine, coarse, y, yc, source: torch.Tensor) -> torch.Tensor:
        """GroupDRO (Sagawa et al. 2020, online): each source's batch loss, weighted by q, where q grows by
        exp(eta * loss) for the sources that fit worst; the sources in the batch share the step."""
        present = torch.unique(source)
        losses = torch.stack(
            [self._loss(fine[m], coarse[m], y[m], yc[m]) for m in (source == s for s in present)]
        )
        with torch.no_grad():
            self.dro_q[present] *= torch.exp(self.dro_eta * losses.detach().float())
            if self.trainer.world_size > 1:  # every rank saw other images: keep one q
                self.dro_q.copy_(self.all_gather(self.dro_q).mean(0))
            self.dro_q /= self.dro_q.sum()
        q = self.dro_q[present]
        for i, name in enumerate(self.sources):
            self.log(f"train/dro_q_{name}", self.dro_q[i], on_step=False, on_epoch=True)
        return (q * losses).sum() / q.sum()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        image, meta, y, yc, *source = batch
        x = self.prepare(image)
        if self.mix is not None:  # mixup/cutmix on the normalised batch: soft fine and coarse targets
            x, y = self.mix(x, y)
            yc = torch.stack([y[:, ~self.malignant].sum(1), y[:, self.malignant].sum(1)], 1)
        fine, coarse = self.net(x, meta)
        if source and self.dro_eta > 0:
            loss = self._dro_loss(fine, coarse, y, yc, source[0])
        else:
            loss = self._loss(fine, coarse, y, yc)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step=self.global_step)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        image, meta, y, yc = batch
        fine, coarse = self.eval_net()(self.prepare(image), meta)
        fine, coarse = fine.float(), coarse.float()
        if dataloader_idx > 0:  # the external and per-source validation sets: scored at epoch end
            self._extra.setdefault(dataloader_idx, []).append((fine.softmax(1).cpu(), y.cpu()))
            return
        loss = self._loss(fine, coarse, y, yc)
        self.val_recall.update(fine, y)
        self.val_support += torch.bincount(y, minlength=len(self.classes))
        self.val_auc.update(fine.softmax(1), y)
        self.val_coarse_auc.update(coarse.softmax(1), yc)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y), add_dataloader_idx=False)

    def on_validation_epoch_start(self) -> None:
        self._extra: dict[int, list[ValBatch]] = {}

    def _gathered(self, parts: list[ValBatch]) -> list[ValBatch]:
        """Every rank scored a shard: the whole set (unchanged on one process)."""
        if self.trainer.world_size == 1:
            return parts
        probs, y = (torch.cat([t[i] for t in parts]).to(self.device) for i in (0, 1))
        return [(self.all_gather(probs).flatten(0, 1).cpu(), self.all_gather(y).flatten(0, 1).cpu())]

    def on_validation_epoch_end(self) -> None:
        counts = (
            self.val_support if self.trainer.world_size == 1 else self.all_gather(self.val_support).sum(0)
        )
        support = counts > 0
        bal_acc = self.val_recall.compute()[support].mean() if bool(support.any()) else torch.tensor(0.0)
        self.val_support.zero_()
        self.log("val/bal_acc", bal_acc, prog_bar=True, sync_dist=False)
        self.log("val/auc", self.val_auc.compute(), prog_bar=True)
        self.log("val/coarse_auc", self.val_coarse_auc.compute())
        for m in (self.val_recall, self.val_auc, self.val_coarse_auc):
            m.reset()
        figures = [float(bal_acc)]
        names = val_set_names(self.cfg)
        for idx, parts in sorted(self._extra.items()):
            scores = external_scores(self._gathered(parts), self.classes)
            name = names[idx]
            if name == "ext":
                for k, v in scores.items():
                    self.log(f"ext/{k}", v, prog_bar=k == "bal_acc3")
            else:
                self.log(f"val_{name}/bal_acc", scores["bal_acc3"], prog_bar=True)
                if "mel_auc" in scores:
                    self.log(f"val_{name}/mel_auc", scores["mel_auc"])
            figures.append(scores["bal_acc3"])
        self.log("val/select", select_figure(figures, str(self.cfg["trainer"].get("select", "mean"))))

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg["optim"]
        head = list(self.net.head.parameters())
        back = list(self.net.backbone.parameters())
        wd = float(o.get("weight_decay", 1e-4))
        groups = [
            {"params": back, "lr": float(o.get("backbone_lr", o["lr"])), "weight_decay": wd},
            {"params": head, "lr": float(o["lr"]), "weight_decay": wd},
        ]
        opt = torch.optim.AdamW(groups)
        sched = lr_schedule(self, opt, o)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
