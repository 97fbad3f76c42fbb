"""Tuning: TPE + Hyperband against random search at the same compute budget, on a small real task.

    python -m bench.tuning             # defaults: 3 seeds x 2 arms, about 3 minutes on 2 CPU cores
    python -m bench.tuning --quick     # tiny (1 seed, a few epochs): the smoke test's run
    python -m bench.tuning --help      # --seeds, --budget-epochs, --max-epochs, --per-class, --size, ...

Task: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (the data of bench/transfer_learning.py: a
stratified subset, resized, grey replicated to RGB), MobileNetV2 with ImageNet weights and a frozen base, stage 1
only, so the head trains on cached bottleneck features through `trainer_service.engine.recipe.train`.

The search goes through the product's tuning code: a `StudySpec` built here is checked by `validate_study`; the
sampler and pruner come from `make_sampler` / `make_pruner`; each trial's values come from `suggest` and become its
TrainingSpec with `apply_params`, checked by `validate_spec` as the study runner does. Searched:
`classifier.learning_rate` (log), `model.classifier_dim`, `model.dropout`, `classifier.optimizer.type` (Adam or
SGD) and `classifier.batch_size`; `classifier.epochs` is fixed at R (`--max-epochs`, cosine LR schedule).

Arms, each run with sampler seeds 0 .. N-1 (`--seeds`), trials one after another, asked and told in memory:

  random search      RandomSampler, no pruner: every trial trains R epochs.
  TPE + Hyperband    TPESampler + HyperbandPruner(min_resource 1, max_resource R, reduction factor 3). A trial
                     reports validation accuracy after every epoch and stops when the pruner says so, as a
                     trial job does (trainer_service/worker.py).

Compute is counted in training epochs actually run. Each arm gets the same budget B (`--budget-epochs`): it
starts trials until B epochs are spent, and the trial running when the budget ends is stopped there. A trial's
value is the objective the study runner reads (validation accuracy of the finished run); only COMPLETE trials
count for "best", as in a study's result. For every seed:

  A_r       random search's best validation accuracy over the whole budget (its best-of-budget);
  c_random  the epochs random search had spent when its best trial completed (when it first reached A_r);
  c_tpe_hb  the epochs TPE + Hyperband had spent when a completed trial first reached >= A_r (or not reached);
  ratio     c_tpe_hb / c_random; the headline is the median over seeds (below 1: TPE + Hyperband got there
            with less compute; "not reached" counts as infinite).

Each arm's final best validation accuracy (mean +- std over seeds) is reported too, and the test accuracy of each
arm's best configuration, retrained once with the test set attached (`--no-retrain` skips it).

The engine computes stage 1's bottleneck features at the start of every run, and has no cache shared across
runs: in the product every trial job pays that feature pass. With 1000-odd images it costs more than a whole
trial's epochs, which would make the benchmark slow without changing the epoch counts, so by default the bench
memoises the engine's `compute_features` for the run (exact: the base is frozen, in eval mode, and the same for
every trial; only the dataset rows are the key). The report gives the feature pass's cost, so the wall time a
study of trial jobs would take can be read off; `--no-share-features` runs every trial as the product does.

What the arms share: TPE (as `make_sampler` builds it) draws at random until 10 trials have finished, counting
under Hyperband only the trials of the asking trial's bracket, so with R = 9 and reduction factor 3 (3 brackets)
about 30 trials are random draws; and those draws come from a RandomSampler seeded like the random-search arm's,
so both arms start with the same configurations. The report counts the trials TPE drew from its model.

Exit status: 0 when the run completed (whatever the ratio), 1 when a trial failed, 2 when the data is missing or
the settings are bad.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from unittest import mock

import optuna
import torch
from google.protobuf import duration_pb2
from torch import Tensor
from torch.utils.data import DataLoader
from trainer_service.engine import loop
from trainer_service.engine.batches import ImageArrayDataset
from trainer_service.engine.context import RunContext, run_context
from trainer_service.engine.loop import EpochRecord, NoOpCallbacks
from trainer_service.engine.models import Classifier, build_classifier
from trainer_service.engine.recipe import PreparedData, TrainingResult, train
from trainer_service.spec.config import Architecture, Metric, ModelConfig, TrainingConfig, WeightsSource
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.tuning.optuna_setup import make_pruner, make_sampler
from trainer_service.tuning.space import apply_params, suggest
from trainer_service.tuning.study_config import StudyConfig, validate_study
from trainer_service.weights import load_base_weights
from visiontune.v1 import study_pb2
from visiontune.v1 import training_spec_pb2 as pb
from visiontune.weights_cache import seed_weights_cache

from bench.machine import cpu_model
from bench.transfer_learning import APT_PACKAGE, DATA_DIR, DatasetMissing, prepare_data

__all__ = ["APT_PACKAGE", "ARMS", "DATA_DIR", "main"]

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "tuning.md"
BUCKET: Final = "visiontune"  # validate_spec's default bucket; the bench never touches S3
RANDOM: Final = "random search"
TPE_HB: Final = "TPE + Hyperband"

# Optimiser names as the categorical values the StudySpec lists (enum value names), shortened for tables.
_OPTIMIZERS: Final = {"OPTIMIZER_TYPE_ADAM": "Adam", "OPTIMIZER_TYPE_SGD": "SGD"}


@dataclass(frozen=True)
class Arm:
    name: str
    sampler: study_pb2.Sampler.ValueType
    pruner: study_pb2.PrunerType.ValueType


ARMS: Final = (
    Arm(RANDOM, study_pb2.SAMPLER_RANDOM, study_pb2.PRUNER_TYPE_NONE),
    Arm(TPE_HB, study_pb2.SAMPLER_TPE, study_pb2.PRUNER_TYPE_HYPERBAND),
)


@dataclass(frozen=True)
class Settings:
    seeds: int
    budget_epochs: int
    max_epochs: int  # R: every trial's classifier.epochs, Hyperband's max_resource
    reduction_factor: int
    per_class: int
    val_per_class: int
    test_per_class: int
    size: int
    data_seed: int
    threads: int
    retrain: bool
    share_features: bool

    def check(self) -> None:
        problems = []
        if self.seeds < 1:
            problems.append(f"--seeds must be >= 1, got {self.seeds}")
        if self.max_epochs < 1:
            problems.append(f"--max-epochs must be >= 1, got {self.max_epochs}")
        if self.budget_epochs < self.max_epochs:
            problems.append(f"--budget-epochs must be >= --max-epochs ({self.max_epochs}), got {self.budget_epochs}")
        if min(self.per_class, self.val_per_class) < 1 or self.test_per_class < 0:
            problems.append("--per-class and --val-per-class must be >= 1, --test-per-class >= 0")
        if self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if problems:
            raise ValueError("; ".join(problems))


DEFAULTS: Final = {
    "seeds": 3,
    "budget_epochs": 180,
    "max_epochs": 9,
    "per_class": 100,
    "val_per_class": 50,
    "test_per_class": 100,
    "size": 32,
}
QUICK: Final = {
    "seeds": 1,
    "budget_epochs": 18,
    "max_epochs": 3,
    "per_class": 20,
    "val_per_class": 10,
    "test_per_class": 10,
    "size": 32,
}


# -- the study spec -----------------------------------------------------------------------------------------------


def base_spec(s: Settings) -> pb.TrainingSpec:
    """What every trial starts from: MobileNetV2 on ImageNet weights, stage 1 only, R epochs, cosine LR."""
    return pb.TrainingSpec(
        dataset=pb.DatasetSpec(uri="bench/fashion-mnist", image_size=s.size),
        model=pb.ModelSpec(architecture=pb.ARCHITECTURE_MOBILENET_V2, weights=pb.WEIGHTS_SOURCE_IMAGENET),
        classifier=pb.StageSpec(epochs=s.max_epochs, schedule=pb.ScheduleSpec(type=pb.SCHEDULE_TYPE_COSINE)),
        run=pb.RunSpec(
            seed=s.data_seed, repeats=1, device=pb.DEVICE_CPU, precision=pb.PRECISION_FP32, data_loader_workers=0
        ),
        output_model="bench-tuning",
    )


def search_space() -> list[study_pb2.SearchParameter]:
    def categorical(path: str, *values: str) -> study_pb2.SearchParameter:
        return study_pb2.SearchParameter(path=path, categorical=study_pb2.Categorical(values=list(values)))

    return [
        study_pb2.SearchParameter(
            path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-5, max=1e-1, log=True)
        ),
        categorical("model.classifier_dim", "32", "64", "128", "256"),
        study_pb2.SearchParameter(path="model.dropout", float_range=study_pb2.FloatRange(min=0.0, max=0.7)),
        categorical("classifier.optimizer.type", *_OPTIMIZERS),
        categorical("classifier.batch_size", "16", "32", "64"),
    ]


def study_spec(s: Settings, arm: Arm, seed: int) -> study_pb2.StudySpec:
    # StudyBudget counts trials or wall time, not epochs: the epoch budget is the bench's own loop, and the
    # duration is only there because the spec needs a limit.
    return study_pb2.StudySpec(
        base_spec=base_spec(s),
        parameters=search_space(),
        objective=study_pb2.Objective(metric=pb.METRIC_VALIDATION_ACCURACY, direction=study_pb2.DIRECTION_MAXIMIZE),
        budget=study_pb2.StudyBudget(max_duration=duration_pb2.Duration(seconds=24 * 3600)),
        sampler=arm.sampler,
        pruner=study_pb2.PrunerSpec(type=arm.pruner, min_resource=1, reduction_factor=s.reduction_factor),
        seed=seed,
    )


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

    def compute(model: Classifier, loader: DataLoader[Any], ctx: RunContext) -> tuple[Tensor, Tensor]:
        dataset = loader.dataset
        key = split = None
        if enabled and isinstance(dataset, ImageArrayDataset):
            split = dataset.split
            key = (id(split), tuple(dataset.indices))
            hit = cache.get(key)
            if hit is not None and hit[0] is split:
                stats.reused += 1
                return hit[1]
        started = time.perf_counter()
        out = original(model, loader, ctx)
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
_STATE_MARK: Final = {COMPLETE: "c", PRUNED: "p", CUT: "b", FAILED: "f"}


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


def _short(params: dict[str, str | int | float]) -> str:
    lr = float(params["classifier.learning_rate"])
    return (
        f"{_OPTIMIZERS.get(str(params['classifier.optimizer.type']), params['classifier.optimizer.type'])} "
        f"LR {lr:.2g}, head {params['model.classifier_dim']}, dropout {float(params['model.dropout']):.2f}, "
        f"batch {params['classifier.batch_size']}"
    )


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
            f"({_short(params)}; {now - trial_started:.1f} s)",
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


# -- comparison and report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedComparison:
    seed: int
    random: ArmRun
    tpe_hb: ArmRun

    @property
    def target(self) -> float | None:
        """A_r: random search's best-of-budget validation accuracy."""
        return self.random.best

    def _reach(self, run: ArmRun) -> TrialRun | None:
        return None if self.target is None else run.reached(self.target)

    @property
    def random_reach(self) -> TrialRun | None:
        return self._reach(self.random)

    @property
    def tpe_hb_reach(self) -> TrialRun | None:
        return self._reach(self.tpe_hb)

    @property
    def ratio(self) -> float:
        """Epochs TPE + Hyperband needed to reach A_r over the epochs random search needed; inf: not reached."""
        r, t = self.random_reach, self.tpe_hb_reach
        if r is None:
            return math.nan
        return math.inf if t is None else t.spent / r.spent

    def wall_ratio(self, per_trial: float = 0.0) -> float:
        """The same in wall seconds, each trial charged `per_trial` seconds more (numbers count trials from 0)."""
        r, t = self.random_reach, self.tpe_hb_reach
        if r is None:
            return math.nan
        if t is None:
            return math.inf
        return (t.elapsed + (t.number + 1) * per_trial) / (r.elapsed + (r.number + 1) * per_trial)


def median_ratio(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "not reached" if math.isinf(value) else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{statistics.fmean(present):.1%} ± {std:.1%}"


def ratio_line(comparisons: Sequence[SeedComparison]) -> str:
    ratios = [c.ratio for c in comparisons]
    per_seed = ", ".join(f"seed {c.seed}: {_ratio(c.ratio)}" for c in comparisons)
    return (
        f"Compute ratio TPE + Hyperband / random search (epochs to reach random search's best-of-budget "
        f"validation accuracy): median {_ratio(median_ratio(ratios))} over {len(comparisons)} seed(s) "
        f"({per_seed})"
    )


def render_report(
    s: Settings,
    comparisons: Sequence[SeedComparison],
    features: FeatureStats,
    data: PreparedData,
    command: str,
    total_seconds: float,
    load: tuple[tuple[float, float, float], tuple[float, ...]],
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs = {arm.name: [c.random if arm.name == RANDOM else c.tpe_hb for c in comparisons] for arm in ARMS}
    brackets = math.floor(math.log(s.max_epochs, s.reduction_factor)) + 1 if s.max_epochs > 1 else 1
    test_count = len(data.test) if data.test is not None else 0
    lines = [
        "# Tuning: TPE + Hyperband vs random search at the same compute budget",
        "",
        f"Fashion-MNIST stratified subset (data seed {s.data_seed}): {len(data.train)} train ({s.per_class}/class) "
        f"and {len(data.val)} validation ({s.val_per_class}/class) from the train file, {test_count} test "
        f"({s.test_per_class}/class) from t10k; {s.size}x{s.size}, grey replicated to RGB. MobileNetV2, ImageNet "
        f"weights, frozen base: stage 1 only (the head on cached bottleneck features), cosine LR schedule, "
        f"R = {s.max_epochs} epochs per trial, through `recipe.train`. Searched (a `StudySpec` checked by "
        f"`validate_study`; values from `suggest`, applied with `apply_params`): `classifier.learning_rate` "
        f"log-uniform [1e-5, 1e-1], `model.classifier_dim` {{32, 64, 128, 256}}, `model.dropout` [0, 0.7], "
        f"`classifier.optimizer.type` {{Adam, SGD}}, `classifier.batch_size` {{16, 32, 64}}.",
        "",
        f"Arms: **random search** (`make_sampler`: RandomSampler, no pruner, every trial R epochs) and **TPE + "
        f"Hyperband** (`make_sampler` / `make_pruner`: multivariate TPE, HyperbandPruner with min_resource 1, "
        f"max_resource R = {s.max_epochs}, reduction factor {s.reduction_factor}: {brackets} bracket(s); a trial "
        f"reports validation accuracy after every epoch and stops when pruned). Compute is counted in training "
        f"epochs actually run; each arm gets B = {s.budget_epochs} epochs ({s.budget_epochs / s.max_epochs:g} full "
        f"trials), trials one after another, sampler seeds 0..{s.seeds - 1}. Only completed trials count as "
        f'"best", as in a study\'s result. c_random: epochs random search had spent when it first reached its '
        f"best-of-budget validation accuracy A_r; c_tpe_hb: epochs TPE + Hyperband had spent when a completed "
        f"trial first scored >= A_r. Ratio = c_tpe_hb / c_random (below 1: TPE + Hyperband needs less compute).",
        "",
        f"**{ratio_line(comparisons)}.**",
        "",
    ]
    # Stage 1's feature pass over the train and validation images: what each trial job pays in the product.
    per_trial_features = 2 * features.seconds / max(features.passes, 1)
    estimate = s.share_features
    header = (
        "| seed | A_r (random best) | c_random | TPE + HB best | c_tpe_hb | ratio (epochs) | c_tpe_hb / B "
        "| ratio (wall time, as run) |"
    )
    lines += [
        header + (" ratio (wall time, each trial paying its feature pass; estimate) |" if estimate else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if estimate else ""),
    ]
    for c in comparisons:
        r, t = c.random_reach, c.tpe_hb_reach
        lines.append(
            f"| {c.seed} | {_pct(c.target)} | {'-' if r is None else f'{r.spent} (trial {r.number})'} | "
            f"{_pct(c.tpe_hb.best)} | {'not reached' if t is None else f'{t.spent} (trial {t.number})'} | "
            f"{_ratio(c.ratio)} | {'-' if t is None else f'{t.spent / s.budget_epochs:.2f}'} | "
            f"{_ratio(c.wall_ratio())} |" + (f" {_ratio(c.wall_ratio(per_trial_features))} |" if estimate else "")
        )
    wall_estimates = [c.wall_ratio(per_trial_features if estimate else 0.0) for c in comparisons]
    lines += [
        "",
        f"Median wall-time ratio{' (each trial paying its feature pass, estimated)' if estimate else ''}: "
        f"{_ratio(median_ratio(wall_estimates))}.",
    ]
    lines += [
        "",
        "| arm | trials (complete / pruned / cut by budget / failed) | epochs spent | epochs per trial | "
        "trials drawn by TPE's model | best val acc (mean ± std) | test acc of the best config, retrained "
        "(mean ± std) | wall time per seed | of which outside epochs, per trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        arm_runs = runs[arm.name]
        trials = [t for run in arm_runs for t in run.trials]
        n = len(trials)
        counts = " / ".join(str(sum(t.state == st for t in trials)) for st in (COMPLETE, PRUNED, CUT, FAILED))
        spent = sum(run.spent for run in arm_runs)
        overhead = sum(t.seconds - t.epoch_seconds for t in trials) / max(n, 1)
        wall = statistics.fmean(run.seconds for run in arm_runs)
        modelled = [run.model_sampled for run in arm_runs]
        drawn = "-" if any(m is None for m in modelled) else str(sum(m for m in modelled if m is not None))
        lines.append(
            f"| {arm.name} | {n} ({counts}) | {spent} | {spent / max(n, 1):.1f} | {drawn} | "
            f"{_mean_std([run.best for run in arm_runs])} | {_mean_std([run.test_accuracy for run in arm_runs])} | "
            f"{wall:.0f} s | {overhead:.2f} s |"
        )
    lines += ["", "Best configuration of each arm and seed (validation accuracy; test accuracy when retrained):", ""]
    lines += ["| seed | arm | trial | configuration | val acc | test acc |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        for run in (c.random, c.tpe_hb):
            best = run.best_trial()
            if best is None:
                lines.append(f"| {c.seed} | {run.arm.name} | - | no trial completed | - | - |")
                continue
            lines.append(
                f"| {c.seed} | {run.arm.name} | {best.number} | {_short(best.params)} | "
                f"{_pct(best.value)} | {_pct(run.test_accuracy)} |"
            )
    if s.share_features:
        trials_each = {arm.name: sum(len(r.trials) for r in runs[arm.name]) / len(comparisons) for arm in ARMS}
        feature_note = (
            f"Bottleneck features were computed {features.passes} time(s) ({features.images} images, "
            f"{features.seconds:.1f} s in all) and reused {features.reused} time(s): the bench memoises the "
            f"engine's `compute_features` across trials (exact here; the engine has no cache shared across runs). "
            f"In a study of trial jobs every trial pays stage 1's feature pass of the train and validation images, "
            f"about {per_trial_features:.1f} s here: add that per trial to the wall times above "
            f"({trials_each[RANDOM]:.0f} trials per seed for random search, {trials_each[TPE_HB]:.0f} for "
            f"TPE + Hyperband), as the estimated wall-time ratio does. Epoch counts do not depend on it."
        )
    else:
        feature_note = (
            f"Every trial computed its own bottleneck features, as a trial job does "
            f"({features.passes} passes, {features.seconds:.1f} s in all)."
        )
    test_note = ""
    if s.retrain and test_count:
        test_note = (
            f" Test accuracy: each arm's best configuration trained once more with the test split attached "
            f"(the same seed, so the same validation accuracy), evaluated once; {test_count} test images, "
            f"so ± about {100 * math.sqrt(0.25 / test_count):.1f} points of binomial noise per run."
        )
    lines += [
        "",
        "TPE draws at random until 10 trials have finished (optuna's `n_startup_trials`, which `make_sampler` "
        "leaves at its default), and under Hyperband it counts only the trials of the asking trial's bracket, "
        f"so with {brackets} bracket(s) about {10 * brackets} trials are random draws before the model is used "
        'everywhere; the "trials drawn by TPE\'s model" column counts the others. Its random draws come from a '
        "RandomSampler with the same seed as the random-search arm's, so the two arms start with the same "
        "configurations (a paired comparison: early on, the difference is Hyperband's pruning).",
        "",
        f"Wall time counts everything a trial does (building the model, the epochs, the final evaluation); the last "
        f"column is what is not epochs. {feature_note}{test_note}",
        "",
        "<details><summary>Epochs of every trial, in order (c complete, p pruned, b cut by the budget, "
        "f failed)</summary>",
        "",
    ]
    for c in comparisons:
        for run in (c.random, c.tpe_hb):
            marks = " ".join(f"{t.epochs}{_STATE_MARK[t.state]}" for t in run.trials)
            lines.append(f"- seed {c.seed}, {run.arm.name} ({len(run.trials)} trials, {run.spent} epochs): {marks}")
    failures = [
        (c.seed, run.arm.name, t) for c in comparisons for run in (c.random, c.tpe_hb) for t in run.trials if t.error
    ]
    lines += ["", "</details>", ""]
    if failures:
        lines += ["Failed trials:", ""]
        lines += [f"- seed {seed}, {name}, trial {t.number}: {t.error}" for seed, name, t in failures]
        lines.append("")
    lines += [
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, {s.threads} torch thread(s), no GPU used; "
        f"load average {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f} (1/5/15 min) at the start, "
        f"{load[1][0]:.2f} at the end; Python {platform.python_version()}, torch {torch.__version__}, optuna "
        f"{optuna.__version__}; {platform.platform()}. Total wall time {total_seconds / 60:.1f} min. Date: {now}.",
        "",
    ]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = DEFAULTS
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for the smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--seeds", type=int, help=f"sampler seeds per arm, 0..N-1 (default {d['seeds']})")
    parser.add_argument(
        "--budget-epochs",
        type=int,
        help=f"B: training epochs each arm may spend per seed (default {d['budget_epochs']})",
    )
    parser.add_argument(
        "--max-epochs",
        type=int,
        help=f"R: epochs of a full trial, Hyperband's max resource (default {d['max_epochs']})",
    )
    parser.add_argument("--reduction-factor", type=int, default=3, help="Hyperband's reduction factor (default 3)")
    parser.add_argument("--per-class", type=int, help=f"training images per class (default {d['per_class']})")
    parser.add_argument("--val-per-class", type=int, help=f"validation images per class (default {d['val_per_class']})")
    parser.add_argument(
        "--test-per-class",
        type=int,
        help=f"test images per class, from t10k (default {d['test_per_class']}; 0: no test)",
    )
    parser.add_argument("--size", type=int, help=f"image side in pixels, >= 32 (default {d['size']})")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the subset and of every trial's run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 threads oversubscribe)",
    )
    parser.add_argument(
        "--no-retrain", action="store_true", help="skip retraining each arm's best configuration for its test accuracy"
    )
    parser.add_argument(
        "--no-share-features",
        action="store_true",
        help="every trial computes its own bottleneck features, as a trial job does (slower)",
    )
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"report file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 when it ran (whatever the ratio), 1 when a trial failed, 2 for missing data or bad
    settings."""
    args = parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.tuning", *map(shlex.quote, raw)])
    s = Settings(
        seeds=args.seeds,
        budget_epochs=args.budget_epochs,
        max_epochs=args.max_epochs,
        reduction_factor=args.reduction_factor,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        size=args.size,
        data_seed=args.data_seed,
        threads=args.threads,
        retrain=not args.no_retrain,
        share_features=not args.no_share_features,
    )
    try:
        s.check()
        for arm in ARMS:  # the study spec itself, before any data is loaded
            validate_study(study_spec(s, arm, 0), default_bucket=BUCKET)
    except (ValueError, SpecInvalid) as err:
        print(f"bad settings: {err}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    torch.set_num_threads(s.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        data = prepare_data(s.per_class, s.val_per_class, s.test_per_class, s.size, s.data_seed, args.data_dir)
    except DatasetMissing as err:
        print(err, file=sys.stderr)
        return 2
    search_data = replace(data, test=None)  # the same train/val splits (so the same feature cache), no test
    seed_weights_cache()
    base_state = load_base_weights(
        ModelConfig(architecture=Architecture.MOBILENET_V2, weights=WeightsSource.IMAGENET), None
    )
    started = time.perf_counter()
    comparisons = []
    with shared_features(s.share_features) as features:
        for seed in range(s.seeds):
            runs = {}
            for arm in ARMS:
                print(f"{arm.name}, seed {seed}: budget {s.budget_epochs} epochs, R = {s.max_epochs}", flush=True)
                run, config = run_arm(arm, seed, s, search_data, base_state)
                if s.retrain:
                    retrain_best(run, config, data, base_state)
                print(
                    f"{arm.name}, seed {seed}: {len(run.trials)} trials, {run.spent} epochs, best val "
                    f"{_pct(run.best)}, test {_pct(run.test_accuracy)}, {run.seconds:.0f} s",
                    flush=True,
                )
                runs[arm.name] = run
            comparison = SeedComparison(seed=seed, random=runs[RANDOM], tpe_hb=runs[TPE_HB])
            print(f"seed {seed}: ratio {_ratio(comparison.ratio)}", flush=True)
            comparisons.append(comparison)
    report = render_report(
        s, comparisons, features, data, command, time.perf_counter() - started, (load_start, os.getloadavg())
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print()
    print(report)
    print(ratio_line(comparisons))
    print(f"written to {args.output}")
    failed = any(t.state == FAILED for c in comparisons for run in (c.random, c.tpe_hb) for t in run.trials)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
