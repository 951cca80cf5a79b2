"""The licence of every runtime dependency (core + the serve, postgres, dicom and monitor extras), read
from the installed packages' metadata; writes docs/results/licences.json and the table in docs/licences.md.

    python benchmarks/licences.py [--json docs/results/licences.json] [--markdown docs/licences.md]
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("serve", "postgres", "dicom", "monitor")
BEGIN, END = "<!-- licences:begin (benchmarks/licences.py) -->", "<!-- licences:end -->"
# GPL and AGPL (any version), but not the LGPL: a library may link LGPL code without taking its licence.
_GPL = re.compile(r"(?<![L\w])A?GPL|GNU (Affero )?General Public", re.IGNORECASE)


def project_requirements(extras: tuple[str, ...], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """dermlens' own requirement strings (core + extras, self-references expanded) from pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name, optional = canonicalize_name(project["name"]), project.get("optional-dependencies", {})
    out, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in optional[extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == name:
                todo += sorted(req.extras)
            else:
                out.append(spec)
    return out


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """Every installed distribution the requirements pull in (transitively, markers evaluated here).

    Raises PackageNotFoundError naming a required distribution that is not installed."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(spec), "") for spec in requirements]
    done: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in done:
            continue
        done.add(key)
        dist = found.get(key[0]) or metadata.distribution(req.name)
        found[key[0]] = dist
        for spec in dist.requires or []:
            sub = Requirement(spec)
            todo += [(sub, e) for e in sorted(req.extras) or [""]]
    return dict(sorted(found.items()))


def licence(dist: metadata.Distribution) -> str:
    """The distribution's licence: License-Expression, else a one-line License field, else classifiers."""
    meta = dist.metadata
    if expr := (meta.get("License-Expression") or "").strip():
        return expr
    classifiers = [
        c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")
    ]
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80:
        return text
    if classifiers:
        return " / ".join(classifiers)
    return text.splitlines()[0][:80] if text else "UNKNOWN"


def is_gpl(text: str) -> bool:
    """True for a GPL or AGPL licence string (not the LGPL)."""
    return bool(_GPL.search(text))


def runtime_licences(extras: tuple[str, ...] = RUNTIME_EXTRAS) -> list[dict[str, object]]:
    """One row per runtime distribution: name, version, licence and the extras ("core" too) that need it."""
    needed_by: dict[str, list[str]] = {}
    dists: dict[str, metadata.Distribution] = {}
    for group in ("core", *extras):
        found = closure(project_requirements(() if group == "core" else (group,)))
        dists |= found
        for name in found:
            needed_by.setdefault(name, []).append(group)
    return [
        {
            "name": dists[n].metadata["Name"],
            "version": dists[n].version,
            "licence": licence(dists[n]),
            "needed_by": "core" if "core" in needed_by[n] else ", ".join(needed_by[n]),
        }
        for n in sorted(dists)
    ]


def markdown_table(rows: list[dict[str, object]]) -> str:
    """The rows as a markdown table."""
    lines = ["| package | version | licence | needed by |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['version']} | {r['licence']} | {r['needed_by']} |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, table: str) -> None:
    """Replace the generated table between the markers in `path` (appended if the markers are absent)."""
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text else f"{block}\n"
    path.write_text(text)


def main() -> None:
    """Write the JSON and the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "licences.json")
    ap.add_argument("--markdown", type=Path, default=ROOT / "docs" / "licences.md")
    args = ap.parse_args()
    rows = runtime_licences()
    args.json.write_text(json.dumps({"extras": ["core", *RUNTIME_EXTRAS], "packages": rows}, indent=2) + "\n")
    write_markdown(args.markdown, markdown_table(rows))
    gpl = [f"{r['name']} ({r['licence']})" for r in rows if is_gpl(str(r["licence"]))]
    print(f"{len(rows)} runtime packages; GPL/AGPL: {', '.join(gpl) or 'none'}")


if __name__ == "__main__":
    main()
