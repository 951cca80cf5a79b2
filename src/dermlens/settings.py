"""Locations that depend on the user's machine, read from environment variables with defaults."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """Root of the shared datasets: $DERMLENS_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("DERMLENS_DATA")
    if env:
        return Path(env).expanduser().resolve()
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def work_dir() -> Path:
    """Scratch root for prepared data and runs: $DERMLENS_WORK, else ./work."""
    return Path(os.environ.get("DERMLENS_WORK", "work")).expanduser().resolve()
