"""FindLearningRate's request checked at the edge: the sweep's rules come from training_service.proto."""

from __future__ import annotations

import pytest
from trainer_service.spec.lr_sweep import LrSweep, validate_lr_request
from trainer_service.spec.validate import SpecInvalid
from visiontune import protoreflect
from visiontune.errors import FieldViolation
from visiontune.v1 import training_service_pb2 as ts
from visiontune.v1 import training_spec_pb2 as pb

SPEC = pb.TrainingSpec(dataset=pb.DatasetSpec(uri="datasets/shapes"))


def _violations(**fields: float) -> dict[str, str]:
    with pytest.raises(SpecInvalid) as caught:
        validate_lr_request(ts.FindLearningRateRequest(spec=SPEC, **fields), default_bucket="b")
    return {v.field: v.description for v in caught.value.violations}


def test_the_sweep_defaults_are_the_request_fields_defaults() -> None:
    request = ts.FindLearningRateRequest.DESCRIPTOR
    sweep = LrSweep()
    assert (
        (sweep.min_lr, sweep.max_lr, sweep.steps, sweep.smoothing, sweep.divergence_factor)
        == tuple(
            protoreflect.field_default(request, name)
            for name in ("min_learning_rate", "max_learning_rate", "steps", "smoothing", "divergence_factor")
        )
        == (1e-7, 10.0, 100, 0.98, 4.0)
    )


def test_a_valid_request_is_its_config_and_sweep() -> None:
    config, sweep = validate_lr_request(
        ts.FindLearningRateRequest(spec=SPEC, min_learning_rate=1e-4, steps=20), default_bucket="b"
    )
    assert config.dataset.uri == "datasets/shapes"
    assert sweep == LrSweep(min_lr=1e-4, steps=20)


def test_every_bad_field_is_reported_at_once_with_the_spec_s_prefixed() -> None:
    with pytest.raises(SpecInvalid) as caught:
        validate_lr_request(
            ts.FindLearningRateRequest(
                spec=pb.TrainingSpec(classifier=pb.StageSpec(epochs=0)),
                steps=5,
                smoothing=1.0,
                divergence_factor=1.0,
                max_learning_rate=200,
            ),
            default_bucket="b",
        )
    assert caught.value.violations == [
        FieldViolation("max_learning_rate", "must be in (0, 100], got 200"),
        FieldViolation("steps", "must be in [10, 10000], got 5"),
        FieldViolation("smoothing", "must be in [0, 1), got 1"),
        FieldViolation("divergence_factor", "must be in [1.5, 100], got 1"),
        FieldViolation("spec.dataset.uri", "is required: s3://BUCKET/PREFIX or a key prefix (datasets/NAME), got ''"),
        FieldViolation("spec.classifier.epochs", "must be in [1, 1000], got 0"),
    ]


def test_a_crossed_range_names_both_ends() -> None:
    assert _violations(min_learning_rate=1, max_learning_rate=0.1) == {
        "min_learning_rate": "need 0 < min < max <= 100, got min 1, max 0.1"
    }
    assert _violations(min_learning_rate=0) == {"min_learning_rate": "must be in (0, 100], got 0"}
