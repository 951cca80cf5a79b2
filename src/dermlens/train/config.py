"""Training configuration: configs/train.yaml <- a YAML file <- dotted overrides, via `dermlens.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermlens import config
from dermlens.config import ConfigError

__all__ = [
    "ConfigError",
    "apply_override",
    "check_arch",
    "default_config",
    "dump_config",
    "load_config",
    "with_section",
]


def default_config() -> dict[str, Any]:
    """The shipped defaults, configs/train.yaml."""
    return config.packaged("train")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict | None = None
) -> dict[str, Any]:
    """Defaults (configs/train.yaml, or `defaults`) <- YAML file (a path, or a packaged config name like
    release.yaml) <- overrides; every key must exist in the defaults, with the default's type."""
    return config.load("train", path, list(overrides or []), defaults=defaults)


def apply_override(cfg: dict, item: str, defaults: dict | None = None) -> dict:
    """`cfg` with one `dotted.key=value` override applied (checked like every other)."""
    return config.load("train", overrides=[item], base=cfg, defaults=defaults)


def with_section(name: str, section: str) -> dict[str, Any]:
    """configs/train.yaml's keys, set from the packaged configs/<name> file, plus its own `section`."""
    packaged = config.read_yaml(name)
    own = packaged.pop(section)
    cfg = config.load("train", layers=[(f"configs/{name}", packaged)])
    cfg[section] = own
    return cfg


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
