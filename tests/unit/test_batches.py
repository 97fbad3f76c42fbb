"""The image path's loading: uint8 batches from the decoded cache, one DataLoader per split and stage, and the
batches on the device independent of how many worker processes load them (CPU, tiny images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_service.engine.batch_augment import build_batch_pipeline
from trainer_service.engine.batches import (
    BatchPlan,
    Split,
    SplitBatches,
    SplitLoader,
    planned,
    sequential_plans,
)
from trainer_service.engine.context import RunContext, seeded_generator
from trainer_service.engine.epoch import features_fit
from trainer_service.spec.config import AugmentationConfig

SIZE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUG = AugmentationConfig(horizontal_flip=True, zoom_min_scale=0.6, brightness=0.3)


def _split(n: int = 20) -> Split:
    rng = np.random.default_rng(3)
    return Split(
        images=rng.integers(0, 256, size=(n, 3, SIZE, SIZE), dtype=np.uint8),
        targets=np.arange(n, dtype=np.int64) % 4,
    )


def _ctx(workers: int) -> RunContext:
    return RunContext(device=torch.device("cpu"), autocast_dtype=None, workers=workers, mean=MEAN, std=STD)


def test_plans_cover_the_rows_in_order_in_batches() -> None:
    plans = sequential_plans([5, 6, 7, 8, 9], 2, [True, False, True, False, True])
    assert plans == [BatchPlan((5, 6), (True, False)), BatchPlan((7, 8), (True, False)), BatchPlan((9,), (True,))]
    assert sequential_plans([1, 2], 4) == [BatchPlan((1, 2), (False, False))]
    assert planned([[1, 0], [2]], rows=[10, 11, 12], augmented=[False, True, False]) == [
        BatchPlan((11, 10), (True, False)),
        BatchPlan((12,), (False,)),
    ]


def test_a_loaded_batch_is_the_split_s_uint8_rows_in_the_plan_s_order() -> None:
    split = _split()
    images, targets, augmented = SplitBatches(split)[BatchPlan((7, 2, 9), (True, False, True))]
    assert images.dtype == torch.uint8  # a quarter of float32's bytes through /dev/shm
    assert torch.equal(images, torch.from_numpy(split.images[[7, 2, 9]]))
    assert targets.tolist() == [3, 2, 1]
    assert augmented.tolist() == [True, False, True]


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_do_not_depend_on_the_worker_count_and_workers_persist(workers: int) -> None:
    split = _split()
    pipeline = build_batch_pipeline(AUG, SIZE, MEAN, STD)
    plans = planned([[3, 1, 4, 0], [5, 9, 2, 6], [8, 7]], list(range(10)), [True, False] * 5)

    def one_pass(loader: SplitLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(loader.batches(plans, seeded_generator(11)))

    in_process = one_pass(SplitLoader(split, _ctx(0), pipeline))
    loader = SplitLoader(split, _ctx(workers), pipeline)
    first = one_pass(loader)
    iterator = loader._loader._iterator  # the persistent workers' iterator
    second = one_pass(loader)
    assert iterator is not None
    assert loader._loader._iterator is iterator
    for (x0, y0), (x1, y1), (x2, y2) in zip(in_process, first, second, strict=True):
        assert x0.dtype == torch.float32
        assert torch.equal(x0, x1)
        assert torch.equal(x0, x2)
        assert torch.equal(y0, y1)
        assert torch.equal(y0, y2)
    # Unaugmented rows (odd positions here) are exactly the normalised images.
    x, _ = in_process[0]
    assert torch.equal(x[1], pipeline.normalise(torch.from_numpy(split.images[[1]]))[0])


def test_without_a_generator_every_row_is_only_normalised() -> None:
    split = _split()
    pipeline = build_batch_pipeline(AUG, SIZE, MEAN, STD)
    plans = sequential_plans(list(range(6)), 4, [True] * 6)
    (x, y), (x2, _) = list(SplitLoader(split, _ctx(0), pipeline).batches(plans, None))
    assert torch.equal(x, pipeline.normalise(torch.from_numpy(split.images[:4])))
    assert x2.shape == (2, 3, SIZE, SIZE)
    assert y.tolist() == [0, 1, 2, 3]


def test_cached_features_stay_on_the_gpu_only_within_a_share_of_its_free_memory() -> None:
    assert features_fit(total_bytes=1 << 20, free_bytes=8 << 20)
    assert features_fit(total_bytes=2 << 20, free_bytes=8 << 20)
    assert not features_fit(total_bytes=(2 << 20) + 1, free_bytes=8 << 20)
