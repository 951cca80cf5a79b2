"""Code shape: the layer contracts in pyproject [tool.importlinter] hold (lint-imports), and a package module
over 400 lines says why in its docstring."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_import_layers_and_no_cycles() -> None:
    """data -> model -> train -> export -> evaluate/trust -> serve -> cli (infer, metrics low); no cycles."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    assert Path(exe).is_file(), "lint-imports not found: pip install 'dermlens[dev]' (import-linter)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [exe, str(ROOT / "pyproject.toml")],
        cwd=ROOT / "src",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_long_modules_give_a_reason() -> None:
    long = []
    for path in sorted((ROOT / "src" / "dermlens").rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_LINES and "Long module:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert not long, "split these or add a 'Long module: <reason>' line to the docstring: " + ", ".join(long)
