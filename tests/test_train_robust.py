"""Training levers on real images: metadata dropout, colour constancy, multi-source data, precision,
one-line config errors and stop reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SMALL
from dermlens.metadata import META_BLOCKS, encode_metadata, mark_missing, missing_vector
from dermlens.preprocess import Preprocessing, load_rgb, shades_of_gray
from dermlens.train.config import ConfigError, check_arch, load_config
from test_train import tiny_cfg  # tests/test_train.py

torch.set_num_threads(1)


def test_mark_missing_sets_each_field_missing() -> None:
    full = encode_metadata(55, "female", "back")
    assert not np.array_equal(full, missing_vector())
    assert np.array_equal(mark_missing(full, list(META_BLOCKS)), missing_vector())
    age_gone = mark_missing(full, ["age"])
    assert np.array_equal(age_gone, encode_metadata(None, "female", "back"))
    assert np.array_equal(full, encode_metadata(55, "female", "back"))  # the input is not changed


def test_metadata_dropout_rates() -> None:
    from dermlens.train.datamodule import drop_metadata

    full = encode_metadata(40, "male", "face")
    np.random.seed(0)
    out = [drop_metadata(full, 0.0, 0.4, np.random) for _ in range(2000)]
    all_missing = np.mean([np.array_equal(o, missing_vector()) for o in out])
    assert 0.35 < all_missing < 0.45
    out = [drop_metadata(full, 0.2, 0.0, np.random) for _ in range(2000)]
    age_missing = np.mean([o[META_BLOCKS["age"]][-1] == 1.0 for o in out])
    assert 0.16 < age_missing < 0.24
    assert drop_metadata(full, 0.0, 0.0, np.random) is full


def test_shades_of_gray_removes_a_colour_cast(data_root: Path) -> None:
    rgb = load_rgb(data_root / "ham10000" / "images" / "ISIC_0024306.jpg")
    cast = np.clip(rgb * np.array([1.15, 1.0, 0.75]), 0, 255).astype(np.uint8)
    before = np.abs(rgb.astype(float) - cast).mean()
    after = np.abs(shades_of_gray(rgb).astype(float) - shades_of_gray(cast)).mean()
    assert after < before / 3, (before, after)
    prep = Preprocessing.from_dict({**Preprocessing.default().to_dict(), "color_constancy": "shades_of_gray"})
    assert prep.cache_name != Preprocessing.default().cache_name
    assert np.array_equal(prep.resize(rgb), shades_of_gray(Preprocessing.default().resize(rgb)))
    with pytest.raises(ValueError, match="color_constancy"):
        Preprocessing.from_dict({**Preprocessing.default().to_dict(), "color_constancy": "grey_world"})


def test_bad_overrides_are_one_line_errors() -> None:
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    with pytest.raises(ConfigError, match="must be int"):
        load_config(None, ["trainer.max_epochs=abc"])
    assert load_config(None, ["trainer.max_epochs=3.0"])["trainer"]["max_epochs"] == 3
    with pytest.raises(ConfigError, match="not a timm architecture"):
        check_arch(load_config(None, ["model.arch=efficientnet_b9"]))
    for bad in ("trainer.max_epochs=abc", "model.arch=efficientnet_b9", "trainer.progress=bars"):
        r = CliRunner().invoke(app, ["train", bad])
        assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_precision_auto_follows_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from dermlens.train import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert engine.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert engine.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert engine.resolve_precision("16-mixed", "cpu") == "16-mixed"


def test_external_holdout_and_extra_sources(tiny_dir: Path, tmp_path: Path) -> None:
    from dermlens.train.datamodule import DermDataModule

    cfg = tiny_cfg(
        tiny_dir, tmp_path / "run", f"data.extra_train=[{tiny_dir}]", f"data.external_val={tiny_dir}"
    )
    dm = DermDataModule(cfg)
    _, ext = dm.external
    ((_, extra),) = dm.extra
    assert not set(ext.image_ids) & set(extra.image_ids)
    assert set(ext.image_ids) | set(extra.image_ids) == set(dm.train.image_ids)
    assert 0.15 < len(ext) / len(dm.train) < 0.35
    df = pd.read_csv(tiny_dir / "manifest.csv").set_index("image_id")
    held_groups, rest_groups = (
        set(df.loc[ext.image_ids, "group_id"]),
        set(df.loc[extra.image_ids, "group_id"]),
    )
    assert not held_groups & rest_groups  # whole lesions stay on one side
    assert len(dm.class_counts()) == len(dm.classes) and dm.class_counts().sum() == len(dm.train) + len(extra)
    assert len(dm.val_dataloader()) == 2


@pytest.mark.slow
def test_run_with_dropout_and_external_val_logs_and_says_why(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    from dermlens.train.engine import train

    run = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_dir,
        run,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        f"data.external_val={tiny_dir}",
        "trainer.monitor=val/select",
        "augment.meta_drop_all=0.5",
        "augment.meta_drop_field=0.2",
        "model.metadata=true",
        "trainer.progress=none",
    )
    metrics = train(cfg)
    log = pd.read_csv(run / "logs" / "csv" / "metrics.csv")
    assert {"ext/bal_acc3", "val/select", "val/bal_acc"} <= set(log.columns)
    assert log["ext/bal_acc3"].dropna().between(0, 1).all()
    # the final pass scores the best checkpoint in the other conditions too: no metadata, external set
    assert 0 <= metrics["no_metadata"]["bal_acc"] <= 1 and 0 <= metrics["no_metadata"]["macro_auc"] <= 1
    assert metrics["external"]["bal_acc3"] == pytest.approx(log["ext/bal_acc3"].dropna().iloc[-1], abs=0.02)
    said = capsys.readouterr()
    assert "Finished all 1 epochs" in said.out
    # progress none: no bar, one line per epoch with the logged validation figures
    (line,) = [x for x in said.err.splitlines() if x.startswith("epoch 1/1:")]
    assert f"val/bal_acc {log['val/bal_acc'].dropna().iloc[-1]:.3f}" in line and "ext/bal_acc3" in line
    assert "it/s" not in said.err
    assert metrics["precision"] in ("bf16-mixed", "32-true")


@pytest.mark.slow
def test_finished_run_is_not_retrained(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    from dermlens.train.engine import FINISHED, train

    run = tmp_path / "run"
    args = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2")
    first = train(tiny_cfg(tiny_dir, run, *args))
    assert (run / FINISHED).is_file()
    stamp = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = train(tiny_cfg(tiny_dir, run, *args))
    assert "already finished" in capsys.readouterr().out and again == first
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


def test_data_holdout_materialises_the_training_holdout(tiny_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dermlens.cli.main import app
    from dermlens.data.manifest import read_manifest
    from dermlens.train.datamodule import DermDataModule

    out = tmp_path / "holdout"
    r = CliRunner().invoke(app, ["data", "holdout", str(tiny_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    held = read_manifest(out)
    dm = DermDataModule(tiny_cfg(tiny_dir, tmp_path / "run", f"data.external_val={tiny_dir}"))
    assert set(held.loc[held["split"] == "train", "image_id"]) == set(dm.external[1].image_ids)
    assert (out / "cache" / SMALL.cache_name).is_file()
