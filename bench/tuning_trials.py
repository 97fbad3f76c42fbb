"""The tuning benchmark's trials: one arm for one seed, trial after trial until its epoch budget is spent, through
the product's tuning code and the engine's `recipe.train`; and the bottleneck features shared across trials
(bench/tuning.py's docstring has the method)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final
from unittest import mock

import optuna
from torch import Tensor
from trainer_service.engine import loop
from trainer_service.engine.batches import DevicePass
from trainer_service.engine.context import RunContext, run_context
from trainer_service.engine.epoch import Batches
from trainer_service.engine.loop import EpochRecord, NoOpCallbacks
from trainer_service.engine.models import Classifier, build_classifier
from trainer_service.engine.recipe import PreparedData, TrainingResult, train
from trainer_service.spec.config import Metric, TrainingConfig
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.tuning.optuna_setup import make_pruner, make_sampler
from trainer_service.tuning.space import apply_params, suggest
from trainer_service.tuning.study_config import StudyConfig, validate_study

from bench.tuning_study import BUCKET, Arm, Settings, short_params, study_spec

# -- shared bottleneck features -----------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    passes: int = 0  # feature passes computed (cache misses)
    reused: int = 0  # passes a trial skipped (cache hits)
    seconds: float = 0.0  # time spent computing them
    images: int = 0


@contextlib.contextmanager
def shared_features(enabled: bool) -> Iterator[FeatureStats]:
    """Within the block, the engine's `compute_features` runs once per split of the data: later runs reuse the
    features. Exact when every run has the same frozen base and eval transform, as every trial here does (the
    search space has no architecture, weights or image size). Counts passes and their time either way."""
    stats = FeatureStats()
    original = loop.compute_features
    cache: dict[tuple[int, tuple[int, ...]], tuple[object, tuple[Tensor, Tensor]]] = {}

    def compute(model: Classifier, batches: Batches, ctx: RunContext, rows: int) -> tuple[Tensor, Tensor]:
        key = split = None
        if enabled and isinstance(batches, DevicePass) and batches.generator is None:  # no augmented copies
            split = batches.loader.split
            key = (id(split), tuple(r for plan in batches.plans for r in plan.rows))
            hit = cache.get(key)
            if hit is not None and hit[0] is split:
                stats.reused += 1
                return hit[1]
        started = time.perf_counter()
        out = original(model, batches, ctx, rows)
        stats.passes += 1
        stats.seconds += time.perf_counter() - started
        stats.images += int(out[0].shape[0])
        if key is not None:
            cache[key] = (split, out)  # the split itself, so a reused id() of a freed one never matches
        return out

    with mock.patch.object(loop, "compute_features", compute):
        yield stats


# -- one arm, one seed --------------------------------------------------------------------------------------------


class _Pruned(Exception):
    """The pruner stopped the trial after the epoch just reported (raised through the engine, as the worker does)."""


class _OutOfBudget(Exception):
    """The arm's epoch budget ran out inside this trial."""


class _TrialCallbacks(NoOpCallbacks):
    """Engine callbacks of one trial: count epochs, report the objective to Optuna, ask the pruner, stop at the
    budget."""

    def __init__(self, trial: optuna.Trial, metric: Metric, epochs_left: int) -> None:
        self.trial = trial
        self.metric = metric
        self.epochs_left = epochs_left
        self.epochs = 0
        self.epoch_seconds = 0.0
        self.last_value: float | None = None

    def epoch_ended(self, repeat: int, record: EpochRecord) -> None:
        self.epochs += 1
        self.epoch_seconds += record.epoch_seconds
        self.last_value = record.metric(self.metric)
        self.trial.report(self.last_value, self.epochs)  # steps are 1-based epochs (optuna_setup's docstring)
        if self.trial.should_prune():
            raise _Pruned()
        if self.epochs >= self.epochs_left and record.epoch < record.epochs:
            raise _OutOfBudget()


COMPLETE: Final = "complete"
PRUNED: Final = "pruned"
CUT: Final = "cut by budget"
FAILED: Final = "failed"


@dataclass(frozen=True)
class TrialRun:
    number: int
    state: str
    epochs: int  # epochs this trial trained
    spent: int  # the arm's epochs spent when it ended (cumulative)
    elapsed: float  # the arm's wall seconds when it ended (cumulative)
    value: float | None  # the objective, COMPLETE trials only
    last_value: float | None  # the last epoch's reported validation accuracy
    seconds: float  # this trial's wall time
    epoch_seconds: float  # of which in its epochs
    params: dict[str, str | int | float]
    error: str | None = None


@dataclass
class ArmRun:
    arm: Arm
    seed: int
    trials: list[TrialRun] = field(default_factory=list)
    seconds: float = 0.0
    test_accuracy: float | None = None  # the best configuration retrained with the test set
    retrain_val_accuracy: float | None = None
    model_sampled: int | None = None  # trials TPE drew from its model (not its random start-up); None: unknown

    @property
    def spent(self) -> int:
        return self.trials[-1].spent if self.trials else 0

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)

    def best_trial(self) -> TrialRun | None:
        complete = [t for t in self.trials if t.value is not None]
        # The first of equal values, as optuna's best_trial picks.
        return max(complete, key=lambda t: (t.value, -t.number)) if complete else None

    @property
    def best(self) -> float | None:
        best = self.best_trial()
        return None if best is None else best.value

    def reached(self, target: float) -> TrialRun | None:
        """The first COMPLETE trial whose value is >= target."""
        return next((t for t in self.trials if t.value is not None and t.value >= target), None)


def _trial_config(config: StudyConfig, params: dict[str, str | int | float]) -> TrainingConfig:
    """The trial's TrainingConfig: the base spec with the trial's values, validated as the study runner does."""
    return validate_spec(apply_params(config.base_spec, params), default_bucket=BUCKET)


def _run_training(
    trial_config: TrainingConfig, data: PreparedData, base_state: dict[str, Tensor] | None, callbacks: NoOpCallbacks
) -> TrainingResult:
    return train(
        trial_config,
        data,
        lambda seed: build_classifier(trial_config.model, len(data.labels), base_state),
        run_context(trial_config),
        callbacks,
    )


def run_arm(
    arm: Arm,
    seed: int,
    s: Settings,
    data: PreparedData,
    base_state: dict[str, Tensor] | None,
) -> tuple[ArmRun, StudyConfig]:
    """Trials of one arm until `s.budget_epochs` epochs are spent; `data` without its test split."""
    config = validate_study(study_spec(s, arm, seed), default_bucket=BUCKET)
    # A fixed name: HyperbandPruner puts a trial in a bracket by a hash of the study name and trial number.
    study = optuna.create_study(
        study_name=f"bench-tuning-{arm.name}-seed-{seed}".replace(" ", ""),
        direction=config.direction.value,
        sampler=make_sampler(config),
        pruner=make_pruner(config),
    )
    run = ArmRun(arm=arm, seed=seed)
    started = time.perf_counter()
    spent = 0
    while spent < s.budget_epochs:
        trial = study.ask()
        params = suggest(trial, config)
        callbacks = _TrialCallbacks(trial, config.metric, s.budget_epochs - spent)
        trial_started = time.perf_counter()
        value: float | None = None
        error = None
        try:
            result = _run_training(_trial_config(config, params), data, base_state, callbacks)
        except _Pruned:
            state = PRUNED
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except _OutOfBudget:
            state = CUT  # optuna has no "stopped by the caller" state; the study ends here anyway
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except (SpecInvalid, ValueError, RuntimeError) as err:  # a trial's own failure: the study goes on
            state, error = FAILED, f"{type(err).__name__}: {err}"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            state = COMPLETE
            value = result.summary[config.metric.value][0]  # the study runner's objective: the mean over repeats
            study.tell(trial, value)
        spent += callbacks.epochs
        now = time.perf_counter()
        run.trials.append(
            TrialRun(
                number=trial.number,
                state=state,
                epochs=callbacks.epochs,
                spent=spent,
                elapsed=now - started,
                value=value,
                last_value=callbacks.last_value,
                seconds=now - trial_started,
                epoch_seconds=callbacks.epoch_seconds,
                params=params,
                error=error,
            )
        )
        shown = (
            f"val {value:.3f}"
            if value is not None
            else (f"last val {callbacks.last_value:.3f}" if callbacks.last_value is not None else error or "")
        )
        best = run.best
        print(
            f"  [{arm.name}, seed {seed}] trial {trial.number}: {state} after {callbacks.epochs} epoch(s), "
            f"{shown}; spent {spent}/{s.budget_epochs}, best {'-' if best is None else f'{best:.3f}'} "
            f"({short_params(params)}; {now - trial_started:.1f} s)",
            flush=True,
        )
        # A trial that fails before its first epoch spends nothing: don't let a broken setup loop forever.
        if state == FAILED and callbacks.epochs == 0 and run.count(FAILED) >= 5:
            break
    run.seconds = time.perf_counter() - started
    run.model_sampled = _tpe_model_sampled(study)
    return run, config


def _tpe_model_sampled(study: optuna.Study) -> int | None:
    """How many trials TPE drew from its model rather than at random; None for other samplers or when optuna's
    internals differ. TPE samples at random until `n_startup_trials` trials have finished, and under Hyperband
    it sees only the trials of the asking trial's bracket (optuna's `_filter_study`), so every bracket has its own
    start-up. Trials run one after another here, so every earlier trial had finished when one was asked."""
    startup = getattr(study.sampler, "_n_startup_trials", None)
    if not isinstance(study.sampler, optuna.samplers.TPESampler) or not isinstance(startup, int):
        return None
    bracket_of = None
    if isinstance(study.pruner, optuna.pruners.HyperbandPruner):
        bracket_of = getattr(study.pruner, "_get_bracket_id", None)  # private: Hyperband's bracket of a trial
        if bracket_of is None:
            return None
    seen: dict[int, int] = {}
    modelled = 0
    for trial in study.get_trials(deepcopy=False):
        bracket = 0 if bracket_of is None else int(bracket_of(study, trial))
        modelled += seen.get(bracket, 0) >= startup
        if trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            seen[bracket] = seen.get(bracket, 0) + 1
    return modelled


def retrain_best(run: ArmRun, config: StudyConfig, data: PreparedData, base_state: dict[str, Tensor] | None) -> None:
    """Train the arm's best configuration again, the test split attached, and keep its test accuracy."""
    best = run.best_trial()
    if best is None or data.test is None or not len(data.test):
        return
    result = _run_training(_trial_config(config, best.params), data, base_state, NoOpCallbacks())
    run.retrain_val_accuracy = result.best.validation.accuracy
    run.test_accuracy = None if result.best.test is None else result.best.test.accuracy
