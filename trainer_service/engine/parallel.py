"""A job trained by `run.devices` processes on one machine: the caller is rank 0 and starts the others.

Rank 0 is the caller's process and keeps its callbacks: events, checkpoints, artifacts and cancel checks are
written by it alone. `train_on_devices` starts `devices - 1` followers (torch.multiprocessing, spawn) that run
the same `recipe.train` with callbacks that record nothing; all ranks meet on a rendezvous on 127.0.0.1 (NCCL
on GPUs, one GPU a rank; gloo on the CPU) and train as `engine/distributed.py` says. A checkpoint holds the
unwrapped model's trained part as with one process, so a checkpoint resumes with any number of devices.

When rank 0 leaves `train` (done, failed, cancelled, pruned) it stops the followers: one waiting in a
collective would otherwise wait for a rank that is not coming, and what they have left (the final evaluation)
is rank 0's alone to report. A follower whose rank 0 died (kill -9) fails its next collective, or sees its parent
gone at its next step, and exits; a follower that dies before it joins fails rank 0 at once (`await_ranks`).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer_service.engine import distributed
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext
from trainer_service.engine.loop import Callbacks, NoOpCallbacks
from trainer_service.engine.models import Classifier, build_classifier
from trainer_service.engine.recipe import (
    ModelFactory,
    PreparedData,
    ResumeState,
    TrainingResult,
    checkpoint_bytes,
    train,
)
from trainer_service.spec.config import ModelConfig, TrainingConfig

# A follower's exit code when its rank 0 is gone.
EXIT_LEADER_GONE = 75


@dataclass(frozen=True)
class ClassifierFactory:
    """`build_classifier` as a ModelFactory that followers can be sent: the base weights and a fresh head
    (its initialisation is seeded by the caller)."""

    model: ModelConfig
    num_classes: int
    base_state: Mapping[str, Tensor] | None

    def __call__(self, seed: int) -> Classifier:
        return build_classifier(self.model, self.num_classes, self.base_state)


@dataclass(frozen=True)
class _SplitRef:
    """A split as a follower receives it: a memmap on local disk by its path (reopened, never copied through
    the pipe: a decoded dataset can be gigabytes), anything else by value."""

    targets: np.ndarray[Any, Any]
    images: np.ndarray[Any, Any] | None
    path: str | None = None
    shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, split: Split) -> _SplitRef:
        images = split.images
        base: object = getattr(images, "base", None)
        # Only a whole mapping (its base is the mmap itself) is its file from offset 0; a view is sent by value.
        if isinstance(images, np.memmap) and isinstance(base, mmap.mmap) and images.filename:
            return cls(targets=split.targets, images=None, path=str(images.filename), shape=tuple(images.shape))
        return cls(targets=split.targets, images=np.asarray(images))

    def open(self) -> Split:
        if self.path is None:
            assert self.images is not None
            return Split(images=self.images, targets=self.targets)
        return Split(images=np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape), targets=self.targets)


@dataclass(frozen=True)
class _FollowerJob:
    """Everything `train` takes but the callbacks, as sent to each follower."""

    config: TrainingConfig
    labels: list[str]
    splits: dict[str, _SplitRef]
    make_model: ModelFactory
    ctx: RunContext
    # The checkpoint's bytes, not the ResumeState: torch's pickler would share its tensors' memory with rank 0,
    # whose optimizer then steps the very moment buffers a follower is about to load.
    resume: bytes | None
    leader: int  # rank 0's pid

    def data(self) -> PreparedData:
        opened = {name: ref.open() for name, ref in self.splits.items()}
        return PreparedData(
            labels=self.labels,
            train=opened["train"],
            val=opened["val"],
            test=opened.get("test"),
            unknown=opened.get("unknown"),
        )


class _FollowerCallbacks(NoOpCallbacks):
    """A follower records nothing; a cancel reaches it through rank 0 (`Shard.step`)."""

    def __init__(self, leader: int) -> None:
        self.leader = leader

    def should_stop(self) -> bool:
        if os.getppid() != self.leader:
            os._exit(EXIT_LEADER_GONE)
        return False


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _share_cores(device: torch.device, world_size: int) -> None:
    # On the CPU the ranks share the machine's cores: each takes its part instead of all of them each.
    if device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))


def _follow(rank: int, world_size: int, port: int, job: _FollowerJob) -> None:
    """A follower's process: join the group, train along, leave."""
    # Rank 0 stops its followers itself; a SIGTERM meant for the job (a cancel, a drain) is rank 0's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = _rank_device(job.ctx.device, rank)
    _share_cores(device, world_size)
    shard = distributed.join(rank, world_size, port, device)
    try:
        ctx = dataclasses.replace(job.ctx, device=device)
        resume = ResumeState.from_bytes(job.resume) if job.resume is not None else None
        train(job.config, job.data(), job.make_model, ctx, _FollowerCallbacks(job.leader), resume, shard)
    finally:
        distributed.leave()


def train_on_devices(
    config: TrainingConfig,
    data: PreparedData,
    make_model: ModelFactory,
    ctx: RunContext,
    callbacks: Callbacks,
    resume: ResumeState | None = None,
) -> TrainingResult:
    """`recipe.train` on `config.run.devices` processes; with 1 it is `train` itself, in this process.

    `make_model` must be picklable when devices > 1 (`ClassifierFactory`). Raises RuntimeError when the job
    asks for more GPUs than this process sees.
    """
    devices = config.run.devices
    if devices == 1:
        return train(config, data, make_model, ctx, callbacks, resume)
    if ctx.device.type == "cuda" and torch.cuda.device_count() < devices:
        raise RuntimeError(f"run.devices asks for {devices} GPUs, but {torch.cuda.device_count()} are visible")
    splits = {"train": _SplitRef.of(data.train), "val": _SplitRef.of(data.val)}
    if data.test is not None:
        splits["test"] = _SplitRef.of(data.test)
    if data.unknown is not None:
        splits["unknown"] = _SplitRef.of(data.unknown)
    saved = checkpoint_bytes({f.name: getattr(resume, f.name) for f in dataclasses.fields(resume)}) if resume else None
    job = _FollowerJob(config, list(data.labels), splits, make_model, ctx, saved, leader=os.getpid())
    store = distributed.rendezvous_store(devices)
    spawn = torch.multiprocessing.get_context("spawn")
    # Not daemons: a follower's DataLoader starts worker processes of its own.
    followers = [spawn.Process(target=_follow, args=(rank, devices, store.port, job)) for rank in range(1, devices)]
    for follower in followers:
        follower.start()
    threads = torch.get_num_threads()
    try:
        device = _rank_device(ctx.device, 0)
        _share_cores(device, devices)
        distributed.await_ranks(store, devices, lambda rank: followers[rank - 1].is_alive())
        shard = distributed.join(0, devices, store.port, device, store)
        return train(config, data, make_model, dataclasses.replace(ctx, device=device), callbacks, resume, shard)
    finally:
        for follower in followers:
            follower.kill()
            follower.join()
        distributed.leave()
        torch.set_num_threads(threads)  # the worker carries on alone (publishing)
