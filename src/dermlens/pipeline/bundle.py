"""One call from a trained model to a servable bundle: export, then trust fitting on the served precision."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens.export.checkpoint import LoadedModel
from dermlens.export.stage import export_bundle, export_config
from dermlens.trust.exported import fit_exported


def build_bundle(
    checkpoint: str | Path | None,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    loaded: LoadedModel | None = None,
    external: str | Path | None = None,
) -> dict[str, Any]:
    """Checkpoint (or a `loaded` model) + prepared data -> a complete bundle in out_dir; returns its card."""
    cfg = cfg or export_config()
    exported = export_bundle(checkpoint, data_dir, out_dir, cfg, log, loaded)
    return fit_exported(exported, cfg, log, external, data_dir)
