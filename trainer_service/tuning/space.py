"""The search space of a tuning study: TrainingSpec fields named by path, their Optuna distributions, and putting
sampled values back into a spec.

A parameter's Optuna name is its TrainingSpec path (`classifier.learning_rate`), so trials, importances and plots use
the API's names. Categorical values stay the strings the client wrote (`"ARCHITECTURE_RESNET18"`, `"true"`, `"64"`):
that is what Optuna stores and what `Trial.parameters` shows, and `apply_params` parses them into the field's type.
"""

from __future__ import annotations

import decimal
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from visiontune import protoreflect
from visiontune.v1 import training_spec_pb2 as pb

if TYPE_CHECKING:
    import optuna

    from trainer_service.tuning.study_config import StudyConfig

__all__ = [
    "ParamValue",
    "ParameterConfig",
    "ParameterKind",
    "apply_params",
    "distributions",
    "field_at",
    "grid_search_space",
    "grid_size",
    "is_float_field",
    "is_integer_field",
    "is_stepped",
    "param_string",
    "step_divides",
    "suggest",
]

# What a parameter takes: `suggest` returns str (categorical), int or float; callers may also pass bools and enum
# numbers to `apply_params`.
ParamValue = str | int | float | bool

_BOOL_STRINGS: Final = {"true": True, "false": False}


class ParameterKind(enum.StrEnum):
    FLOAT = "float"  # FloatRange: float/double fields
    INT = "int"  # IntRange: integer fields
    CATEGORICAL = "categorical"  # enums, bools, and listed numbers


@dataclass(frozen=True)
class ParameterConfig:
    """One searched TrainingSpec field, checked by `validate_study`.

    FLOAT and INT use `low`/`high` (inclusive; whole numbers for INT), `log`, and `step`: None means continuous
    (FLOAT only), INT's step is always a whole number >= 1. CATEGORICAL uses `choices` (strings, as written).
    """

    path: str
    kind: ParameterKind
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[str, ...] = ()


# -- fields ------------------------------------------------------------------------------------------------------


def field_at(path: str) -> FieldDescriptor:
    """The searchable scalar field of TrainingSpec at dotted `path` (`fine_tuning.stage.epochs`).

    KeyError: no such field. ValueError: the path names something a study cannot search (a message, a repeated
    field, a string such as `dataset.uri`) or walks through a non-message field.
    """
    field = protoreflect.field_path(pb.TrainingSpec.DESCRIPTOR, path)[-1]
    if field.is_repeated:
        raise ValueError(f"{path} is a repeated field; only single numbers, bools and enums can be searched")
    if field.message_type is not None:
        example = f"{path}.{field.message_type.fields[0].name}"
        raise ValueError(f"{path} is a message ({field.message_type.name}); name one of its fields, e.g. {example}")
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        raise ValueError(f"{path} is a string field; only numbers, bools and enums can be searched")
    return field


def is_integer_field(field: FieldDescriptor) -> bool:
    return protoreflect.is_integer(field)


def is_float_field(field: FieldDescriptor) -> bool:
    return protoreflect.is_float(field)


def _coerce(path: str, field: FieldDescriptor, value: ParamValue) -> int | float | bool:
    """`value` as what the proto field takes; TypeError/ValueError name the path and the allowed values."""
    enum_type = field.enum_type
    if enum_type is not None:
        # Full names only: they are what trials store and show (`ARCHITECTURE_RESNET18`).
        number = protoreflect.enum_number(enum_type, value, short_names=False)
        if number is not None:
            return number
        if isinstance(value, str):
            allowed = ", ".join(v.name for v in enum_type.values if v.number != 0)
            raise ValueError(f"{path}: {value!r} is not a value of {enum_type.name}; one of {allowed}")
        if isinstance(value, int) and not isinstance(value, bool):  # proto3 enums are open; a config holds no unknowns
            raise ValueError(f"{path}: {value} is not a value of {enum_type.name}")
        raise TypeError(f"{path}: an enum takes a value name or number, got {type(value).__name__}")
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _BOOL_STRINGS:
            return _BOOL_STRINGS[value]
        raise ValueError(f'{path}: a bool takes true, false, "true" or "false", got {value!r}')
    if isinstance(value, bool):  # bool is an int: refuse it where a number is meant
        raise TypeError(f"{path}: a number field does not take a bool, got {value!r}")
    if protoreflect.is_integer(field):
        number = _integer(path, value)
        if not protoreflect.fits(field, number):
            lo, hi = protoreflect.INT_BOUNDS[field.cpp_type]
            raise ValueError(f"{path}: {number} is out of the field's range [{lo}, {hi}]")
        return number
    if protoreflect.is_float(field):
        try:
            real = float(value)
        except ValueError:
            raise ValueError(f"{path}: {value!r} is not a number") from None
        if not math.isfinite(real):
            raise ValueError(f"{path}: must be finite, got {value!r}")
        if not protoreflect.fits(field, real):
            raise ValueError(f"{path}: {value!r} is out of the float32 range")
        return real
    raise TypeError(f"{path}: fields of C++ type {field.cpp_type} are not searchable")  # field_at refuses these


def _integer(path: str, value: ParamValue) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"{path}: an integer field does not take {value!r}")
    try:
        return int(value, 10)
    except ValueError:
        raise ValueError(f"{path}: {value!r} is not a whole number") from None


def apply_params(base: pb.TrainingSpec, params: Mapping[str, ParamValue]) -> pb.TrainingSpec:
    """A copy of `base` with each path in `params` set; `base` is left alone.

    Enums take a value name or number, bools take bools or "true"/"false", numbers take numbers or their strings
    (an integer field refuses 2.5). Setting a field inside an unset message (`fine_tuning.stage.epochs`) sets the
    message, as protobuf does. Raises KeyError/ValueError/TypeError naming the path for a bad path or value.
    """
    spec = pb.TrainingSpec()
    spec.CopyFrom(base)
    for path, value in params.items():
        field = field_at(path)
        *parents, leaf = path.split(".")
        message: Message = spec
        for name in parents:
            message = getattr(message, name)
        setattr(message, leaf, _coerce(path, field, value))
    return spec


# -- Optuna ------------------------------------------------------------------------------------------------------


def distributions(config: StudyConfig) -> dict[str, BaseDistribution]:
    """Each parameter's Optuna distribution, by path (what `suggest` samples from)."""
    return {p.path: _distribution(p) for p in config.parameters}


def _distribution(p: ParameterConfig) -> BaseDistribution:
    if p.kind is ParameterKind.FLOAT:
        return FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    if p.kind is ParameterKind.INT:
        return IntDistribution(int(p.low), int(p.high), log=p.log, step=_int_step(p))
    return CategoricalDistribution(p.choices)


def _int_step(p: ParameterConfig) -> int:
    return 1 if p.step is None else int(p.step)


def suggest(trial: optuna.trial.BaseTrial, config: StudyConfig) -> dict[str, str | int | float]:
    """One value per parameter from `trial`'s sampler, by path; feed the result to `apply_params`."""
    values: dict[str, str | int | float] = {}
    for p in config.parameters:
        if p.kind is ParameterKind.FLOAT:
            values[p.path] = trial.suggest_float(p.path, p.low, p.high, step=p.step, log=p.log)
        elif p.kind is ParameterKind.INT:
            values[p.path] = trial.suggest_int(p.path, int(p.low), int(p.high), step=_int_step(p), log=p.log)
        else:
            values[p.path] = trial.suggest_categorical(p.path, p.choices)
    return values


def param_string(value: ParamValue) -> str:
    """The string form of a sampled value in `Trial.parameters`: the same form as Categorical values.

    Categorical values (enum names, "true"/"false", numbers as written) pass through; bools are "true"/"false",
    ints are decimal, floats are Python's shortest round-tripping repr (`0.001`, `1e-05`).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def grid_size(p: ParameterConfig) -> int:
    """How many values `grid_search_space` lists for `p`; ValueError for a continuous float range."""
    if p.kind is ParameterKind.CATEGORICAL:
        return len(p.choices)
    if p.kind is ParameterKind.INT:
        return (int(p.high) - int(p.low)) // _int_step(p) + 1
    if p.step is None or p.step <= 0:
        raise ValueError(f"{p.path}: a continuous float range has no grid; give it a step")
    with decimal.localcontext(_EXACT):
        return int((_exact(p.high) - _exact(p.low)) // _exact(p.step)) + 1


def grid_search_space(config: StudyConfig) -> dict[str, list[str | int | float]]:
    """Every value of each parameter, for optuna's GridSampler: the categorical values, or the stepped range
    enumerated from low to high (floats in decimal steps, so 0.1 + 2 x 0.1 is 0.3, not 0.30000000000000004)."""
    space: dict[str, list[str | int | float]] = {}
    for p in config.parameters:
        n = grid_size(p)
        if p.kind is ParameterKind.CATEGORICAL:
            space[p.path] = list(p.choices)
        elif p.kind is ParameterKind.INT:
            space[p.path] = list(range(int(p.low), int(p.high) + 1, _int_step(p)))
        else:
            assert p.step is not None  # grid_size refused a continuous range
            low, step = _exact(p.low), _exact(p.step)
            with decimal.localcontext(_EXACT):
                space[p.path] = [float(low + i * step) for i in range(n)]
    return space


# Decimal arithmetic on any two floats without rounding: a float's repr has at most 17 digits, between 1e-324 and
# 1e309, so a difference, a remainder or a quotient of two needs at most about 650 digits. The default context's 28
# would round `max - min` and raise DivisionImpossible for a quotient past 10^28 (max 1e27, step 0.1).
_EXACT: Final = decimal.Context(prec=700)


def _exact(value: float) -> decimal.Decimal:
    """The decimal the client wrote (0.1, not 0.1000000000000000055…); the same rule optuna's distributions use."""
    return decimal.Decimal(repr(value))


def step_divides(step: float, low: float, high: float) -> bool:
    """Whether `step` divides `high - low` exactly, in decimal as optuna's FloatDistribution checks it (so 0.1
    divides 0.5 - 0.1)."""
    with decimal.localcontext(_EXACT):
        return (_exact(high) - _exact(low)) % _exact(step) == 0


def is_stepped(p: ParameterConfig) -> bool:
    """Whether `p` has finitely many values (what a grid needs)."""
    return p.kind is not ParameterKind.FLOAT or (p.step is not None and p.step > 0)
