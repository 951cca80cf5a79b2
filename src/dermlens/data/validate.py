"""Manifest validation: missing/corrupt images, unknown labels, duplicate ids, label conflicts, bad ages.

Each problem is reported with a count and examples; the caller either drops the bad rows (`skip`) or
stops (`fail`). The report is also saved as DIR/validation_report.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermlens.data import taxonomy as tx
from dermlens.data.cache import chunks, pool_map
from dermlens.data.manifest import data_config
from dermlens.preprocess import ImageDecodeError, load_rgb

CHECKS: dict[str, str] = {
    "missing_file": "image file missing",
    "corrupt_image": "unreadable or corrupt image",
    "unknown_label": "unknown or empty diagnosis label",
    "duplicate_id": "duplicate image id",
    "conflicting_labels": "different diagnoses within one lesion",
    "impossible_age": "impossible age",
}
KNOWN_LABELS = frozenset(tx.FINE_CODES) | {tx.UNKNOWN}


@dataclass
class Issue:
    """One kind of problem: the affected row positions and human-readable examples."""

    kind: str
    rows: list[int]
    examples: list[str]

    @property
    def title(self) -> str:
        return CHECKS[self.kind]


@dataclass
class ValidationReport:
    """All problems found in a manifest of `n_rows` rows."""

    n_rows: int
    checked_images: bool
    issues: list[Issue] = field(default_factory=list)

    @property
    def bad_rows(self) -> list[int]:
        return sorted({r for issue in self.issues for r in issue.rows})

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        """One line: each problem with its count and first example."""
        parts = [f"{i.title}: {len(i.rows)} (e.g. {i.examples[0]})" for i in self.issues]
        return f"{len(self.bad_rows)} of {self.n_rows} rows have problems: " + "; ".join(parts)

    def to_dict(self, df: pd.DataFrame, action: str) -> dict:
        ids = df["image_id"].astype(str).tolist()
        return {
            "n_rows": self.n_rows,
            "n_bad_rows": len(self.bad_rows),
            "action": action,
            "checked_images": self.checked_images,
            "issues": [
                {
                    "kind": i.kind,
                    "title": i.title,
                    "count": len(i.rows),
                    "examples": i.examples,
                    "image_ids": [ids[r] for r in i.rows],
                }
                for i in self.issues
            ],
        }

    def write(self, path: str | Path, df: pd.DataFrame, action: str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(df, action), indent=2) + "\n")
        return path

    def table(self):  # -> rich.table.Table
        """A rich table: problem, count, examples."""
        from rich.table import Table

        t = Table(title=f"Validation: {len(self.bad_rows)} of {self.n_rows} rows with problems")
        t.add_column("problem", style="bold")
        t.add_column("count", justify="right")
        t.add_column("examples", overflow="fold")
        for i in self.issues:
            t.add_row(i.title, str(len(i.rows)), "\n".join(i.examples))
        return t


def _decode_check(paths: list[str]) -> list[str | None]:
    """Worker: decode each file; None when fine, else the decoder's message."""
    out: list[str | None] = []
    for p in paths:
        try:
            load_rgb(p)
            out.append(None)
        except ImageDecodeError as e:
            out.append(str(e))
    return out


def _issue(kind: str, rows: list[int], examples: list[str], limit: int) -> list[Issue]:
    return [Issue(kind, rows, examples[:limit])] if rows else []


def check_images(
    df: pd.DataFrame, decode: bool = True, workers: int | None = None, progress: bool = False
) -> list[Issue]:
    """Missing files, and (if `decode`) files that load_rgb cannot decode."""
    cfg = data_config()
    limit = int(cfg["validation"]["examples"])
    paths = df["image_path"].astype(str).tolist()
    exists = [os.path.isfile(p) for p in paths]
    missing = [i for i, e in enumerate(exists) if not e]
    issues = _issue("missing_file", missing, [paths[i] for i in missing], limit)
    present = [i for i, e in enumerate(exists) if e]
    if decode and present:
        ranges = list(chunks(len(present), int(cfg["cache"]["chunk"]) * 4))
        tasks = [([paths[i] for i in present[a:b]],) for a, b in ranges]
        workers = int(workers or cfg["cache"]["workers"])
        sizes = [b - a for a, b in ranges]
        results = [
            m
            for part in pool_map(_decode_check, tasks, workers, sizes, "checking images", progress)
            for m in part
        ]
        bad = [(present[j], m) for j, m in enumerate(results) if m is not None]
        issues += _issue("corrupt_image", [i for i, _ in bad], [m for _, m in bad], limit)
    return issues


def check_table(df: pd.DataFrame) -> list[Issue]:
    """Label, id, lesion-consistency and age checks on the table alone."""
    cfg = data_config()["validation"]
    limit = int(cfg["examples"])
    ids = df["image_id"].astype(str).tolist()
    issues: list[Issue] = []

    dx = df["diagnosis"]
    unknown = [i for i, d in enumerate(dx) if d not in KNOWN_LABELS]
    issues += _issue("unknown_label", unknown, [f"{ids[i]}: {dx.iloc[i]!r}" for i in unknown], limit)

    dup_mask = df["image_id"].duplicated(keep="first").to_numpy()
    dups = [i for i, d in enumerate(dup_mask) if d]
    issues += _issue("duplicate_id", dups, [f"{ids[i]} (repeats an earlier row)" for i in dups], limit)

    lesions = df[df["lesion_id"].notna()]
    n_dx = lesions.groupby("lesion_id")["diagnosis"].nunique(dropna=False)
    conflicted = set(n_dx[n_dx > 1].index)
    rows = [i for i, les in enumerate(df["lesion_id"]) if les in conflicted]
    examples = [
        f"{les}: "
        + ", ".join(f"{r.image_id}={r.diagnosis}" for r in lesions[lesions.lesion_id == les].itertuples())
        for les in sorted(conflicted)[:limit]
    ]
    issues += _issue("conflicting_labels", rows, examples, limit)

    age = pd.to_numeric(df["age"], errors="coerce")
    lo, hi = float(cfg["age_min"]), float(cfg["age_max"])
    bad_age = [i for i, a in enumerate(age) if pd.notna(a) and not lo <= a <= hi]
    issues += _issue("impossible_age", bad_age, [f"{ids[i]}: age {age.iloc[i]:g}" for i in bad_age], limit)
    return issues


def validate(
    df: pd.DataFrame,
    check_files: bool = True,
    decode: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Run every check on a manifest; image checks only when `check_files`."""
    df = df.reset_index(drop=True)
    issues = check_images(df, decode, workers, progress) if check_files else []
    issues += check_table(df)
    order = list(CHECKS)
    return ValidationReport(len(df), check_files, sorted(issues, key=lambda i: order.index(i.kind)))


def drop_bad_rows(df: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    """The manifest without the rows the report flags."""
    keep = pd.Series(True, index=range(len(df)))
    keep[report.bad_rows] = False
    return df.reset_index(drop=True)[keep.to_numpy()].reset_index(drop=True)
