"""Server configuration: configs/serve.yaml, then an optional user YAML, then environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dermlens import config as configuration

ENV_TOKEN = "DERMLENS_API_TOKEN"
ENV_RECORDS_URL = "DERMLENS_RECORDS_URL"
ENV_CONFIG = "DERMLENS_SERVE_CONFIG"


class Limits(BaseModel):
    """Upload limits."""

    model_config = ConfigDict(extra="forbid")
    max_upload_bytes: int = Field(gt=0)
    max_pixels: int = Field(gt=0)
    max_decoded_bytes: int = Field(gt=0)
    memory_budget_bytes: int = Field(gt=0)
    max_batch_files: int = Field(gt=0)
    max_in_flight: int = Field(gt=0)
    retry_after_s: int = Field(ge=0)
    max_uploads_per_client: int = Field(gt=0)
    max_auth_failures: int = Field(gt=0)
    auth_failure_window_s: float = Field(gt=0)


class Batching(BaseModel):
    """Dynamic batching of concurrent requests into one onnxruntime call."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool
    max_batch: int = Field(gt=0)
    max_wait_ms: float = Field(ge=0)
    max_queue: int = Field(gt=0)


class Inference(BaseModel):
    """Threadpool settings for model calls."""

    model_config = ConfigDict(extra="forbid")
    max_concurrent: int = Field(gt=0)
    threads: int | None = Field(gt=0)
    batching: Batching


class Http(BaseModel):
    """uvicorn connection limits and time-outs."""

    model_config = ConfigDict(extra="forbid")
    header_timeout_s: float = Field(gt=0)
    body_timeout_s: float = Field(gt=0)
    body_grace_s: float = Field(ge=0)
    min_body_rate_bytes_s: float = Field(ge=0)
    keep_alive_s: int = Field(gt=0)
    max_header_bytes: int = Field(gt=0)
    max_connections: int = Field(gt=0)


class RecordsSettings(BaseModel):
    """Where prediction records (and optionally images) are kept."""

    model_config = ConfigDict(extra="forbid")
    url: str | None
    store_images: bool
    image_dir: str | None
    store_filename: bool
    lock_timeout_s: float = Field(gt=0)


class DicomwebSettings(BaseModel):
    """The PACS that store_sr=true stores DICOM SRs in (STOW-RS)."""

    model_config = ConfigDict(extra="forbid")
    url: str | None
    timeout_s: float = Field(gt=0)


class ServeSettings(BaseModel):
    """Everything `dermlens serve` needs; the values (defaults included) come from configs/serve.yaml."""

    model_config = ConfigDict(extra="forbid")
    host: str
    port: int = Field(ge=0, le=65535)
    model: str | None
    precision: str | None
    refer_rate: float | None = Field(ge=0, le=1)
    api_token: str | None
    allow_insecure_bind: bool
    trusted_hosts: list[str] | None
    cors_origins: list[str]
    limits: Limits
    inference: Inference
    http: Http
    records: RecordsSettings
    dicomweb: DicomwebSettings


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """True for loopback bind addresses (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(settings: ServeSettings) -> list[str]:
    """Host header values to serve: the configured list, else loopback names plus a specific bind host."""
    if settings.trusted_hosts is not None:
        return list(settings.trusted_hosts)
    hosts = [*LOOPBACK_HOSTS, "[::1]"]
    if settings.host not in ("0.0.0.0", "::", "") and settings.host not in hosts:
        hosts.append(settings.host)
    return hosts


def load_settings(config: str | Path | None = None, **overrides: Any) -> ServeSettings:
    """configs/serve.yaml < YAML (argument or $DERMLENS_SERVE_CONFIG) < environment < non-None overrides."""
    env: dict[str, Any] = {}
    if os.environ.get(ENV_TOKEN):
        env["api_token"] = os.environ[ENV_TOKEN]
    if os.environ.get(ENV_RECORDS_URL):
        env["records"] = {"url": os.environ[ENV_RECORDS_URL]}
    layers = [
        ("the environment", env),
        ("command-line options", {k: v for k, v in overrides.items() if v is not None}),
    ]
    path = config or os.environ.get(ENV_CONFIG) or None
    return configuration.load_model("serve", ServeSettings, path, layers=layers)
