"""What every results JSON records about where it ran: the CPU and the model bundle."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model name (as lscpu shows it) and the cores this process may use."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next(ln for ln in fh if ln.startswith("model name"))
        name = line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({len(os.sched_getaffinity(0))} cores)"


def model_version(bundle: str | Path | None = None) -> str:
    """`name version` of a model bundle's card (default: the packaged release)."""
    from dermlens.bundle import read_card, release_dir

    card = read_card(Path(bundle) if bundle else release_dir())
    return f"{card.name} {card.version}"


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the (shared) machine was during the run."""
    return [round(x, 2) for x in os.getloadavg()]
