"""Learning-rate schedules as pure functions of a stage's progress, evaluated before every optimizer step.

`lr_at(stage, epoch)` takes fractional epochs: step i of n in epoch e is `e + i / n`. The schedules match
torch.optim.lr_scheduler stepped once per optimizer step (the tests compare them numerically):

- CONSTANT: the stage LR.
- STEP: LR * gamma ** floor(epoch / step_epochs)                    (StepLR, step_size = step_epochs * n)
- COSINE: LR down to min_learning_rate over the stage               (CosineAnnealingLR, T_max = epochs * n)
- ONE_CYCLE: peak / 25 up to peak over the first 30 %, then cosine down to peak / 25 / 1e4
  (OneCycleLR's defaults, max_lr = stage.peak_learning_rate, total_steps = epochs * n)
- CYCLIC: triangle between LR and peak, one cycle per cycle_epochs  (CyclicLR 'triangular')
- SGDR: cosine from LR to min_learning_rate, restarting after restart_epochs, each period restart_multiplier
  times the previous                                                 (CosineAnnealingWarmRestarts)
- REDUCE_ON_PLATEAU: the stage LR, times `PlateauReducer.scale` (stateful: it depends on the metrics).

Warm-up (warmup_epochs = w > 0): over [0, w) the LR rises linearly to the schedule's value at w, then the
schedule continues on the stage's own timeline (decay points and cycles do not shift). The ramp starts at
WARMUP_START_FACTOR rather than 0 so that the first step still moves the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trainer_service.spec.config import ScheduleType, StageConfig

WARMUP_START_FACTOR = 1e-3

# torch.optim.lr_scheduler.OneCycleLR defaults.
ONE_CYCLE_PCT_START = 0.3
ONE_CYCLE_DIV_FACTOR = 25.0
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4

# torch.optim.lr_scheduler.ReduceLROnPlateau defaults: relative threshold, and the smallest LR change applied.
PLATEAU_THRESHOLD = 1e-4
PLATEAU_EPS = 1e-8


def lr_at(stage: StageConfig, epoch: float, *, steps_per_epoch: int | None = None) -> float:
    """The learning rate at fractional epoch `epoch` of the stage (in [0, stage.epochs)).

    `steps_per_epoch` only matters for ONE_CYCLE: given, the cycle is laid out on the stage's optimizer steps
    exactly as OneCycleLR does (its last step lands on the floor); None lays it out on continuous time (the
    floor is reached at the end of the stage). Every other schedule is the same either way.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    warmup = stage.schedule.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return _schedule_lr(stage, warmup, steps_per_epoch) * max(epoch / warmup, WARMUP_START_FACTOR)
    return _schedule_lr(stage, epoch, steps_per_epoch)


def lr_curve(stage: StageConfig, steps_per_epoch: int) -> list[float]:
    """The LR of every optimizer step of the stage (epochs * steps_per_epoch values), for plots and tests."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return [
        lr_at(stage, e + i / steps_per_epoch, steps_per_epoch=steps_per_epoch)
        for e in range(stage.epochs)
        for i in range(steps_per_epoch)
    ]


def _schedule_lr(stage: StageConfig, epoch: float, steps_per_epoch: int | None) -> float:
    s = stage.schedule
    lr = stage.learning_rate
    match s.type:
        case ScheduleType.CONSTANT | ScheduleType.REDUCE_ON_PLATEAU:
            return lr
        case ScheduleType.STEP:
            return lr * s.gamma ** math.floor(epoch / s.step_epochs)
        case ScheduleType.COSINE:
            progress = min(epoch / stage.epochs, 1.0)
            return _cosine(lr, s.min_learning_rate, progress)
        case ScheduleType.ONE_CYCLE:
            return _one_cycle(stage, epoch, steps_per_epoch)
        case ScheduleType.CYCLIC:
            # CyclicLR 'triangular' with equal up and down halves.
            x = epoch / s.cycle_epochs
            position = x - math.floor(x)  # in [0, 1) within the current cycle
            height = position / 0.5 if position <= 0.5 else (position - 1.0) / (0.5 - 1.0)
            return lr + (stage.peak_learning_rate - lr) * height
        case ScheduleType.SGDR:
            t, period = _sgdr_position(epoch, float(s.restart_epochs), s.restart_multiplier)
            return _cosine(lr, s.min_learning_rate, t / period)
    raise ValueError(f"unknown schedule type {s.type!r}")


def _cosine(start: float, end: float, progress: float) -> float:
    """Half a cosine from `start` (progress 0) to `end` (progress 1)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _sgdr_position(epoch: float, first_period: float, multiplier: int) -> tuple[float, float]:
    """(epochs into the current period, length of the current period)."""
    if multiplier == 1:
        return math.fmod(epoch, first_period), first_period
    t, period = epoch, first_period
    while t >= period:  # periods grow geometrically, so this runs O(log epoch) times
        t -= period
        period *= multiplier
    return t, period


def _one_cycle(stage: StageConfig, epoch: float, steps_per_epoch: int | None) -> float:
    peak = stage.peak_learning_rate
    initial = peak / ONE_CYCLE_DIV_FACTOR
    floor = initial / ONE_CYCLE_FINAL_DIV_FACTOR
    if steps_per_epoch is None:
        t, total = epoch, float(stage.epochs)
        up_end, down_end = ONE_CYCLE_PCT_START * total, total
    else:
        # OneCycleLR's step positions: the peak at step pct * T - 1, the floor at the last step T - 1.
        t, total = epoch * steps_per_epoch, float(stage.epochs * steps_per_epoch)
        up_end, down_end = ONE_CYCLE_PCT_START * total - 1.0, total - 1.0
    if up_end > 0 and t <= up_end:
        return _cosine(initial, peak, t / up_end)
    return _cosine(peak, floor, min((t - up_end) / (down_end - up_end), 1.0))


class PlateauReducer:
    """REDUCE_ON_PLATEAU's state: multiply the LR by gamma after plateau_patience epochs without improvement.

    The semantics of torch's ReduceLROnPlateau with its defaults (relative threshold 1e-4, no cooldown, no
    minimum LR, changes smaller than 1e-8 skipped), with mode "max" when `higher_is_better` else "min".
    Call `update` once per epoch with the monitored metric; `scale` is the factor the stage LR is multiplied by
    from the next epoch on. `state_dict` / `load_state_dict` (plain JSON-able dicts) let a resumed job continue
    exactly.
    """

    def __init__(self, stage: StageConfig, *, higher_is_better: bool) -> None:
        self._base_lr = stage.learning_rate
        self._gamma = stage.schedule.gamma
        self._patience = stage.schedule.plateau_patience
        self._higher_is_better = higher_is_better
        self._best = -math.inf if higher_is_better else math.inf
        self._bad_epochs = 0
        self._scale = 1.0

    @property
    def scale(self) -> float:
        """The cumulative LR factor: gamma ** (number of reductions so far)."""
        return self._scale

    def update(self, metric_value: float) -> float:
        """Record one epoch's metric; returns the (possibly reduced) scale for the next epoch."""
        if self._is_better(metric_value):
            self._best = metric_value
            self._bad_epochs = 0
        else:
            self._bad_epochs += 1  # NaN never improves, as in torch
        if self._bad_epochs > self._patience:
            old_lr = self._base_lr * self._scale
            if old_lr - old_lr * self._gamma > PLATEAU_EPS:
                self._scale *= self._gamma
            self._bad_epochs = 0
        return self._scale

    def _is_better(self, value: float) -> bool:
        if self._higher_is_better:
            return value > self._best * (1.0 + PLATEAU_THRESHOLD)
        return value < self._best * (1.0 - PLATEAU_THRESHOLD)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self._mode,
            # None until a finite best exists: JSON has no infinities.
            "best": self._best if math.isfinite(self._best) else None,
            "num_bad_epochs": self._bad_epochs,
            "scale": self._scale,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["mode"] != self._mode:
            raise ValueError(f"plateau state is for mode {state['mode']!r}, this reducer is {self._mode!r}")
        best = state["best"]
        self._best = float(best) if best is not None else (-math.inf if self._higher_is_better else math.inf)
        self._bad_epochs = int(state["num_bad_epochs"])
        self._scale = float(state["scale"])

    @property
    def _mode(self) -> str:
        return "max" if self._higher_is_better else "min"
