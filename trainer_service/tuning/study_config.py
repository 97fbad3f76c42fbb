"""A `StudySpec` checked at the edge: every rule of study.proto, every default resolved, in one pass.

`validate_study` returns the `StudyConfig` the study runner works from, or raises `SpecInvalid` listing every bad
field with its request path (`spec.parameters[0].float_range.max`, `spec.budget.max_trials`); problems of the base
spec come through `validate_spec`, prefixed `spec.base_spec.`.

A parameter's bounds must lie inside its field's own range. Rather than copy the ranges of training_spec.proto,
each bound (each categorical value) is applied to the base spec and the result run through `validate_spec`: its
violations come back on the bound. That covers cross-field rules too, one parameter at a time: with the base's
`schedule.min_learning_rate` at 1e-4, a `classifier.learning_rate` minimum of 1e-5 is refused. Combinations of
two searched fields are not checked here (the fine-tuning LR limit with both LRs searched): every trial's spec is
validated again before it runs, and a trial whose combination is invalid fails on its own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.descriptor import EnumValueDescriptor
from visiontune import protoreflect
from visiontune.protoreflect import EnumMap
from visiontune.uris import InputLocations
from visiontune.v1 import study_pb2
from visiontune.v1 import training_spec_pb2 as pb

from trainer_service.spec.checker import Checker
from trainer_service.spec.config import METRICS, Metric, TrainingConfig
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.tuning.space import (
    ParameterConfig,
    ParameterKind,
    apply_params,
    field_at,
    grid_size,
    is_float_field,
    is_integer_field,
    is_stepped,
    step_divides,
)

__all__ = [
    "MAX_GRID_POINTS",
    "Direction",
    "ParameterConfig",
    "ParameterKind",
    "PrunerConfig",
    "PrunerType",
    "SamplerType",
    "SpecInvalid",
    "StudyConfig",
    "validate_study",
]

# optuna's GridSampler materialises every combination up front: a float step of 1e-9 must not take the trainer down.
MAX_GRID_POINTS: Final = 100_000
_EPOCH_PATHS: Final = ("classifier.epochs", "fine_tuning.enabled", "fine_tuning.stage.epochs")


class Direction(enum.StrEnum):
    """Values are optuna's direction names (`optuna.create_study(direction=...)`)."""

    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class SamplerType(enum.StrEnum):
    TPE = "tpe"
    GAUSSIAN_PROCESS = "gaussian_process"
    RANDOM = "random"
    GRID = "grid"  # every combination of categorical and stepped parameters
    # Numeric parameters only: optuna's CmaEsSampler samples categorical ones independently (at random).
    CMA_ES = "cma_es"


class PrunerType(enum.StrEnum):
    NONE = "none"
    HYPERBAND = "hyperband"
    SUCCESSIVE_HALVING = "successive_halving"  # asynchronous (ASHA)
    MEDIAN = "median"


@dataclass(frozen=True)
class PrunerConfig:
    type: PrunerType = PrunerType.NONE
    # Defaults from study.proto's field rules, like the validator's.
    min_resource: int = protoreflect.field_default(study_pb2.PrunerSpec.DESCRIPTOR, "min_resource")
    reduction_factor: int = protoreflect.field_default(study_pb2.PrunerSpec.DESCRIPTOR, "reduction_factor")
    startup_trials: int = protoreflect.field_default(study_pb2.PrunerSpec.DESCRIPTOR, "startup_trials")


@dataclass(frozen=True)
class StudyConfig:
    """A checked study. `base_spec` is kept as the proto because every trial's spec is the base with the
    trial's parameters applied (`apply_params`), validated again; `base` is that base spec validated."""

    base_spec: pb.TrainingSpec
    base: TrainingConfig
    parameters: tuple[ParameterConfig, ...]
    metric: Metric = Metric.VALIDATION_ACCURACY
    direction: Direction = Direction.MAXIMIZE
    max_trials: int = 0  # 0: no limit (then max_duration_s is set); GRID: at most the grid's size
    max_duration_s: float | None = None  # no new trials after this wall time
    parallelism: int = 1
    sampler: SamplerType = SamplerType.TPE
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    repeat_top_k: int = 0
    repeat_count: int = 0  # runs per re-run configuration; 0 when repeat_top_k is 0
    seed: int = 0
    # Epochs a trial trains (classifier + fine-tuning when on), over the whole search space: the pruner's resource.
    min_trial_epochs: int = 1
    max_trial_epochs: int = 1


# -- validate_study ------------------------------------------------------------------------------------------------


def validate_study(
    spec: study_pb2.StudySpec, *, default_bucket: str, inputs: InputLocations | None = None
) -> StudyConfig:
    """The study spec as a `StudyConfig` with every default resolved; `SpecInvalid` lists every bad field.

    `inputs` confines the base spec's URIs and every value a search may give them (see `validate_spec`)."""
    v = Checker(study_pb2.Study.DESCRIPTOR)  # paths as clients see them: `spec.parallelism`
    base: TrainingConfig | None = None
    try:
        base = validate_spec(spec.base_spec, default_bucket=default_bucket, inputs=inputs)
    except SpecInvalid as exc:
        for violation in exc.violations:
            v.fail(f"spec.base_spec.{violation.field}", violation.description)
    parameters = _parameters(v, spec, default_bucket, inputs, base_ok=base is not None)
    metric, direction = _objective(v, spec.objective)
    max_trials, max_duration_s = _budget(v, spec.budget)
    parallelism = v.number(spec, "spec.parallelism")
    sampler = _sampler(v, spec.sampler, spec.parameters, parameters)
    epochs = None if base is None else _trial_epochs(base, parameters)
    pruner = _pruner(v, spec.pruner, epochs)
    v.number(spec, "spec.repeat_top_k")
    repeat_count = v.number(spec, "spec.repeat_count")
    if v.violations:
        raise SpecInvalid(v.violations)
    if sampler is SamplerType.GRID:
        # Past the last point optuna's GridSampler re-runs visited ones: the grid is the trial limit.
        points = _grid_points(parameters)
        max_trials = min(max_trials, points) if max_trials else points
    # Both are None only where a violation was recorded.
    assert base is not None
    assert epochs is not None
    base_spec = pb.TrainingSpec()
    base_spec.CopyFrom(spec.base_spec)  # the caller's request may be reused; the config must not change with it
    return StudyConfig(
        base_spec=base_spec,
        base=base,
        parameters=tuple(p for p in parameters if p is not None),
        metric=metric,
        direction=direction,
        max_trials=max_trials,
        max_duration_s=max_duration_s,
        parallelism=parallelism,
        sampler=sampler,
        pruner=pruner,
        repeat_top_k=spec.repeat_top_k,
        repeat_count=repeat_count if spec.repeat_top_k > 0 else 0,
        seed=spec.seed,
        min_trial_epochs=epochs[0],
        max_trial_epochs=epochs[1],
    )


# -- parameters ----------------------------------------------------------------------------------------------------


def _parameters(
    v: Checker, spec: study_pb2.StudySpec, default_bucket: str, inputs: InputLocations | None, *, base_ok: bool
) -> list[ParameterConfig | None]:
    """One entry per spec parameter: its config, or None where anything about it is invalid (reported)."""
    if not spec.parameters:
        v.fail("spec.parameters", "needs at least one parameter: a TrainingSpec field path and its domain")
        return []
    searched = {p.path for p in spec.parameters}
    first_index: dict[str, int] = {}
    result: list[ParameterConfig | None] = []
    for i, param in enumerate(spec.parameters):
        prefix = f"spec.parameters[{i}]"
        before = len(v.violations)
        if param.path and param.path in first_index:
            v.fail(f"{prefix}.path", f"duplicates spec.parameters[{first_index[param.path]}].path ({param.path})")
        first_index.setdefault(param.path, i)
        # Every check runs even after one failed, so a client sees all of a parameter's problems at once.
        fits = _field_fits(v, prefix, param)
        config = _domain(v, prefix, param)
        if fits and config is not None and base_ok:
            # The field's own range needs a valid base: against a bad one every bound would inherit its faults.
            _check_bounds(v, prefix, param, config, spec.base_spec, default_bucket, inputs, searched)
        result.append(config if len(v.violations) == before else None)
    return result


def _field_fits(v: Checker, prefix: str, param: study_pb2.SearchParameter) -> bool:
    """Whether the path names a searchable field and the domain suits its type."""
    if not param.path:
        v.fail(f"{prefix}.path", "is required: a TrainingSpec field path such as classifier.learning_rate")
        return False
    try:
        fd = field_at(param.path)
    except (KeyError, ValueError) as exc:
        v.fail(f"{prefix}.path", str(exc.args[0]))
        return False
    which = param.WhichOneof("domain")
    if which is None:
        return False  # reported by _domain
    fitting: tuple[str, ...]
    if is_float_field(fd):
        what, fitting = "a float", ("float_range", "categorical")
    elif is_integer_field(fd):
        what, fitting = "an integer", ("int_range", "categorical")
    else:
        what, fitting = ("an enum" if fd.enum_type is not None else "a bool"), ("categorical",)
    if which not in fitting:
        v.fail(f"{prefix}.{which}", f"does not fit {param.path}, {what} field: use {' or '.join(fitting)}")
        return False
    return True


def _domain(v: Checker, prefix: str, param: study_pb2.SearchParameter) -> ParameterConfig | None:
    """The domain as a ParameterConfig (possibly with reported faults), or None where it has no usable shape."""
    which = param.WhichOneof("domain")
    if which == "float_range":
        return _float_range(v, f"{prefix}.float_range", param.path, param.float_range)
    if which == "int_range":
        return _int_range(v, f"{prefix}.int_range", param.path, param.int_range)
    if which == "categorical":
        return _categorical(v, f"{prefix}.categorical", param.path, param.categorical)
    v.fail(f"{prefix}.domain", "is required: one of float_range, int_range, categorical")
    return None


def _float_range(v: Checker, prefix: str, path: str, r: study_pb2.FloatRange) -> ParameterConfig | None:
    finite = True
    for name, value in (("min", r.min), ("max", r.max), ("step", r.step)):
        if not math.isfinite(value):
            v.fail(f"{prefix}.{name}", f"must be finite, got {value}")
            finite = False
    if not finite:
        return None
    ordered = r.min < r.max
    if not ordered:
        v.fail(f"{prefix}.max", f"must be greater than min ({r.min!r}), got {r.max!r}")
    if r.log and r.min <= 0:
        v.fail(f"{prefix}.min", f"must be > 0 with log, got {r.min!r}")
    if r.step < 0:
        v.fail(f"{prefix}.step", f"must be >= 0 (0: continuous), got {r.step!r}")
    elif r.step > 0 and r.log:
        v.fail(f"{prefix}.step", f"must be 0 with log (a log range is continuous), got {r.step!r}")
    elif r.step > 0 and ordered and not step_divides(r.step, r.min, r.max):
        # optuna would quietly lower max to the last step; refuse instead, so the space is what the client wrote.
        v.fail(f"{prefix}.step", f"must divide max - min ({r.max!r} - {r.min!r}), got {r.step!r}")
    return ParameterConfig(
        path, ParameterKind.FLOAT, low=r.min, high=r.max, log=r.log, step=r.step if r.step > 0 else None
    )


def _int_range(v: Checker, prefix: str, path: str, r: study_pb2.IntRange) -> ParameterConfig:
    step = r.step or 1  # the proto's "Default 1"
    ordered = r.min < r.max
    if not ordered:
        v.fail(f"{prefix}.max", f"must be greater than min ({r.min}), got {r.max}")
    if r.log and r.min <= 0:
        v.fail(f"{prefix}.min", f"must be > 0 with log, got {r.min}")
    if step < 0:
        v.fail(f"{prefix}.step", f"must be >= 1 (0: the default 1), got {step}")
    elif r.log and step != 1:
        v.fail(f"{prefix}.step", f"must be 0 or 1 with log, got {step}")
    elif ordered and (r.max - r.min) % step != 0:
        v.fail(f"{prefix}.step", f"must divide max - min ({r.max} - {r.min}), got {step}")
    return ParameterConfig(path, ParameterKind.INT, low=r.min, high=r.max, log=r.log, step=step)


def _categorical(v: Checker, prefix: str, path: str, c: study_pb2.Categorical) -> ParameterConfig | None:
    """Empty and duplicate checks; each value's parse and range are `_check_bounds`' job."""
    if not c.values:
        v.fail(f"{prefix}.values", "needs at least one value")
        return None
    seen: dict[str, int] = {}
    for k, value in enumerate(c.values):
        if value in seen:
            v.fail(f"{prefix}.values[{k}]", f"duplicates values[{seen[value]}] ({value})")
        seen.setdefault(value, k)
    return ParameterConfig(path, ParameterKind.CATEGORICAL, choices=tuple(c.values))


def _check_bounds(
    v: Checker,
    prefix: str,
    param: study_pb2.SearchParameter,
    config: ParameterConfig,
    base_spec: pb.TrainingSpec,
    default_bucket: str,
    inputs: InputLocations | None,
    searched: set[str],
) -> None:
    """Apply each bound (each categorical value) to the base spec and validate it: the field's own range and the
    cross-field rules with fields that are not searched. Violations land on the bound."""
    which = param.WhichOneof("domain")
    probes: list[tuple[str, str | int | float]]
    if config.kind is ParameterKind.CATEGORICAL:
        probes = [(f"{prefix}.categorical.values[{k}]", value) for k, value in enumerate(config.choices)]
    elif config.kind is ParameterKind.INT:
        probes = [(f"{prefix}.{which}.min", int(config.low)), (f"{prefix}.{which}.max", int(config.high))]
    else:
        probes = [(f"{prefix}.{which}.min", config.low), (f"{prefix}.{which}.max", config.high)]
    for where, value in probes:
        problem = _probe(config.path, value, base_spec, default_bucket, inputs, searched)
        if problem is not None:
            v.fail(where, problem)


def _probe(
    path: str,
    value: str | int | float,
    base_spec: pb.TrainingSpec,
    default_bucket: str,
    inputs: InputLocations | None,
    searched: set[str],
) -> str | None:
    """What is wrong with the base spec with `path` set to `value`, or None."""
    enum_type = field_at(path).enum_type
    member = enum_type.values_by_name.get(value) if enum_type is not None and isinstance(value, str) else None
    if enum_type is not None and member is not None and member.number == 0:
        # Valid in a spec (it means "the default"), but not something to compare against the concrete values.
        return f"must name a concrete {enum_type.name} value, got {value}"
    try:
        trial_spec = apply_params(base_spec, {path: value})
    except (KeyError, TypeError, ValueError) as exc:
        return str(exc.args[0])
    try:
        validate_spec(trial_spec, default_bucket=default_bucket, inputs=inputs)
    except SpecInvalid as exc:
        own = [x for x in exc.violations if x.field == path]
        if own:
            return f"{path} {own[0].description}"
        # Another field broke: the base is valid, so this value broke it. A searched field's own value is set
        # per trial, so a clash with the base's value of it says nothing (every trial spec is validated anyway).
        other = [x for x in exc.violations if x.field not in searched]
        if other:
            shown = value if isinstance(value, str) else repr(value)
            return f"with {path} = {shown}, {other[0].field} {other[0].description}"
    return None


# -- objective, budget, sampler, pruner ------------------------------------------------------------------------


_DIRECTIONS: Final = EnumMap(study_pb2.Direction, Direction)


def _objective(v: Checker, objective: study_pb2.Objective) -> tuple[Metric, Direction]:
    metric = Metric.VALIDATION_ACCURACY  # the study default (a TrainingSpec's early stopping defaults to the loss)
    if objective.metric != pb.METRIC_UNSPECIFIED:
        member = METRICS.to_python(objective.metric)
        if member is None:
            v.fail(
                "spec.objective.metric",
                f"must be one of {_allowed(pb.Metric.DESCRIPTOR.values)}, got {objective.metric}",
            )
        else:
            metric = member
    # An explicit direction that contradicts the metric (minimise an accuracy) is the client's call, not an error.
    direction = Direction.MAXIMIZE if metric.higher_is_better else Direction.MINIMIZE
    if objective.direction != study_pb2.DIRECTION_UNSPECIFIED:
        chosen = _DIRECTIONS.to_python(objective.direction)
        if chosen is None:
            v.fail(
                "spec.objective.direction",
                f"must be one of {_allowed(study_pb2.Direction.DESCRIPTOR.values)}, got {objective.direction}",
            )
        else:
            direction = chosen
    return metric, direction


def _budget(v: Checker, budget: study_pb2.StudyBudget) -> tuple[int, float | None]:
    v.number(budget, "spec.budget.max_trials")
    ok = not v.failed("spec.budget.max_trials")
    duration: float | None = None
    if budget.HasField("max_duration"):
        d = budget.max_duration
        seconds = d.seconds + d.nanos / 1e9
        if seconds <= 0:
            v.fail("spec.budget.max_duration", f"must be > 0, got {seconds:g}s")
        else:
            duration = seconds
    if ok and budget.max_trials == 0 and not budget.HasField("max_duration"):
        v.fail("spec.budget.max_trials", "0 means no limit, which needs spec.budget.max_duration; got neither")
    return budget.max_trials, duration


_SAMPLERS: Final = EnumMap(study_pb2.Sampler, SamplerType)


def _sampler(
    v: Checker,
    number: study_pb2.Sampler.ValueType,
    spec_parameters: Iterable[study_pb2.SearchParameter],
    parameters: list[ParameterConfig | None],
) -> SamplerType:
    sampler = _SAMPLERS.to_python(number) if number else SamplerType.TPE  # study.proto: unset is TPE
    if sampler is None:
        v.fail("spec.sampler", f"must be one of {_allowed(study_pb2.Sampler.DESCRIPTOR.values)}, got {number}")
        return SamplerType.TPE
    if sampler is SamplerType.GRID:
        for i, param in enumerate(spec_parameters):  # the proto's, so an otherwise invalid range is checked too
            if param.WhichOneof("domain") == "float_range" and param.float_range.step == 0:
                v.fail(
                    f"spec.parameters[{i}].float_range.step",
                    "must be > 0 with SAMPLER_GRID: a grid needs finitely many values, got 0 (continuous)",
                )
        points = _grid_points(parameters)
        if points > MAX_GRID_POINTS:
            v.fail(
                "spec.sampler",
                f"SAMPLER_GRID: the grid has {_count(points)} points, at most {MAX_GRID_POINTS}; "
                "use fewer values or larger steps, or another sampler",
            )
    return sampler


def _count(n: int) -> str:
    """`n` as a message words it: its digits, or its order of magnitude past 10^15 (a product of float ranges'
    sizes can have thousands of digits, more than `str` converts)."""
    return str(n) if n < 10**15 else f"about 10^{math.floor(math.log10(n))}"


def _grid_points(parameters: list[ParameterConfig | None]) -> int:
    """The grid's size over the valid, stepped parameters (the others are reported)."""
    return math.prod(grid_size(p) for p in parameters if p is not None and is_stepped(p))


_PRUNERS: Final = EnumMap(study_pb2.PrunerType, PrunerType)


def _pruner(v: Checker, spec: study_pb2.PrunerSpec, epochs: tuple[int, int] | None) -> PrunerConfig:
    kind = _PRUNERS.to_python(spec.type) if spec.type else PrunerType.NONE  # study.proto: unset is no pruning
    if kind is None:
        v.fail(
            "spec.pruner.type", f"must be one of {_allowed(study_pb2.PrunerType.DESCRIPTOR.values)}, got {spec.type}"
        )
        kind = PrunerType.NONE
    min_resource = v.number(spec, "spec.pruner.min_resource")
    min_ok = not v.failed("spec.pruner.min_resource")
    factor = v.number(spec, "spec.pruner.reduction_factor")
    startup = v.number(spec, "spec.pruner.startup_trials")
    # Only a pruner that runs needs the resource to fit in a trial; epochs is None where they are unknown.
    if kind is not PrunerType.NONE and min_ok and epochs is not None and min_resource > epochs[0]:
        v.fail(
            "spec.pruner.min_resource",
            f"must be <= {epochs[0]}, the fewest epochs a trial trains (classifier.epochs, plus "
            f"fine_tuning.stage.epochs when fine-tuning is on), got {min_resource}",
        )
    return PrunerConfig(type=kind, min_resource=min_resource, reduction_factor=factor, startup_trials=startup)


def _trial_epochs(base: TrainingConfig, parameters: list[ParameterConfig | None]) -> tuple[int, int] | None:
    """The fewest and most epochs a trial trains over the search space; None where an epoch parameter is bad."""
    if any(p is None for p in parameters):
        # A bad parameter could be an epoch one: without its values the bound is unknown (and the spec is refused).
        return None
    by_path = {p.path: p for p in parameters if p is not None}
    classifier = _int_values(by_path.get(_EPOCH_PATHS[0]), base.classifier.epochs)
    enabled = _bool_values(by_path.get(_EPOCH_PATHS[1]), base.fine_tuning.enabled)
    fine_tuning = _int_values(by_path.get(_EPOCH_PATHS[2]), base.fine_tuning.stage.epochs)
    fewest = min(classifier) + (min(fine_tuning) if all(enabled) else 0)
    most = max(classifier) + (max(fine_tuning) if any(enabled) else 0)
    return fewest, most


def _int_values(p: ParameterConfig | None, default: int) -> list[int]:
    if p is None:
        return [default]
    if p.kind is ParameterKind.CATEGORICAL:
        return [int(c) for c in p.choices]  # parsed before: _check_bounds applied every value
    return [int(p.low), int(p.high)]


def _bool_values(p: ParameterConfig | None, default: bool) -> list[bool]:
    return [default] if p is None else [c == "true" for c in p.choices]


def _allowed(values: Iterable[EnumValueDescriptor]) -> str:
    return ", ".join(x.name for x in values if x.number != 0)
