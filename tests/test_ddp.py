"""Two-process DDP on CPU (gloo) through torchrun runs the same `dermlens train` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_torchrun_two_process_ddp(tiny_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc_per_node=2", "--standalone", "-m", "dermlens.cli.main", "train",
        f"data.dir={tiny_dir}", f"trainer.run_dir={run}", "preprocess.height=64", "preprocess.width=80",
        "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.threads=1",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "sampler.name=sqrt",
        "trainer.patience=0", "trainer.freeze_epochs=1", "model.metadata=true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3  # 3 synchronized steps per process
    assert (run / "metrics_val.json").is_file()
