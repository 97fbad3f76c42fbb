"""What a stage trains on: decoded images of a split, the datasets that serve them, and class balancing.

`ImageArrayDataset` and `PlanDataset` feed the image path through a DataLoader; `tensor_batches` feeds the
cached-feature path from tensors in memory. `class_weights` / `balanced_sampler` implement `ClassBalancing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, WeightedRandomSampler

from trainer_service.engine.context import seeded_generator

Transform = Callable[[Tensor], Tensor]


@dataclass
class Split:
    """Decoded images of one split: uint8 [N, 3, S, S] (a numpy memmap is fine) and their label indices."""

    images: np.ndarray[Any, Any]
    targets: np.ndarray[Any, Any]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


class ImageArrayDataset(Dataset[tuple[Tensor, int]]):
    """Rows of a uint8 image array through a transform. Picklable for DataLoader worker processes."""

    def __init__(self, split: Split, indices: Sequence[int], transform: Transform) -> None:
        self.split = split
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row = self.indices[i]
        image = torch.from_numpy(np.ascontiguousarray(self.split.images[row]))
        return self.transform(image), int(self.split.targets[row])


class PlanDataset(Dataset[tuple[Tensor, int]]):
    """One epoch's plan of (original index, augmented?) pairs: originals plain, copies augmented."""

    def __init__(self, split: Split, plan: Sequence[tuple[int, bool]], plain: Transform, augmented: Transform):
        self.split = split
        self.plan = list(plan)
        self.plain = plain
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row, is_augmented = self.plan[i]
        image = torch.from_numpy(np.ascontiguousarray(self.split.images[row]))
        transform = self.augmented if is_augmented else self.plain
        return transform(image), int(self.split.targets[row])


def tensor_batches(x: Tensor, y: Tensor, batch_size: int, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    index = order if order is not None else torch.arange(x.shape[0])
    for start in range(0, int(index.shape[0]), batch_size):
        rows = index[start : start + batch_size]
        yield x[rows], y[rows]


# -- class balancing ------------------------------------------------------------------------------------


def class_weights(targets: np.ndarray[Any, Any], num_classes: int) -> Tensor:
    """Inverse label frequency, normalised to mean 1 over the labels present."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def balanced_sampler(targets: np.ndarray[Any, Any], num_classes: int, count: int, seed: int) -> WeightedRandomSampler:
    """`count` draws with replacement, every label equally likely per draw, from a generator seeded with `seed`."""
    per_class = class_weights(targets, num_classes)
    sample_weights = per_class[torch.as_tensor(targets, dtype=torch.long)].double()
    return WeightedRandomSampler(
        sample_weights.tolist(), num_samples=count, replacement=True, generator=seeded_generator(seed)
    )
