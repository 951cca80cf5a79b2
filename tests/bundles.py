"""The model bundle the tests run against (shared by the runtime, API, records, CLI and browser tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dermlens.bundle import release_dir


def bundle_dir() -> Path:
    """$DERMLENS_TEST_BUNDLE or the packaged release bundle; skip, saying why, while it does not exist."""
    path = Path(os.environ.get("DERMLENS_TEST_BUNDLE") or release_dir())
    if not (path / "card.json").is_file():
        pytest.skip(f"no model bundle at {path} yet (the release bundle is committed by the export step)")
    return path
