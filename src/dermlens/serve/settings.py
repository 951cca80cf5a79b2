"""Server configuration: configs/serve.yaml, then an optional user YAML, then environment variables."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

ENV_TOKEN = "DERMLENS_API_TOKEN"
ENV_RECORDS_URL = "DERMLENS_RECORDS_URL"
ENV_CONFIG = "DERMLENS_SERVE_CONFIG"


class Limits(BaseModel):
    """Upload limits."""

    model_config = ConfigDict(extra="forbid")
    max_upload_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    max_batch_files: int = Field(16, gt=0)


class Inference(BaseModel):
    """Threadpool settings for model calls."""

    model_config = ConfigDict(extra="forbid")
    max_concurrent: int = Field(2, gt=0)
    threads: int | None = Field(None, gt=0)


class RecordsSettings(BaseModel):
    """Where prediction records (and optionally images) are kept."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = None
    store_images: bool = False
    image_dir: str | None = None


class ServeSettings(BaseModel):
    """Everything `dermlens serve` needs; see configs/serve.yaml for the meaning of each key."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = None
    precision: str | None = None
    api_token: str | None = None
    limits: Limits = Field(default_factory=Limits)
    inference: Inference = Field(default_factory=Inference)
    records: RecordsSettings = Field(default_factory=RecordsSettings)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: override wins, nested sections merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(config: str | Path | None = None, **overrides: Any) -> ServeSettings:
    """Packaged defaults < YAML (argument or $DERMLENS_SERVE_CONFIG) < environment < non-None overrides."""
    text = resources.files("dermlens.configs").joinpath("serve.yaml").read_text()
    data = _read_yaml(text, "configs/serve.yaml")
    path = config or os.environ.get(ENV_CONFIG)
    if path:
        data = _merge(data, _read_yaml(Path(path).expanduser().read_text(), str(path)))
    if os.environ.get(ENV_TOKEN):
        data["api_token"] = os.environ[ENV_TOKEN]
    if os.environ.get(ENV_RECORDS_URL):
        data = _merge(data, {"records": {"url": os.environ[ENV_RECORDS_URL]}})
    data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    return ServeSettings.model_validate(data)
