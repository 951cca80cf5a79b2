"""Training engine on real HAM10000 images: config overrides, losses, sampling, a short run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermlens.train.config import ConfigError, load_config
from dermlens.train.losses import LOSSES, ImbalanceLoss
from dermlens.train.sampling import DistributedWeightedSampler, sample_weights

torch.set_num_threads(1)


def tiny_cfg(data_dir: Path, run_dir: Path, *extra: str) -> dict:
    return load_config(
        None,
        [
            f"data.dir={data_dir}",
            f"trainer.run_dir={run_dir}",
            "preprocess.height=64",
            "preprocess.width=80",
            "data.batch_size=16",
            "trainer.threads=1",
            "trainer.patience=0",
            "trainer.log_every_n_steps=1",
            "augment.color_jitter=0",
            *extra,
        ],
    )


def test_overrides_and_bad_keys() -> None:
    cfg = load_config("release.yaml", ["model.metadata=true", "trainer.max_epochs=3", "optim.lr=2e-4"])
    assert (
        cfg["model"]["metadata"] is True and cfg["trainer"]["max_epochs"] == 3 and cfg["optim"]["lr"] == 2e-4
    )
    with pytest.raises(ConfigError, match="unknown config key 'model.nope'"):
        load_config(None, ["model.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.metadata"])


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    r = CliRunner().invoke(app, ["train", "trainer.bogus=1"])
    assert (
        r.exit_code == 2 and "unknown config key 'trainer.bogus'" in r.output and "Traceback" not in r.output
    )
    r = CliRunner().invoke(app, ["train", f"data.dir={tmp_path}"])
    assert r.exit_code == 2 and "no manifest" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("name", LOSSES)
def test_losses_are_finite_and_differentiable(name: str) -> None:
    counts = np.array([500, 50, 5])
    logits = torch.randn(8, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    loss = ImbalanceLoss(name, counts)(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None


@pytest.mark.parametrize("name", LOSSES)
def test_one_hot_soft_targets_give_the_hard_target_loss(name: str) -> None:
    """Mixup/cutmix hand the losses class probabilities; a one-hot row must cost what its label costs."""
    counts = np.array([500, 50, 5])
    logits, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    loss = ImbalanceLoss(name, counts)
    assert loss(logits, torch.nn.functional.one_hot(y, 3).float()) == pytest.approx(float(loss(logits, y)))


def test_cutmix_mixes_images_and_both_target_levels(tiny_dir: Path, tmp_path: Path) -> None:
    from dermlens.train.datamodule import DermDataModule
    from dermlens.train.module import DermModule

    cfg = tiny_cfg(tiny_dir, tmp_path / "run", "augment.cutmix_alpha=1.0", "augment.mixup_alpha=0.0")
    dm = DermDataModule(cfg)
    module = DermModule(cfg, list(dm.classes), dm.class_counts().tolist(), dm.prep.to_dict())
    image, meta, y, yc = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    x, soft = module.mix(module.prepare(image), y.clone())
    assert soft.shape == (len(y), 7) and torch.allclose(soft.sum(1), torch.ones(len(y)))
    mixed = soft.max(1).values < 1  # cutmix pairs each image with the flipped batch: a mixed target
    assert torch.equal(mixed, y != y.flip(0))  # wherever the two labels differ
    lam = float(soft[0, y[0]]) if y[0] != y.flip(0)[0] else None
    if lam is not None:  # the pasted box covers 1 - lam of the first image, taken from the last one
        pasted = (x[0] != module.prepare(image)[0]).any(0).float().mean()
        assert float(pasted) == pytest.approx(1 - lam, abs=0.05)
    module.training_step((image, meta, y, yc), 0)  # soft coarse targets derived from the soft fine ones


def test_logit_adjustment_favours_rare_classes() -> None:
    counts = np.array([900, 100])
    la, ce = ImbalanceLoss("logit_adjust", counts), ImbalanceLoss("ce", counts)
    logits = torch.zeros(1, 2)
    assert la(logits, torch.tensor([1])) > ce(logits, torch.tensor([1]))  # rare-class errors cost more


def test_distributed_weighted_sampler_splits_one_draw() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    w = sample_weights(labels, "inverse")
    ranks = [DistributedWeightedSampler(w, rank=r, world=2, seed=3) for r in range(2)]
    draws = [list(s) for s in ranks]
    assert len(draws[0]) == len(draws[1]) == 50
    single = list(DistributedWeightedSampler(w, rank=0, world=1, seed=3))
    assert sorted(draws[0] + draws[1]) == sorted(single)
    share = np.mean(labels[single] == 1)
    assert 0.3 < share < 0.7  # inverse frequency: both classes drawn about equally


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_run_folder(tiny_dir: Path, tmp_path: Path) -> None:
    from dermlens.train.engine import train

    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_dir, run, "trainer.max_epochs=3", "model.metadata=true", "optim.lr=3e-3")
    metrics = train(cfg)
    log = pd.read_csv(run / "logs" / "csv" / "metrics.csv")
    per_epoch = log.dropna(subset=["train/loss_epoch"]).groupby("epoch")["train/loss_epoch"].mean()
    assert per_epoch.iloc[-1] < per_epoch.iloc[0]
    for name in ("config.yaml", "metrics_val.json", "val_outputs.npz", "model.pt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    assert any((run / "logs" / "tb").glob("events.*"))
    prep = json.loads((run / "preprocessing.json").read_text())  # normalisation and where it came from
    assert prep["normalization_source"] == "timm pretrained config of tf_efficientnet_lite0"
    assert prep["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2  # last.ckpt is written every epoch, whatever val/bal_acc did
    out = np.load(run / "val_outputs.npz")
    n = len(out["image_ids"])
    assert out["fine_logits"].shape == (n, 7) and out["coarse_logits"].shape == (n, 2)
    assert out["embedding"].shape[0] == n and metrics["n"] == n
    assert 0.0 <= metrics["bal_acc"] <= 1.0 and set(metrics["per_class_recall"]) == set(out["classes"])


@pytest.mark.slow
def test_resume_restores_model_optimizer_and_epoch(tiny_dir: Path, tmp_path: Path) -> None:
    from dermlens.train.engine import train

    run = tmp_path / "run"
    train(tiny_cfg(tiny_dir, run, "trainer.max_epochs=1", "trainer.limit_train_batches=4"))
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["epoch"] == 0 and first["global_step"] == 4
    # mark the saved model: a resumed run must start from these weights, not from a fresh init
    key = "net.head.fine.bias"
    first["state_dict"][key] = first["state_dict"][key] + 5.0
    torch.save(first, last)
    train(tiny_cfg(tiny_dir, run, "trainer.max_epochs=2", "trainer.limit_train_batches=4"))
    second = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["epoch"] == 1 and second["global_step"] == 8
    shift = (second["state_dict"][key] - first["state_dict"][key]).abs().max()  # first holds the mark
    assert shift < 0.5  # continued from the marked weights (a fresh start would be ~5 away)
    opt_steps = {int(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert opt_steps == {8}  # AdamW moments continued from the first run, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 8
    assert (run / "logs" / "csv" / "metrics.part1.csv").is_file()  # first session's CSV log kept
    times = json.loads((run / "train_seconds.json").read_text())
    assert times["seconds"] > times["this_session"]  # training time summed over both sessions
