"""Tests of the LR schedules: numerically against torch's own schedulers, warm-up, decay points, floors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LRScheduler,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)
from trainer_service.engine.schedules import (
    ONE_CYCLE_DIV_FACTOR,
    ONE_CYCLE_FINAL_DIV_FACTOR,
    WARMUP_START_FACTOR,
    PlateauReducer,
    lr_at,
    lr_curve,
)
from trainer_service.spec.config import ScheduleConfig, ScheduleType, StageConfig

LR = 0.01
SHAPES = [(6, 7), (10, 1), (3, 40)]  # (epochs, steps per epoch)


def _stage(epochs: int, **schedule: object) -> StageConfig:
    return StageConfig(epochs=epochs, learning_rate=LR, schedule=ScheduleConfig(**schedule))  # type: ignore[arg-type]


def _optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)


def _torch_curve(make: Callable[[torch.optim.SGD], LRScheduler], steps: int) -> list[float]:
    """The LR torch's scheduler gives each optimizer step, stepped once per step."""
    optimizer = _optimizer()
    scheduler = make(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return lrs


def _assert_curves_equal(ours: list[float], theirs: list[float]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-15), f"step {i}: {a} != {b}"


# -- against torch ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("epochs", "n"), SHAPES)
def test_constant(epochs: int, n: int) -> None:
    assert lr_curve(_stage(epochs), n) == [LR] * (epochs * n)


@pytest.mark.parametrize(("epochs", "n"), SHAPES)
@pytest.mark.parametrize("step_epochs", [1, 3])
def test_step_matches_step_lr(epochs: int, n: int, step_epochs: int) -> None:
    stage = _stage(epochs, type=ScheduleType.STEP, step_epochs=step_epochs, gamma=0.5)
    theirs = _torch_curve(lambda o: StepLR(o, step_size=step_epochs * n, gamma=0.5), epochs * n)
    _assert_curves_equal(lr_curve(stage, n), theirs)


def test_step_decays_exactly_at_multiples_of_step_epochs() -> None:
    stage = _stage(9, type=ScheduleType.STEP, step_epochs=3, gamma=0.1)
    assert lr_at(stage, 0.0) == LR
    assert lr_at(stage, 2.999) == LR
    assert lr_at(stage, 3.0) == pytest.approx(LR * 0.1)
    assert lr_at(stage, 5.5) == pytest.approx(LR * 0.1)
    assert lr_at(stage, 6.0) == pytest.approx(LR * 0.01)


@pytest.mark.parametrize(("epochs", "n"), SHAPES)
@pytest.mark.parametrize("floor", [0.0, 1e-4])
def test_cosine_matches_cosine_annealing(epochs: int, n: int, floor: float) -> None:
    stage = _stage(epochs, type=ScheduleType.COSINE, min_learning_rate=floor)
    theirs = _torch_curve(lambda o: CosineAnnealingLR(o, T_max=epochs * n, eta_min=floor), epochs * n)
    ours = lr_curve(stage, n)
    _assert_curves_equal(ours, theirs)
    assert ours[0] == LR
    assert all(lr >= floor for lr in ours)
    assert ours == sorted(ours, reverse=True)
    assert lr_at(stage, float(epochs)) == pytest.approx(floor)


@pytest.mark.parametrize(("epochs", "n"), SHAPES)
@pytest.mark.parametrize("peak", [None, 0.05])
def test_one_cycle_matches_one_cycle_lr(epochs: int, n: int, peak: float | None) -> None:
    stage = _stage(epochs, type=ScheduleType.ONE_CYCLE, max_learning_rate=peak)
    max_lr = stage.peak_learning_rate
    assert max_lr == (peak if peak is not None else 10 * LR)
    theirs = _torch_curve(lambda o: OneCycleLR(o, max_lr=max_lr, total_steps=epochs * n), epochs * n)
    ours = lr_curve(stage, n)
    _assert_curves_equal(ours, theirs)
    assert max(ours) == pytest.approx(max_lr, rel=0.05)
    assert ours[-1] == pytest.approx(max_lr / ONE_CYCLE_DIV_FACTOR / ONE_CYCLE_FINAL_DIV_FACTOR)


def test_one_cycle_on_continuous_time() -> None:
    stage = _stage(10, type=ScheduleType.ONE_CYCLE)
    peak = stage.peak_learning_rate
    assert lr_at(stage, 0.0) == pytest.approx(peak / ONE_CYCLE_DIV_FACTOR)
    assert lr_at(stage, 3.0) == pytest.approx(peak)
    assert lr_at(stage, 10.0) == pytest.approx(peak / ONE_CYCLE_DIV_FACTOR / ONE_CYCLE_FINAL_DIV_FACTOR)
    up = [lr_at(stage, e / 10) for e in range(31)]
    down = [lr_at(stage, 3 + e / 10) for e in range(71)]
    assert up == sorted(up)
    assert down == sorted(down, reverse=True)


@pytest.mark.parametrize(("epochs", "n"), SHAPES)
@pytest.mark.parametrize("cycle", [2.0, 1.5, 1.0])
def test_cyclic_matches_triangular_cyclic_lr(epochs: int, n: int, cycle: float) -> None:
    stage = _stage(epochs, type=ScheduleType.CYCLIC, cycle_epochs=cycle, max_learning_rate=0.04)
    theirs = _torch_curve(
        lambda o: CyclicLR(  # a fractional half-cycle works: torch converts step_size_up to float
            o,
            base_lr=LR,
            max_lr=0.04,
            step_size_up=cycle * n / 2,  # type: ignore[arg-type]
            mode="triangular",
            cycle_momentum=False,
        ),
        epochs * n,
    )
    _assert_curves_equal(lr_curve(stage, n), theirs)


def test_cyclic_shape() -> None:
    stage = _stage(6, type=ScheduleType.CYCLIC, cycle_epochs=2.0)
    peak = stage.peak_learning_rate
    assert lr_at(stage, 0.0) == LR
    assert lr_at(stage, 1.0) == pytest.approx(peak)
    assert lr_at(stage, 0.5) == pytest.approx((LR + peak) / 2)
    assert lr_at(stage, 2.0) == pytest.approx(LR)
    assert lr_at(stage, 3.0) == pytest.approx(peak)


@pytest.mark.parametrize(("epochs", "n"), SHAPES)
@pytest.mark.parametrize(("restart", "multiplier"), [(1, 1), (2, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("floor", [0.0, 1e-3])
def test_sgdr_matches_warm_restarts(epochs: int, n: int, restart: int, multiplier: int, floor: float) -> None:
    stage = _stage(
        epochs, type=ScheduleType.SGDR, restart_epochs=restart, restart_multiplier=multiplier, min_learning_rate=floor
    )
    theirs = _torch_curve(
        lambda o: CosineAnnealingWarmRestarts(o, T_0=restart * n, T_mult=multiplier, eta_min=floor), epochs * n
    )
    ours = lr_curve(stage, n)
    _assert_curves_equal(ours, theirs)
    assert all(floor <= lr <= LR * (1 + 1e-12) for lr in ours)


def test_sgdr_restarts() -> None:
    stage = _stage(20, type=ScheduleType.SGDR, restart_epochs=2, restart_multiplier=2, min_learning_rate=1e-4)
    for restart in (0.0, 2.0, 6.0, 14.0):  # periods 2, 4, 8, ...
        assert lr_at(stage, restart) == pytest.approx(LR)
        if restart > 0:
            assert lr_at(stage, restart - 1e-9) == pytest.approx(1e-4, rel=1e-3)
    assert lr_at(stage, 4.0) == pytest.approx((LR + 1e-4) / 2)  # the middle of the second period


def test_reduce_on_plateau_lr_is_the_base_lr() -> None:
    stage = _stage(5, type=ScheduleType.REDUCE_ON_PLATEAU)
    assert lr_curve(stage, 4) == [LR] * 20


# -- warm-up ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ScheduleType))
def test_warmup_rises_linearly_to_the_schedules_value(kind: ScheduleType) -> None:
    warmup = 2.0
    stage = _stage(10, type=kind, warmup_epochs=warmup, step_epochs=1)
    target = lr_at(_stage(10, type=kind, step_epochs=1), warmup)
    assert lr_at(stage, 0.0) == pytest.approx(target * WARMUP_START_FACTOR)
    assert lr_at(stage, 0.0) > 0
    assert lr_at(stage, 0.5) == pytest.approx(target * 0.25)
    assert lr_at(stage, 1.0) == pytest.approx(target * 0.5)
    assert lr_at(stage, warmup) == pytest.approx(target)
    ramp = [lr_at(stage, e / 20) for e in range(41)]
    assert ramp == sorted(ramp)


@pytest.mark.parametrize("kind", list(ScheduleType))
def test_after_warmup_the_schedule_is_unchanged(kind: ScheduleType) -> None:
    plain = _stage(8, type=kind, step_epochs=2)
    warm = _stage(8, type=kind, step_epochs=2, warmup_epochs=1.5)
    for epoch in (1.5, 2.0, 3.25, 6.0, 7.9):
        assert lr_at(warm, epoch) == lr_at(plain, epoch)


def test_fractional_warmup_with_step_decay() -> None:
    stage = _stage(6, type=ScheduleType.STEP, step_epochs=2, gamma=0.1, warmup_epochs=0.5)
    assert lr_at(stage, 0.25) == pytest.approx(LR / 2)
    assert lr_at(stage, 1.99) == LR
    assert lr_at(stage, 2.0) == pytest.approx(LR * 0.1)


def test_curve_is_lr_at_every_step() -> None:
    stage = _stage(4, type=ScheduleType.COSINE, warmup_epochs=1.0, min_learning_rate=1e-4)
    curve = lr_curve(stage, 5)
    assert len(curve) == 20
    assert curve == [lr_at(stage, e + i / 5) for e in range(4) for i in range(5)]


def test_negative_epoch_and_empty_epochs_are_rejected() -> None:
    with pytest.raises(ValueError, match="epoch"):
        lr_at(_stage(3), -0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_curve(_stage(3), 0)


# -- reduce on plateau --------------------------------------------------------------------------------------

LOSSES = [1.0, 0.8, 0.8, 0.79995, 0.81, 0.7, 0.7, 0.7, 0.7, float("nan"), 0.6, 0.6, 0.6, 0.5, 0.5, 0.5, 0.5]
ACCURACIES = [0.5, 0.6, 0.6, 0.60003, 0.55, 0.7, 0.7, 0.7, 0.71, 0.71, 0.71, 0.71, 0.9, 0.9, 0.9, 0.9]


def _torch_plateau_lrs(metrics: list[float], *, mode: str, patience: int, gamma: float) -> list[float]:
    optimizer = _optimizer()
    scheduler = ReduceLROnPlateau(optimizer, mode=mode, factor=gamma, patience=patience)  # type: ignore[arg-type]
    lrs = []
    for value in metrics:
        scheduler.step(value)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return lrs


@pytest.mark.parametrize("patience", [0, 1, 2])
@pytest.mark.parametrize("gamma", [0.1, 0.5])
@pytest.mark.parametrize(("metrics", "higher_is_better"), [(LOSSES, False), (ACCURACIES, True)])
def test_plateau_matches_reduce_lr_on_plateau(
    patience: int, gamma: float, metrics: list[float], higher_is_better: bool
) -> None:
    stage = _stage(len(metrics), type=ScheduleType.REDUCE_ON_PLATEAU, plateau_patience=patience, gamma=gamma)
    reducer = PlateauReducer(stage, higher_is_better=higher_is_better)
    assert reducer.scale == 1.0
    ours = [LR * reducer.update(value) for value in metrics]
    theirs = _torch_plateau_lrs(metrics, mode="max" if higher_is_better else "min", patience=patience, gamma=gamma)
    _assert_curves_equal(ours, theirs)
    assert ours[-1] < LR  # the sequences do plateau


def test_plateau_stops_reducing_below_torchs_eps() -> None:
    # Reductions smaller than 1e-8 are skipped, as in torch: the LR bottoms out instead of vanishing.
    metrics = [1.0] * 30
    stage = _stage(30, type=ScheduleType.REDUCE_ON_PLATEAU, plateau_patience=0, gamma=0.1)
    reducer = PlateauReducer(stage, higher_is_better=False)
    ours = [LR * reducer.update(value) for value in metrics]
    _assert_curves_equal(ours, _torch_plateau_lrs(metrics, mode="min", patience=0, gamma=0.1))
    assert ours[-1] == ours[-2] > 0


def test_plateau_threshold_is_relative() -> None:
    stage = _stage(10, type=ScheduleType.REDUCE_ON_PLATEAU, plateau_patience=0, gamma=0.5)
    reducer = PlateauReducer(stage, higher_is_better=False)
    assert reducer.update(1.0) == 1.0
    assert reducer.update(0.99995) == 0.5  # less than 1e-4 relative: no improvement
    assert reducer.update(0.9) == 0.5


@pytest.mark.parametrize(("metrics", "higher_is_better"), [(LOSSES, False), (ACCURACIES, True)])
def test_plateau_state_round_trips_through_json(metrics: list[float], higher_is_better: bool) -> None:
    stage = _stage(len(metrics), type=ScheduleType.REDUCE_ON_PLATEAU, plateau_patience=1, gamma=0.5)
    uninterrupted = PlateauReducer(stage, higher_is_better=higher_is_better)
    expected = [uninterrupted.update(value) for value in metrics]
    for cut in range(len(metrics) + 1):
        first = PlateauReducer(stage, higher_is_better=higher_is_better)
        scales = [first.update(value) for value in metrics[:cut]]
        state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        resumed = PlateauReducer(stage, higher_is_better=higher_is_better)
        resumed.load_state_dict(state)
        assert resumed.scale == (scales[-1] if scales else 1.0)
        scales += [resumed.update(value) for value in metrics[cut:]]
        assert scales == expected, f"resumed after {cut} epochs"


def test_plateau_state_of_the_other_mode_is_rejected() -> None:
    stage = _stage(3, type=ScheduleType.REDUCE_ON_PLATEAU)
    state = PlateauReducer(stage, higher_is_better=True).state_dict()
    with pytest.raises(ValueError, match="mode"):
        PlateauReducer(stage, higher_is_better=False).load_state_dict(state)


def test_plateau_state_is_plain() -> None:
    reducer = PlateauReducer(_stage(3, type=ScheduleType.REDUCE_ON_PLATEAU), higher_is_better=False)
    reducer.update(0.5)
    state = reducer.state_dict()
    assert state == {"mode": "min", "best": 0.5, "num_bad_epochs": 0, "scale": 1.0}
    assert not math.isinf(float(state["best"]))
