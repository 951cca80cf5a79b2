"""Training configuration: YAML files under dermlens/configs plus dotted command-line overrides."""

from __future__ import annotations

import contextlib
import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used (one-line message)."""


def default_config() -> dict[str, Any]:
    """The shipped defaults, configs/train.yaml."""
    return yaml.safe_load(resources.files("dermlens.configs").joinpath("train.yaml").read_text())


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    """Recursively merge `over` onto `base`; unknown keys are errors."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in out:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _merge(out[k], v, key + ".")
        else:
            out[k] = v
    return out


def apply_override(cfg: dict, item: str) -> dict:
    """Apply one `dotted.key=value` override (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.max_epochs=3)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for i, p in enumerate(parts):
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {item!r}")
        if i < len(parts) - 1:
            node = node[p]
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value in override {item!r}: {e}") from e
    if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    node[parts[-1]] = value
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- YAML file <- overrides; every key must exist in configs/train.yaml."""
    cfg = default_config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            alt = resources.files("dermlens.configs").joinpath(str(path))
            if not alt.is_file():
                raise ConfigError(f"config file not found: {path}")
            text = alt.read_text()
        else:
            text = p.read_text()
        try:
            user = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from e
        cfg = _merge(cfg, user)
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return cfg


def dump_config(cfg: dict, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
