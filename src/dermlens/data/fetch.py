"""`dermlens data fetch`: download ISIC Archive images + metadata with the official client, isic-cli.

The client writes OUT/ISIC_*.jpg, OUT/metadata.csv, attribution.txt and licenses/, the layout that
`dermlens data prepare --dataset isic-archive` reads. A missing client or network is a one-line error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

from dermlens.data.isic_archive import archive_config
from dermlens.errors import FetchError  # noqa: F401 (re-exported)
from dermlens.extras import install_hint

INSTALL_HINT = install_hint("isic")
_NETWORK_SIGNS = (
    "ConnectionError",
    "Max retries exceeded",
    "Name or service not known",
    "NewConnectionError",
)


def client_command(client: str | None = None) -> list[str]:
    """The isic-cli executable: `client` (or the config's) on PATH, else beside this Python."""
    name = client or archive_config()["fetch"]["client"]
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise FetchError(f"the ISIC Archive client `{name}` (isic-cli) is not installed: {INSTALL_HINT}")
    return [found]


def check_network(api: str | None = None, timeout: float | None = None) -> None:
    """Fail fast when the Archive's API cannot be reached (isic-cli itself retries for minutes)."""
    cfg = archive_config()["fetch"]
    api = api or cfg["api"]
    try:
        with urllib.request.urlopen(api, timeout=timeout or cfg["check_timeout_s"]):
            return
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(
            f"cannot reach the ISIC Archive at {urlparse(api).netloc} ({reason}): check the network "
            "connection or proxy; nothing was downloaded"
        ) from None


def download_args(out: Path, search: str | None, collections: str | None, limit: int) -> list[str]:
    """isic-cli's own syntax: isic image download [--search Q] [--collections IDS] [--limit N] OUTDIR."""
    if not search and not collections:
        raise FetchError(
            "give --search QUERY and/or --collections IDS (the whole Archive is 400,000+ images)"
        )
    args = ["image", "download"]
    if search:
        args += ["--search", search]
    if collections:
        args += ["--collections", collections]
    return [*args, "--limit", str(int(limit)), str(out)]


def fetch(
    out: Path,
    search: str | None = None,
    collections: str | None = None,
    limit: int = 0,
    client: str | None = None,
) -> int:
    """Download into `out` with isic-cli (its progress shown on stderr); returns the images listed."""
    cmd = client_command(client) + download_args(out, search, collections, limit)
    check_network()
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(line)
    if proc.returncode != 0:
        text = "\n".join(tail)
        if any(s in text for s in _NETWORK_SIGNS):
            raise FetchError("isic-cli lost the connection to the ISIC Archive: check the network and rerun")
        last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "no output")
        raise FetchError(f"isic-cli failed (exit {proc.returncode}): {last}")
    meta = out / archive_config()["metadata_csv"]
    if not meta.is_file():
        raise FetchError(f"isic-cli finished but wrote no {meta.name} in {out}")
    with open(meta, encoding="utf-8") as fh:
        return max(0, sum(1 for _ in fh) - 1)
