"""Lightning DataModule over the prepared manifest and the uint8 memmap image cache."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from dermlens.data.splits import holdout_rows
from dermlens.data.taxonomy import COARSE_CLASSES, UNKNOWN, coarse_label, label_space
from dermlens.errors import DataSetupError  # noqa: F401 (re-exported)
from dermlens.metadata import META_BLOCKS, META_DIM, encode_rows, mark_missing
from dermlens.preprocess import Preprocessing
from dermlens.train.augment import eval_transform, to_chw, train_transform
from dermlens.train.folds import fold_split
from dermlens.train.sampling import DistributedWeightedSampler, sample_weights, source_weights


def preprocessing_from(cfg: dict) -> Preprocessing:
    """configs/preprocess.yaml, with mean/std of model.arch's pretrained weights (timm), then the non-null
    `preprocess:` keys (e.g. a smaller test size). The checkpoint and the bundle card carry the result."""
    return Preprocessing.from_dict(preprocessing_record(cfg)["preprocessing"])


def preprocessing_record(cfg: dict) -> dict:
    """The resolved preprocessing and where its mean/std came from (written as RUN/preprocessing.json)."""
    from dermlens.model.weights import pretrained_normalization

    base = Preprocessing.default().to_dict()
    arch = str((cfg.get("model") or {}).get("arch") or "")
    norm = pretrained_normalization(arch) if arch else None
    source = "configs/preprocess.yaml" if norm is None else f"timm pretrained config of {arch}"
    base.update(norm or {})
    given = {k: v for k, v in (cfg.get("preprocess") or {}).items() if v is not None}
    if {"mean", "std"} & set(given):
        source = "config preprocess.mean/std"
    base.update(given)
    return {"preprocessing": base, "normalization_source": source}


def read_prepared(data_dir: Path, prep: Preprocessing) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and memmapped cache (rows aligned), with clear errors when either is missing."""
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise DataSetupError(
            f"no manifest at {manifest}: run `dermlens data prepare` first (or set data.dir)"
        )
    cache = data_dir / "cache" / prep.cache_name
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


def label_subset(df: pd.DataFrame, fraction: float | None, seed: int) -> pd.DataFrame:
    """Keep a seeded, diagnosis-stratified share of the train lesions (label efficiency); None keeps all."""
    if fraction is None or float(fraction) >= 1.0:
        return df
    keep = holdout_rows(df, float(fraction), seed)
    drop = df.index[(df["split"] == "train") & ~df.index.isin(keep)]
    return df.assign(split=df["split"].where(~df.index.isin(drop), "-"))


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
        self.meta = encode_rows(ages, sexes, sites) if len(sub) else np.zeros((0, META_DIM), np.float32)

    def __len__(self) -> int:
        return len(self.rows)


def drop_metadata(meta: np.ndarray, p_field: float, p_all: float, rng) -> np.ndarray:
    """Metadata dropout: all fields missing with p_all, else each field missing with p_field."""
    if p_all > 0 and rng.random() < p_all:
        return mark_missing(meta, list(META_BLOCKS))
    drop = [f for f in META_BLOCKS if p_field > 0 and rng.random() < p_field]
    return mark_missing(meta, drop) if drop else meta


class CacheDataset(Dataset):
    """(uint8 3xHxW image, meta, fine, coarse[, source]) from the memmap cache, with optional metadata
    dropout."""

    def __init__(
        self, images: np.ndarray, split: SplitData, transform, meta_drop=(0.0, 0.0), source: int | None = None
    ) -> None:
        self.images, self.split, self.transform = images, split, transform
        self.meta_drop = (float(meta_drop[0] or 0.0), float(meta_drop[1] or 0.0))
        self.source = source  # when set, each item also carries its training source's index

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        img = self.transform(to_chw(np.asarray(self.images[self.split.rows[i]])))
        meta = self.split.meta[i]
        if any(self.meta_drop):
            meta = drop_metadata(meta, *self.meta_drop, np.random)  # seeded per worker by Lightning
        item = (
            img,
            torch.from_numpy(np.ascontiguousarray(meta)),
            int(self.split.fine[i]),
            int(self.split.coarse[i]),
        )
        return item if self.source is None else (*item, self.source)


def source_val_names(cfg: dict) -> list[str]:
    """The names data.source_val sets are logged under: each folder's name (val_<name>/bal_acc)."""
    return [Path(d).expanduser().name for d in cfg["data"].get("source_val") or []]


def train_source_names(cfg: dict) -> list[str]:
    """The training sources in loader order: data.dir, then each data.extra_train (folder names)."""
    d = cfg["data"]
    names = [Path(x).expanduser().name for x in [d["dir"], *(d.get("extra_train") or [])]]
    return [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def val_set_names(cfg: dict) -> list[str]:
    """The validation loaders in order: val (data.dir), ext (data.external_val), then each source_val."""
    return ["val", *(["ext"] if cfg["data"].get("external_val") else []), *source_val_names(cfg)]


class DermDataModule(L.LightningDataModule):
    """Train/val loaders; the test split is never read here."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.dcfg = cfg["data"]
        self.prep = preprocessing_from(cfg)
        self._read: dict[str, tuple[pd.DataFrame, np.ndarray]] = {}
        df, self.images = read_prepared(Path(self.dcfg["dir"]).expanduser(), self.prep)
        df = fold_split(df, self.dcfg.get("val_fold"), str(self.dcfg.get("fold_pool") or "train+val"))
        self.classes = label_space(set(df["diagnosis"].astype(str)) | self._other_diagnoses())
        self.train_tf = train_transform(self.prep, cfg.get("augment", {}))  # bad settings fail here, early
        seed = int(cfg.get("seed", 42))
        df = label_subset(df, self.dcfg.get("label_fraction"), seed)
        self.train = SplitData(df, "train", self.classes, self.dcfg.get("limit_train"), seed)
        self.val = SplitData(df, "val", self.classes, self.dcfg.get("limit_val"), seed)
        if len(self.train) == 0 or len(self.val) == 0:
            raise DataSetupError(f"manifest in {self.dcfg['dir']} has no train or no val rows")
        ext = self.dcfg.get("external_val")
        frac = float(self.dcfg.get("external_fraction") or 0.25)
        self.external = self._source(ext, seed, holdout=frac) if ext else None
        held = {str(Path(ext).expanduser().resolve()): frac} if ext else {}
        self.extra = [
            self._source(d, seed, holdout=held.get(str(Path(d).expanduser().resolve())), keep_rest=True)
            for d in self.dcfg.get("extra_train") or []
        ]
        self.sources = [
            (name, *self._source(d, seed, split="val"))
            for name, d in zip(source_val_names(cfg), self.dcfg.get("source_val") or [], strict=True)
        ]

    def _other_diagnoses(self) -> set[str]:
        """Diagnoses of every extra source's training rows (scc there makes the label space 8 classes)."""
        frames = (self._prepared(d)[0] for d in self.dcfg.get("extra_train") or [])
        return {str(dx) for df in frames for dx in df.loc[df["split"] == "train", "diagnosis"]}

    def _prepared(self, data_dir: str) -> tuple[pd.DataFrame, np.ndarray]:
        """read_prepared of another dataset, once however many roles it plays (extra, external, source)."""
        key = str(Path(data_dir).expanduser().resolve())
        if key not in self._read:
            self._read[key] = read_prepared(Path(data_dir).expanduser(), self.prep)
        return self._read[key]

    def _source(
        self,
        data_dir: str,
        seed: int,
        holdout: float | None = None,
        keep_rest: bool = False,
        split: str = "train",
    ) -> tuple[np.ndarray, SplitData]:
        """Another dataset's `split` rows with one of the model's classes; `holdout` (a seeded, stratified
        share of them) is the external validation set, and keep_rest=True returns the rows outside it."""
        df, images = self._prepared(data_dir)
        known = df["diagnosis"].isin(self.classes) & (df["split"] == split)
        df = df.assign(split=np.where(known, split, "-"))
        if holdout:
            held = holdout_rows(df, float(holdout), seed)
            df.loc[held if keep_rest else df.index.difference(held), "split"] = "-"
        part = SplitData(df, split, self.classes, None, seed)
        if len(part) == 0:
            raise DataSetupError(f"{data_dir} has no {split} rows with one of the classes {self.classes}")
        return images, part

    def train_fine(self) -> np.ndarray:
        """Fine labels of every training image (the main split, then each extra source)."""
        return np.concatenate([self.train.fine, *(part.fine for _, part in self.extra)])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train_fine(), minlength=len(self.classes))

    def train_weights(self) -> np.ndarray | None:
        """Per-image sampling weights from `sampler.name` (classes) and `sampler.source`; None = uniform."""
        scfg = self.cfg.get("sampler", {})
        mode, by_source = str(scfg.get("name", "none")), str(scfg.get("source", "none") or "none")
        sizes = [len(self.train), *(len(part) for _, part in self.extra)]
        weights = np.ones(sum(sizes))
        if mode != "none":
            weights *= sample_weights(self.train_fine(), mode)
        if by_source != "none":
            weights *= source_weights(sizes, by_source)
        return None if mode == "none" and by_source == "none" else weights

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
        aug = self.cfg.get("augment", {})
        tf, drop = self.train_tf, (aug.get("meta_drop_field"), aug.get("meta_drop_all"))
        parts = [(self.images, self.train), *self.extra]
        by_source = float(self.cfg.get("loss", {}).get("group_dro_eta", 0) or 0) > 0  # the loss needs it
        ds = ConcatDataset(
            [CacheDataset(im, part, tf, drop, i if by_source else None) for i, (im, part) in enumerate(parts)]
        )
        rank, world = self._dist()
        weights, seed = self.train_weights(), int(self.cfg.get("seed", 42))
        if weights is not None:
            sampler = DistributedWeightedSampler(weights, rank=rank, world=world, seed=seed)
        elif world > 1:
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        else:
            sampler = RandomSampler(ds)
        return self._loader(ds, sampler, drop_last=True)

    def _eval_loader(self, images: np.ndarray, part: SplitData, no_metadata: bool = False) -> DataLoader:
        ds = CacheDataset(images, part, eval_transform(self.prep), (0.0, 1.0 if no_metadata else 0.0))
        rank, world = self._dist()
        sampler = (
            DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
            if world > 1
            else SequentialSampler(ds)
        )
        return self._loader(ds, sampler, drop_last=False)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """HAM val, then the external validation set and each source's val set, in val_set_names order."""
        main, ext = self._eval_loader(self.images, self.val), self.external_val_dataloader()
        more = [self._eval_loader(images, part) for _, images, part in self.sources]
        loaders = [main, *([ext] if ext is not None else []), *more]
        return loaders if len(loaders) > 1 else main

    def source_val_dataloader(self, name: str, no_metadata: bool = False) -> DataLoader:
        """One data.source_val set's val rows (optionally with every metadata field missing)."""
        images, part = next((im, p) for n, im, p in self.sources if n == name)
        return self._eval_loader(images, part, no_metadata)

    def no_metadata_val_dataloader(self) -> DataLoader:
        """HAM val with every metadata field missing: how the model does on a folder of bare images."""
        return self._eval_loader(self.images, self.val, no_metadata=True)

    def external_val_dataloader(self) -> DataLoader | None:
        """The external validation set alone (None when not configured)."""
        return self._eval_loader(*self.external) if self.external else None
