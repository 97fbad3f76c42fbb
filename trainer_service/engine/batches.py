"""What a stage trains on: decoded images of a split, how they reach the device in batches, and class balancing.

The image path loads uint8 batches straight from the decoded cache: one DataLoader item is a whole batch
(`SplitBatches` indexed by a `BatchPlan`), so a worker only copies rows, and a batch crosses /dev/shm in a quarter
of float32's bytes. `SplitLoader` keeps one DataLoader per split for a whole stage (its workers persist across
epochs; each pass is handed its plans) and turns the uint8 batches into float batches on the device, where
`BatchPipeline` augments and normalises them (engine/batch_augment.py). Every random draw of augmentation comes
from the generator a pass is given, in batch order on the main process: the batches do not depend on how many
workers load them, and a resumed epoch replays the same ones.

`tensor_batches` feeds the cached-feature path from tensors in memory. `class_weights` / `balanced_sampler`
implement `ClassBalancing`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from trainer_service.engine.batch_augment import BatchPipeline
from trainer_service.engine.context import RunContext, seeded_generator, to_device

RawBatch = tuple[Tensor, Tensor, Tensor]  # uint8 images [N, 3, S, S], int64 targets [N], bool augmented? [N]


@dataclass
class Split:
    """Decoded images of one split: uint8 [N, 3, S, S] (a numpy memmap is fine) and their label indices."""

    images: np.ndarray[Any, Any]
    targets: np.ndarray[Any, Any]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class BatchPlan:
    """One batch: rows of a split, in order, and which of them go through augmentation."""

    rows: tuple[int, ...]
    augmented: tuple[bool, ...]


def sequential_plans(rows: Sequence[int], batch_size: int, augmented: Sequence[bool] | None = None) -> list[BatchPlan]:
    """`rows` in order, in batches of `batch_size` (the last one shorter); `augmented` per row (None: none is)."""
    flags = augmented if augmented is not None else [False] * len(rows)
    return [
        BatchPlan(tuple(rows[i : i + batch_size]), tuple(flags[i : i + batch_size]))
        for i in range(0, len(rows), batch_size)
    ]


def planned(batches: Iterable[Sequence[int]], rows: Sequence[int], augmented: Sequence[bool]) -> list[BatchPlan]:
    """Batches of indices into (rows, augmented) entries -- what a BatchSampler draws -- as BatchPlans."""
    return [BatchPlan(tuple(rows[i] for i in batch), tuple(augmented[i] for i in batch)) for batch in batches]


class SplitBatches(Dataset[RawBatch]):
    """A split's rows by the batch: plan -> (uint8 images, targets, augmented?). Picklable for worker processes."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, plan: BatchPlan) -> RawBatch:
        rows = np.asarray(plan.rows, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[rows]))  # fancy indexing copies the rows
        targets = torch.from_numpy(np.asarray(self.split.targets[rows], dtype=np.int64))
        return images, targets, torch.tensor(plan.augmented, dtype=torch.bool)


class _Plans(Sampler[BatchPlan]):
    """The plans of the current pass: the main process sets them, the persistent workers load what it sends."""

    def __init__(self) -> None:
        self.plans: list[BatchPlan] = []

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


def _one_thread(worker_id: int) -> None:
    # A worker only copies rows: torch's intra-op threads would compete with the training process for the cores.
    torch.set_num_threads(1)


class SplitLoader:
    """A split's batches on the device, for as many passes as a stage makes, through one DataLoader."""

    def __init__(self, split: Split, ctx: RunContext, pipeline: BatchPipeline) -> None:
        self.ctx = ctx
        self.pipeline = pipeline
        self._plans = _Plans()
        self._split = split
        workers = ctx.workers
        self._loader: DataLoader[RawBatch] = DataLoader(
            SplitBatches(split),
            batch_size=None,  # an item is already a batch
            sampler=self._plans,
            num_workers=workers,
            pin_memory=ctx.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers else None,
            worker_init_fn=_one_thread if workers else None,
        )

    @property
    def split(self) -> Split:
        return self._split

    def batches(self, plans: Sequence[BatchPlan], generator: torch.Generator | None) -> DevicePass:
        """One pass: (float inputs, targets) on the device for each plan, in order. Rows a plan marks augmented go
        through the pipeline's augmentation, drawing from `generator` (None: every row is only normalised)."""
        return DevicePass(self, list(plans), generator)

    def _iterate(self, plans: list[BatchPlan], generator: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
        self._plans.plans = plans
        for images, targets, augmented in self._loader:
            images = images.to(self.ctx.device, non_blocking=True)
            if generator is None or not bool(augmented.any()):
                inputs = self.pipeline.normalise(images)
            else:
                inputs = self.pipeline.augment(images, generator, augmented)
            yield to_device(inputs, self.ctx), targets.to(self.ctx.device, non_blocking=True)


@dataclass(frozen=True)
class DevicePass:
    """A pass of a SplitLoader over some plans, iterated once; says what it reads (for callers that cache)."""

    loader: SplitLoader
    plans: list[BatchPlan]
    generator: torch.Generator | None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.loader._iterate(self.plans, self.generator)


def tensor_batches(x: Tensor, y: Tensor, batch_size: int, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    index = order.to(x.device) if order is not None else torch.arange(x.shape[0], device=x.device)
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
