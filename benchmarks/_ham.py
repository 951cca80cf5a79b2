"""Test and benchmark helpers: a deterministic HAM10000 sample from data_root() and the ImageNet-initialised
backbone (torch) as a stand-in model before a trained bundle exists. Shared by tests/ and benchmarks/."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from dermlens.preprocess import Preprocessing, load_rgb
from dermlens.settings import data_root


def ham_sample(per_class: int, seed: int = 0, skip: int = 0) -> pd.DataFrame:
    """Deterministic HAM10000 rows (one image per lesion, `per_class` lesions per class after `skip`) from
    data_root(), with lesion-hash order; for tests and development without a prepared manifest."""
    import hashlib

    md = pd.read_csv(data_root() / "ham10000" / "HAM10000_metadata.csv")
    md = md.sort_values("image_id").drop_duplicates("lesion_id")
    md["_h"] = [hashlib.md5(f"{seed}:{lid}".encode()).hexdigest() for lid in md["lesion_id"]]
    md = md.sort_values("_h").groupby("dx", sort=True).nth(list(range(skip, skip + per_class)))
    md["image_path"] = [str(data_root() / "ham10000" / "images" / f"{i}.jpg") for i in md["image_id"]]
    return md.drop(columns="_h").reset_index(drop=True)


@functools.cache
def _imagenet_net():  # noqa: ANN202 - torch type stays out of the signature
    from dermlens.model.network import DermNet

    return DermNet(metadata=False).eval()


def imagenet_features(images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """`embedding` and `feature_map` of the ImageNet-initialised lite0 backbone (torch): a stand-in model
    for tests and development before a trained bundle exists."""
    import torch

    net = _imagenet_net()
    prep = Preprocessing.default()
    embs, fmaps = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            f = net.feature_map(torch.from_numpy(prep.normalize(images[s : s + batch])))
            fmaps.append(f.numpy())
            embs.append(f.mean(dim=(2, 3)).numpy())
    return {"embedding": np.concatenate(embs), "feature_map": np.concatenate(fmaps)}


@functools.cache
def ham_reference(per_class: int, skip: int = 0) -> dict[str, np.ndarray]:
    """Images, fine labels and ImageNet-backbone features of ham_sample(per_class, skip=skip); cached."""
    from dermlens.data.taxonomy import HAM_CLASSES

    df = ham_sample(per_class, skip=skip)
    prep = Preprocessing.default()
    images = np.stack([prep.resize(load_rgb(p)) for p in df["image_path"]])
    labels = np.array([HAM_CLASSES.index(d) for d in df["dx"]])
    return {
        "images": images,
        "labels": labels,
        "image_id": df["image_id"].to_numpy(),
        **imagenet_features(images),
    }
