"""Tests of `validate_spec` / `config_to_spec`: every rule of training_spec.proto, defaults, the round trip.

One module for one contract: the sections follow training_spec.proto's messages, so a rule and its tests are
found at the same place in both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from trainer_service.jobs.executor import max_retries_of
from trainer_service.jobs.store import JobStore
from trainer_service.spec.config import (
    BLOCK_COUNTS,
    FINE_TUNING_LR_DIVISOR,
    Activation,
    Architecture,
    AugmentationConfig,
    ClassBalancing,
    DatasetConfig,
    DeviceKind,
    EarlyStoppingConfig,
    FineTuningConfig,
    Metric,
    ModelConfig,
    OpenSetConfig,
    OpenSetScore,
    OptimizerConfig,
    OptimizerType,
    Precision,
    RunConfig,
    ScheduleConfig,
    ScheduleType,
    StageConfig,
    TrainingConfig,
    WeightsSource,
)
from trainer_service.spec.convert import config_to_spec, load_stored_spec
from trainer_service.spec.validate import SpecInvalid, model_id_from_uri, validate_spec
from visiontune import protoreflect
from visiontune.errors import FieldViolation
from visiontune.v1 import training_spec_pb2 as pb

DATASET = "datasets/flowers"
NAN, INF = math.nan, math.inf


# -- helpers ----------------------------------------------------------------------------------------------------


def _set(message: Message, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        message = getattr(message, name)
    setattr(message, leaf, value)


def _get(message: Message, path: str) -> Any:
    for name in path.split("."):
        message = getattr(message, name)
    return message


def _spec(**fields: Any) -> pb.TrainingSpec:
    """A spec with a dataset and the given fields set; keys use '__' for '.' (`classifier__learning_rate`)."""
    spec = pb.TrainingSpec(dataset=pb.DatasetSpec(uri=DATASET))
    for key, value in fields.items():
        _set(spec, key.replace("__", "."), value)
    return spec


def _spec_with(values: dict[str, Any]) -> pb.TrainingSpec:
    spec = _spec()
    for path, value in values.items():
        _set(spec, path, value)
    return spec


def _violations(spec: pb.TrainingSpec) -> list[FieldViolation]:
    with pytest.raises(SpecInvalid) as caught:
        validate_spec(spec)
    return caught.value.violations


def _config_value(config: TrainingConfig, spec_path: str) -> Any:
    """The config value a spec field lands in (the paths agree except for the unfreeze oneof)."""
    path = spec_path.replace("fine_tuning.unfreeze.last_n_blocks", "fine_tuning.last_n_blocks")
    value: Any = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _leaf_paths(descriptor: Descriptor, field_type: int, prefix: str = "") -> Iterator[str]:
    """Every field path of `field_type` below `descriptor`, nested messages included."""
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        if field.message_type is not None:
            yield from _leaf_paths(field.message_type, field_type, f"{path}.")
        elif field.type == field_type:
            yield path


FLOAT_PATHS = list(_leaf_paths(pb.TrainingSpec.DESCRIPTOR, FieldDescriptor.TYPE_FLOAT))
ENUM_PATHS = list(_leaf_paths(pb.TrainingSpec.DESCRIPTOR, FieldDescriptor.TYPE_ENUM))


# -- defaults ---------------------------------------------------------------------------------------------------


def test_defaults_resolve_to_the_documented_values() -> None:
    config = validate_spec(_spec())

    d, a, m, o, r = config.dataset, config.augmentation, config.model, config.open_set, config.run
    assert (d.uri, d.validation_uri, d.test_uri, d.unknown_uri) == (DATASET, None, None, None)
    assert (d.validation_split, d.image_size, d.class_balancing, d.cache_max_mb) == (
        0.2,
        224,
        ClassBalancing.NONE,
        2048,
    )
    assert a == AugmentationConfig()
    assert not a.is_random
    assert (a.zoom_min_scale, a.zoom_max_scale, a.copies_per_original) == (1.0, 1.0, 0)
    assert (m.architecture, m.weights, m.weights_uri) == (Architecture.MOBILENET_V2, WeightsSource.IMAGENET, None)
    assert (m.classifier_dim, m.dropout, m.activation) == (256, 0.5, Activation.RELU)
    for stage, epochs, lr in ((config.classifier, 10, 0.003), (config.fine_tuning.stage, 5, 0.0003)):
        assert (stage.epochs, stage.learning_rate, stage.batch_size) == (epochs, lr, 32)
        assert stage.optimizer == OptimizerConfig(
            type=OptimizerType.ADAM, momentum=0.9, nesterov=False, weight_decay=0.0, beta1=0.9, beta2=0.999
        )
        assert stage.schedule == ScheduleConfig(
            type=ScheduleType.CONSTANT,
            warmup_epochs=0.0,
            step_epochs=3,
            gamma=0.1,
            min_learning_rate=0.0,
            max_learning_rate=None,
            cycle_epochs=2.0,
            restart_epochs=2,
            restart_multiplier=1,
            plateau_patience=2,
        )
        assert stage.early_stopping == EarlyStoppingConfig(
            enabled=False, monitor=Metric.VALIDATION_LOSS, patience=3, min_delta=0.0, restore_best_weights=True
        )
        assert (stage.label_smoothing, stage.gradient_clip_norm) == (0.0, 0.0)
    assert (config.fine_tuning.enabled, config.fine_tuning.last_n_blocks) == (False, None)
    assert (o.score, o.target_true_positive_rate) == (OpenSetScore.MAX_SOFTMAX, 0.95)
    assert (r.seed, r.repeats, r.precision, r.device, r.data_loader_workers, r.max_retries, r.devices) == (
        0,
        1,
        Precision.AUTO,
        DeviceKind.AUTO,
        2,
        2,
        1,
    )
    assert not r.deterministic
    assert config.output_model == "flowers"


def test_the_config_dataclass_defaults_agree_with_the_proto_defaults() -> None:
    assert validate_spec(_spec()) == TrainingConfig(dataset=DatasetConfig(uri=DATASET), output_model="flowers")


@pytest.mark.parametrize(
    ("path", "unspecified", "default"),
    [
        ("dataset.class_balancing", pb.CLASS_BALANCING_UNSPECIFIED, ClassBalancing.NONE),
        ("model.architecture", pb.ARCHITECTURE_UNSPECIFIED, Architecture.MOBILENET_V2),
        ("model.weights", pb.WEIGHTS_SOURCE_UNSPECIFIED, WeightsSource.IMAGENET),
        ("model.activation", pb.ACTIVATION_UNSPECIFIED, Activation.RELU),
        ("classifier.optimizer.type", pb.OPTIMIZER_TYPE_UNSPECIFIED, OptimizerType.ADAM),
        ("classifier.schedule.type", pb.SCHEDULE_TYPE_UNSPECIFIED, ScheduleType.CONSTANT),
        ("classifier.early_stopping.monitor", pb.METRIC_UNSPECIFIED, Metric.VALIDATION_LOSS),
        ("open_set.score", pb.OPEN_SET_SCORE_UNSPECIFIED, OpenSetScore.MAX_SOFTMAX),
        ("run.precision", pb.PRECISION_UNSPECIFIED, Precision.AUTO),
        ("run.device", pb.DEVICE_UNSPECIFIED, DeviceKind.AUTO),
        ("run.device", pb.DEVICE_AUTO, DeviceKind.AUTO),
    ],
)
def test_unspecified_enums_resolve_to_the_documented_default(path: str, unspecified: int, default: Any) -> None:
    assert _config_value(validate_spec(_spec_with({path: unspecified})), path) is default


def test_float32_values_come_back_as_the_decimal_the_client_wrote() -> None:
    # 0.003 as a proto float is 0.0030000000260770…; the config holds 0.003 again.
    config = validate_spec(_spec(classifier__learning_rate=0.003, dataset__validation_split=0.1))
    assert config.classifier.learning_rate == 0.003
    assert config.dataset.validation_split == 0.1


# -- every violation, each once ---------------------------------------------------------------------------------


def test_a_spec_with_ten_bad_fields_names_all_ten_once_each() -> None:
    bad = {
        "dataset.image_size": 16,
        "augmentation.hue": 0.7,
        "model.architecture": 42,
        "model.dropout": 0.99,
        "classifier.learning_rate": 0.0,
        "classifier.schedule.gamma": 1.5,
        "fine_tuning.stage.epochs": 9,
        "open_set.target_true_positive_rate": 1.0,
        "run.repeats": 0,
        "output_model": "Not An ID",
    }
    spec = _spec_with(bad)

    with pytest.raises(SpecInvalid) as caught:
        validate_spec(spec)

    fields = [v.field for v in caught.value.violations]
    assert sorted(fields) == sorted(bad)
    assert isinstance(caught.value, ValueError)
    assert all(path in str(caught.value) for path in bad)


def test_a_missing_dataset_uri_is_reported_with_the_other_violations() -> None:
    spec = _spec(run__max_retries=11)
    spec.dataset.uri = ""

    fields = [v.field for v in _violations(spec)]

    assert fields == ["dataset.uri", "run.max_retries"]


def test_the_description_names_the_range_and_the_value() -> None:
    [violation] = _violations(_spec(classifier__learning_rate=12))
    assert violation == FieldViolation("classifier.learning_rate", "must be in (0, 10], got 12")


# -- ranges: each rule fails outside and passes on its boundary --------------------------------------------------

# (spec path, values that pass (the boundaries), values that fail, other fields to set first)
RangeCase = tuple[str, list[float], list[float], dict[str, Any]]


def _stage_cases(stage: str, epochs: int, lr_below: float, lr: float, lr_above: float) -> list[RangeCase]:
    """The rules every stage has; `lr_below` < `lr` (the stage's default LR) < `lr_above`, all short decimals."""
    return [
        (f"{stage}.batch_size", [1, 4096], [0, 4097], {}),
        (f"{stage}.optimizer.momentum", [0, 0.99], [-0.1, 1.0], {}),
        (f"{stage}.optimizer.weight_decay", [0, 1], [-0.1, 1.1], {}),
        (f"{stage}.optimizer.beta1", [0, 0.99], [-0.1, 1.0], {}),
        (f"{stage}.optimizer.beta2", [0, 0.999], [-0.1, 1.0], {}),
        (f"{stage}.schedule.warmup_epochs", [0, epochs - 0.5], [-1, epochs], {}),
        (f"{stage}.schedule.step_epochs", [1, 1000], [0, 1001], {}),
        (f"{stage}.schedule.gamma", [0.01, 0.99], [0, 1, -0.5], {}),
        (f"{stage}.schedule.min_learning_rate", [0, lr_below], [-0.001, lr, lr_above], {}),
        (f"{stage}.schedule.max_learning_rate", [lr_above, 100], [lr, lr_below, 0], {}),
        (f"{stage}.schedule.cycle_epochs", [1, 1000], [0.5, 1001], {}),
        (f"{stage}.schedule.restart_epochs", [1, 1000], [0, 1001], {}),
        (f"{stage}.schedule.restart_multiplier", [1, 10], [0, 11], {}),
        (f"{stage}.schedule.plateau_patience", [0, 100], [-1, 101], {}),
        (f"{stage}.early_stopping.patience", [1, 1000], [0, 1001], {}),
        (f"{stage}.early_stopping.min_delta", [0, 1], [-0.1, 1.1], {}),
        (f"{stage}.label_smoothing", [0, 0.49], [-0.1, 0.5], {}),
        (f"{stage}.gradient_clip_norm", [0, 1000], [-1, 1000.5], {}),
    ]


RANGE_CASES: list[RangeCase] = [
    ("dataset.validation_split", [0.5, 1e-6], [0.0, 0.51, -0.1], {}),
    ("dataset.image_size", [32, 1024], [31, 1025], {}),
    ("dataset.cache_max_mb", [0, 1_000_000], [-1], {}),
    ("augmentation.rotation_degrees", [0, 180], [-1, 180.5], {}),
    ("augmentation.zoom_min_scale", [0.05, 1], [0.04, 1.01], {}),
    ("augmentation.zoom_max_scale", [0.05, 1], [0.04, 1.01], {"augmentation.zoom_min_scale": 0.05}),
    ("augmentation.brightness", [0, 1], [-0.1, 1.1], {}),
    ("augmentation.contrast", [0, 1], [-0.1, 1.1], {}),
    ("augmentation.saturation", [0, 1], [-0.1, 1.1], {}),
    ("augmentation.hue", [0, 0.5], [-0.1, 0.51], {}),
    ("augmentation.shear_degrees", [0, 45], [-1, 45.5], {}),
    ("augmentation.gaussian_noise_std", [0, 1], [-0.1, 1.1], {}),
    ("augmentation.copies_per_original", [0, 4], [-1, 5], {}),
    ("model.classifier_dim", [8, 8192], [7, 8193], {}),
    ("model.dropout", [0, 0.95], [-0.1, 0.96], {}),
    ("classifier.epochs", [1, 1000], [0, 1001], {}),
    ("classifier.learning_rate", [1e-6, 10], [0, -0.1, 10.5], {}),
    *_stage_cases("classifier", epochs=10, lr_below=0.0029, lr=0.003, lr_above=0.0031),
    ("fine_tuning.stage.epochs", [1, 5], [0, 6], {}),
    ("fine_tuning.stage.epochs", [1, 1000], [0, 1001], {"fine_tuning.allow_long_fine_tuning": True}),
    ("fine_tuning.stage.learning_rate", [1e-6, 0.0003], [0, 0.00031, 0.003], {}),
    ("fine_tuning.stage.learning_rate", [10], [0, 10.5], {"fine_tuning.override_learning_rate_limit": True}),
    *_stage_cases("fine_tuning.stage", epochs=5, lr_below=0.00029, lr=0.0003, lr_above=0.00031),
    ("fine_tuning.unfreeze.last_n_blocks", [1, 18], [0, 19, -1], {}),
    ("open_set.target_true_positive_rate", [0.5, 0.99], [0.49, 1.0], {}),
    ("run.repeats", [1, 20], [0, 21], {}),
    ("run.data_loader_workers", [0, 64], [-1, 65], {}),
    ("run.max_retries", [0, 10], [-1, 11], {}),
    ("run.devices", [1, 8], [0, 9, -1], {}),
]


def _flatten(passing: bool) -> list[Any]:
    return [
        pytest.param(path, value, setup, id=f"{path}={value}" + ("+" + ",".join(setup) if setup else ""))
        for path, good, bad, setup in RANGE_CASES
        for value in (good if passing else bad)
    ]


@pytest.mark.parametrize(("path", "value", "setup"), _flatten(passing=True))
def test_a_boundary_value_passes_and_lands_in_the_config(path: str, value: float, setup: dict[str, Any]) -> None:
    config = validate_spec(_spec_with({**setup, path: value}))
    assert _config_value(config, path) == value


@pytest.mark.parametrize(("path", "value", "setup"), _flatten(passing=False))
def test_a_value_out_of_range_is_one_violation_naming_the_field(path: str, value: float, setup: dict[str, Any]) -> None:
    [violation] = _violations(_spec_with({**setup, path: value}))
    assert violation.field == path
    assert violation.description.startswith("must be ")
    assert ", got " in violation.description


def test_the_zoom_range_must_not_be_inverted() -> None:
    [violation] = _violations(_spec(augmentation__zoom_min_scale=0.6, augmentation__zoom_max_scale=0.5))
    assert violation == FieldViolation("augmentation.zoom_min_scale", "must be <= zoom_max_scale (0.5), got 0.6")
    config = validate_spec(_spec(augmentation__zoom_min_scale=0.5, augmentation__zoom_max_scale=0.5))
    assert config.augmentation.is_random


def test_the_schedule_is_checked_against_the_stage_s_own_epochs_and_learning_rate() -> None:
    spec = _spec(
        classifier__epochs=6,
        classifier__learning_rate=0.1,
        classifier__schedule__warmup_epochs=5,
        classifier__schedule__min_learning_rate=0.05,
    )
    assert validate_spec(spec).classifier.schedule.warmup_epochs == 5
    spec.classifier.epochs = 4
    spec.classifier.learning_rate = 0.01
    violations = {v.field: v.description for v in _violations(spec)}
    assert violations == {
        "classifier.schedule.warmup_epochs": "must be in [0, 4) (less than classifier.epochs), got 5",
        "classifier.schedule.min_learning_rate": "must be in [0, 0.01) (below classifier.learning_rate), got 0.05",
    }


def test_a_bad_stage_learning_rate_is_not_reported_again_through_the_schedule() -> None:
    spec = _spec(
        classifier__learning_rate=-1,
        classifier__schedule__min_learning_rate=0.5,
        classifier__schedule__max_learning_rate=0.1,
    )
    assert [v.field for v in _violations(spec)] == ["classifier.learning_rate"]


@pytest.mark.parametrize("path", FLOAT_PATHS)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_floats_are_violations(path: str, value: float) -> None:
    [violation] = _violations(_spec_with({path: value}))
    assert violation.field == path
    assert violation.description.endswith(f"got {value}")


@pytest.mark.parametrize("path", ENUM_PATHS)
@pytest.mark.parametrize("number", [99, -1])
def test_enum_numbers_this_server_does_not_know_are_violations(path: str, number: int) -> None:
    [violation] = _violations(_spec_with({path: number}))
    assert violation.field == path
    assert violation.description.startswith("must be one of ")
    assert violation.description.endswith(f"got {number}")


# -- URIs and the output model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["datasets/flowers", "s3://bucket/datasets/flowers/", "s3://flowers", "a"])
def test_dataset_uris_that_parse(uri: str) -> None:
    assert validate_spec(_spec(dataset__uri=uri)).dataset.uri == uri


@pytest.mark.parametrize("uri", ["", "/", "//", "ftp://host/flowers", "s3:///flowers", "http://x/y"])
def test_dataset_uris_that_do_not(uri: str) -> None:
    [violation] = _violations(_spec(dataset__uri=uri))
    assert violation.field == "dataset.uri"
    assert repr(uri) in violation.description


@pytest.mark.parametrize("name", ["validation_uri", "test_uri", "unknown_uri"])
def test_optional_dataset_uris_must_parse_when_set(name: str) -> None:
    assert (
        _config_value(validate_spec(_spec_with({f"dataset.{name}": "s3://b/val"})), f"dataset.{name}") == "s3://b/val"
    )
    [violation] = _violations(_spec_with({f"dataset.{name}": "gs://b/val"}))
    assert violation.field == f"dataset.{name}"


def test_weights_uri_is_required_iff_weights_is_uri() -> None:
    uri_weights = {"model.weights": pb.WEIGHTS_SOURCE_URI}
    config = validate_spec(_spec_with({**uri_weights, "model.weights_uri": "s3://w/resnet.pt"}))
    assert (config.model.weights, config.model.weights_uri) == (WeightsSource.URI, "s3://w/resnet.pt")
    assert validate_spec(_spec_with({**uri_weights, "model.weights_uri": "weights/a.pt"})).model.weights_uri

    for bad in ({}, {"model.weights_uri": "s3://w/"}, {"model.weights_uri": "ftp://w/a.pt"}):
        [violation] = _violations(_spec_with({**uri_weights, **bad}))
        assert violation.field == "model.weights_uri"
    for source in (pb.WEIGHTS_SOURCE_UNSPECIFIED, pb.WEIGHTS_SOURCE_IMAGENET, pb.WEIGHTS_SOURCE_NONE):
        [violation] = _violations(_spec_with({"model.weights": source, "model.weights_uri": "s3://w/a.pt"}))
        assert violation.field == "model.weights_uri"
        assert "must be empty unless model.weights is WEIGHTS_SOURCE_URI" in violation.description


@pytest.mark.parametrize(
    ("uri", "model"),
    [
        ("datasets/flowers", "flowers"),
        ("s3://bucket/sets/Flowers_2024/", "flowers-2024"),
        ("s3://flowers", "flowers"),
        ("datasets/123-cats", "cats"),
        ("datasets/2024", "model"),
        ("datasets/___", "model"),
        ("datasets/" + "x" * 70, "x" * 63),
        ("datasets/" + "a" * 62 + "_b", "a" * 62),
    ],
)
def test_the_output_model_defaults_to_the_dataset_name_as_an_id(uri: str, model: str) -> None:
    assert model_id_from_uri(uri) == model
    assert validate_spec(_spec(dataset__uri=uri)).output_model == model


def test_an_explicit_output_model_must_be_a_valid_id() -> None:
    assert validate_spec(_spec(output_model="my-model-2")).output_model == "my-model-2"
    for bad in ("My-Model", "2fast", "a" * 64, "with space", "-x"):
        [violation] = _violations(_spec(output_model=bad))
        assert violation.field == "output_model"
        assert repr(bad) in violation.description


# -- fine-tuning: the LR rule, the epoch cap, unfreezing ---------------------------------------------------------


def test_the_fine_tuning_learning_rate_defaults_to_the_classifier_s_over_ten() -> None:
    assert validate_spec(_spec(classifier__learning_rate=0.01)).fine_tuning.stage.learning_rate == 0.001
    assert validate_spec(_spec(classifier__learning_rate=0.7)).fine_tuning.stage.learning_rate == 0.07


def test_the_fine_tuning_learning_rate_limit_and_its_override() -> None:
    # Exactly classifier / 10 passes although 0.7 / 10 is 0.06999999999999999 in binary.
    assert validate_spec(_spec(classifier__learning_rate=0.7, fine_tuning__stage__learning_rate=0.07))

    spec = _spec(classifier__learning_rate=0.01, fine_tuning__stage__learning_rate=0.002)
    [violation] = _violations(spec)
    assert violation == FieldViolation(
        "fine_tuning.stage.learning_rate",
        "must be <= classifier.learning_rate / 10 = 0.001 unless fine_tuning.override_learning_rate_limit, got 0.002",
    )

    spec.fine_tuning.override_learning_rate_limit = True
    assert validate_spec(spec).fine_tuning.stage.learning_rate == 0.002


def test_a_bad_classifier_learning_rate_does_not_make_the_fine_tuning_default_bad_too() -> None:
    assert [v.field for v in _violations(_spec(classifier__learning_rate=NAN))] == ["classifier.learning_rate"]
    fields = [v.field for v in _violations(_spec(classifier__learning_rate=20, fine_tuning__stage__learning_rate=1))]
    assert fields == ["classifier.learning_rate"]


def test_fine_tuning_epochs_are_capped_at_five_unless_long_fine_tuning_is_allowed() -> None:
    [violation] = _violations(_spec(fine_tuning__stage__epochs=6))
    assert violation == FieldViolation(
        "fine_tuning.stage.epochs", "must be in [1, 5] unless fine_tuning.allow_long_fine_tuning, got 6"
    )
    assert validate_spec(_spec(fine_tuning__stage__epochs=6, fine_tuning__allow_long_fine_tuning=True))


def test_fine_tuning_is_checked_even_when_disabled() -> None:
    assert not validate_spec(_spec()).fine_tuning.enabled
    [violation] = _violations(_spec(fine_tuning__enabled=False, fine_tuning__stage__batch_size=0))
    assert violation.field == "fine_tuning.stage.batch_size"


@pytest.mark.parametrize("architecture", list(Architecture))
def test_unfreeze_last_n_blocks_is_bounded_by_the_architecture(architecture: Architecture) -> None:
    number = pb.Architecture.Value(f"ARCHITECTURE_{architecture.name}")
    blocks = BLOCK_COUNTS[architecture]
    spec = _spec(model__architecture=number, fine_tuning__unfreeze__last_n_blocks=blocks)
    assert validate_spec(spec).fine_tuning.last_n_blocks == blocks

    spec.fine_tuning.unfreeze.last_n_blocks = blocks + 1
    [violation] = _violations(spec)
    assert violation == FieldViolation(
        "fine_tuning.unfreeze.last_n_blocks", f"must be in [1, {blocks}] for {architecture.value}, got {blocks + 1}"
    )


def test_block_counts() -> None:
    resnet = {a: 4 for a in Architecture if a.name.startswith("RESNET")}
    mobilenet = {
        Architecture.MOBILENET_V2: 18,
        Architecture.MOBILENET_V3_SMALL: 12,
        Architecture.MOBILENET_V3_LARGE: 16,
    }
    assert resnet | mobilenet == BLOCK_COUNTS


def test_block_counts_match_torchvision() -> None:
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):  # the module structure without allocating weights
        for architecture, blocks in BLOCK_COUNTS.items():
            model = models.get_model(architecture.value, weights=None)
            if architecture.name.startswith("RESNET"):
                found = sum(1 for name, _ in model.named_children() if name.startswith("layer"))
            else:
                found = len(model.features) - 1  # features[0] is the stem
            assert found == blocks, architecture


def test_unfreeze_all_is_the_default_and_all_false_is_refused() -> None:
    assert validate_spec(_spec()).fine_tuning.last_n_blocks is None
    assert validate_spec(_spec(fine_tuning__unfreeze__all=True)).fine_tuning.last_n_blocks is None
    [violation] = _violations(_spec(fine_tuning__unfreeze__all=False))
    assert violation.field == "fine_tuning.unfreeze.all"


def test_a_bad_architecture_is_not_reported_again_through_unfreeze() -> None:
    spec = _spec(model__architecture=77, fine_tuning__unfreeze__last_n_blocks=30)
    assert [v.field for v in _violations(spec)] == ["model.architecture"]


# -- optimizer and schedule defaults ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["classifier", "fine_tuning.stage"])
def test_adamw_defaults_to_weight_decay_001_and_the_others_to_zero(stage: str) -> None:
    adamw = validate_spec(_spec_with({f"{stage}.optimizer.type": pb.OPTIMIZER_TYPE_ADAMW}))
    assert _config_value(adamw, f"{stage}.optimizer.weight_decay") == 0.01
    explicit = validate_spec(
        _spec_with({f"{stage}.optimizer.type": pb.OPTIMIZER_TYPE_ADAMW, f"{stage}.optimizer.weight_decay": 0.0})
    )
    assert _config_value(explicit, f"{stage}.optimizer.weight_decay") == 0.0
    for other in (pb.OPTIMIZER_TYPE_SGD, pb.OPTIMIZER_TYPE_ADAM, pb.OPTIMIZER_TYPE_RMSPROP):
        config = validate_spec(_spec_with({f"{stage}.optimizer.type": other}))
        assert _config_value(config, f"{stage}.optimizer.weight_decay") == 0.0


def test_nesterov_needs_momentum_with_sgd() -> None:
    spec = _spec(classifier__optimizer__type=pb.OPTIMIZER_TYPE_SGD, classifier__optimizer__nesterov=True)
    assert validate_spec(spec).classifier.optimizer.nesterov
    spec.classifier.optimizer.momentum = 0
    [violation] = _violations(spec)
    assert violation.field == "classifier.optimizer.nesterov"
    spec.classifier.optimizer.type = pb.OPTIMIZER_TYPE_ADAM  # nesterov is SGD-only: ignored elsewhere
    assert validate_spec(spec)


@pytest.mark.parametrize("kind", [pb.SCHEDULE_TYPE_ONE_CYCLE, pb.SCHEDULE_TYPE_CYCLIC])
def test_the_peak_learning_rate_defaults_to_ten_times_the_learning_rate(kind: int) -> None:
    config = validate_spec(_spec(classifier__schedule__type=kind, classifier__learning_rate=0.002))
    assert config.classifier.schedule.max_learning_rate == 0.02
    assert config.classifier.peak_learning_rate == 0.02
    assert config.fine_tuning.stage.schedule.max_learning_rate is None  # the fine-tuning stage is CONSTANT


def test_schedules_without_a_peak_keep_max_learning_rate_unset() -> None:
    config = validate_spec(_spec(classifier__schedule__type=pb.SCHEDULE_TYPE_COSINE))
    assert config.classifier.schedule.max_learning_rate is None


# -- config_to_spec ---------------------------------------------------------------------------------------------

DEFAULT_CONFIG = TrainingConfig(dataset=DatasetConfig(uri=DATASET), output_model="flowers")

NON_DEFAULT_CONFIG = TrainingConfig(
    dataset=DatasetConfig(
        uri="s3://data/sets/cats",
        validation_uri="s3://data/sets/cats-val",
        test_uri="datasets/cats-test",
        unknown_uri="datasets/dogs",
        validation_split=0.25,
        image_size=160,
        class_balancing=ClassBalancing.WEIGHTED_SAMPLER,
        cache_max_mb=512,
    ),
    output_model="cats-v2",
    augmentation=AugmentationConfig(
        horizontal_flip=True,
        vertical_flip=True,
        rotation_degrees=15.0,
        zoom_min_scale=0.5,
        zoom_max_scale=0.9,
        brightness=0.2,
        contrast=0.3,
        saturation=0.4,
        hue=0.05,
        shear_degrees=10.0,
        gaussian_noise_std=0.1,
        copies_per_original=2,
    ),
    model=ModelConfig(
        architecture=Architecture.RESNET50,
        weights=WeightsSource.URI,
        weights_uri="s3://weights/resnet50.pt",
        weights_sha256="0123456789abcdef" * 4,
        classifier_dim=512,
        dropout=0.25,
        activation=Activation.GELU,
    ),
    classifier=StageConfig(
        epochs=20,
        learning_rate=0.01,
        batch_size=64,
        optimizer=OptimizerConfig(
            type=OptimizerType.SGD, momentum=0.8, nesterov=True, weight_decay=0.0005, beta1=0.85, beta2=0.99
        ),
        schedule=ScheduleConfig(
            type=ScheduleType.ONE_CYCLE,
            warmup_epochs=1.5,
            step_epochs=5,
            gamma=0.5,
            min_learning_rate=0.0001,
            max_learning_rate=0.05,
            cycle_epochs=4.0,
            restart_epochs=3,
            restart_multiplier=2,
            plateau_patience=4,
        ),
        early_stopping=EarlyStoppingConfig(
            enabled=True, monitor=Metric.VALIDATION_ACCURACY, patience=5, min_delta=0.001, restore_best_weights=False
        ),
        label_smoothing=0.1,
        gradient_clip_norm=5.0,
    ),
    fine_tuning=FineTuningConfig(
        enabled=True,
        stage=StageConfig(
            epochs=8,
            learning_rate=0.002,
            batch_size=16,  # above both limits: config_to_spec lifts them
            optimizer=OptimizerConfig(
                type=OptimizerType.ADAMW, momentum=0.5, nesterov=True, weight_decay=0.05, beta1=0.8, beta2=0.95
            ),
            schedule=ScheduleConfig(
                type=ScheduleType.SGDR,
                warmup_epochs=0.5,
                step_epochs=2,
                gamma=0.2,
                min_learning_rate=0.00001,
                max_learning_rate=0.004,
                cycle_epochs=3.0,
                restart_epochs=4,
                restart_multiplier=3,
                plateau_patience=1,
            ),
            early_stopping=EarlyStoppingConfig(
                enabled=True, monitor=Metric.TRAIN_LOSS, patience=2, min_delta=0.01, restore_best_weights=False
            ),
            label_smoothing=0.05,
            gradient_clip_norm=1.0,
        ),
        last_n_blocks=2,
    ),
    open_set=OpenSetConfig(score=OpenSetScore.ENERGY, target_true_positive_rate=0.9),
    run=RunConfig(
        seed=42,
        repeats=3,
        precision=Precision.AMP_BF16,
        device=DeviceKind.CUDA,
        data_loader_workers=4,
        max_retries=5,
        devices=2,
        deterministic=True,
    ),
)


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _leaves(getattr(value, f.name), f"{path}{f.name}.")
    else:
        yield path.rstrip("."), value


def test_the_non_default_config_differs_from_the_default_everywhere() -> None:
    same = [p for (p, a), (_, b) in zip(_leaves(NON_DEFAULT_CONFIG), _leaves(DEFAULT_CONFIG), strict=True) if a == b]
    assert same == []


@pytest.mark.parametrize("config", [DEFAULT_CONFIG, NON_DEFAULT_CONFIG], ids=["default", "non-default"])
def test_config_to_spec_round_trips(config: TrainingConfig) -> None:
    spec = config_to_spec(config)
    assert validate_spec(spec) == config
    # The resolved spec travels as bytes and JSON (the job store): it must survive serialisation too.
    assert validate_spec(pb.TrainingSpec.FromString(spec.SerializeToString())) == config
    assert validate_spec(json_format.Parse(json_format.MessageToJson(spec), pb.TrainingSpec())) == config


def _unset_presence_fields(message: Message, prefix: str = "") -> Iterator[str]:
    for field in message.DESCRIPTOR.fields:
        path = f"{prefix}{field.name}"
        in_real_oneof = field.containing_oneof is not None and not field.containing_oneof.name.startswith("_")
        if field.has_presence and not in_real_oneof and not message.HasField(field.name):
            yield path
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            yield from _unset_presence_fields(getattr(message, field.name), f"{path}.")
    for oneof in message.DESCRIPTOR.oneofs:
        if not oneof.name.startswith("_") and message.WhichOneof(oneof.name) is None:
            yield f"{prefix}{oneof.name}"


def test_config_to_spec_sets_every_field_explicitly() -> None:
    assert list(_unset_presence_fields(config_to_spec(NON_DEFAULT_CONFIG))) == []
    # Only a schedule without a peak has nothing to say for max_learning_rate.
    assert list(_unset_presence_fields(config_to_spec(DEFAULT_CONFIG))) == [
        "classifier.schedule.max_learning_rate",
        "fine_tuning.stage.schedule.max_learning_rate",
    ]


def test_config_to_spec_lifts_exactly_the_fine_tuning_limits_the_values_need() -> None:
    lifted = config_to_spec(NON_DEFAULT_CONFIG).fine_tuning
    assert (lifted.override_learning_rate_limit, lifted.allow_long_fine_tuning) == (True, True)
    kept = config_to_spec(DEFAULT_CONFIG).fine_tuning
    assert (kept.override_learning_rate_limit, kept.allow_long_fine_tuning) == (False, False)


def _known_enum_values() -> Iterator[tuple[str, int]]:
    for path in ENUM_PATHS:
        parent, _, name = path.rpartition(".")
        for value in _get(pb.TrainingSpec(), parent).DESCRIPTOR.fields_by_name[name].enum_type.values:
            if value.number != 0:
                yield path, value.number


@pytest.mark.parametrize(("path", "number"), list(_known_enum_values()))
def test_every_known_enum_value_maps_and_maps_back(path: str, number: int) -> None:
    setup = {"model.weights_uri": "s3://w/a.pt"} if (path, number) == ("model.weights", pb.WEIGHTS_SOURCE_URI) else {}
    config = validate_spec(_spec_with({**setup, path: number}))
    assert _get(config_to_spec(config), path) == number


def test_automatic_precision_is_written_back_as_unspecified() -> None:
    assert config_to_spec(DEFAULT_CONFIG).run.precision == pb.PRECISION_UNSPECIFIED
    assert config_to_spec(DEFAULT_CONFIG).run.device == pb.DEVICE_AUTO


# -- the stored spec, and the proto as the one source of defaults -------------------------------------------------


def test_a_stored_spec_reads_back_to_its_config() -> None:
    stored = load_stored_spec(json_format.MessageToJson(config_to_spec(NON_DEFAULT_CONFIG), indent=None))
    assert stored.config == NON_DEFAULT_CONFIG
    assert stored.spec == config_to_spec(NON_DEFAULT_CONFIG)


def test_a_stored_spec_the_trainer_cannot_read_is_not_retried(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        bad, _ = jobs.create_job("bad", json_format.MessageToJson(pb.TrainingSpec(run=pb.RunSpec(max_retries=5))))
        good, _ = jobs.create_job("good", json_format.MessageToJson(config_to_spec(NON_DEFAULT_CONFIG)))
        assert max_retries_of(jobs.get_job(bad.job_id)) == 0  # no dataset.uri: its worker fails the same way
        assert max_retries_of(jobs.get_job(good.job_id)) == NON_DEFAULT_CONFIG.run.max_retries
    with pytest.raises(SpecInvalid):
        load_stored_spec(json_format.MessageToJson(pb.TrainingSpec()))


def test_a_required_field_left_empty_is_the_only_violation_of_an_empty_spec() -> None:
    required = [
        f"dataset.{f.name}" for f in pb.DatasetSpec.DESCRIPTOR.fields if protoreflect.field_behavior(f) == ("REQUIRED",)
    ]
    assert [v.field for v in _violations(pb.TrainingSpec())] == required == ["dataset.uri"]


def test_the_config_defaults_are_the_proto_s_field_rules() -> None:
    spec = pb.TrainingSpec.DESCRIPTOR
    assert StageConfig().epochs == protoreflect.field_default(spec, "classifier.epochs")
    assert FineTuningConfig().stage.epochs == protoreflect.field_default(spec, "fine_tuning.stage.epochs")
    assert ModelConfig().classifier_dim == protoreflect.field_default(spec, "model.classifier_dim")
    assert FineTuningConfig().stage.learning_rate == pytest.approx(StageConfig().learning_rate / FINE_TUNING_LR_DIVISOR)
    assert DEFAULT_CONFIG.classifier == StageConfig()
