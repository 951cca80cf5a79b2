"""The one config loader (dermlens.config): unknown keys and wrong types are one-line errors on every
command that reads a config, and packaged defaults < user file < overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dermlens import config
from dermlens.cli.main import app
from dermlens.config import ConfigError


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def _yaml(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_unknown_keys_and_wrong_types_are_one_line_on_every_command(tmp_path: Path) -> None:
    missing = tmp_path / "empty.csv"  # evaluate checks the files exist; the config is read first
    missing.write_text("image\n")
    missing = str(missing)
    cases = [
        (["train", "trainer.bogus=1"], "unknown config key 'trainer.bogus' in override 'trainer.bogus=1'"),
        (["train", "trainer.max_epochs=abc"], "config key 'trainer.max_epochs' must be int"),
        (
            ["train", "--config", _yaml(tmp_path, "t.yaml", {"optim": {"lrr": 1}})],
            "unknown config key 'optim.lrr' in ",
        ),
        (
            [
                "evaluate",
                "--config",
                _yaml(tmp_path, "e.yaml", {"bootstrap": {"n_resample": 5}}),
                "--predictions",
                missing,
                "--truth",
                missing,
                "--out",
                str(tmp_path / "out"),
            ],
            "unknown config key 'bootstrap.n_resample'",
        ),
        (
            [
                "evaluate",
                "--config",
                _yaml(tmp_path, "e2.yaml", {"ece_bins": "many"}),
                "--predictions",
                missing,
                "--truth",
                missing,
                "--out",
                str(tmp_path / "out"),
            ],
            "config key 'ece_bins' must be int",
        ),
        (
            ["serve", "--config", _yaml(tmp_path, "s.yaml", {"limits": {"max_pixel": 5}})],
            "unknown config key 'limits.max_pixel'",
        ),
        (
            ["serve", "--config", _yaml(tmp_path, "s2.yaml", {"port": "eighty"})],
            "config key 'port' must be int",
        ),
        (
            ["trust", "fit", "--bundle", str(tmp_path), "conformal.alpah=0.1"],
            "unknown config key 'conformal.alpah'",
        ),
        (
            ["trust", "fit", "--bundle", str(tmp_path), "conformal.alpha=[1]"],
            "config key 'conformal.alpha' must be float",
        ),
        (
            ["train", "tune", "--study", _yaml(tmp_path, "u.yaml", {"sampler": {"typ": "tpe"}})],
            "unknown config key 'sampler.typ'",
        ),
        (
            ["train", "ensemble", "--recipe", _yaml(tmp_path, "n.yaml", {"folds": "five"})],
            "config key 'folds' must be int",
        ),
        (
            ["release", "build", "--recipe", _yaml(tmp_path, "r.yaml", {"distill": {"alpah": 0.5}})],
            "unknown config key 'alpah'",
        ),
    ]
    for args, message in cases:
        code, output = _cli(*args)
        assert code == 2 and message in output, (args, output)
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1, (args, output)


def test_precedence_packaged_then_file_then_overrides(tmp_path: Path, monkeypatch) -> None:
    from dermlens.evaluate import EvaluateConfig
    from dermlens.serve.settings import load_settings
    from dermlens.train.config import load_config
    from dermlens.trust.outputs import trust_config

    user = _yaml(tmp_path, "train.yaml", {"trainer": {"max_epochs": 5}, "optim": {"lr": "2e-4"}})
    assert load_config()["trainer"]["max_epochs"] == config.packaged("train")["trainer"]["max_epochs"]
    cfg = load_config(user)
    assert cfg["trainer"]["max_epochs"] == 5 and cfg["optim"]["lr"] == 2e-4  # YAML 1.1 "2e-4" is a float
    assert (
        cfg["trainer"]["patience"] == config.packaged("train")["trainer"]["patience"]
    )  # merged, not replaced
    assert load_config(user, ["trainer.max_epochs=7"])["trainer"]["max_epochs"] == 7

    ev = _yaml(tmp_path, "e.yaml", {"bootstrap": {"n_resamples": 50, "seed": 4}})
    assert (EvaluateConfig.load(ev).n_resamples, EvaluateConfig.load(ev).seed) == (50, 4)
    assert EvaluateConfig.load(ev, n_resamples=9).n_resamples == 9

    tr = _yaml(tmp_path, "trust.yaml", {"conformal": {"alpha": 0.2}})
    assert trust_config(tr)["conformal"]["alpha"] == 0.2
    assert trust_config(tr, ["conformal.alpha=0.05"])["conformal"]["alpha"] == 0.05
    assert (
        trust_config(tr)["conformal"]["max_set_size"] == config.packaged("trust")["conformal"]["max_set_size"]
    )

    sv = _yaml(tmp_path, "serve.yaml", {"port": 9001, "records": {"url": "sqlite:///file.db"}})
    monkeypatch.setenv("DERMLENS_RECORDS_URL", "sqlite:///env.db")
    s = load_settings(sv, port=9002)
    assert (s.port, s.records.url) == (9002, "sqlite:///env.db")  # option > environment > file
    assert s.limits.max_pixels == config.packaged("serve")["limits"]["max_pixels"]


def test_loader_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'augment.scale\[0\]' must be float .* in override"):
        config.load("train", overrides=["augment.scale=[a]"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.load("train", overrides=["trainer.max_epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load("train", bad)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("train", tmp_path / "missing.yaml")
    study = config.load("tune", _yaml(tmp_path, "s.yaml", {"space": {"optim.lr": {"type": "float"}}}))
    assert list(study["space"]) == ["optim.lr"]  # a study's space replaces the default space


def test_every_packaged_config_loads() -> None:
    """Each packaged YAML passes its own schema unchanged (its values define the types)."""
    names = sorted(
        p.name[:-5] for p in config.packaged_path("train").parent.iterdir() if p.name.endswith(".yaml")
    )
    assert len(names) >= 15
    for name in names:
        assert config.load(name) == config.packaged(name), name
