"""The LR range test: the pure curve functions on synthetic curves, then real sweeps on a tiny in-memory dataset."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn
from trainer_service.engine.augment import build_eval_transform
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext
from trainer_service.engine.lr_finder import (
    MINIMUM_RULE,
    SKIP_END,
    SKIP_START,
    STEEPEST_RULE,
    LrFinderResult,
    Smoother,
    _sample_rows,
    diverged,
    find_learning_rate,
    lr_schedule,
    smooth,
    suggest,
)
from trainer_service.engine.models import Classifier, build_classifier
from trainer_service.spec.config import Architecture, ModelConfig, StageConfig, WeightsSource

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CLASSES = 3


# -- lr_schedule ----------------------------------------------------------------------------------------------


def test_schedule_is_geometric_from_min_to_max() -> None:
    lrs = lr_schedule(1e-7, 10.0, 100)
    assert len(lrs) == 100
    assert lrs[0] == 1e-7
    assert lrs[-1] == 10.0
    ratios = np.diff(np.log10(lrs))
    assert np.allclose(ratios, 8 / 99)


@pytest.mark.parametrize(
    ("min_lr", "max_lr", "steps"),
    [(0.0, 1.0, 10), (1.0, 1.0, 10), (1.0, 0.1, 10), (1e-3, math.inf, 10), (1e-3, 1.0, 1)],
)
def test_schedule_rejects_bad_ranges(min_lr: float, max_lr: float, steps: int) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        lr_schedule(min_lr, max_lr, steps)


# -- smooth -----------------------------------------------------------------------------------------------------


def test_smoothing_of_a_constant_is_that_constant_from_the_first_point() -> None:
    # Bias correction: without it the first values would be pulled towards 0.
    assert smooth([2.5] * 20, 0.98) == pytest.approx([2.5] * 20)


def test_smoothing_zero_is_the_identity() -> None:
    losses = [3.0, 1.0, 4.0, 1.0, 5.0]
    assert smooth(losses, 0.0) == losses


def test_smoothing_matches_the_bias_corrected_average_by_hand() -> None:
    # beta 0.5: avg1 = 0.5 -> 0.5 / 0.5 = 1; avg2 = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75.
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75])


def test_smoother_one_at_a_time_equals_smooth() -> None:
    losses = list(np.random.default_rng(0).uniform(0.5, 2.0, 50))
    smoother = Smoother(0.9)
    assert [smoother.update(v) for v in losses] == smooth(losses, 0.9)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_smoothing_out_of_range_is_an_error(beta: float) -> None:
    with pytest.raises(ValueError, match="smoothing"):
        smooth([1.0], beta)


# -- suggest ----------------------------------------------------------------------------------------------------


def _curve(steepest_at: float, *, diverge_from: float | None = None, n: int = 100) -> tuple[list[float], list[float]]:
    """A loss curve over lr 1e-6..1 whose steepest descent (in log10 lr) is at `steepest_at`."""
    lrs = lr_schedule(1e-6, 1.0, n)
    x = np.log10(lrs)
    loss = 2.0 - np.tanh(2.0 * (x - steepest_at))
    if diverge_from is not None:
        loss = loss + np.where(x > diverge_from, 20.0 * (x - diverge_from) ** 2, 0.0)
    return lrs, [float(v) for v in loss]


def _grid_step(lrs: list[float]) -> float:
    return lrs[1] / lrs[0]


@pytest.mark.parametrize("steepest_at", [-4.0, -3.0, -2.0])
def test_suggestion_is_the_steepest_descent(steepest_at: float) -> None:
    lrs, losses = _curve(steepest_at)
    lr, rule = suggest(lrs, losses)
    assert rule == STEEPEST_RULE
    step = _grid_step(lrs)
    assert 10**steepest_at / step <= lr <= 10**steepest_at * step


def test_the_divergent_tail_does_not_move_the_suggestion() -> None:
    lrs, losses = _curve(-3.0, diverge_from=-1.0)
    lr, rule = suggest(lrs, losses)
    assert rule == STEEPEST_RULE
    assert 1e-3 / _grid_step(lrs) <= lr <= 1e-3 * _grid_step(lrs)


def test_the_first_points_are_ignored() -> None:
    # The steepest drop is at the very start (smoothing warm-up artefacts look like this); after it, a gentle descent.
    lrs = lr_schedule(1e-6, 1.0, 100)
    losses = [5.0, 3.0, 2.2] + [2.0 - 0.005 * i for i in range(97)]
    lr, rule = suggest(lrs, losses)
    assert rule == STEEPEST_RULE
    assert lrs.index(lr) >= SKIP_START
    assert lrs.index(lr) < len(lrs) - SKIP_END


def test_a_flat_curve_falls_back_to_the_minimum_over_ten() -> None:
    lrs = lr_schedule(1e-6, 1.0, 100)
    noise = np.random.default_rng(0).uniform(-0.01, 0.01, 100)
    losses = [float(1.0 + v) for v in noise]
    lr, rule = suggest(lrs, losses)
    assert rule == MINIMUM_RULE
    assert lr == pytest.approx(lrs[int(np.argmin(losses))] / 10)


def test_a_rising_curve_falls_back_to_the_first_rate_over_ten() -> None:
    lrs = lr_schedule(1e-6, 1.0, 50)
    losses = [1.0 + 0.1 * i for i in range(50)]
    lr, rule = suggest(lrs, losses)
    assert rule == MINIMUM_RULE
    assert lr == pytest.approx(1e-7)


def test_too_few_points_fall_back() -> None:
    lr, rule = suggest([1e-3, 1e-2], [2.0, 1.0])
    assert rule == MINIMUM_RULE
    assert lr == pytest.approx(1e-3)


def test_suggest_needs_matching_non_empty_input() -> None:
    with pytest.raises(ValueError, match="no points"):
        suggest([], [])
    with pytest.raises(ValueError, match="2 learning rates for 1 losses"):
        suggest([1e-3, 1e-2], [1.0])


def test_divergence_is_factor_times_best() -> None:
    assert not diverged(4.0, 1.0, 4.0)
    assert diverged(4.01, 1.0, 4.0)


def test_the_sweep_samples_only_the_rows_it_can_see() -> None:
    rows = _sample_rows(1000, 64, seed=3)
    assert len(rows) == 64 == len(set(rows))
    assert rows == sorted(rows) == _sample_rows(1000, 64, seed=3)
    assert _sample_rows(10, 64, seed=3) == list(range(10))


# -- real sweeps --------------------------------------------------------------------------------------------------


def _split(n: int = 48, size: int = 32) -> Split:
    """Learnable images: each label brightens one colour channel of uniform noise."""
    rng = np.random.default_rng(0)
    targets = np.arange(n) % CLASSES
    images = rng.integers(0, 156, (n, 3, size, size), dtype=np.uint8)
    for label in range(CLASSES):
        images[targets == label, label] += 100
    return Split(images=images, targets=targets)


def _model(split: Split) -> Classifier:
    """MobileNetV3-small without pretrained weights, its BatchNorm statistics taken from the data.

    A freshly initialised MobileNetV3 emits features of ~1e-9 (its BatchNorms assume unit-variance inputs), so no
    head could learn from them; data statistics give the frozen base informative features, as pretraining would.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(architecture=Architecture.MOBILENET_V3_SMALL, weights=WeightsSource.NONE, classifier_dim=32)
    model = build_classifier(cfg, CLASSES, None)
    for module in model.base.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: one pass sets the statistics of this data
            module.reset_running_stats()
    model.base.train()
    with torch.no_grad():
        model.base(build_eval_transform(split.images.shape[-1], MEAN, STD)(torch.from_numpy(split.images)))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The tensors here are tiny: with intra-op threads on a busy machine, their spin-waiting makes a 0.2 s sweep
    # take ~10 s. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split() -> Split:
    return _split()


@pytest.fixture(scope="module")
def model(split: Split) -> Classifier:
    return _model(split)


@pytest.fixture
def ctx() -> RunContext:
    return RunContext(device=torch.device("cpu"), autocast_dtype=None, workers=0, mean=MEAN, std=STD)


STAGE = StageConfig(batch_size=16)


def test_a_sweep_follows_the_exponential_schedule(model: Classifier, split: Split, ctx: RunContext) -> None:
    result = find_learning_rate(model, split, STAGE, ctx, min_lr=1e-6, max_lr=0.1, steps=40)
    assert isinstance(result, LrFinderResult)
    assert not result.stopped_early
    lrs = [p.lr for p in result.points]
    assert lrs == lr_schedule(1e-6, 0.1, 40)
    assert lrs[0] == 1e-6
    assert lrs[-1] == 0.1
    assert [p.smoothed_loss for p in result.points] == pytest.approx(smooth([p.loss for p in result.points], 0.98))
    assert all(math.isfinite(p.loss) for p in result.points)
    assert 1e-7 <= result.suggested_lr <= 0.1
    assert result.rule in (STEEPEST_RULE, MINIMUM_RULE)


def test_the_loss_falls_and_the_suggestion_is_the_steepest_point(
    model: Classifier, split: Split, ctx: RunContext
) -> None:
    result = find_learning_rate(model, split, STAGE, ctx)
    smoothed = [p.smoothed_loss for p in result.points]
    assert min(smoothed) < 0.9 * smoothed[0]  # the head learns: a real descent
    assert result.rule == STEEPEST_RULE
    assert (result.suggested_lr, result.rule) == suggest([p.lr for p in result.points], smoothed)


def test_a_huge_max_lr_diverges_and_stops_early(model: Classifier, split: Split, ctx: RunContext) -> None:
    result = find_learning_rate(model, split, STAGE, ctx, max_lr=1e4, steps=100)
    assert result.stopped_early
    assert len(result.points) < 100
    smoothed = [p.smoothed_loss for p in result.points]
    assert smoothed[-1] > 4.0 * min(smoothed)  # stopped on the divergence rule
    assert all(not diverged(s, min(smoothed[: i + 1]), 4.0) for i, s in enumerate(smoothed[:-1]))
    assert result.suggested_lr < result.points[-1].lr


def test_a_sweep_is_deterministic_for_a_seed(model: Classifier, split: Split, ctx: RunContext) -> None:
    first = find_learning_rate(model, split, STAGE, ctx, steps=30, seed=7)
    again = find_learning_rate(model, split, STAGE, ctx, steps=30, seed=7)
    other = find_learning_rate(model, split, STAGE, ctx, steps=30, seed=8)
    assert first == again
    assert [p.loss for p in other.points] != [p.loss for p in first.points]


def test_a_sweep_leaves_the_model_and_the_global_rng_alone(model: Classifier, split: Split, ctx: RunContext) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    find_learning_rate(
        model,
        split,
        StageConfig(batch_size=8, gradient_clip_norm=1.0),
        ctx,
        steps=20,
        class_weight=torch.tensor([1.0, 2.0, 0.5]),
    )
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_fewer_images_than_a_batch_still_sweep(model: Classifier, ctx: RunContext) -> None:
    tiny = _split(n=5)
    result = find_learning_rate(model, tiny, StageConfig(batch_size=16), ctx, steps=12)
    assert len(result.points) == 12 or result.stopped_early


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 1}, "steps"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"divergence_factor": 1.0}, "divergence_factor"),
        ({"min_lr": 1.0, "max_lr": 0.5}, "min_lr"),
    ],
)
def test_bad_arguments_are_errors(
    model: Classifier, split: Split, ctx: RunContext, kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        find_learning_rate(model, split, STAGE, ctx, **kwargs)  # type: ignore[arg-type]


def test_an_empty_split_is_an_error(model: Classifier, ctx: RunContext) -> None:
    empty = Split(images=np.zeros((0, 3, 32, 32), dtype=np.uint8), targets=np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="no images"):
        find_learning_rate(model, empty, STAGE, ctx)
