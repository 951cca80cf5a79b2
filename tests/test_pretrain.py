"""Self-supervised pretraining and the label-efficiency study, on a small real HAM10000 subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

pytest.importorskip("lightly")

from dermlens.cli.main import app  # noqa: E402
from dermlens.evaluate.label_efficiency import load_study, run_study  # noqa: E402
from dermlens.model.network import build_network  # noqa: E402
from dermlens.train.pretrain import load_pretrain_config, pretrain  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_overrides(tiny_dir: Path, run_dir: Path, epochs: int) -> list[str]:
    return [
        f"data.dir={tiny_dir}",
        f"ssl.pool=[{tiny_dir}]",
        "data.external_val=null",
        "data.batch_size=16",
        "preprocess.height=64",
        "preprocess.width=80",
        "ssl.view_size=48",
        "ssl.proj_hidden=128",
        "trainer.time_budget_min=null",
        f"trainer.max_epochs={epochs}",
        f"trainer.run_dir={run_dir}",
        "trainer.progress=tqdm",
    ]


@pytest.fixture(scope="module")
def pretrained(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two epochs, then the same run resumed to four: the reports of both sessions."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    first = pretrain(load_pretrain_config(None, tiny_overrides(tiny_dir, run_dir, 2)))
    second = pretrain(load_pretrain_config(None, tiny_overrides(tiny_dir, run_dir, 4)))
    return {"first": first, "second": second, "run_dir": run_dir}


def test_loss_falls_and_resume_continues(pretrained: dict) -> None:
    first, second = pretrained["first"], pretrained["second"]
    assert first["epochs"] == 2 and second["epochs"] == 4
    assert second["epoch_losses"][:2] == first["epoch_losses"]  # resumed from last.ckpt, not restarted
    assert second["epoch_losses"][-1] < second["epoch_losses"][0] - 0.05
    assert second["images"] > 100 and second["init"].startswith("imagenet")


def test_weights_load_into_train_and_differ_from_imagenet(pretrained: dict) -> None:
    path = pretrained["run_dir"] / "backbone.pt"
    ssl = torch.load(path, weights_only=True)
    net = build_network({"arch": "tf_efficientnet_lite0", "init": str(path)}, 7)
    assert net.init_note.startswith("file:")
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, ssl[k]), k
    imagenet = build_network({"arch": "tf_efficientnet_lite0", "init": "imagenet"}, 7).backbone.state_dict()
    changed = [k for k, v in imagenet.items() if v.is_floating_point() and not torch.allclose(v, ssl[k])]
    assert len(changed) > 50  # pretraining moved the encoder


def test_finished_pretraining_is_not_rerun(pretrained: dict, tiny_dir: Path) -> None:
    before = (pretrained["run_dir"] / "checkpoints" / "last.ckpt").stat().st_mtime
    again = pretrain(load_pretrain_config(None, tiny_overrides(tiny_dir, pretrained["run_dir"], 4)))
    assert again == pretrained["second"]
    assert (pretrained["run_dir"] / "checkpoints" / "last.ckpt").stat().st_mtime == before


def test_label_efficiency_study_end_to_end(pretrained: dict, tiny_dir: Path, tmp_path: Path) -> None:
    study = load_study(None)
    study.update(
        {
            "overrides": [
                f"data.dir={tiny_dir}",
                "preprocess.height=64",
                "preprocess.width=80",
                "model.metadata=false",
                "trainer.patience=0",
                "data.batch_size=16",
                "trainer.progress=tqdm",
            ],
            "inits": {"imagenet": "imagenet", "ssl": str(pretrained["run_dir"] / "backbone.pt")},
            "fractions": [0.5, 1.0],
            "epochs": {"0.5": 1, "1.0": 1},
            "run_root": str(tmp_path / "runs"),
            # the small subset stands in for both test sets (ISIC 2017 needs mel, bkl and nv: it has them)
            "test": {"ham": str(tiny_dir), "isic2017": str(tiny_dir)},
            "n_resamples": 50,
            "out": str(tmp_path / "le.json"),
            "plot": str(tmp_path / "le.png"),
        }
    )
    out = run_study(study)
    cells = out["cells"]
    assert [(c["init"], c["fraction"]) for c in cells] == [
        ("imagenet", 0.5),
        ("imagenet", 1.0),
        ("ssl", 0.5),
        ("ssl", 1.0),
    ]
    assert cells[0]["n_train_images"] < cells[1]["n_train_images"]
    for c in cells:
        for key in ("val_bal_acc", "test_bal_acc", "isic2017_test_mel_auc"):
            v = c[key]
            assert 0.0 <= v["ci_low"] <= v["value"] <= v["ci_high"] <= 1.0, (c["init"], key, v)
    assert json.loads(Path(study["out"]).read_text())["cells"] == cells
    assert Path(study["plot"]).stat().st_size > 10_000
    stamp = (tmp_path / "runs" / "ssl_100" / "model.pt").stat().st_mtime
    assert run_study(study)["cells"] == cells  # resumable: finished cells are neither retrained nor rescored
    assert (tmp_path / "runs" / "ssl_100" / "model.pt").stat().st_mtime == stamp


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["train", "pretrain", "ssl.nope=1"])
    assert bad.exit_code == 2 and "unknown config key 'ssl.nope'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    method = runner.invoke(app, ["train", "pretrain", "ssl.method=byol", f"trainer.run_dir={tmp_path / 'r'}"])
    assert method.exit_code == 2 and "ssl.method" in method.output
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"fractions": [0.5], "colour": 1}))
    le = runner.invoke(app, ["train", "label-efficiency", "--config", str(study)])
    assert le.exit_code == 2 and "colour" in le.output and len(le.output.strip().splitlines()) == 1
