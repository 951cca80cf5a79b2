"""Training on several clinics: the eight-class label space, source-balanced sampling, per-source validation
every epoch, the val/select rule, and starting from an ensemble member's backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermlens.errors import WeightsError
from dermlens.train.module import select_figure
from dermlens.train.sampling import source_weights
from test_train import tiny_cfg  # tests/test_train.py

torch.set_num_threads(1)


def test_select_rule_is_the_mean_or_the_worst_source() -> None:
    assert select_figure([0.8, 0.6, 0.4], "mean") == pytest.approx(0.6)
    assert select_figure([0.8, 0.6, 0.4], "worst") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="mean, worst"):
        select_figure([0.5], "best")


def test_source_weights_give_each_source_its_share() -> None:
    sizes = [700, 100, 200]
    labels = np.repeat(np.arange(3), sizes)
    for mode, expected in (("equal", [1 / 3] * 3), ("sqrt", np.sqrt(sizes) / np.sqrt(sizes).sum())):
        w = source_weights(sizes, mode)
        shares = np.array([w[labels == s].sum() for s in range(3)]) / w.sum()
        np.testing.assert_allclose(shares, expected)
    with pytest.raises(ValueError, match="sqrt or equal"):
        source_weights(sizes, "inverse")


def test_a_source_with_scc_makes_eight_classes_and_is_validated_on_its_own(
    tiny_dir: Path, bcn_tiny: Path, tmp_path: Path
) -> None:
    from dermlens.train.datamodule import DermDataModule

    cfg = tiny_cfg(
        tiny_dir,
        tmp_path / "run",
        f"data.extra_train=[{bcn_tiny}]",
        f"data.source_val=[{bcn_tiny}]",
        "sampler.source=equal",
    )
    dm = DermDataModule(cfg)
    assert dm.classes == ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc")
    ((name, _, val),) = dm.sources
    df = pd.read_csv(bcn_tiny / "manifest.csv").set_index("image_id")
    assert name == "bcn" and set(df.loc[val.image_ids, "split"]) == {"val"}
    assert "scc" in {dm.classes[i] for i in dm.extra[0][1].fine}
    w = dm.train_weights()
    n_ham = len(dm.train)
    assert w[:n_ham].sum() == pytest.approx(w[n_ham:].sum())  # each source half of every epoch
    assert len(dm.val_dataloader()) == 2


@pytest.mark.slow
def test_run_logs_every_source_each_epoch_and_selects_on_the_worst(
    tiny_dir: Path, bcn_tiny: Path, tmp_path: Path
) -> None:
    from dermlens.train.engine import train

    run = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_dir,
        run,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        f"data.extra_train=[{bcn_tiny}]",
        f"data.source_val=[{bcn_tiny}]",
        f"data.external_val={tiny_dir}",
        "trainer.monitor=val/select",
        "trainer.select=worst",
        "sampler.source=sqrt",
        "trainer.progress=none",
    )
    metrics = train(cfg)
    log = pd.read_csv(run / "logs" / "csv" / "metrics.csv")
    epochs = log.dropna(subset=["val/select"])
    assert len(epochs) == 2 and epochs["val_bcn/bal_acc"].notna().all()
    worst = epochs[["val/bal_acc", "ext/bal_acc3", "val_bcn/bal_acc"]].min(axis=1)
    np.testing.assert_allclose(epochs["val/select"], worst, atol=1e-6)
    bcn = metrics["sources"]["bcn"]
    assert 0 <= bcn["no_metadata"]["bal_acc"] <= 1 and bcn["n"] == len(
        np.load(run / "val_outputs_bcn.npz")["fine_labels"]
    )
    assert metrics["classes"][-1] == "scc"


def test_init_from_an_ensemble_member(tmp_path: Path) -> None:
    from bundles import bundle_dir
    from dermlens.model.network import build_network

    weights = bundle_dir() / "model.pt"
    net = build_network({"arch": "tf_efficientnet_lite0", "init": f"{weights}#0"}, 8)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    stem = net.backbone.state_dict()["conv_stem.weight"]
    torch.testing.assert_close(stem, state["members.0.backbone.conv_stem.weight"].float())
    assert "#0" in net.init_note
    with pytest.raises(WeightsError, match="name a member"):
        build_network({"arch": "tf_efficientnet_lite0", "init": str(weights)}, 8)
    with pytest.raises(WeightsError, match="no ensemble member '7'"):
        build_network({"arch": "tf_efficientnet_lite0", "init": f"{weights}#7"}, 8)


@pytest.mark.slow
def test_levers_compare_every_source_with_paired_intervals(
    tiny_dir: Path, bcn_tiny: Path, tmp_path: Path
) -> None:
    import json

    import yaml

    from test_research_tools import TINY, run_cli

    recipe = {
        "base_config": "train.yaml",
        "out": str(tmp_path / "levers"),
        "overrides": [
            f"data.dir={tiny_dir}",
            *TINY,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            f"data.extra_train=[{bcn_tiny}]",
            f"data.source_val=[{bcn_tiny}]",
            f"data.external_val={tiny_dir}",
            "model.metadata=true",
        ],
        "levers": [
            {"name": "base", "overrides": []},
            {"name": "source_sampling", "overrides": ["sampler.source=equal"]},
        ],
    }
    path, out = tmp_path / "levers.yaml", tmp_path / "levers.json"
    path.write_text(yaml.safe_dump(recipe))
    code, output = run_cli("release", "levers", "-r", str(path), "--out", str(out))
    assert code == 0, output
    row = {r["lever"]: r for r in json.loads(out.read_text())["levers"]}["source_sampling"]
    bcn = row["delta_sources_no_metadata"]["bcn"]
    low, high = bcn["ci95"]
    assert low <= bcn["delta"] <= high
    assert row["sources_val_bal_acc_no_metadata"]["bcn"] is not None
    low, high = row[
        "delta_val_bal_acc_ci95"
    ]  # an eight-class model on seven-class val: same argmax as the point
    assert low - 1e-9 <= row["delta_val_bal_acc"] <= high + 1e-9
    low, high = row["delta_external_bal_acc3_ci95"]
    assert low - 1e-9 <= row["delta_external_bal_acc3"] <= high + 1e-9
    assert (tmp_path / "levers" / "base" / "val_outputs_ext.npz").is_file()


@pytest.mark.slow
def test_group_dro_moves_weight_between_the_sources(tiny_dir: Path, bcn_tiny: Path, tmp_path: Path) -> None:
    from dermlens.train.engine import train

    run = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_dir,
        run,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        f"data.extra_train=[{bcn_tiny}]",
        "loss.group_dro_eta=1.0",
        "sampler.source=equal",
    )
    train(cfg)
    log = pd.read_csv(run / "logs" / "csv" / "metrics.csv")
    q = log[["train/dro_q_prepared", "train/dro_q_bcn"]].dropna().iloc[-1]
    assert q.sum() == pytest.approx(1.0, abs=1e-5) and not np.allclose(q, 0.5)  # moved from the even start
