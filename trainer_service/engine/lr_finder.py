"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks"; fastai's
`lr_find`): train the classification head for a few mini-batches while the learning rate grows exponentially from
tiny to huge, record the loss, and suggest the rate where the loss falls fastest.

It runs in the stage-1 setting (head on the frozen base) on cached bottleneck features, so a sweep costs one pass of
the base over at most `steps x batch_size` images plus `steps` tiny head updates. The caller's model is never
touched: the sweep trains a deep copy. `smooth` and `suggest` are pure functions over the recorded curve.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from trainer_service.engine.batch_augment import build_batch_pipeline
from trainer_service.engine.batches import Split, SplitLoader, sequential_plans, tensor_batches
from trainer_service.engine.context import RunContext, derive_seed, seeded_generator
from trainer_service.engine.epoch import build_optimizer, compute_features, set_lr
from trainer_service.engine.models import Classifier, freeze_base
from trainer_service.spec.config import AugmentationConfig, StageConfig

# The suggestion ignores this many points at each end (fastai's plot skips 10 and 5 of 100): the start is
# dominated by the smoothing's warm-up, the end by divergence. Scaled down for short curves.
SKIP_START = 10
SKIP_END = 5
# A curve "descends clearly" when its smoothed loss drops below the first smoothed value by at least this fraction;
# below that, the steepest slope is noise and the minimum-loss rule is used.
MIN_DESCENT = 0.05
# The steepest-descent window needs at least this many points to be meaningful.
MIN_WINDOW = 3

STEEPEST_RULE = "steepest descent of the smoothed loss against log10(learning rate)"
MINIMUM_RULE = "minimum loss / 10: the smoothed loss shows no clear descent, so one tenth of the rate at its minimum"


class LrPoint(NamedTuple):
    lr: float
    loss: float
    smoothed_loss: float


@dataclass(frozen=True)
class LrFinderResult:
    points: list[LrPoint]  # one per step taken, in order
    suggested_lr: float
    rule: str  # which rule produced `suggested_lr`, as a short sentence
    stopped_early: bool  # the loss diverged (or stopped being finite) before `steps` steps


# -- pure pieces ----------------------------------------------------------------------------------------------


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` learning rates growing geometrically from `min_lr` to `max_lr`, both ends included."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if not 0 < min_lr < max_lr or not math.isfinite(max_lr):
        raise ValueError(f"need 0 < min_lr < max_lr (finite), got {min_lr}, {max_lr}")
    ratio = max_lr / min_lr
    lrs = [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]
    lrs[-1] = max_lr  # exact despite rounding, so the sweep really ends at max_lr
    return lrs


class Smoother:
    """Bias-corrected exponential moving average, one value at a time (see `smooth`)."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {beta}")
        self.beta = beta
        self._average = 0.0
        self._count = 0

    def update(self, loss: float) -> float:
        self._count += 1
        self._average = self.beta * self._average + (1.0 - self.beta) * loss
        return self._average / (1.0 - self.beta**self._count)


def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (fastai): avg_i = beta avg_(i-1) + (1 - beta) loss_i, divided by
    1 - beta^(i+1) so early values are not pulled towards the zero the average starts from. beta = 0: unchanged."""
    smoother = Smoother(beta)
    return [smoother.update(loss) for loss in losses]


def _skips(n: int) -> tuple[int, int]:
    return min(SKIP_START, n // 10), min(SKIP_END, n // 20)


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[float, str]:
    """(suggested learning rate, the rule used) for a recorded curve.

    Steepest descent: the rate where d(smoothed loss) / d(log10 lr) is most negative, the first and last few points
    ignored (`SKIP_START`, `SKIP_END`). When the curve does not clearly descend (too few points, no negative slope,
    or a drop under `MIN_DESCENT` of the starting loss): one tenth of the rate with the lowest smoothed loss.
    """
    if len(lrs) != len(smoothed):
        raise ValueError(f"{len(lrs)} learning rates for {len(smoothed)} losses")
    if not lrs:
        raise ValueError("no points to suggest a learning rate from")
    values = np.asarray(smoothed, dtype=np.float64)
    best = int(np.argmin(values))
    fallback = (float(lrs[best]) / 10.0, MINIMUM_RULE)
    first, last = _skips(len(values))
    window = range(first, len(values) - last)
    if len(window) < MIN_WINDOW or values[0] - values[best] < MIN_DESCENT * abs(values[0]):
        return fallback
    # Central differences on the whole curve, so the window's edge points have both neighbours.
    slopes = np.gradient(values, np.log10(np.asarray(lrs, dtype=np.float64)))
    steepest = window[int(np.argmin(slopes[window.start : window.stop]))]
    if slopes[steepest] >= 0:
        return fallback
    return float(lrs[steepest]), STEEPEST_RULE


def diverged(smoothed_loss: float, best: float, factor: float) -> bool:
    """fastai's stop: the smoothed loss above `factor` times the best so far."""
    return smoothed_loss > factor * best


# -- the sweep ------------------------------------------------------------------------------------------------


def _sample_rows(n: int, needed: int, seed: int) -> list[int]:
    """At most `needed` of `n` rows, a seeded sample (sorted): the sweep never sees more images than that."""
    if n <= needed:
        return list(range(n))
    return sorted(random.Random(derive_seed(seed, "lr_finder", "rows")).sample(range(n), needed))


def _cycle_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled full batches (a new order per pass); one partial batch per pass only when the data holds
    fewer images than a batch."""
    n = int(x.shape[0])
    usable = n - n % batch_size if n >= batch_size else n
    epoch = 0
    while True:
        order = torch.randperm(n, generator=seeded_generator(derive_seed(seed, "lr_finder", "order", epoch)))[:usable]
        yield from tensor_batches(x, y, batch_size, order)
        epoch += 1


def _check_arguments(train: Split, steps: int, smoothing: float, divergence_factor: float) -> None:
    if len(train) == 0:
        raise ValueError("the training split has no images")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not divergence_factor > 1.0:
        raise ValueError(f"divergence_factor must be above 1, got {divergence_factor}")


def _features(model: Classifier, train: Split, rows: list[int], ctx: RunContext) -> tuple[Tensor, Tensor]:
    pipeline = build_batch_pipeline(AugmentationConfig(), int(train.images.shape[-1]), ctx.mean, ctx.std)
    plans = sequential_plans(rows, ctx.eval_batch_size)
    return compute_features(model, SplitLoader(train, ctx, pipeline).batches(plans, None), ctx, len(rows))


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def find_learning_rate(
    model: Classifier,
    train: Split,
    stage: StageConfig,
    ctx: RunContext,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
    seed: int = 0,
    class_weight: Tensor | None = None,
) -> LrFinderResult:
    """The LR range test of the head on `model`'s frozen base, with `stage`'s batch size, optimizer, label smoothing
    and gradient clipping. `class_weight`: per-label loss weights (WEIGHTED_LOSS), or None.

    Deterministic for a seed; leaves `model` and the global RNG state as they were.
    """
    _check_arguments(train, steps, smoothing, divergence_factor)
    lrs = lr_schedule(min_lr, max_lr, steps)
    sweep = copy.deepcopy(model)  # trained and thrown away: the caller's weights stay as they are
    freeze_base(sweep)
    sweep.to(ctx.device)
    # Iterating a DataLoader draws from the global RNG even without shuffling, and dropout does: all of it happens
    # on a forked RNG, seeded from `seed`, so the sweep is reproducible and the caller's RNG state untouched.
    with torch.random.fork_rng(devices=_rng_devices(ctx.device)):
        torch.manual_seed(derive_seed(seed, "lr_finder", "torch"))
        x, y = _features(sweep, train, _sample_rows(len(train), steps * stage.batch_size, seed), ctx)
        head = sweep.head.train()  # dropout on, as in stage-1 training
        weight = class_weight.to(ctx.device) if class_weight is not None else None
        criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=stage.label_smoothing)
        batches = _cycle_batches(x, y, stage.batch_size, seed)
        points, stopped_early = _sweep(head, batches, lrs, criterion, stage, ctx, smoothing, divergence_factor)
    if not points:
        raise ValueError("the loss was not finite at the first learning rate; check the data and the model")
    suggested, rule = suggest([p.lr for p in points], [p.smoothed_loss for p in points])
    return LrFinderResult(points=points, suggested_lr=suggested, rule=rule, stopped_early=stopped_early)


def _sweep(
    head: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    lrs: Sequence[float],
    criterion: nn.Module,
    stage: StageConfig,
    ctx: RunContext,
    smoothing: float,
    divergence_factor: float,
) -> tuple[list[LrPoint], bool]:
    """(the recorded points, whether it stopped before the last rate)."""
    optimizer = build_optimizer(list(head.parameters()), stage)
    smoother = Smoother(smoothing)
    points: list[LrPoint] = []
    best = math.inf
    for lr, (inputs, targets) in zip(lrs, batches, strict=False):
        # The head is tiny: fp32 throughout, so no fp16 loss scaler can skip steps and distort the curve.
        inputs = inputs.to(device=ctx.device, dtype=torch.float32)  # cached features may be kept in bf16
        loss = _step(head, optimizer, criterion, inputs, targets.to(ctx.device), lr, stage)
        if not math.isfinite(loss):
            return points, True
        smoothed = smoother.update(loss)
        points.append(LrPoint(lr, loss, smoothed))
        best = min(best, smoothed)
        if diverged(smoothed, best, divergence_factor):
            return points, len(points) < len(lrs)
    return points, False


def _step(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    lr: float,
    stage: StageConfig,
) -> float:
    """One head update at `lr`; returns the loss before the update."""
    set_lr(optimizer, lr)
    loss: Tensor = criterion(head(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
    if stage.gradient_clip_norm > 0:
        nn.utils.clip_grad_norm_(head.parameters(), stage.gradient_clip_norm)
    optimizer.step()
    return float(loss.detach())
