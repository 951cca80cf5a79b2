"""Lightning DataModule over the prepared manifest and the uint8 memmap image cache."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from dermlens.data.taxonomy import COARSE_CLASSES, UNKNOWN, coarse_label, label_space
from dermlens.metadata import encode_rows
from dermlens.preprocess import Preprocessing
from dermlens.train.augment import eval_transform, to_chw, train_transform
from dermlens.train.folds import fold_split
from dermlens.train.sampling import DistributedWeightedSampler, sample_weights


class DataSetupError(FileNotFoundError):
    """Prepared data that is missing or inconsistent (one-line message)."""


def preprocessing_from(cfg: dict) -> Preprocessing:
    """Preprocessing.default() with any non-null `preprocess:` overrides (e.g. a smaller test size)."""
    base = Preprocessing.default().to_dict()
    base.update({k: v for k, v in (cfg.get("preprocess") or {}).items() if v is not None})
    return Preprocessing.from_dict(base)


def read_prepared(data_dir: Path, prep: Preprocessing) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and memmapped cache (rows aligned), with clear errors when either is missing."""
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise DataSetupError(
            f"no manifest at {manifest}: run `dermlens data prepare` first (or set data.dir)"
        )
    cache = data_dir / "cache" / f"images_{prep.height}x{prep.width}.npy"
    if not cache.is_file():
        raise DataSetupError(f"no image cache at {cache}: build the {prep.height}x{prep.width} cache first")
    try:
        from dermlens.data.manifest import read_manifest

        df = read_manifest(data_dir)
    except ImportError:
        df = pd.read_csv(manifest)
    images = np.load(cache, mmap_mode="r")
    if len(images) != len(df):
        raise DataSetupError(f"cache {cache} has {len(images)} images but the manifest has {len(df)} rows")
    return df, images


class SplitData:
    """One split's row indices into the cache, labels and encoded metadata."""

    def __init__(
        self, df: pd.DataFrame, split: str, classes: tuple[str, ...], limit: int | None, seed: int
    ) -> None:
        rows = np.flatnonzero((df["split"].to_numpy() == split) & (df["diagnosis"].to_numpy() != UNKNOWN))
        if limit and len(rows) > limit:
            rows = np.sort(np.random.default_rng(seed).choice(rows, int(limit), replace=False))
        sub = df.iloc[rows]
        self.rows = rows
        self.image_ids = sub["image_id"].astype(str).to_numpy()
        self.fine = np.array([classes.index(d) for d in sub["diagnosis"]], dtype=np.int64)
        self.coarse = np.array(
            [COARSE_CLASSES.index(coarse_label(d)) for d in sub["diagnosis"]], dtype=np.int64
        )
        ages = sub["age"].tolist() if "age" in sub else [None] * len(sub)
        sexes = sub["sex"].tolist() if "sex" in sub else [None] * len(sub)
        sites = sub["site"].tolist() if "site" in sub else [None] * len(sub)
        self.meta = encode_rows(ages, sexes, sites) if len(sub) else np.zeros((0, 15), np.float32)

    def __len__(self) -> int:
        return len(self.rows)


class CacheDataset(Dataset):
    """(uint8 3xHxW image, meta, fine label, coarse label) from the memmap cache."""

    def __init__(self, images: np.ndarray, split: SplitData, transform) -> None:
        self.images, self.split, self.transform = images, split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[self.split.rows[i]])
        img = self.transform(image=img)["image"]
        return (
            to_chw(img),
            torch.from_numpy(self.split.meta[i]),
            int(self.split.fine[i]),
            int(self.split.coarse[i]),
        )


class DermDataModule(L.LightningDataModule):
    """Train/val loaders; the test split is never read here."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.dcfg = cfg["data"]
        self.prep = preprocessing_from(cfg)
        df, self.images = read_prepared(Path(self.dcfg["dir"]).expanduser(), self.prep)
        df = fold_split(df, self.dcfg.get("val_fold"), str(self.dcfg.get("fold_pool") or "train+val"))
        self.classes = label_space(set(df["diagnosis"].astype(str)))
        seed = int(cfg.get("seed", 42))
        self.train = SplitData(df, "train", self.classes, self.dcfg.get("limit_train"), seed)
        self.val = SplitData(df, "val", self.classes, self.dcfg.get("limit_val"), seed)
        if len(self.train) == 0 or len(self.val) == 0:
            raise DataSetupError(f"manifest in {self.dcfg['dir']} has no train or no val rows")

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train.fine, minlength=len(self.classes))

    def _dist(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ds: Dataset, sampler, drop_last: bool) -> DataLoader:
        nw = int(self.dcfg.get("num_workers", 0))
        return DataLoader(
            ds,
            batch_size=int(self.dcfg["batch_size"]),
            sampler=sampler,
            num_workers=nw,
            persistent_workers=nw > 0,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        ds = CacheDataset(self.images, self.train, train_transform(self.prep, self.cfg.get("augment", {})))
        rank, world = self._dist()
        mode = self.cfg.get("sampler", {}).get("name", "none")
        seed = int(self.cfg.get("seed", 42))
        if mode != "none":
            sampler = DistributedWeightedSampler(
                sample_weights(self.train.fine, mode), rank=rank, world=world, seed=seed
            )
        elif world > 1:
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        else:
            sampler = RandomSampler(ds)
        return self._loader(ds, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        ds = CacheDataset(self.images, self.val, eval_transform(self.prep))
        rank, world = self._dist()
        sampler = (
            DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
            if world > 1
            else SequentialSampler(ds)
        )
        return self._loader(ds, sampler, drop_last=False)
