"""Class- and source-balanced sampling (sqrt or inverse frequency) that also works under DDP."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

SAMPLERS = ("none", "sqrt", "inverse")
SOURCE_MODES = ("none", "sqrt", "equal")


def sample_weights(labels: np.ndarray, mode: str) -> np.ndarray:
    """Per-sample weights: count^-0.5 (sqrt) or count^-1 (inverse) of the sample's class."""
    if mode not in SAMPLERS or mode == "none":
        raise ValueError(f"unknown balanced sampler {mode!r}; choose sqrt or inverse")
    counts = np.bincount(labels)
    power = 0.5 if mode == "sqrt" else 1.0
    return (1.0 / np.maximum(counts, 1) ** power)[labels]


def source_weights(sizes: list[int], mode: str) -> np.ndarray:
    """Per-sample weights by training source (sizes in loader order): size^-0.5 (sqrt) or size^-1 (equal)."""
    if mode not in SOURCE_MODES or mode == "none":
        raise ValueError(f"unknown source sampler {mode!r}; choose sqrt or equal")
    return sample_weights(np.repeat(np.arange(len(sizes)), sizes), "inverse" if mode == "equal" else "sqrt")


class DistributedWeightedSampler(Sampler[int]):
    """WeightedRandomSampler that draws one global sequence per epoch and gives each rank its slice."""

    def __init__(
        self,
        weights: np.ndarray,
        num_samples: int | None = None,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        total = int(num_samples or len(weights))
        self.per_rank = -(-total // world)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=g)
        self.epoch += 1  # advance even if the loop does not call set_epoch
        return iter(idx[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank
