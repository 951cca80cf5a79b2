"""Run a training from a config: run folder, Lightning trainer, resume, final val metrics and outputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dermlens.train.config import dump_config

LAST, BEST = "last.ckpt", "best.ckpt"
FINISHED = "finished.json"  # written when a run has finished and its final validation pass is done


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    from dermlens.settings import machine

    return bool(machine()["native_bf16"])


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` -> bf16-mixed on CPUs with native bf16 (else 32-true); bf16-mixed/16-mixed on CUDA."""
    if precision != "auto":
        return precision
    if accelerator in ("cpu",) or not torch.cuda.is_available():
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def run_dir_for(cfg: dict) -> Path:
    """trainer.run_dir, else runs/<trainer.name>."""
    t = cfg["trainer"]
    return Path(t.get("run_dir") or Path("runs") / str(t.get("name") or "default")).expanduser()


def hardware() -> dict:
    """A short description of the machine the run used (CPU model and native bf16, threads, GPUs)."""
    from dermlens.settings import machine

    info = {**machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _callbacks(cfg: dict, ckpt_dir: Path) -> list:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    t = cfg["trainer"]
    monitor = t.get("monitor")  # null: no best checkpoint (e.g. self-supervised pretraining has no labels)
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    cbs = [
        *([best] if monitor else []),
        # Lightning 2.6 writes save_last only when the monitored checkpoint improves: keep our own every epoch
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    from dermlens.train.budget import TimeBudget, TrainClock

    cbs.append(TimeBudget(float(t["time_budget_min"])) if t.get("time_budget_min") else TrainClock())
    if monitor and int(t.get("patience", 0) or 0) > 0:
        cbs.append(EarlyStopping(monitor=monitor, mode="max", patience=int(t["patience"]), verbose=True))
    from dermlens.train.progress import progress_callbacks

    return cbs + progress_callbacks(str(t.get("progress", "rich")))


def resolve_strategy(t: dict) -> str:
    """DDP needs find_unused_parameters while early blocks are frozen (freeze_epochs > 0)."""
    strategy = str(t.get("strategy", "auto"))
    devices = t.get("devices", "auto")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (isinstance(devices, int) and devices > 1)
    multi = multi or (devices == "auto" and torch.cuda.device_count() > 1)
    if int(t.get("freeze_epochs", 0) or 0) > 0 and strategy in ("auto", "ddp") and multi:
        return "ddp_find_unused_parameters_true"
    return strategy


def _keep_csv_history(csv_dir: Path) -> None:
    """CSVLogger deletes an existing metrics.csv; on resume keep it as metrics.partN.csv."""
    old = csv_dir / "metrics.csv"
    if old.is_file() and int(os.environ.get("RANK", "0")) == 0:
        n = len(list(csv_dir.glob("metrics.part*.csv"))) + 1
        old.rename(csv_dir / f"metrics.part{n}.csv")


def build_trainer(cfg: dict, run_dir: Path, extra_callbacks: list | None = None):
    """A Lightning Trainer configured from the `trainer:` section (CPU, one GPU or DDP via torchrun)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg["trainer"]
    accelerator = str(t.get("accelerator", "auto"))
    _keep_csv_history(run_dir / "logs" / "csv")
    return L.Trainer(
        default_root_dir=run_dir,
        accelerator=accelerator,
        devices=t.get("devices", "auto"),
        strategy=resolve_strategy(t),
        num_nodes=int(t.get("num_nodes", 1)),
        precision=resolve_precision(str(t.get("precision", "auto")), accelerator),
        max_epochs=int(t["max_epochs"]),
        max_time=t.get("max_time"),
        accumulate_grad_batches=int(t.get("accumulate_grad_batches", 1)),
        gradient_clip_val=t.get("gradient_clip_val"),
        limit_train_batches=t.get("limit_train_batches") or 1.0,
        limit_val_batches=t.get("limit_val_batches") or 1.0,
        callbacks=_callbacks(cfg, run_dir / "checkpoints") + list(extra_callbacks or []),
        logger=[
            CSVLogger(run_dir, name="logs", version="csv"),
            TensorBoardLogger(run_dir, name="logs", version="tb"),
        ],
        log_every_n_steps=int(t.get("log_every_n_steps", 10)),
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        deterministic=False,
        enable_model_summary=False,
        enable_progress_bar=str(t.get("progress", "rich")) != "none",
    )


@torch.no_grad()
def predict_split(module, loader, precision: str = "32-true", label: str = "final validation pass"):
    """Fine/coarse logits and embeddings over a loader with the module's evaluation network.

    Runs at the training precision (bf16 autocast only when training used it) with a progress bar."""
    from tqdm import tqdm

    net = module.eval_net().eval()
    fine, coarse, emb = [], [], []
    device = next(net.parameters()).device.type
    use_bf16 = precision.startswith("bf16")
    for image, meta, _, _ in tqdm(loader, desc=label, unit="batch", mininterval=5):
        x = module.prepare(image.to(module.device))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            f, c, e, _ = net.forward_all(x, meta.to(module.device))
        fine.append(f.float().cpu())
        coarse.append(c.float().cpu())
        emb.append(e.float().cpu())
    return {
        "fine_logits": torch.cat(fine).numpy(),
        "coarse_logits": torch.cat(coarse).numpy(),
        "embedding": torch.cat(emb).numpy(),
    }


def val_metrics(out: dict, fine: np.ndarray, coarse: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Balanced accuracy, macro AUC, per-class recall and losses of validation outputs (dermlens.metrics)."""
    from scipy.special import softmax
    from sklearn.metrics import log_loss, recall_score, roc_auc_score

    from dermlens.metrics import classification_metrics, predicted_labels

    p = softmax(out["fine_logits"], axis=1)
    pc = softmax(out["coarse_logits"], axis=1)
    labels = list(range(len(classes)))
    recall = recall_score(fine, predicted_labels(p), labels=labels, average=None, zero_division=0)
    return {
        **classification_metrics(p, fine, len(classes)),
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "loss": float(log_loss(fine, p, labels=labels)),
        "coarse_auc": float(roc_auc_score(coarse, pc[:, 1])) if len(set(coarse)) == 2 else None,
        "coarse_loss": float(log_loss(coarse, pc, labels=[0, 1])),
    }


def other_conditions(module, dm, cfg: dict, precision: str, run_dir: Path | None = None) -> dict:
    """The best checkpoint on val without metadata (metadata models) and on the external set, if any."""
    from scipy.special import softmax

    from dermlens.metrics import classification_metrics

    found: dict = {}
    if cfg["model"].get("metadata", False):
        bare = predict_split(module, dm.no_metadata_val_dataloader(), precision, "validation, no metadata")
        scores = classification_metrics(softmax(bare["fine_logits"], axis=1), dm.val.fine, len(dm.classes))
        found["no_metadata"] = {k: scores[k] for k in ("bal_acc", "macro_auc")}
    loader = dm.external_val_dataloader()
    if loader is not None:
        from dermlens.train.module import external_scores

        ext = predict_split(module, loader, precision, "external validation")
        probs = torch.from_numpy(softmax(ext["fine_logits"], axis=1))
        found["external"] = external_scores([(probs, torch.from_numpy(dm.external[1].fine))], dm.classes)
        if run_dir is not None:
            save_outputs(run_dir / "val_outputs_ext.npz", ext, dm.external[1], dm.classes)
    if dm.sources:
        found["sources"] = source_scores(module, dm, precision, run_dir)
    return found


def source_scores(module, dm, precision: str, run_dir: Path | None = None) -> dict:
    """Each data.source_val set's val figures, with metadata and without (how users send folders); the
    outputs go to RUN/val_outputs_<name>[_no_metadata].npz for paired comparisons."""
    from scipy.special import softmax

    from dermlens.train.module import external_scores

    found: dict = {}
    for name, _, part in dm.sources:
        found[name] = {"n": len(part)}
        for key, bare in (("with_metadata", False), ("no_metadata", True)):
            out = predict_split(module, dm.source_val_dataloader(name, bare), precision, f"{name} val")
            probs = torch.from_numpy(softmax(out["fine_logits"], axis=1))
            scores = external_scores([(probs, torch.from_numpy(part.fine))], dm.classes)
            found[name][key] = {"bal_acc": scores.pop("bal_acc3"), **scores}
            if run_dir is not None:
                suffix = "_no_metadata" if bare else ""
                save_outputs(run_dir / f"val_outputs_{name}{suffix}.npz", out, part, dm.classes)
    return found


def save_outputs(path: Path, out: dict, part, classes: tuple[str, ...]) -> None:
    """One validation set's logits with its labels and image ids (for paired comparisons between runs)."""
    np.savez(
        path,
        fine_logits=out["fine_logits"],
        coarse_logits=out["coarse_logits"],
        fine_labels=part.fine,
        image_ids=np.asarray(part.image_ids, dtype=str),
        classes=np.array(classes),
    )


def finish(
    run_dir: Path, dm, module_cls, ckpt: Path, cfg: dict, seconds: float, precision: str = "32-true"
) -> dict:
    """Evaluate the best checkpoint on val; write metrics_val.json, val_outputs.npz and model.pt."""
    module = module_cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    module.eval()
    loaders = dm.val_dataloader()
    out = predict_split(module, loaders[0] if isinstance(loaders, list) else loaders, precision)
    metrics = val_metrics(out, dm.val.fine, dm.val.coarse, dm.classes)
    metrics.update(other_conditions(module, dm, cfg, precision, run_dir))
    epoch = torch.load(ckpt, map_location="cpu", weights_only=False).get("epoch")
    metrics.update(
        {
            "checkpoint": str(ckpt),
            "best_epoch": epoch,
            "train_seconds": round(seconds, 1),
            "hardware": hardware(),
            "classes": list(dm.classes),
            "arch": cfg["model"]["arch"],
            "uses_metadata": bool(cfg["model"].get("metadata", False)),
            "precision": precision,
        }
    )
    (run_dir / "metrics_val.json").write_text(json.dumps(metrics, indent=2) + "\n")
    np.savez(
        run_dir / "val_outputs.npz",
        **out,
        fine_labels=dm.val.fine,
        coarse_labels=dm.val.coarse,
        image_ids=np.asarray(dm.val.image_ids, dtype=str),
        classes=np.array(dm.classes),
    )
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.eval_net().state_dict().items()}
    torch.save(state, run_dir / "model.pt")
    return metrics


def config_hash(cfg: dict) -> str:
    """Identity of a resolved config: a finished run is skipped only when it is asked for again unchanged."""
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stop_reason(trainer, clock) -> str:
    """One line saying why training stopped."""
    from dermlens.train.budget import TimeBudget

    epochs = trainer.current_epoch
    if isinstance(clock, TimeBudget) and clock.stopped_early:
        return (
            f"Stopped after {epochs} epoch(s): the next epoch would not fit in the time budget "
            f"({clock.budget / 60:.0f} min; trainer.time_budget_min)."
        )
    early = [c for c in trainer.callbacks if type(c).__name__ == "EarlyStopping" and c.stopped_epoch > 0]
    if early:
        e = early[0]
        return f"Stopped early after {epochs} epoch(s): {e.monitor} did not improve for {e.patience} epochs."
    if trainer.interrupted:
        return f"Stopped after {epochs} epoch(s): interrupted (resume with the same command)."
    if epochs >= trainer.max_epochs:
        return f"Finished all {trainer.max_epochs} epochs (trainer.max_epochs)."
    return f"Stopped after {epochs} epoch(s): trainer.max_time reached or another stop condition."


def setup_run(cfg: dict) -> Path:
    """Seed, set CPU threads and return the run folder."""
    import lightning as L

    threads = int(cfg["trainer"].get("threads", 0) or 0)
    torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))
    L.seed_everything(int(cfg.get("seed", 42)), workers=True, verbose=False)
    return run_dir_for(cfg)


def finished_before(cfg: dict, run_dir: Path, resume: bool | None) -> bool:
    """True when the run finished with this exact config (and no --resume asks to train it further)."""
    done = run_dir / FINISHED
    if resume is None and done.is_file() and json.loads(done.read_text()).get("config") == config_hash(cfg):
        print(f"{run_dir} already finished with this config; pass --resume to train it further.", flush=True)
        return True
    return False


def fit(cfg: dict, module, dm, run_dir: Path, resume: bool | None, callbacks: list | None = None):
    """Fit, resuming from checkpoints/last.ckpt; prints why it stopped. Returns (trainer, seconds, reason)."""
    last = run_dir / "checkpoints" / LAST
    if resume and not last.is_file():
        raise FileNotFoundError(f"--resume given but {last} does not exist")
    ckpt_path = str(last) if last.is_file() and resume is not False else None
    trainer = build_trainer(cfg, run_dir, callbacks)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        from dermlens.train.datamodule import preprocessing_record

        (run_dir / "preprocessing.json").write_text(json.dumps(preprocessing_record(cfg), indent=2) + "\n")
    start = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    seconds = time.time() - start
    if not trainer.is_global_zero:
        return trainer, seconds, ""
    from dermlens.train.budget import TrainClock

    clock = next(c for c in trainer.callbacks if isinstance(c, TrainClock))
    total = clock.elapsed() if clock.start is not None else seconds  # summed over resumed sessions
    (run_dir / "train_seconds.json").write_text(json.dumps({"seconds": total, "this_session": seconds}))
    reason = stop_reason(trainer, clock)
    print(reason, flush=True)
    return trainer, total, reason


def mark_finished(run_dir: Path, cfg: dict, reason: str, ckpt: Path) -> None:
    """Write finished.json: a later identical request skips the run."""
    record = {"reason": reason, "checkpoint": str(ckpt), "config": config_hash(cfg)}
    (run_dir / FINISHED).write_text(json.dumps(record) + "\n")


def train(
    cfg: dict,
    resume: bool | None = None,
    callbacks: list | None = None,
    module_cls: type | None = None,
    datamodule_cls: type | None = None,
) -> dict | None:
    """Train from a resolved config; resumes from checkpoints/last.ckpt when present (or when resume=True).

    callbacks are added to the trainer's; module_cls / datamodule_cls replace DermModule / DermDataModule
    (research tools: pruning in `dermlens train tune`, soft targets in `dermlens train distill`).
    """
    from dermlens.train.config import check_arch
    from dermlens.train.datamodule import DermDataModule
    from dermlens.train.module import DermModule
    from dermlens.train.progress import check_mode

    check_arch(cfg)
    check_mode(str(cfg["trainer"].get("progress", "rich")))
    module_cls = module_cls or DermModule
    datamodule_cls = datamodule_cls or DermDataModule
    run_dir = setup_run(cfg)
    if finished_before(cfg, run_dir, resume):
        return json.loads((run_dir / "metrics_val.json").read_text())
    dm = datamodule_cls(cfg)
    module = module_cls(cfg, list(dm.classes), dm.class_counts().tolist(), dm.prep.to_dict())
    trainer, total, reason = fit(cfg, module, dm, run_dir, resume, callbacks)
    if not trainer.is_global_zero:
        return None
    ckpt_dir = run_dir / "checkpoints"
    best = ckpt_dir / BEST
    dm.trainer = None
    ckpt = best if best.is_file() else ckpt_dir / LAST
    print(f"Evaluating {ckpt.name} on the validation split ({len(dm.val)} images)...", flush=True)
    metrics = finish(run_dir, dm, module_cls, ckpt, cfg, total, str(trainer.precision))
    mark_finished(run_dir, cfg, reason, ckpt)
    return metrics
