"""Several processes training one job (DDP, gloo on the CPU): the same numbers as one process, and exact resume.

Stage 1 on cached features (the base frozen, the head without dropout) with batches that split evenly over the
ranks: there one process's step and the ranks' averaged step are the same sum, so every metric matches up to
float rounding. Each run starts a real follower process over a real rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.colour_data import LABELS, colour_config, colour_split, cpu_context
from torch.utils.data import BatchSampler, SequentialSampler
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext
from trainer_service.engine.distributed import Shard, ShardedBatchSampler, shard_tensor_batches
from trainer_service.engine.epoch import Cancelled
from trainer_service.engine.loop import CLASSIFIER, EpochRecord, NoOpCallbacks
from trainer_service.engine.models import normalization
from trainer_service.engine.parallel import ClassifierFactory, _SplitRef, train_on_devices
from trainer_service.engine.recipe import PreparedData, ResumeState, TrainingResult, checkpoint_bytes
from trainer_service.spec.config import (
    RunConfig,
)

CPU = torch.device("cpu")
DATA = PreparedData(labels=LABELS, train=colour_split(48, 1), val=colour_split(25, 2), test=colour_split(12, 3))
CONFIG = colour_config(dropout=0.0, run=RunConfig(data_loader_workers=0, repeats=2))


class Recorder(NoOpCallbacks):
    def __init__(self) -> None:
        self.epochs: list[tuple[int, EpochRecord]] = []
        self.checkpoints: list[bytes] = []

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        self.epochs.append((repeat, record))

    def checkpoint(self, state: dict[str, Any]) -> None:
        self.checkpoints.append(checkpoint_bytes(state))


def _run(devices: int, recorder: Recorder, resume: ResumeState | None = None) -> TrainingResult:
    config = dataclasses.replace(CONFIG, run=dataclasses.replace(CONFIG.run, devices=devices))
    return train_on_devices(
        config, DATA, ClassifierFactory(config.model, 3, None), cpu_context(config), recorder, resume
    )


@pytest.fixture(scope="module")
def runs() -> dict[int, tuple[TrainingResult, Recorder]]:
    out = {}
    for devices in (1, 2):
        recorder = Recorder()
        out[devices] = (_run(devices, recorder), recorder)
    return out


def _assert_same(a: TrainingResult, b: TrainingResult) -> None:
    assert set(a.summary) == set(b.summary)
    for key, (mean, std) in a.summary.items():
        assert b.summary[key][0] == pytest.approx(mean, rel=1e-5, abs=1e-6), key
        assert b.summary[key][1] == pytest.approx(std, rel=1e-4, abs=1e-6), key
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_two_processes_reach_the_metrics_of_one(runs: dict[int, tuple[TrainingResult, Recorder]]) -> None:
    (one, one_recorder), (two, two_recorder) = runs[1], runs[2]
    # Rank 0 alone records: every epoch and checkpoint once, as one process does.
    assert [(r, e.stage, e.epoch) for r, e in two_recorder.epochs] == [
        (r, e.stage, e.epoch) for r, e in one_recorder.epochs
    ]
    assert len(two_recorder.checkpoints) == len(one_recorder.checkpoints) == 6
    for (_, a), (_, b) in zip(one_recorder.epochs, two_recorder.epochs, strict=True):
        # The training totals are summed over both ranks' halves of each batch, validation over both halves.
        assert (b.train_loss, b.val_loss) == pytest.approx((a.train_loss, a.val_loss), rel=1e-5)
        assert (b.train_accuracy, b.val_accuracy) == (a.train_accuracy, a.val_accuracy)
    assert one_recorder.epochs[-1][1].train_loss < one_recorder.epochs[0][1].train_loss  # it did learn
    _assert_same(one, two)
    assert two.summary["test_accuracy"] == one.summary["test_accuracy"]


@pytest.mark.parametrize("devices", [2, 1])
def test_a_two_process_run_resumes_from_its_checkpoint_with_any_number_of_processes(
    devices: int, runs: dict[int, tuple[TrainingResult, Recorder]]
) -> None:
    two, recorder = runs[2]
    # Checkpoint 1: repeat 1 after its second epoch; its state is the unwrapped model's, as one process writes.
    state = ResumeState.from_bytes(recorder.checkpoints[1])
    assert state.stage == CLASSIFIER
    assert state.stage_state.completed_epochs == 2
    assert not any(key.startswith("module.") for key in state.model)
    resumed_recorder = Recorder()
    resumed = _run(devices, resumed_recorder, state)
    assert len(resumed_recorder.epochs) == 6 - 2  # only the epochs after the checkpoint ran again
    _assert_same(two, resumed)


def test_each_rank_takes_its_rows_of_every_global_batch_and_all_ranks_skip_the_same_tail() -> None:
    shards = [Shard(rank=r, world_size=3, device=CPU) for r in range(3)]
    global_batches = list(BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False))
    assert global_batches[-1] == [8, 9]  # fewer rows than ranks: skipped by every rank
    samplers = [ShardedBatchSampler(BatchSampler(SequentialSampler(range(10)), 4, False), s) for s in shards]
    assert [list(sampler) for sampler in samplers] == [[[0, 3], [4, 7]], [[1], [5]], [[2], [6]]]
    assert [len(sampler) for sampler in samplers] == [2, 2, 2]

    x = torch.arange(10.0).unsqueeze(1)
    batches = [(x[i : i + 4], x[i : i + 4, 0].long()) for i in range(0, 10, 4)]
    rows = [[b[1].tolist() for b in shard_tensor_batches(iter(batches), s)] for s in shards]
    assert rows == [[[0, 3], [4, 7]], [[1], [5]], [[2], [6]]]


def test_followers_get_a_decoded_set_by_its_file_and_an_array_by_value(tmp_path: Path) -> None:
    mapped = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=DATA.val.images.shape)
    mapped[:] = DATA.val.images
    mapped.flush()
    ref = _SplitRef.of(Split(images=mapped, targets=DATA.val.targets))
    assert ref.images is None  # only the path travels
    assert ref.path == str(tmp_path / "images.u8")
    assert np.array_equal(ref.open().images, DATA.val.images)
    view = _SplitRef.of(Split(images=mapped[1:], targets=DATA.val.targets[1:]))  # not the file from its start
    assert view.path is None
    assert np.array_equal(view.open().images, DATA.val.images[1:])


class _CancelAfterFirstEpoch(Recorder):
    def should_stop(self) -> bool:
        return len(self.epochs) >= 1


def test_a_cancel_on_rank_0_stops_every_rank_at_the_same_step() -> None:
    recorder = _CancelAfterFirstEpoch()
    with pytest.raises(Cancelled):
        _run(2, recorder)  # returns at all: the follower did not wait for a step rank 0 never took
    assert len(recorder.epochs) == 1
    assert len(recorder.checkpoints) == 1


def _unpickle_fails() -> None:
    raise RuntimeError("this object does not load in another process")


class _Unloadable:
    """A model factory that cannot reach a follower: the follower dies before it joins the group."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _unpickle_fails, ()

    def __call__(self, seed: int) -> Any:
        raise AssertionError("never called: rank 0 fails before it trains")


def test_a_follower_that_dies_before_joining_fails_the_run_at_once() -> None:
    config = dataclasses.replace(CONFIG, run=dataclasses.replace(CONFIG.run, devices=2))
    mean, std = normalization(config.model)
    ctx = RunContext(device=CPU, autocast_dtype=None, workers=0, mean=mean, std=std)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="training process 1 exited before it joined"):
        train_on_devices(config, DATA, _Unloadable(), ctx, Recorder())
    assert time.monotonic() - started < 60  # not the rendezvous' timeout (30 minutes)
