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


def _check_type(key: str, default: Any, value: Any) -> None:
    """A value must have the type of the shipped default (numbers may be int or float; null is allowed)."""
    if default is None or value is None or default == "auto":  # "auto" keys also take a number or list
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }.get(type(default), lambda v: True)
    if not ok(value):
        want = type(default).__name__
        raise ConfigError(f"config key {key!r} must be {want} (like the default {default!r}), got {value!r}")


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
            _check_type(key, out[k], v)
            out[k] = v
    return out


def apply_override(cfg: dict, item: str, defaults: dict | None = None) -> dict:
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
    if isinstance(node[parts[-1]], int) and isinstance(value, float) and value.is_integer():
        value = int(value)
    _check_type(key.strip(), default_value(parts, defaults), value)
    node[parts[-1]] = value
    return cfg


def default_value(parts: list[str], defaults: dict | None = None) -> Any:
    """The shipped default of a dotted key."""
    node: Any = defaults if defaults is not None else default_config()
    for p in parts:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def check_arch(cfg: dict) -> None:
    """model.arch must name a timm architecture (one line, with a hint, when it does not)."""
    import timm

    arch = str(cfg["model"]["arch"])
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.arch {arch!r} is not a timm architecture{hint}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict | None = None
) -> dict[str, Any]:
    """Defaults (configs/train.yaml) <- YAML file <- overrides; every key must exist in the defaults."""
    cfg = copy.deepcopy(defaults) if defaults is not None else default_config()
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
        cfg = apply_override(cfg, item, defaults)
    return cfg


def with_section(name: str, section: str) -> dict[str, Any]:
    """configs/train.yaml's keys, set from the packaged configs/<name> file, plus its own `section`."""
    packaged = yaml.safe_load(resources.files("dermlens.configs").joinpath(name).read_text())
    own = packaged.pop(section)
    cfg = _merge(default_config(), packaged)
    cfg[section] = own
    return cfg


def dump_config(cfg: dict, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
