"""The dataset readers by name: `dermlens data prepare --dataset NAME` -> a manifest frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from dermlens.data.isic_archive import read_isic_archive
from dermlens.data.manifest import DataError
from dermlens.data.pad_ufes20 import read_pad_ufes20
from dermlens.data.readers import (
    read_csv_dataset,
    read_ham10000,
    read_isic2017,
    read_isic2019,
)

READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "ham10000": read_ham10000,
    "isic2019": read_isic2019,
    "isic2017": read_isic2017,
    "pad_ufes20": read_pad_ufes20,
    "csv": read_csv_dataset,
    "isic-archive": read_isic_archive,
}


def read_dataset(name: str, root: str | Path, **kwargs: object) -> pd.DataFrame:
    """Read dataset `name` (ham10000, isic2019, isic2017, pad_ufes20, csv,
    isic-archive) at `root` into a manifest."""
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    return READERS[name](root, **{k: v for k, v in kwargs.items() if v is not None})
