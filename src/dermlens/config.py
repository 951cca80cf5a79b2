"""The one configuration loader every command uses.

packaged ``configs/<name>.yaml`` <- an optional user YAML file <- dotted ``key=value`` overrides. Each layer
is validated with pydantic against a model derived from the packaged defaults (or a given model): unknown
keys and values of the wrong type are one-line :class:`ConfigError` naming the key and the file or override.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

from dermlens.errors import ConfigError  # noqa: F401 (re-exported)

# Sections whose keys are free (a mapping the user may extend), per config name.
OPEN_KEYS: dict[str, tuple[str, ...]] = {
    "tune": ("space",),
    "export": ("licences",),
    "decode": ("formats", "mode_bytes"),
    "ensemble": ("export",),  # configs/export.yaml sections, merged by the export step
    "release_build": ("data", "holdout", "ensemble", "distill", "export", "ship"),
    "label_efficiency": ("inits", "epochs", "test"),
    "levers": ("levers", "overrides"),
}
# Sections a user file replaces whole instead of merging key by key.
REPLACE_KEYS: dict[str, tuple[str, ...]] = {
    "tune": ("space",),
    "label_efficiency": ("inits", "epochs", "test"),
    "levers": ("levers", "overrides"),
    "release_build": ("data", "holdout", "ensemble", "distill", "export", "ship"),
}


# ---- reading ---------------------------------------------------------------------------------------


def packaged_path(name: str) -> Any:
    """The packaged configs/<name>.yaml (a Traversable)."""
    return resources.files("dermlens.configs").joinpath(f"{name}.yaml")


@functools.cache
def _packaged(name: str) -> dict[str, Any]:
    return _parse(packaged_path(name).read_text(), f"configs/{name}.yaml")


def packaged(name: str) -> dict[str, Any]:
    """The shipped defaults of configs/<name>.yaml (a fresh copy)."""
    return copy.deepcopy(_packaged(name))


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {source}: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from a file, else from a packaged config of that file name; one-line errors."""
    p = Path(path).expanduser()
    if p.is_file():
        return _parse(p.read_text(), str(path))
    alt = resources.files("dermlens.configs").joinpath(str(path))
    if str(path).endswith((".yaml", ".yml")) and alt.is_file():
        return _parse(alt.read_text(), str(path))
    raise ConfigError(f"{what} not found: {path}")


def parse_override(item: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}} (value parsed as YAML; empty = null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.max_epochs=3)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value in override {item!r}: {str(e).splitlines()[0]}") from e
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def merge(base: dict[str, Any], over: Mapping[str, Any], replace: Iterable[str] = ()) -> dict[str, Any]:
    """Recursive merge of `over` onto a copy of `base`; keys in `replace` (dotted) are replaced whole."""
    replace = set(replace)

    def go(b: dict, o: Mapping, prefix: str) -> dict:
        out = dict(b)
        for k, v in o.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and isinstance(out.get(k), dict) and key not in replace:
                out[k] = go(out[k], v, key + ".")
            else:
                out[k] = copy.deepcopy(v)
        return out

    return go(base, over, "")


# ---- schema from the defaults ------------------------------------------------------------------------


def _to_int(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _to_float(v: Any) -> Any:
    if isinstance(v, str):  # YAML 1.1 reads "2e-4" as a string
        try:
            return float(v)
        except ValueError:
            return v
    return v


_SCALARS: dict[type, Any] = {
    bool: StrictBool,
    int: Annotated[StrictInt, BeforeValidator(_to_int)],
    float: Annotated[StrictFloat, BeforeValidator(_to_float)],
    str: StrictStr,
}


def _type_of(value: Any, key: str, open_keys: frozenset[str]) -> Any:
    """The pydantic type a value must keep: the default's type (null or "auto" defaults take anything)."""
    if value is None or value == "auto":
        return Any
    if isinstance(value, dict):
        if key in open_keys:
            return dict[str, Any]
        return _model(key or "config", value, open_keys)
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        if kinds == {int, float}:
            kinds = {float}
        item = _SCALARS.get(kinds.pop()) if len(kinds) == 1 else None
        return list[item or Any]
    return _SCALARS.get(type(value), Any)


def _model(name: str, defaults: dict[str, Any], open_keys: frozenset[str]) -> type[BaseModel]:
    prefix = "" if name == "config" else name + "."
    fields = {str(k): (_type_of(v, f"{prefix}{k}", open_keys) | None, None) for k, v in defaults.items()}
    return create_model(name.replace(".", "_"), __config__=ConfigDict(extra="forbid"), **fields)


@functools.cache
def schema(name: str) -> type[BaseModel]:
    """The pydantic model of configs/<name>.yaml: every key typed like its default (null allowed)."""
    return _model("config", _packaged(name), _open(name))


def _open(name: str) -> frozenset[str]:
    return frozenset(OPEN_KEYS.get(name, ()))


# ---- validation and loading --------------------------------------------------------------------------


def _lookup(d: Any, loc: Sequence[Any]) -> Any:
    for p in loc:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _error(e: ValidationError, data: dict, defaults: dict, source: str) -> ConfigError:
    """The first pydantic error as one line naming the key and where the value came from."""
    err = e.errors()[0]
    loc = [p for p in err["loc"] if isinstance(p, str)]
    key = ".".join(loc) + "".join(f"[{p}]" for p in err["loc"][len(loc) :])
    if err["type"] == "extra_forbidden":
        return ConfigError(f"unknown config key {key!r} in {source}")
    default = _lookup(defaults, loc)
    if isinstance(default, list) and len(loc) < len(err["loc"]) and default:
        default = default[0]  # a list item of the wrong type: compare with the default's first item
    wrong_type = err["type"].endswith(("_type", "_parsing")) or err["type"] == "int_from_float"
    if wrong_type and default is not None and not isinstance(default, dict) and loc:
        want, got = type(default).__name__, err["input"]
        return ConfigError(
            f"config key {key!r} must be {want} (like the default {default!r}), got {got!r} in {source}"
        )
    return ConfigError(f"config key {key!r}: {err['msg']}, got {_lookup(data, loc)!r} in {source}")


def validate(
    name: str,
    data: dict[str, Any],
    source: str,
    model: type[BaseModel] | None = None,
    defaults: dict[str, Any] | None = None,
) -> BaseModel:
    """Check `data` against the config's model: given, else derived from `defaults` or configs/<name>.yaml."""
    if model is None:
        model = schema(name) if defaults is None else _model("config", defaults, _open(name))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _error(e, data, _packaged(name) if defaults is None else defaults, source) from None


def load(
    name: str,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    layers: Sequence[tuple[str, Mapping[str, Any]]] = (),
    model: type[BaseModel] | None = None,
    base: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    what: str = "config file",
) -> dict[str, Any]:
    """configs/<name>.yaml (or `defaults`, or `base`) <- YAML at `path` <- extra (source, mapping) `layers`
    <- `key=value` overrides, each layer validated (types from `defaults` when given, else configs/<name>)."""
    data = copy.deepcopy(base if base is not None else defaults if defaults is not None else _packaged(name))
    steps: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        steps.append((str(path), read_yaml(path, what)))
    steps += list(layers)
    steps += [(f"override {item!r}", parse_override(item)) for item in overrides]
    checked = validate(name, data, f"configs/{name}.yaml", model, defaults)
    for source, over in steps:
        data = merge(data, over, REPLACE_KEYS.get(name, ()))
        checked = validate(name, data, source, model, defaults)
    out = checked.model_dump()
    return out if model is not None else _strip(out, data)


def _strip(dumped: Any, given: Any) -> Any:
    """The validated values, keeping only the keys actually present (open sections stay as given)."""
    if isinstance(given, dict) and isinstance(dumped, dict):
        return {k: _strip(dumped.get(k), v) for k, v in given.items()}
    return dumped


def load_model(
    name: str,
    model: type[BaseModel],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    layers: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> Any:
    """Like `load`, validated against an explicit pydantic `model`; returns the model instance."""
    return model.model_validate(load(name, path, overrides, layers=layers, model=model))


def dump(cfg: Mapping[str, Any], path: Path) -> None:
    """Write resolved settings as YAML."""
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
