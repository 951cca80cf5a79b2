"""Knowledge distillation: one student trained with soft targets from a teacher bundle (e.g. an ensemble).

The teacher's fine and coarse logits are computed ONCE on the training images with onnxruntime (its fp32
graph, full metadata, no augmentation) and stored in RUN/teacher.npz; the student then trains with the
ordinary engine (checkpoints, resume, time budget) on
    loss = (1 - alpha) * hard loss + alpha * T^2 * [KL(teacher_T || student_T) + coarse_weight * same],
where X_T = softmax(logits / T). Augmented crops reuse the teacher's logits of the whole image.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from dermlens.errors import DistillError  # noqa: F401 (re-exported)
from dermlens.train.datamodule import DermDataModule
from dermlens.train.module import DermModule

TEACHER_FILE = "teacher.npz"
Log = Callable[[str], None]


def teacher_logits(
    bundle: str | Path,
    data_dir: str | Path,
    out: Path,
    splits: tuple[str, ...] = ("train",),
    log: Log = print,
) -> Path:
    """Score the labelled rows of `splits` with the teacher's fp32 ONNX graph; write OUT (once per
    teacher version)."""
    from dermlens.bundle import ONNX_FP32, read_card
    from dermlens.data.cache import open_cache
    from dermlens.data.manifest import read_manifest
    from dermlens.infer.session import OnnxModel
    from dermlens.metadata import META_DIM, encode_rows

    card = read_card(Path(bundle))
    if out.is_file():
        with np.load(out) as z:
            if str(z["teacher_version"]) == card.version:
                log(f"teacher logits of {card.version} already in {out}, reused")
                return out
    df = read_manifest(data_dir)
    rows = np.flatnonzero(df["split"].isin(splits).to_numpy() & (df["diagnosis"].to_numpy() != "unk"))
    sub = df.iloc[rows]
    images = open_cache(data_dir, card.preprocessing)
    meta = (
        encode_rows(sub["age"].tolist(), sub["sex"].tolist(), sub["site"].tolist())
        if card.uses_metadata
        else np.zeros((len(sub), META_DIM), np.float32)
    )
    model = OnnxModel(Path(bundle) / ONNX_FP32)
    fine, coarse = [], []
    step = 256
    for s in range(0, len(rows), step):
        o = model.run_images(np.asarray(images[rows[s : s + step]]), card.preprocessing, meta[s : s + step])
        fine.append(o["fine_logits"])
        coarse.append(o["coarse_logits"])
        log(f"teacher logits: {min(s + step, len(rows))}/{len(rows)} images")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        image_ids=sub["image_id"].to_numpy().astype(str),
        fine_logits=np.concatenate(fine).astype(np.float32),
        coarse_logits=np.concatenate(coarse).astype(np.float32),
        classes=np.array(card.classes),
        teacher_version=np.array(card.version),
        teacher_bundle=np.array(str(bundle)),
    )
    return out


class TeacherDataset(Dataset):
    """A training dataset's items plus the teacher's fine and coarse logits of the same image."""

    def __init__(self, base: Dataset, fine: np.ndarray, coarse: np.ndarray) -> None:
        self.base, self.fine, self.coarse = base, torch.from_numpy(fine), torch.from_numpy(coarse)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return (*self.base[i], self.fine[i], self.coarse[i])


class DistillDataModule(DermDataModule):
    """DermDataModule whose training batches carry the teacher's logits (cfg['distill']['teacher_logits'])."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        paths = [Path(p) for p in cfg["distill"]["teacher_logits"]]
        parts = [self.train, *(part for _, part in self.extra)]  # the training ConcatDataset's order
        if len(paths) != len(parts):
            raise DistillError(f"{len(paths)} teacher logit files for {len(parts)} training sources")
        pairs = [self._aligned(p, part.image_ids) for p, part in zip(paths, parts, strict=True)]
        self.teacher_fine = np.concatenate([f for f, _ in pairs])
        self.teacher_coarse = np.concatenate([c for _, c in pairs])

    def _aligned(self, path: Path, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A teacher file's fine and coarse logits in the order of one training source's images."""
        with np.load(path) as z:
            pos = {str(i): n for n, i in enumerate(z["image_ids"])}
            if tuple(str(c) for c in z["classes"]) != tuple(self.classes):
                raise DistillError(
                    f"teacher classes {list(z['classes'])} differ from the data's {list(self.classes)}"
                )
            missing = [i for i in image_ids if i not in pos]
            if missing:
                raise DistillError(f"{path} has no teacher logits for {len(missing)} training images")
            idx = np.array([pos[i] for i in image_ids], dtype=np.int64)
            return (
                np.asarray(z["fine_logits"][idx], np.float32),
                np.asarray(z["coarse_logits"][idx], np.float32),
            )

    def train_dataloader(self) -> DataLoader:
        base = super().train_dataloader()
        ds = TeacherDataset(base.dataset, self.teacher_fine, self.teacher_coarse)
        return DataLoader(
            ds,
            batch_size=base.batch_size,
            sampler=base.sampler,
            num_workers=base.num_workers,
            persistent_workers=base.num_workers > 0,
            drop_last=base.drop_last,
        )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    s = F.log_softmax(student.float() / t, dim=1)
    p = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


class DistillModule(DermModule):
    """DermModule trained on (1 - alpha) * hard loss + alpha * soft-target loss (cfg['distill'])."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        image, meta, y, yc, t_fine, t_coarse = batch
        d = self.cfg["distill"]
        alpha, temp = float(d["alpha"]), float(d["temperature"])
        fine, coarse = self(image, meta)
        hard = self._loss(fine, coarse, y, yc)
        soft = kd_loss(fine, t_fine, temp) + self.coarse_weight * kd_loss(coarse, t_coarse, temp)
        loss = (1 - alpha) * hard + alpha * soft
        n = len(y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/kd", soft, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/hard", hard, on_step=False, on_epoch=True, batch_size=n)
        return loss


def student_config(dcfg: dict[str, Any], extra: list[str] | None = None) -> dict[str, Any]:
    """The student's training config (dcfg['config'] + dcfg['overrides'] + extra) with a distill section."""
    from dermlens.train.config import load_config

    cfg = load_config(dcfg.get("config"), [*(dcfg.get("overrides") or []), *(extra or [])])
    return cfg


def distill(dcfg: dict[str, Any], extra: list[str] | None = None, log: Log = print) -> dict[str, Any]:
    """Teacher logits (once) -> student training (resumable; skipped when finished); returns its summary."""
    from dermlens.train.engine import run_dir_for
    from dermlens.train.runs import train_run

    if not dcfg.get("teacher"):
        raise DistillError("no teacher bundle: pass --teacher BUNDLE_DIR (e.g. an ensemble bundle)")
    cfg = student_config(dcfg, extra)
    run_dir = run_dir_for(cfg)
    sources = [cfg["data"]["dir"], *(cfg["data"].get("extra_train") or [])]
    files = [
        teacher_logits(
            dcfg["teacher"],
            Path(d).expanduser(),
            run_dir / (TEACHER_FILE if i == 0 else f"teacher_{i}.npz"),
            ("train",),
            log,
        )
        for i, d in enumerate(sources)
    ]
    with np.load(files[0]) as z:
        version = str(z["teacher_version"])
    cfg["distill"] = {
        "teacher": str(dcfg["teacher"]),
        "teacher_version": version,
        "teacher_logits": [str(f) for f in files],
        "alpha": float(dcfg["alpha"]),
        "temperature": float(dcfg["temperature"]),
    }
    done = train_run(cfg, log, module_cls=DistillModule, datamodule_cls=DistillDataModule)
    (run_dir / "distill.json").write_text(json.dumps(cfg["distill"], indent=2) + "\n")
    return done
