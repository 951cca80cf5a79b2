"""A missing optional dependency is one line naming the extra to install, in the library and on the CLI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dermlens.extras import EXTRAS, MissingExtra, as_missing_extra, require

REPO = Path(__file__).resolve().parents[1]


def test_require_names_the_extra() -> None:
    assert require("sklearn.metrics", "evaluate").roc_auc_score is not None
    with pytest.raises(
        MissingExtra, match=r"^dermlens_no_such_module is not installed: pip install 'dermlens\[train\]'$"
    ):
        require("dermlens_no_such_module.sub", "train")
    with pytest.raises(MissingExtra, match="probing needs dermlens_no_such_module"):
        require("dermlens_no_such_module", "evaluate", "probing")
    err = as_missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert err is not None and str(err) == "torch is not installed: pip install 'dermlens[train]'"
    assert as_missing_extra(ModuleNotFoundError("x", name="not_an_extra_module")) is None


def test_every_mapped_extra_is_declared() -> None:
    """Each extra named in dermlens.extras exists in pyproject.toml."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras), set(EXTRAS.values()) - set(extras)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DERMLENS_CORE_PYTHON"), reason="needs DERMLENS_CORE_PYTHON (CI sets it)"
)
def test_core_install_says_which_extra(tmp_path: Path, ham_root: Path) -> None:
    """In the torch-free core (+serve) install, commands that need an extra say which, in one line."""
    cases = [
        (
            [
                "data",
                "prepare",
                "--dataset",
                "ham10000",
                "--root",
                str(ham_root),
                "--out",
                str(tmp_path / "d"),
            ],
            "data preparation needs sklearn: pip install 'dermlens[evaluate]'",
        ),
        (["train", "trainer.max_epochs=1"], "pip install 'dermlens[train]'"),
        (["train", "tune"], "pip install 'dermlens[train]'"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for args, message in cases:
        cmd = [os.environ["DERMLENS_CORE_PYTHON"], "-m", "dermlens.cli.main", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and message in last and last.startswith("error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
