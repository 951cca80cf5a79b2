"""Rich tables `dermlens data prepare` prints: what the ISIC Archive reader left out, classes per split,
missing metadata."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from rich.table import Table

from dermlens.data.isic_archive import unmapped
from dermlens.data.splits import SPLITS


def archive_summary(show: Callable[[object], None], df: pd.DataFrame, image_types: tuple[str, ...]) -> None:
    """What the ISIC Archive reader left out: other image types, diagnoses that map to no class."""
    dropped = int(df.attrs.get("dropped_image_type", 0))
    if dropped:
        kept = ", ".join(image_types)
        show(f"Kept image_type {kept}: left out {dropped} other image(s) (--image-types all keeps them)")
    counts = unmapped(df)
    if counts.empty:
        show("[green]Every diagnosis maps onto a dermlens class[/green]")
        return
    t = Table(title=f"{int(counts.sum())} image(s) whose ISIC diagnosis maps to no dermlens class")
    t.add_column("diagnosis_1:...:diagnosis_5")
    t.add_column("images", justify="right")
    for path, n in counts.items():
        t.add_row(str(path), str(int(n)))
    show(t)


def class_table(df: pd.DataFrame, deviation: dict[str, float]) -> Table:
    """Images per class and split, with each class's share of its split and the largest share deviation."""
    splits = [s for s in SPLITS if s in set(df["split"])]
    t = Table(title="Images per class and split (share of split)")
    t.add_column("class", style="bold")
    for s in splits:
        t.add_column(s, justify="right")
    t.add_column("all", justify="right")
    sizes = df["split"].value_counts()
    for c, n in df["diagnosis"].value_counts().items():
        cells = []
        for s in splits:
            k = int(((df["diagnosis"] == c) & (df["split"] == s)).sum())
            cells.append(f"{k} ({100 * k / sizes[s]:.1f}%)")
        t.add_row(str(c), *cells, f"{n} ({100 * n / len(df):.1f}%)")
    t.add_row("total", *[str(int(sizes[s])) for s in splits], str(len(df)), style="bold")
    t.add_row("max share dev.", *[f"{100 * deviation.get(s, 0):.2f} pt" for s in splits], "", style="dim")
    return t


def missing_table(df: pd.DataFrame) -> Table:
    """Missing lesion id, age, sex, site and dx_type: count and share."""
    t = Table(title="Missing metadata")
    t.add_column("field", style="bold")
    t.add_column("missing", justify="right")
    t.add_column("share", justify="right")
    for c in ("lesion_id", "age", "sex", "site", "dx_type"):
        k = int(df[c].isna().sum())
        t.add_row(c, str(k), f"{100 * k / len(df):.1f}%")
    return t
