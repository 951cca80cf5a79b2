"""Cross-validation splits from the manifest's `fold` column: member i of an ensemble validates on fold i."""

from __future__ import annotations

import pandas as pd

from dermlens.errors import FoldError  # noqa: F401 (re-exported)

POOLS: dict[str, tuple[str, ...]] = {"train": ("train",), "train+val": ("train", "val")}


def fold_split(df: pd.DataFrame, val_fold: int | None, pool: str = "train+val") -> pd.DataFrame:
    """Rows of `pool` in fold `val_fold` become "val", the pool's other folds "train"; the rest is untouched.

    val_fold None returns df unchanged. With pool "train" the original val split stays out of training
    (it becomes "heldout", so the ensemble can still be measured on it); the test split never moves.
    """
    if val_fold is None:
        return df
    if pool not in POOLS:
        raise FoldError(f"data.fold_pool must be one of {sorted(POOLS)}, not {pool!r}")
    if "fold" not in df.columns:
        raise FoldError("the manifest has no `fold` column: prepare the data with --folds K")
    in_pool = df["split"].isin(POOLS[pool]).to_numpy()
    folds = sorted(int(f) for f in df.loc[in_pool, "fold"].unique() if int(f) >= 0)
    if int(val_fold) not in folds:
        raise FoldError(f"fold {val_fold} is not among the manifest's folds {folds} in pool {pool!r}")
    out = df.copy()
    fold = out["fold"].to_numpy()
    out.loc[in_pool & (fold == int(val_fold)), "split"] = "val"
    out.loc[in_pool & (fold != int(val_fold)), "split"] = "train"
    if pool == "train":
        out.loc[df["split"].to_numpy() == "val", "split"] = "heldout"
    return out
