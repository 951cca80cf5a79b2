"""Dependency hygiene: pyproject floors never admit a release with a known, fixed CVE; constraints.txt pins
every dependency to a version inside pyproject's ranges and above those fixes; and no runtime dependency of
the core, serve, dicom, monitor or postgres installs is GPL/AGPL licensed (read from installed metadata)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from licences import RUNTIME_EXTRAS, closure, is_gpl, licence, project_requirements  # benchmarks/licences.py

REPO = Path(__file__).resolve().parents[1]

# package -> (first release with the fix, the CVEs it fixed). pyproject floors and constraints.txt pins must
# be at least this version. Transitive-only packages (jinja2, requests, ...) are checked against the pins.
SAFE_FLOORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "starlette": ("0.49.1", ("CVE-2024-47874", "CVE-2025-54121", "CVE-2025-62727")),
    "h11": ("0.16.0", ("CVE-2025-43859",)),
    "python-multipart": ("0.0.18", ("CVE-2024-24762", "CVE-2024-53981")),
    "pillow": ("10.3.0", ("CVE-2023-4863", "CVE-2024-28219")),
    "fastapi": ("0.109.1", ("CVE-2024-24762",)),
    "uvicorn": ("0.11.7", ("CVE-2020-7694", "CVE-2020-7695")),
    "pydantic": ("2.4.0", ("CVE-2024-3772",)),
    "pyyaml": ("5.4", ("CVE-2020-14343",)),
    "torch": ("2.6.0", ("CVE-2025-32434",)),
    "onnx": ("1.17.0", ("CVE-2024-27318", "CVE-2024-27319", "CVE-2024-5187")),
    "lightning": ("2.3.3", ("CVE-2024-5452",)),
    "tqdm": ("4.66.3", ("CVE-2024-34062",)),
    "scikit-learn": ("1.5.0", ("CVE-2024-5206",)),
    "setuptools": ("78.1.1", ("CVE-2024-6345", "CVE-2025-47273")),
    "jinja2": (
        "3.1.6",
        ("CVE-2024-22195", "CVE-2024-34064", "CVE-2024-56201", "CVE-2024-56326", "CVE-2025-27516"),
    ),
    "requests": ("2.32.4", ("CVE-2024-35195", "CVE-2024-47081")),
    "urllib3": ("2.5.0", ("CVE-2024-37891", "CVE-2025-50181", "CVE-2025-50182")),
    "idna": ("3.7", ("CVE-2024-3651",)),
    "certifi": ("2024.7.4", ("CVE-2024-39689",)),
    "mako": ("1.2.2", ("CVE-2022-40023",)),
    "pyarrow": ("14.0.1", ("CVE-2023-47248",)),
}
# Runtime installs whose dependencies must all be free of GPL/AGPL code (LGPL, e.g. psycopg, is fine).
NO_GPL = ("core", *RUNTIME_EXTRAS)


def pyproject_requirements(build: bool = False) -> list[Requirement]:
    """pyproject.toml's requirements: core and each extra (self-references dropped), + the build system."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = data["project"]
    specs = (data["build-system"]["requires"] if build else []) + project["dependencies"]
    specs += [s for extra in project["optional-dependencies"].values() for s in extra]
    reqs = [Requirement(s) for s in specs]
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def constraints() -> dict[str, Version]:
    """constraints.txt as {canonical name: pinned version}; every line must be an exact `==` pin."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.extras and req.marker is None, line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def floor(req: Requirement) -> Version | None:
    """The lowest version a requirement admits (None when it has no lower bound)."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=", "===")]
    return max(lows) if lows else None


def test_floors_exclude_releases_with_known_cves() -> None:
    bad = []
    for req in pyproject_requirements(build=True):
        name = canonicalize_name(req.name)
        if name in SAFE_FLOORS:
            safe, cves = SAFE_FLOORS[name]
            low = floor(req)
            if low is None or low < Version(safe):
                bad.append(f"{req} admits releases before {safe} ({', '.join(cves)})")
    assert not bad, "\n".join(bad)


def test_constraints_pin_every_dependency_inside_its_range_and_above_the_fixes() -> None:
    pins = constraints()
    outside = [
        f"{r.name}=={pins.get(canonicalize_name(r.name))} (pyproject: {r})"
        for r in pyproject_requirements()
        if (r.marker is None or r.marker.evaluate())
        and (canonicalize_name(r.name) not in pins or pins[canonicalize_name(r.name)] not in r.specifier)
    ]
    assert not outside, "constraints.txt misses or contradicts pyproject.toml:\n" + "\n".join(outside)
    vulnerable = [
        f"{name}=={pins[name]} < {safe} ({', '.join(cves)})"
        for name, (safe, cves) in SAFE_FLOORS.items()
        if name in pins and pins[name] < Version(safe)
    ]
    assert not vulnerable, "\n".join(vulnerable)
    assert "dermlens" not in pins and "pylibjpeg-libjpeg" not in pins


def test_safe_floor_table_is_well_formed() -> None:
    for name, (safe, cves) in SAFE_FLOORS.items():
        assert name == canonicalize_name(name) and Version(safe) and cves, name
        assert all(c.startswith("CVE-") and len(c.split("-")) == 3 for c in cves), name


@pytest.mark.parametrize("group", NO_GPL)
def test_no_runtime_dependency_is_gpl(group: str) -> None:
    """Every distribution the install pulls in (pyproject here, then installed metadata) has a non-GPL
    licence; a required distribution that is not installed fails too (its licence cannot be read)."""
    dists = closure(project_requirements(() if group == "core" else (group,), REPO / "pyproject.toml"))
    gpl = {name: licence(d) for name, d in dists.items() if is_gpl(licence(d))}
    assert not gpl, f"GPL/AGPL dependencies of {group}: {gpl}"
    assert all(licence(d) != "UNKNOWN" for d in dists.values())


def test_gpl_detection() -> None:
    for text in ("GPL-3.0-only", "GPL V3.0", "AGPL-3.0-or-later", "GNU General Public License v3 (GPLv3)"):
        assert is_gpl(text), text
    for text in ("LGPL-3.0-only", "GNU Lesser General Public License v3 (LGPLv3)", "MIT", "BSD-3-Clause"):
        assert not is_gpl(text), text
