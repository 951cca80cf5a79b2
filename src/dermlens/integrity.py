"""A folder's SHA-256 manifest (`MANIFEST.sha256`, `sha256sum -c` format): write it, and check that every
file is listed, inside the folder and unchanged. Knows nothing of model cards (dermlens.bundle does)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dermlens.errors import BundleError

MANIFEST = "MANIFEST.sha256"
MAX_MANIFEST_BYTES = 1 << 20
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_CHUNK = 1 << 20


def reseal_hint(folder: Path) -> str:
    """How the owner of a bundle they built themselves seals it again."""
    return f"if you built or changed it yourself, re-seal it with `dermlens bundle seal {folder}`"


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def inside(folder: Path, name: str) -> Path:
    """The regular file `name` directly in `folder`; a path with a folder part, a symlink leading outside the
    folder or anything but a regular file is refused."""
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
        raise BundleError(f"{folder}: {name!r} is not a file name inside the bundle (paths are refused)")
    path = folder / name
    root = folder.resolve()
    if path.is_symlink() and path.resolve().parent != root:
        raise BundleError(f"{path} is a symlink to {os.readlink(path)}, outside the bundle: refused")
    if path.exists() and not path.is_file():
        raise BundleError(f"{path} is not a regular file: refused")
    return path


def files_of(folder: Path) -> list[str]:
    """Names of the folder's files (symlinks included, sub-folders not), the manifest excepted."""
    skip = (MANIFEST, f".{MANIFEST}.tmp")
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in skip and not p.is_dir())


def write_manifest(folder: Path) -> Path:
    """List every file of the folder with its SHA-256 in MANIFEST.sha256 (written atomically)."""
    folder = Path(folder)
    lines = [f"{sha256_file(inside(folder, n))}  {n}\n" for n in files_of(folder)]
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 from MANIFEST.sha256; a missing, oversized or malformed manifest is refused."""
    path = Path(folder) / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise BundleError(
            f"{folder} has no {MANIFEST}, so its files cannot be checked: {reseal_hint(folder)}"
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes: not a bundle manifest")
    listed: dict[str, str] = {}
    for i, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        m = _LINE.fullmatch(line)
        if m is None:
            raise BundleError(f"{path} line {i} is not `<sha256>  <file name>`")
        digest, name = m.groups()
        inside(Path(folder), name)
        if name in listed or name == MANIFEST:
            raise BundleError(f"{path} lists {name!r} twice or lists itself")
        listed[name] = digest
    return listed


def check_manifest(folder: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    """Check every file against MANIFEST.sha256; returns one line per file. `required` files must be listed
    and present; listed `optional` ones may be absent; any other file must be listed and match."""
    folder = Path(folder)
    listed = read_manifest(folder)
    missing = [n for n in required if n not in listed]
    if missing:
        raise BundleError(f"{folder / MANIFEST} does not list {', '.join(missing)}: {reseal_hint(folder)}")
    unlisted = [n for n in files_of(folder) if n not in listed]
    if unlisted:
        raise BundleError(f"{folder / unlisted[0]} is not listed in {MANIFEST}: {reseal_hint(folder)}")
    lines = []
    for name, digest in listed.items():
        path = inside(folder, name)
        if not path.exists():
            if name not in optional:
                raise BundleError(f"{path} is listed in {MANIFEST} but missing")
            lines.append(f"absent (optional): {name}")
            continue
        if sha256_file(path) != digest:
            raise BundleError(
                f"{path} does not match the sha256 recorded in {MANIFEST}: the bundle was changed"
            )
        lines.append(f"hash ok: {name}")
    return lines


def manifest_digest(folder: Path) -> str:
    """SHA-256 of MANIFEST.sha256: one value that pins every file of the bundle."""
    return sha256_file(Path(folder) / MANIFEST)
