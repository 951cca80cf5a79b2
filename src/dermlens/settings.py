"""Locations that depend on the user's machine, read from environment variables with defaults."""

from __future__ import annotations

import os
import platform
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


def _cpuinfo(key: str) -> str | None:
    """The first `key` field of /proc/cpuinfo, or None."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)


def machine() -> dict:
    """The processor a figure was measured on (model name, cores, native bf16, int8 dot products)."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    flags = (_cpuinfo("flags") or "").split()
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "native_bf16": any(f in flags for f in ("amx_bf16", "avx512_bf16")),
        "avx512": "avx512f" in flags,
        "int8_vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")),
        "x86": platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"),
    }


def cpu_name() -> str:
    """The CPU model name and the logical CPU count (for results files)."""
    name = _cpuinfo("model name")
    return f"{name} ({os.cpu_count()} logical CPUs visible)" if name else platform.processor() or "unknown"
