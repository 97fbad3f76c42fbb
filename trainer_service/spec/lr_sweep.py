"""A FindLearningRateRequest checked at the edge: the sweep's settings and the spec, every bad field at once.

The sweep's defaults and ranges are the request fields' `field_rules` options (training_service.proto,
docs/spec.md); the spec goes through `validate_spec`, its violations prefixed `spec.` (docs/architecture.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from visiontune import protoreflect
from visiontune.errors import FieldViolation
from visiontune.uris import InputLocations
from visiontune.v1 import training_service_pb2

from trainer_service.spec.checker import Checker, SpecInvalid
from trainer_service.spec.config import TrainingConfig
from trainer_service.spec.validate import validate_spec

__all__ = ["LrSweep", "validate_lr_request"]

_REQUEST: Final = training_service_pb2.FindLearningRateRequest.DESCRIPTOR


def _default(name: str) -> Any:
    return protoreflect.field_default(_REQUEST, name)


@dataclass(frozen=True)
class LrSweep:
    """The LR range test's settings, by FindLearningRateRequest field: min_learning_rate, max_learning_rate, steps,
    smoothing, divergence_factor."""

    min_lr: float = _default("min_learning_rate")
    max_lr: float = _default("max_learning_rate")
    steps: int = _default("steps")
    smoothing: float = _default("smoothing")
    divergence_factor: float = _default("divergence_factor")


def validate_lr_request(
    request: training_service_pb2.FindLearningRateRequest, *, default_bucket: str, inputs: InputLocations | None = None
) -> tuple[TrainingConfig, LrSweep]:
    """The request's spec as a config and its sweep; `SpecInvalid` lists every bad field."""
    c = Checker(_REQUEST)
    sweep = LrSweep(
        min_lr=c.number(request, "min_learning_rate"),
        max_lr=c.number(request, "max_learning_rate"),
        steps=c.number(request, "steps"),
        smoothing=c.number(request, "smoothing"),
        divergence_factor=c.number(request, "divergence_factor"),
    )
    bounds = c.range_of("max_learning_rate")
    if not c.failed("min_learning_rate") and not c.failed("max_learning_rate") and sweep.min_lr >= sweep.max_lr:
        low, high = ("<" if bounds.lo_open else "<="), ("<" if bounds.hi_open else "<=")
        c.fail(
            "min_learning_rate",
            f"need {protoreflect.format_number(bounds.lo)} {low} min < max {high} "
            f"{protoreflect.format_number(bounds.hi)}, got min {sweep.min_lr:g}, "
            f"max {sweep.max_lr:g}",
        )
    config: TrainingConfig | None = None
    spec_violations: list[FieldViolation] = []
    try:
        config = validate_spec(request.spec, default_bucket=default_bucket, inputs=inputs)
    except SpecInvalid as err:
        spec_violations = [FieldViolation(f"spec.{v.field}", v.description) for v in err.violations]
    if c.violations or config is None:
        raise SpecInvalid(c.violations + spec_violations)
    return config, sweep
