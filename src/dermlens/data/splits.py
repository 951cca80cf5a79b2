"""Leak-free splits: lesion groups (near-duplicates merged), stratified grouped train/val/test, k folds.

A split is a function of (manifest, seed, fractions) only, and is saved to DIR/splits.json so every
later step uses the same one.
"""

from __future__ import annotations

import json
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens.data.manifest import SPLITS_NAME, DataError
from dermlens.extras import require

SPLITS: tuple[str, ...] = ("train", "val", "test")
DUPLICATES_CSV = "duplicates_abhishek2025.csv"
DERMAMNIST_CSV = "dermamnist_split.csv"
DERMAMNIST_WARNING = (
    "The DermaMNIST split is image-level and puts images of the same lesion in different splits "
    "(lesion leakage): its scores are optimistic. Use it only to compare with MedMNIST numbers."
)


class _UnionFind:
    """Union-find over hashable keys; each component's representative is its smallest key."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def read_duplicate_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Near-duplicate image pairs (from_img, to_img) as image ids (file suffix removed)."""
    table = pd.read_csv(path, dtype=str)
    if not {"from_img", "to_img"} <= set(table.columns):
        raise DataError(f"{path} needs columns from_img,to_img")
    strip = lambda s: Path(str(s).strip()).stem  # noqa: E731
    return [(strip(a), strip(b)) for a, b in zip(table["from_img"], table["to_img"], strict=True)]


# rows sharing one of these values share a group (one patient; identical image files)
LINK_COLUMNS: tuple[str, ...] = ("patient_id", "image_sha256")


def assign_groups(df: pd.DataFrame, pairs: list[tuple[str, str]] = ()) -> pd.Series:
    """Split group per row: its lesion (or image if no lesion), with near-duplicate images' groups merged,
    and, where the manifest has them, all lesions of one patient and all identical image files merged."""
    base = df["lesion_id"].where(df["lesion_id"].notna(), df["image_id"]).astype(str)
    by_image = dict(zip(df["image_id"], base, strict=True))
    uf = _UnionFind()
    for a, b in pairs:
        if a in by_image and b in by_image:
            uf.union(by_image[a], by_image[b])
    for col in (c for c in LINK_COLUMNS if c in df.columns):
        for _, groups in base[df[col].notna()].groupby(df[col][df[col].notna()]):
            first = groups.iloc[0]
            for other in groups.iloc[1:]:
                uf.union(first, other)
    return base.map(uf.find).rename("group_id")


def _n_parts(fractions: dict[str, float]) -> tuple[int, list[int]]:
    """Smallest k (<=100) such that every fraction is a multiple of 1/k, and the parts per split."""
    fr = [Fraction(fractions[s]).limit_denominator(100) for s in SPLITS]
    if any(f < 0 for f in fr) or sum(fr) != 1:
        raise DataError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    k = int(np.lcm.reduce([f.denominator for f in fr]))
    return k, [int(f * k) for f in fr]


def max_deviation(labels: pd.Series, split: pd.Series) -> dict[str, float]:
    """Per split: the largest |class share in split - overall class share| (fractions, not points)."""
    overall = labels.value_counts(normalize=True)
    out = {}
    for s in split.dropna().unique():
        share = labels[split == s].value_counts(normalize=True).reindex(overall.index, fill_value=0.0)
        out[str(s)] = float((share - overall).abs().max())
    return out


def _sgkf_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row from scikit-learn's StratifiedGroupKFold (shuffled with `seed`)."""
    StratifiedGroupKFold = require("sklearn.model_selection", "evaluate").StratifiedGroupKFold

    fold = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than k"
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for i, (_, test_idx) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
            fold[test_idx] = i
    return fold


def _greedy_split(y: np.ndarray, groups: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Small-data fallback: deal groups (largest first) to the split most short of their classes."""
    rng = np.random.default_rng(seed)
    codes, y_idx = np.unique(y, return_inverse=True)
    names, g_idx = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(names), len(codes)))
    np.add.at(counts, (g_idx, y_idx), 1)
    frac = np.array([fractions[s] for s in SPLITS])
    order = sorted(rng.permutation(len(names)), key=lambda g: -counts[g].sum())
    have = np.zeros((len(SPLITS), len(codes)))
    seen = np.zeros(len(codes))
    chosen = np.zeros(len(names), dtype=np.int64)
    for g in order:
        seen += counts[g]
        shortfall = (frac[:, None] * seen[None, :] - have) @ counts[g]
        shortfall[frac == 0] = -np.inf
        chosen[g] = int(np.argmax(shortfall))
        have[chosen[g]] += counts[g]
    return np.array(SPLITS)[chosen[g_idx]]


def grouped_split(
    df: pd.DataFrame,
    fractions: dict[str, float],
    seed: int,
    attempts: int = 8,
    target: float = 0.02,
) -> tuple[pd.Series, dict]:
    """Train/val/test per row, stratified by diagnosis and grouped by group_id.

    Rows are cut into k equal stratified group folds (k makes every fraction a multiple of 1/k) and folds
    are dealt to splits. Attempts reshuffle with seeds drawn from `seed` until every class share is within
    `target` of its overall share (or `attempts` run out: the best-balanced wins). Deterministic per seed.
    """
    k, parts = _n_parts(fractions)
    y = df["diagnosis"].fillna("?").astype(str).to_numpy()
    groups = df["group_id"].astype(str).to_numpy()
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise DataError(f"{n_groups} groups are too few for fractions {fractions} (need {k})")
    fold_to_split = np.repeat(np.array(SPLITS[::-1]), parts[::-1])  # test folds first, then val, train
    _, class_counts = np.unique(y, return_counts=True)
    small = class_counts.max() < k  # StratifiedGroupKFold needs one class with >= k members
    rng = np.random.default_rng(seed)
    best: tuple[float, pd.Series, int] | None = None
    for attempt in range(max(1, attempts)):
        sub_seed = int(rng.integers(2**31 - 1))
        values = (
            _greedy_split(y, groups, fractions, sub_seed)
            if small
            else fold_to_split[_sgkf_folds(y, groups, k, sub_seed)]
        )
        split = pd.Series(values, index=df.index, name="split")
        worst = max(max_deviation(df["diagnosis"].fillna("?"), split).values())
        if best is None or worst < best[0]:
            best = (worst, split, attempt)
        if worst <= target:
            break
    worst, split, attempt = best
    info = {
        "algorithm": "greedy" if small else "StratifiedGroupKFold",
        "parts": k,
        "max_attempts": attempts,
        "chosen_attempt": attempt,
        "max_deviation": worst,
    }
    return split, info


def kfold(df: pd.DataFrame, k: int, seed: int, within: pd.Series | None = None) -> pd.Series:
    """Cross-validation fold 0..k-1 (stratified, grouped) for rows in `within` (default all); others -1."""
    mask = pd.Series(True, index=df.index) if within is None else within.astype(bool)
    fold = pd.Series(-1, index=df.index, dtype=np.int64, name="fold")
    sub = df[mask]
    if k < 2 or sub.empty:
        return fold
    if sub["group_id"].nunique() < k:
        raise DataError(f"{sub['group_id'].nunique()} groups are too few for {k} folds")
    y = sub["diagnosis"].fillna("?").astype(str).to_numpy()
    fold[mask] = _sgkf_folds(y, sub["group_id"].astype(str).to_numpy(), k, seed)
    return fold


def dermamnist_split(df: pd.DataFrame, path: str | Path) -> pd.Series:
    """The official DermaMNIST (MedMNIST) image-level split, keyed by image_id. Leaks lesions."""
    table = pd.read_csv(path, dtype=str)
    if not {"image_id", "split"} <= set(table.columns):
        raise DataError(f"{path} needs columns image_id,split")
    mapping = dict(zip(table["image_id"].str.strip(), table["split"].str.strip().str.lower(), strict=True))
    split = df["image_id"].map(mapping).rename("split")
    if split.isna().any():
        missing = df.loc[split.isna(), "image_id"].head(3).tolist()
        raise DataError(f"{split.isna().sum()} images are not in {path}, e.g. {missing}")
    return split


def holdout_rows(df: pd.DataFrame, fraction: float, seed: int) -> pd.Index:
    """A seeded share of the `train` rows, stratified by diagnosis and whole lesion groups kept together."""
    rows = df[df["split"] == "train"]
    key = rows["group_id"] if "group_id" in rows else rows["image_id"]
    groups = rows.assign(_g=key.astype(str)).drop_duplicates("_g")
    rng = np.random.default_rng(seed)
    chosen = []
    for _, g in groups.groupby("diagnosis", sort=True):
        n = int(round(fraction * len(g)))
        chosen += list(g["_g"].to_numpy()[rng.permutation(len(g))[:n]])
    return rows.index[key.astype(str).isin(set(chosen))]


def leaking_groups(df: pd.DataFrame) -> list[str]:
    """Groups whose rows sit in more than one split (must be empty for a grouped split)."""
    per_group = df.groupby("group_id")["split"].nunique()
    return per_group[per_group > 1].index.tolist()


def split_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split per diagnosis."""
    table = pd.crosstab(df["split"], df["diagnosis"].fillna("?"))
    return {s: {c: int(v) for c, v in row.items()} for s, row in table.iterrows()}


def write_splits_json(out_dir: str | Path, record: dict) -> Path:
    """Save the split record (seed, method, fractions, counts, balance) to DIR/splits.json."""
    path = Path(out_dir) / SPLITS_NAME
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def materialise_holdout(source: str | Path, out: str | Path, fraction: float = 0.25, seed: int = 42) -> int:
    """The rows training held out of `source`'s train split (data.external_val) as the only `train` rows of
    a new prepared folder OUT (every other row's split is `-`), caches linked; returns how many rows."""
    import shutil

    from dermlens.data.manifest import read_manifest, write_manifest

    source, out = Path(source), Path(out)
    df = read_manifest(source)
    held = holdout_rows(df, fraction, seed)
    df["split"] = "-"
    df.loc[held, "split"] = "train"
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(df, out)
    shutil.copy(source / "splits.json", out / "splits.json")
    (out / "cache").mkdir(exist_ok=True)
    for cache in (source / "cache").glob("images_*"):
        if not (out / "cache" / cache.name).exists():
            (out / "cache" / cache.name).symlink_to(cache.resolve())
    return int(len(held))
