"""Training configuration: configs/train.yaml <- a YAML file <- dotted overrides, via `dermlens.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermlens import config
from dermlens.config import ConfigError

__all__ = ["ConfigError", "apply_override", "check_arch", "default_config", "dump_config", "load_config"]


def default_config() -> dict[str, Any]:
    """The shipped defaults, configs/train.yaml."""
    return config.packaged("train")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- YAML file (a path, or a packaged config name like release.yaml) <- overrides."""
    return config.load("train", path, list(overrides or []))


def apply_override(cfg: dict, item: str) -> dict:
    """`cfg` with one `dotted.key=value` override applied (checked like every other)."""
    return config.load("train", overrides=[item], base=cfg)


def check_arch(cfg: dict) -> None:
    """model.arch must name a timm architecture (one line, with a hint, when it does not)."""
    import timm

    arch = str(cfg["model"]["arch"])
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.arch {arch!r} is not a timm architecture{hint}")


def dump_config(cfg: dict, path: Path) -> None:
    """Write the resolved config as YAML."""
    config.dump(cfg, path)
