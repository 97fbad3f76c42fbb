"""Tests of the tuning search space: `validate_study`, `apply_params`, the Optuna wiring (no training, no servers).

One module because the three are one path (a StudySpec validated, its parameters sampled, applied to a spec) and
the tests share its fixtures; sections follow that order.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
from google.protobuf.duration_pb2 import Duration
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import HyperbandPruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import CmaEsSampler, GPSampler, GridSampler, RandomSampler, TPESampler
from trainer_service.jobs.store import JobStore
from trainer_service.spec.config import Architecture, Metric
from trainer_service.spec.validate import validate_spec
from trainer_service.tuning.optuna_setup import (
    DIRECTION_ATTR,
    METRIC_ATTR,
    create_study,
    load_study,
    make_pruner,
    make_sampler,
    open_storage,
    storage_url,
)
from trainer_service.tuning.space import (
    ParameterConfig,
    ParameterKind,
    apply_params,
    distributions,
    field_at,
    grid_search_space,
    param_string,
    step_divides,
    suggest,
)
from trainer_service.tuning.study_config import (
    Direction,
    PrunerConfig,
    PrunerType,
    SamplerType,
    SpecInvalid,
    StudyConfig,
    validate_study,
)
from visiontune.v1 import study_pb2 as st
from visiontune.v1 import training_spec_pb2 as pb

BUCKET = "visiontune"
DATASET = "datasets/flowers"

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- helpers ----------------------------------------------------------------------------------------------------


def _base(**stage: Any) -> pb.TrainingSpec:
    return pb.TrainingSpec(dataset=pb.DatasetSpec(uri=DATASET), classifier=pb.StageSpec(**stage))


def _float(path: str, lo: float, hi: float, *, log: bool = False, step: float = 0.0) -> st.SearchParameter:
    return st.SearchParameter(path=path, float_range=st.FloatRange(min=lo, max=hi, log=log, step=step))


def _int(path: str, lo: int, hi: int, *, log: bool = False, step: int = 0) -> st.SearchParameter:
    return st.SearchParameter(path=path, int_range=st.IntRange(min=lo, max=hi, log=log, step=step))


def _cat(path: str, *values: str) -> st.SearchParameter:
    return st.SearchParameter(path=path, categorical=st.Categorical(values=values))


def _study(*parameters: st.SearchParameter, base: pb.TrainingSpec | None = None, **fields: Any) -> st.StudySpec:
    fields.setdefault("budget", st.StudyBudget(max_trials=10))
    return st.StudySpec(base_spec=base if base is not None else _base(), parameters=parameters, **fields)


def _valid(spec: st.StudySpec) -> StudyConfig:
    return validate_study(spec, default_bucket=BUCKET)


def _violations(spec: st.StudySpec) -> dict[str, str]:
    with pytest.raises(SpecInvalid) as caught:
        validate_study(spec, default_bucket=BUCKET)
    found = {v.field: v.description for v in caught.value.violations}
    assert len(found) == len(caught.value.violations), "one violation per field"
    return found


LR = _float("classifier.learning_rate", 1e-5, 1e-1, log=True)


# -- field_at ---------------------------------------------------------------------------------------------------


def test_field_at_finds_scalar_leaves() -> None:
    assert field_at("classifier.learning_rate").name == "learning_rate"
    assert field_at("fine_tuning.stage.optimizer.momentum").full_name == "visiontune.v1.OptimizerSpec.momentum"
    assert field_at("model.architecture").enum_type is pb.Architecture.DESCRIPTOR
    assert field_at("augmentation.horizontal_flip").name == "horizontal_flip"
    assert field_at("fine_tuning.unfreeze.last_n_blocks").containing_oneof is not None


@pytest.mark.parametrize(
    ("path", "error", "words"),
    [
        ("lr", KeyError, "TrainingSpec (TrainingSpec) has no field 'lr'; its fields are dataset, augmentation"),
        ("classifier.lr", KeyError, "classifier (StageSpec) has no field 'lr'; its fields are epochs, learning_rate"),
        ("", KeyError, "has no field ''"),
        ("classifier", ValueError, "classifier is a message (StageSpec); name one of its fields"),
        ("classifier.optimizer", ValueError, "is a message (OptimizerSpec)"),
        ("dataset.uri", ValueError, "dataset.uri is a string field"),
        ("output_model", ValueError, "output_model is a string field"),
        ("classifier.epochs.value", ValueError, "classifier.epochs is not a message, so it has no field 'value'"),
    ],
)
def test_field_at_refuses_what_cannot_be_searched(path: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as caught:
        field_at(path)
    assert words in str(caught.value.args[0])


# -- apply_params -----------------------------------------------------------------------------------------------


def test_apply_params_sets_every_kind_of_leaf_on_a_copy() -> None:
    base = _base(epochs=4)
    spec = apply_params(
        base,
        {
            "classifier.learning_rate": 0.01,  # float, nested
            "classifier.batch_size": 64,  # int
            "model.classifier_dim": "512",  # int from its string (a categorical value)
            "dataset.image_size": 160.0,  # int from a whole float
            "model.architecture": "ARCHITECTURE_RESNET18",  # enum by name
            "model.activation": int(pb.ACTIVATION_GELU),  # enum by number
            "augmentation.horizontal_flip": True,  # bool
            "augmentation.vertical_flip": "true",  # bool from its string
            "model.dropout": "0.25",  # float from its string
            "run.seed": 2**63,  # uint64 beyond int64
        },
    )
    assert spec.classifier.learning_rate == pytest.approx(0.01)
    assert spec.classifier.epochs == 4  # untouched fields keep the base's values
    assert (spec.classifier.batch_size, spec.model.classifier_dim, spec.dataset.image_size) == (64, 512, 160)
    assert (spec.model.architecture, spec.model.activation) == (pb.ARCHITECTURE_RESNET18, pb.ACTIVATION_GELU)
    assert spec.augmentation.horizontal_flip
    assert spec.augmentation.vertical_flip
    assert spec.model.dropout == pytest.approx(0.25)
    assert spec.run.seed == 2**63
    assert base == _base(epochs=4), "the base spec is not modified"
    config = validate_spec(spec, default_bucket=BUCKET)
    assert config.model.architecture is Architecture.RESNET18
    assert config.classifier.learning_rate == 0.01


def test_apply_params_reaches_into_unset_messages_with_presence() -> None:
    base = _base()
    assert not base.HasField("fine_tuning")
    spec = apply_params(
        base, {"fine_tuning.stage.epochs": 3, "fine_tuning.enabled": "false", "fine_tuning.unfreeze.last_n_blocks": 2}
    )
    assert spec.HasField("fine_tuning")
    assert spec.fine_tuning.HasField("stage")
    assert spec.fine_tuning.stage.HasField("epochs")
    assert spec.fine_tuning.stage.epochs == 3
    assert spec.fine_tuning.unfreeze.WhichOneof("which") == "last_n_blocks"
    assert not base.HasField("fine_tuning")
    assert validate_spec(spec, default_bucket=BUCKET).fine_tuning.stage.epochs == 3


def test_apply_params_false_and_zero_are_set_not_skipped() -> None:
    base = pb.TrainingSpec(
        dataset=pb.DatasetSpec(uri=DATASET),
        augmentation=pb.AugmentationSpec(horizontal_flip=True),
        model=pb.ModelSpec(dropout=0.5),
    )
    spec = apply_params(base, {"augmentation.horizontal_flip": False, "model.dropout": 0.0})
    assert not spec.augmentation.horizontal_flip
    assert spec.model.HasField("dropout")
    assert spec.model.dropout == 0.0


@pytest.mark.parametrize(
    ("path", "value", "error", "words"),
    [
        ("model.architecture", "RESNET18", ValueError, "'RESNET18' is not a value of Architecture"),
        ("model.architecture", 99, ValueError, "99 is not a value of Architecture"),
        ("model.architecture", 1.0, TypeError, "an enum takes a value name or number"),
        ("augmentation.horizontal_flip", "yes", ValueError, "a bool takes"),
        ("augmentation.horizontal_flip", "True", ValueError, "a bool takes"),
        ("augmentation.horizontal_flip", 1, ValueError, "a bool takes"),
        ("classifier.batch_size", 2.5, ValueError, "an integer field does not take 2.5"),
        ("classifier.batch_size", "2.5", ValueError, "'2.5' is not a whole number"),
        ("classifier.batch_size", True, TypeError, "does not take a bool"),
        ("classifier.epochs", 2**40, ValueError, "out of the field's range [-2147483648, 2147483647]"),
        ("run.seed", -1, ValueError, "out of the field's range [0, 18446744073709551615]"),
        ("model.dropout", "nan", ValueError, "must be finite"),
        ("model.dropout", "abc", ValueError, "'abc' is not a number"),
        ("model.dropout", 1e300, ValueError, "out of the float32 range"),
        ("classifier.lr", 1, KeyError, "has no field 'lr'"),
        ("dataset.uri", "x", ValueError, "string field"),
    ],
)
def test_apply_params_refuses_bad_values(path: str, value: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as caught:
        apply_params(_base(), {path: value})
    message = str(caught.value.args[0])
    assert words in message
    assert path in message or error is KeyError  # an unknown field is named inside its message instead


# -- validate_study: valid studies --------------------------------------------------------------------------------


def test_defaults_resolve() -> None:
    spec = _study(LR, seed=7)
    config = _valid(spec)
    assert config.base == validate_spec(spec.base_spec, default_bucket=BUCKET)
    assert config.base_spec == spec.base_spec
    assert config.parameters == (
        ParameterConfig("classifier.learning_rate", ParameterKind.FLOAT, low=1e-5, high=0.1, log=True, step=None),
    )
    assert (config.metric, config.direction) == (Metric.VALIDATION_ACCURACY, Direction.MAXIMIZE)
    assert (config.max_trials, config.max_duration_s, config.parallelism) == (10, None, 1)
    assert config.sampler is SamplerType.TPE
    assert config.pruner == PrunerConfig(type=PrunerType.NONE, min_resource=1, reduction_factor=3, startup_trials=5)
    assert (config.repeat_top_k, config.repeat_count, config.seed) == (0, 0, 7)
    assert (config.min_trial_epochs, config.max_trial_epochs) == (10, 10)
    spec.base_spec.classifier.epochs = 99  # a later change to the request does not reach the config
    assert not config.base_spec.classifier.HasField("epochs")


def test_every_domain_kind_resolves() -> None:
    config = _valid(
        _study(
            _float("model.dropout", 0.1, 0.5, step=0.1),
            _int("classifier.batch_size", 16, 128, step=16),
            _int("model.classifier_dim", 64, 1024, log=True),
            _int("classifier.epochs", 2, 8),
            _cat("model.architecture", "ARCHITECTURE_RESNET18", "ARCHITECTURE_MOBILENET_V2"),
            _cat("augmentation.horizontal_flip", "true", "false"),
            _cat("classifier.label_smoothing", "0", "0.1"),
        )
    )
    assert [(p.path, p.kind) for p in config.parameters] == [
        ("model.dropout", ParameterKind.FLOAT),
        ("classifier.batch_size", ParameterKind.INT),
        ("model.classifier_dim", ParameterKind.INT),
        ("classifier.epochs", ParameterKind.INT),
        ("model.architecture", ParameterKind.CATEGORICAL),
        ("augmentation.horizontal_flip", ParameterKind.CATEGORICAL),
        ("classifier.label_smoothing", ParameterKind.CATEGORICAL),
    ]
    dropout, batch, dim, epochs, arch, *_ = config.parameters
    assert (dropout.low, dropout.high, dropout.step, dropout.log) == (0.1, 0.5, 0.1, False)
    assert (batch.low, batch.high, batch.step) == (16, 128, 16)
    assert (dim.log, dim.step) == (True, 1)  # the proto's "Default 1"
    assert (epochs.step, config.min_trial_epochs, config.max_trial_epochs) == (1, 2, 8)
    assert arch.choices == ("ARCHITECTURE_RESNET18", "ARCHITECTURE_MOBILENET_V2")


def test_objective_budget_and_repeats() -> None:
    loss = _valid(_study(LR, objective=st.Objective(metric=pb.METRIC_VALIDATION_LOSS)))
    assert (loss.metric, loss.direction) == (Metric.VALIDATION_LOSS, Direction.MINIMIZE)
    # An explicit direction against the metric is the client's call.
    odd = _valid(_study(LR, objective=st.Objective(metric=pb.METRIC_TRAIN_ACCURACY, direction=st.DIRECTION_MINIMIZE)))
    assert (odd.metric, odd.direction) == (Metric.TRAIN_ACCURACY, Direction.MINIMIZE)
    timed = _valid(_study(LR, budget=st.StudyBudget(max_duration=Duration(seconds=90, nanos=500_000_000))))
    assert (timed.max_trials, timed.max_duration_s) == (0, 90.5)
    repeated = _valid(_study(LR, repeat_top_k=2, parallelism=4))
    assert (repeated.repeat_top_k, repeated.repeat_count, repeated.parallelism) == (2, 3, 4)
    assert _valid(_study(LR, repeat_top_k=1, repeat_count=20)).repeat_count == 20


def test_trial_epochs_span_the_fine_tuning_choices() -> None:
    config = _valid(
        _study(
            _int("fine_tuning.stage.epochs", 1, 5),
            _cat("fine_tuning.enabled", "true", "false"),
            base=_base(epochs=4),
        )
    )
    assert (config.min_trial_epochs, config.max_trial_epochs) == (4, 9)
    always = pb.TrainingSpec(
        dataset=pb.DatasetSpec(uri=DATASET),
        classifier=pb.StageSpec(epochs=4),
        fine_tuning=pb.FineTuningSpec(enabled=True, stage=pb.StageSpec(epochs=2)),
    )
    config = _valid(_study(_cat("classifier.epochs", "3", "6"), base=always))
    assert (config.min_trial_epochs, config.max_trial_epochs) == (5, 8)


# -- validate_study: every violation ------------------------------------------------------------------------------


def test_every_violation_is_listed_at_its_field() -> None:
    spec = _study(
        _cat("classifier.lr", "1"),  # 0: no such field
        _cat("classifier.optimizer", "x"),  # 1: a message
        _cat("dataset.uri", "s3://b/x"),  # 2: a string
        _int("augmentation.hue", 0, 1),  # 3: int_range on a float field
        _float("model.dropout", 0.5, 0.5),  # 4: min >= max
        _float("augmentation.rotation_degrees", 0, 10, log=True),  # 5: log with min <= 0
        _float("classifier.learning_rate", 1e-4, 100),  # 6: max outside (0, 10]
        _int("classifier.batch_size", 0, 64),  # 7: min outside [1, 4096]
        _cat("model.architecture", "RESNET18", "ARCHITECTURE_UNSPECIFIED", "ARCHITECTURE_RESNET50"),  # 8
        _int("classifier.batch_size", 8, 16),  # 9: duplicate path
        budget=st.StudyBudget(max_trials=0),
        parallelism=0,
        repeat_top_k=11,
        repeat_count=1,
        pruner=st.PrunerSpec(reduction_factor=1, startup_trials=-1),
    )
    found = _violations(spec)
    assert sorted(found) == sorted(
        [
            "spec.parameters[0].path",
            "spec.parameters[1].path",
            "spec.parameters[2].path",
            "spec.parameters[3].int_range",
            "spec.parameters[4].float_range.max",
            "spec.parameters[5].float_range.min",
            "spec.parameters[6].float_range.max",
            "spec.parameters[7].int_range.min",
            "spec.parameters[8].categorical.values[0]",
            "spec.parameters[8].categorical.values[1]",
            "spec.parameters[9].path",
            "spec.budget.max_trials",
            "spec.parallelism",
            "spec.repeat_top_k",
            "spec.repeat_count",
            "spec.pruner.reduction_factor",
            "spec.pruner.startup_trials",
        ]
    )
    assert "has no field 'lr'" in found["spec.parameters[0].path"]
    assert "is a message (OptimizerSpec)" in found["spec.parameters[1].path"]
    assert "string field" in found["spec.parameters[2].path"]
    assert found["spec.parameters[3].int_range"] == (
        "does not fit augmentation.hue, a float field: use float_range or categorical"
    )
    assert found["spec.parameters[4].float_range.max"] == "must be greater than min (0.5), got 0.5"
    assert found["spec.parameters[5].float_range.min"] == "must be > 0 with log, got 0.0"
    assert found["spec.parameters[6].float_range.max"] == "classifier.learning_rate must be in (0, 10], got 100"
    assert found["spec.parameters[7].int_range.min"] == "classifier.batch_size must be in [1, 4096], got 0"
    assert "'RESNET18' is not a value of Architecture" in found["spec.parameters[8].categorical.values[0]"]
    assert found["spec.parameters[8].categorical.values[1]"] == (
        "must name a concrete Architecture value, got ARCHITECTURE_UNSPECIFIED"
    )
    assert found["spec.parameters[9].path"] == "duplicates spec.parameters[7].path (classifier.batch_size)"
    assert "needs spec.budget.max_duration" in found["spec.budget.max_trials"]
    assert found["spec.parallelism"] == "must be in [1, 64], got 0"
    assert found["spec.repeat_top_k"] == "must be in [0, 10], got 11"
    assert found["spec.repeat_count"] == "must be in [2, 20], got 1"
    assert found["spec.pruner.reduction_factor"] == "must be in [2, 10], got 1"


def test_no_parameters() -> None:
    assert _violations(_study()) == {
        "spec.parameters": "needs at least one parameter: a TrainingSpec field path and its domain"
    }


def test_base_spec_violations_are_prefixed() -> None:
    found = _violations(_study(LR, base=pb.TrainingSpec(classifier=pb.StageSpec(batch_size=0))))
    assert set(found) == {"spec.base_spec.dataset.uri", "spec.base_spec.classifier.batch_size"}
    assert found["spec.base_spec.classifier.batch_size"] == "must be in [1, 4096], got 0"


@pytest.mark.parametrize(
    ("parameter", "field", "words"),
    [
        (st.SearchParameter(path="model.dropout"), "spec.parameters[0].domain", "is required"),
        (_float("", 0, 1), "spec.parameters[0].path", "is required"),
        (_float("model.dropout", 0, math.nan), "spec.parameters[0].float_range.max", "must be finite"),
        (_float("model.dropout", 0, 0.5, step=-0.1), "spec.parameters[0].float_range.step", "must be >= 0"),
        (_float("model.dropout", 0.1, 0.5, step=0.15), "spec.parameters[0].float_range.step", "must divide"),
        (
            _float("classifier.learning_rate", 1e-4, 1e-2, log=True, step=1e-4),
            "spec.parameters[0].float_range.step",
            "must be 0 with log",
        ),
        (_int("classifier.batch_size", 8, 64, step=10), "spec.parameters[0].int_range.step", "must divide"),
        (_int("classifier.batch_size", 8, 64, step=-8), "spec.parameters[0].int_range.step", "must be >= 1"),
        (
            _int("classifier.batch_size", 8, 64, log=True, step=8),
            "spec.parameters[0].int_range.step",
            "must be 0 or 1 with log",
        ),
        (_int("classifier.batch_size", 0, 64, log=True), "spec.parameters[0].int_range.min", "must be > 0 with log"),
        (_int("classifier.batch_size", 64, 8), "spec.parameters[0].int_range.max", "must be greater than min (64)"),
        (_int("classifier.epochs", 1, 2**40), "spec.parameters[0].int_range.max", "out of the field's range"),
        (
            _float("augmentation.horizontal_flip", 0, 1),
            "spec.parameters[0].float_range",
            "a bool field: use categorical",
        ),
        (_int("model.architecture", 1, 3), "spec.parameters[0].int_range", "an enum field: use categorical"),
        (_float("classifier.epochs", 1, 3), "spec.parameters[0].float_range", "an integer field"),
        (_cat("model.dropout"), "spec.parameters[0].categorical.values", "needs at least one value"),
        (
            _cat("augmentation.horizontal_flip", "true", "True"),
            "spec.parameters[0].categorical.values[1]",
            "a bool takes",
        ),
        (
            _cat("augmentation.horizontal_flip", "true", "true"),
            "spec.parameters[0].categorical.values[1]",
            "duplicates values[0] (true)",
        ),
        (
            _cat("classifier.batch_size", "32", "2.5"),
            "spec.parameters[0].categorical.values[1]",
            "'2.5' is not a whole number",
        ),
        (_cat("model.dropout", "0.1", "x"), "spec.parameters[0].categorical.values[1]", "'x' is not a number"),
        (
            _cat("model.dropout", "0.1", "0.99"),
            "spec.parameters[0].categorical.values[1]",
            "model.dropout must be in [0, 0.95], got 0.99",
        ),
        # The field's own range, with the rule's own wording (fine-tuning is capped at 5 epochs by default).
        (
            _int("fine_tuning.stage.epochs", 1, 10),
            "spec.parameters[0].int_range.max",
            "fine_tuning.stage.epochs must be in [1, 5] unless fine_tuning.allow_long_fine_tuning, got 10",
        ),
        (
            _cat("fine_tuning.unfreeze.all", "true", "false"),
            "spec.parameters[0].categorical.values[1]",
            "must be true when set",
        ),
    ],
)
def test_one_bad_parameter(parameter: st.SearchParameter, field: str, words: str) -> None:
    found = _violations(_study(parameter))
    assert list(found) == [field]
    assert words in found[field]


def test_bounds_that_break_another_field_are_refused_on_the_bound() -> None:
    base = _base()
    base.classifier.schedule.min_learning_rate = 1e-4
    found = _violations(_study(_float("classifier.learning_rate", 1e-5, 1e-2, log=True), base=base))
    assert list(found) == ["spec.parameters[0].float_range.min"]
    assert found["spec.parameters[0].float_range.min"].startswith(
        "with classifier.learning_rate = 1e-05, classifier.schedule.min_learning_rate must be in [0, 1e-05)"
    )
    # A clash with another *searched* field is decided per trial, not refused up front.
    both = _study(
        _float("classifier.learning_rate", 1e-5, 1e-2, log=True),
        _float("classifier.schedule.min_learning_rate", 0, 1e-6),
        base=base,
    )
    assert len(_valid(both).parameters) == 2


def test_objective_sampler_and_budget_enums_and_ranges() -> None:
    found = _violations(
        _study(
            LR,
            objective=st.Objective(metric=99, direction=7),  # type: ignore[arg-type]
            sampler=42,
            pruner=st.PrunerSpec(type=9, min_resource=0),  # type: ignore[arg-type]
            budget=st.StudyBudget(max_trials=10_001, max_duration=Duration(seconds=-5)),
        )
    )
    assert sorted(found) == [
        "spec.budget.max_duration",
        "spec.budget.max_trials",
        "spec.objective.direction",
        "spec.objective.metric",
        "spec.pruner.min_resource",
        "spec.pruner.type",
        "spec.sampler",
    ]
    assert found["spec.sampler"].startswith("must be one of SAMPLER_TPE, SAMPLER_GAUSSIAN_PROCESS")
    assert found["spec.budget.max_trials"] == "must be in [0, 10000], got 10001"
    assert found["spec.budget.max_duration"] == "must be > 0, got -5s"


def test_grid_needs_finitely_many_values() -> None:
    found = _violations(
        _study(
            _float("model.dropout", 0.1, 0.5),  # continuous
            _float("classifier.learning_rate", 1e-4, 1e-2, log=True),  # continuous (log)
            _int("classifier.batch_size", 16, 64, step=16),
            sampler=st.SAMPLER_GRID,
        )
    )
    assert sorted(found) == ["spec.parameters[0].float_range.step", "spec.parameters[1].float_range.step"]
    assert "must be > 0 with SAMPLER_GRID" in found["spec.parameters[0].float_range.step"]
    huge = _violations(_study(_float("model.dropout", 0.0, 0.9, step=1e-6), sampler=st.SAMPLER_GRID))
    assert "the grid has 900001 points, at most 100000" in huge["spec.sampler"]


def test_pruner_min_resource_must_fit_in_a_trial() -> None:
    hyperband = st.PrunerSpec(type=st.PRUNER_TYPE_HYPERBAND, min_resource=4)
    found = _violations(_study(LR, base=_base(epochs=3), pruner=hyperband))
    assert found == {
        "spec.pruner.min_resource": (
            "must be <= 3, the fewest epochs a trial trains (classifier.epochs, plus fine_tuning.stage.epochs when "
            "fine-tuning is on), got 4"
        )
    }
    # Searched epochs: the fewest a trial can train is what counts.
    assert (
        "must be <= 2"
        in _violations(_study(_int("classifier.epochs", 2, 10), pruner=hyperband))["spec.pruner.min_resource"]
    )
    with_fine_tuning = _base(epochs=3)
    with_fine_tuning.fine_tuning.enabled = True
    with_fine_tuning.fine_tuning.stage.epochs = 2
    config = _valid(_study(LR, base=with_fine_tuning, pruner=hyperband))
    assert (config.pruner.min_resource, config.min_trial_epochs, config.max_trial_epochs) == (4, 5, 5)
    # No pruner, no resource to fit.
    assert _valid(_study(LR, base=_base(epochs=3), pruner=st.PrunerSpec(min_resource=50))).pruner.min_resource == 50


# -- Optuna: distributions, suggestions, samplers, pruners --------------------------------------------------------


MIXED = (
    _float("classifier.learning_rate", 1e-4, 1e-1, log=True),
    _float("model.dropout", 0.1, 0.3, step=0.1),
    _int("classifier.batch_size", 16, 64, step=16),
    _int("fine_tuning.stage.epochs", 1, 3),
    _cat("model.architecture", "ARCHITECTURE_RESNET18", "ARCHITECTURE_MOBILENET_V3_SMALL"),
    _cat("augmentation.horizontal_flip", "true", "false"),
)


def test_distributions() -> None:
    config = _valid(_study(*MIXED))
    assert distributions(config) == {
        "classifier.learning_rate": FloatDistribution(1e-4, 1e-1, log=True),
        "model.dropout": FloatDistribution(0.1, 0.3, step=0.1),
        "classifier.batch_size": IntDistribution(16, 64, step=16),
        "fine_tuning.stage.epochs": IntDistribution(1, 3),
        "model.architecture": CategoricalDistribution(["ARCHITECTURE_RESNET18", "ARCHITECTURE_MOBILENET_V3_SMALL"]),
        "augmentation.horizontal_flip": CategoricalDistribution(["true", "false"]),
    }


def test_grid_search_space_enumerates_decimal_steps() -> None:
    config = _valid(_study(*MIXED[1:], _float("augmentation.hue", 0.0, 0.3, step=0.1), sampler=st.SAMPLER_GRID))
    assert grid_search_space(config) == {
        "model.dropout": [0.1, 0.2, 0.3],  # not 0.30000000000000004
        "classifier.batch_size": [16, 32, 48, 64],
        "fine_tuning.stage.epochs": [1, 2, 3],
        "model.architecture": ["ARCHITECTURE_RESNET18", "ARCHITECTURE_MOBILENET_V3_SMALL"],
        "augmentation.horizontal_flip": ["true", "false"],
        "augmentation.hue": [0.0, 0.1, 0.2, 0.3],
    }
    continuous = _valid(_study(LR))
    with pytest.raises(ValueError, match="no grid"):
        grid_search_space(continuous)


def test_suggest_with_a_fixed_trial() -> None:
    config = _valid(_study(*MIXED))
    fixed = {
        "classifier.learning_rate": 0.001,
        "model.dropout": 0.2,
        "classifier.batch_size": 32,
        "fine_tuning.stage.epochs": 2,
        "model.architecture": "ARCHITECTURE_RESNET18",
        "augmentation.horizontal_flip": "false",
    }
    assert suggest(optuna.trial.FixedTrial(fixed), config) == fixed


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (32, "32"),
        (0.001, "0.001"),
        (1e-5, "1e-05"),
        (0.1 + 0.2, "0.30000000000000004"),
        ("ARCHITECTURE_RESNET18", "ARCHITECTURE_RESNET18"),
        ("64", "64"),
    ],
)
def test_param_string(value: Any, text: str) -> None:
    assert param_string(value) == text


@pytest.mark.parametrize(
    ("sampler", "kind"),
    [
        (st.SAMPLER_UNSPECIFIED, TPESampler),
        (st.SAMPLER_TPE, TPESampler),
        (st.SAMPLER_GAUSSIAN_PROCESS, GPSampler),
        (st.SAMPLER_RANDOM, RandomSampler),
        (st.SAMPLER_GRID, GridSampler),
        (st.SAMPLER_CMA_ES, CmaEsSampler),
    ],
)
def test_make_sampler(sampler: st.Sampler.ValueType, kind: type) -> None:
    # A uint64 seed beyond numpy's 32 bits is folded, not refused.
    config = _valid(_study(*MIXED[1:], sampler=sampler, seed=2**40 + 3))
    made = make_sampler(config)
    assert isinstance(made, kind)
    assert isinstance(made, GridSampler) == (sampler == st.SAMPLER_GRID)


def test_make_pruner() -> None:
    base = _base(epochs=9)

    def pruner(kind: st.PrunerType.ValueType, **fields: int) -> Any:
        return make_pruner(_valid(_study(LR, base=base, pruner=st.PrunerSpec(type=kind, **fields))))

    assert isinstance(pruner(st.PRUNER_TYPE_UNSPECIFIED), NopPruner)
    assert isinstance(pruner(st.PRUNER_TYPE_NONE), NopPruner)
    hyperband = pruner(st.PRUNER_TYPE_HYPERBAND, min_resource=2, reduction_factor=2)
    assert isinstance(hyperband, HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource, hyperband._reduction_factor) == (2, 9, 2)
    halving = pruner(st.PRUNER_TYPE_SUCCESSIVE_HALVING, min_resource=3)
    assert isinstance(halving, SuccessiveHalvingPruner)
    assert (halving._min_resource, halving._reduction_factor) == (3, 3)
    median = pruner(st.PRUNER_TYPE_MEDIAN, min_resource=2, startup_trials=4)
    assert isinstance(median, MedianPruner)
    # Steps are 1-based epochs: a trial can be pruned from its min_resource-th epoch on.
    assert (median._n_startup_trials, median._n_warmup_steps) == (4, 2)


# -- storage and round trips --------------------------------------------------------------------------------------


def test_storage_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_url(Path("trainer.db")) == f"sqlite:///{tmp_path}/trainer.db"
    assert storage_url(Path("trainer.db")).startswith("sqlite:////")


def test_create_then_load_from_a_second_storage(tmp_path: Path) -> None:
    db = tmp_path / "state" / "trainer.db"
    config = _valid(
        _study(
            *MIXED,
            objective=st.Objective(metric=pb.METRIC_VALIDATION_LOSS),
            pruner=st.PrunerSpec(type=st.PRUNER_TYPE_MEDIAN),
        )
    )
    study = create_study(open_storage(db), "s-abc123", config)
    trial = study.ask(fixed_distributions=distributions(config))
    trial.report(0.9, step=1)
    again = create_study(open_storage(db), "s-abc123", config)  # a restart: loaded, not duplicated
    assert again._study_id == study._study_id

    other = load_study(open_storage(db), "s-abc123", config)
    assert other.study_name == "s-abc123"
    assert other.direction == optuna.study.StudyDirection.MINIMIZE
    assert other.user_attrs == {METRIC_ATTR: "val_loss", DIRECTION_ATTR: "minimize"}
    assert isinstance(other.pruner, MedianPruner)
    [seen] = other.get_trials()
    assert seen.params == trial.params
    assert seen.intermediate_values == {1: 0.9}
    with pytest.raises(KeyError):
        load_study(open_storage(db), "s-missing", config)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_optuna_tables_live_beside_the_job_store(tmp_path: Path) -> None:
    db = tmp_path / "trainer.db"
    with JobStore(db) as store:
        version = store.schema_version()
    config = _valid(_study(LR))
    create_study(open_storage(db), "s-1", config)
    with JobStore(db) as store:  # reopens cleanly: Optuna's tables are not in its way
        assert store.schema_version() == version
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    ours = {t for t in tables if t.startswith("vt_")}
    assert ours
    assert {"studies", "trials", "trial_params", "alembic_version"} <= tables - ours


def test_optimisation_round_trip_samples_valid_specs() -> None:
    config = _valid(_study(*MIXED, seed=3))
    study = optuna.create_study(direction=config.direction.value, sampler=make_sampler(config))
    specs: list[pb.TrainingSpec] = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, config)
        spec = apply_params(config.base_spec, params)
        resolved = validate_spec(spec, default_bucket=BUCKET)  # raises (failing the trial) if a sample is invalid
        specs.append(spec)
        assert {k: param_string(v) for k, v in params.items()}["model.architecture"].startswith("ARCHITECTURE_")
        return resolved.classifier.learning_rate * resolved.classifier.batch_size

    study.optimize(objective, n_trials=3)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len(specs) == 3
    for trial, spec in zip(study.trials, specs, strict=True):
        assert trial.distributions == distributions(config)
        assert spec.classifier.batch_size == trial.params["classifier.batch_size"]
        assert spec.fine_tuning.stage.epochs == trial.params["fine_tuning.stage.epochs"]
        assert pb.Architecture.Name(spec.model.architecture) == trial.params["model.architecture"]
        assert spec.augmentation.horizontal_flip == (trial.params["augmentation.horizontal_flip"] == "true")


def test_grid_limits_the_trials() -> None:
    grid = (_int("classifier.batch_size", 16, 32, step=16), _cat("augmentation.horizontal_flip", "true", "false"))
    assert _valid(_study(*grid, sampler=st.SAMPLER_GRID)).max_trials == 4  # asked for 10
    assert _valid(_study(*grid, sampler=st.SAMPLER_GRID, budget=st.StudyBudget(max_trials=3))).max_trials == 3
    timed = st.StudyBudget(max_duration=Duration(seconds=60))
    assert _valid(_study(*grid, sampler=st.SAMPLER_GRID, budget=timed)).max_trials == 4
    assert _valid(_study(*grid, budget=timed)).max_trials == 0  # other samplers: no limit


def test_grid_round_trip_with_ask_and_tell_visits_every_point() -> None:
    config = _valid(
        _study(
            _int("classifier.batch_size", 16, 32, step=16),
            _cat("augmentation.horizontal_flip", "true", "false"),
            sampler=st.SAMPLER_GRID,
        )
    )
    study = optuna.create_study(direction=config.direction.value, sampler=make_sampler(config))
    for _ in range(config.max_trials):  # the runner's ask/tell, with fixed distributions
        trial = study.ask(fixed_distributions=distributions(config))
        validate_spec(apply_params(config.base_spec, trial.params), default_bucket=BUCKET)
        study.tell(trial, 0.5)  # optuna's own GridSampler raises RuntimeError on the last one (study.stop())
    visited = {(t.params["classifier.batch_size"], t.params["augmentation.horizontal_flip"]) for t in study.trials}
    assert visited == {(16, "true"), (16, "false"), (32, "true"), (32, "false")}
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


def test_plain_grid_sampler_fails_the_last_tell() -> None:
    """Why AskTellGridSampler exists: if optuna stops raising here, the subclass can go."""
    study = optuna.create_study(sampler=GridSampler({"x": [1, 2]}))
    for i in range(2):
        trial = study.ask(fixed_distributions={"x": IntDistribution(1, 2)})
        if i == 0:
            study.tell(trial, 1.0)
        else:
            with pytest.raises(RuntimeError, match=r"Study\.stop"):
                study.tell(trial, 1.0)


@pytest.mark.parametrize(
    ("lo", "hi", "step"),
    [
        (0.0, 1e27, 0.1),  # a quotient past 10^28: the default decimal context raised DivisionImpossible
        (5e-324, 1.7e308, 5e-324),  # the widest span of floats
        (1e-300, 1e300, 3e-7),
    ],
)
def test_a_float_step_over_a_huge_range_is_a_violation_not_a_crash(lo: float, hi: float, step: float) -> None:
    # The path's field is a float with a range, so the range is refused, after the step is checked exactly.
    found = _violations(_study(LR, _float("augmentation.rotation_degrees", lo, hi, step=step)))
    assert "spec.parameters[1].float_range.max" in found
    found = _violations(_study(LR, _float("dataset.uri", lo, hi, step=step)))  # not a number at all
    assert "spec.parameters[1].path" in found


def test_step_divides_exactly_far_past_28_digits() -> None:
    assert step_divides(0.1, 0.0, 1e27)  # 10^28 steps
    assert not step_divides(0.3, 0.0, 1e27)


def test_a_grid_of_a_huge_float_range_is_refused_by_its_size() -> None:
    huge = [_float(f"augmentation.{name}", 0.0, 1.0, step=5e-324) for name in ("hue", "saturation")]
    found = _violations(_study(*huge, sampler=st.SAMPLER_GRID))
    assert "points, at most" in found["spec.sampler"]
    assert "about 10^" in found["spec.sampler"]
