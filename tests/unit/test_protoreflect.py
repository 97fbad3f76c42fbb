"""visiontune.protoreflect, and the rules training_spec.proto declares through it (docs/spec.md)."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from trainer_service.spec import config
from visiontune import float32, protoreflect
from visiontune.protoreflect import EnumMap, FieldNotFound, Interval, NotAMessage
from visiontune.v1 import job_pb2, training_service_pb2
from visiontune.v1 import training_spec_pb2 as pb

SPEC = pb.TrainingSpec.DESCRIPTOR
REQUEST = training_service_pb2.FindLearningRateRequest.DESCRIPTOR
# Fields with presence whose default depends on other fields (the comment says how), so they declare none.
DERIVED_DEFAULTS = {
    "fine_tuning.stage.learning_rate",  # the classifier's / FINE_TUNING_LR_DIVISOR
    "classifier.schedule.max_learning_rate",  # PEAK_LR_FACTOR x the stage's LR, for ONE_CYCLE and CYCLIC
    "fine_tuning.stage.schedule.max_learning_rate",
}


def _paths(descriptor: Descriptor, prefix: str = "") -> Iterator[tuple[str, FieldDescriptor]]:
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        yield path, field
        if field.message_type is not None and field.message_type.full_name.startswith("visiontune."):
            yield from _paths(field.message_type, f"{path}.")


SPEC_FIELDS = dict(_paths(SPEC))
REQUEST_FIELDS = {path: field for path, field in _paths(REQUEST) if "." not in path and path != "spec"}
NUMBERS = (
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
    FieldDescriptor.CPPTYPE_FLOAT,
    FieldDescriptor.CPPTYPE_DOUBLE,
)


# -- intervals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "inside", "outside", "words"),
    [
        ("(0, 10]", [1e-9, 10], [0, 10.5, -1], "in (0, 10]"),
        ("[0, 1)", [0, 0.999], [1, -0.1], "in [0, 1)"),
        ("[0, inf)", [0, 1e30], [-1e-9], ">= 0"),
        ("(0, inf)", [1e-9], [0], "> 0"),
    ],
)
def test_an_interval_reads_tests_and_words_its_bounds(
    text: str, inside: list[float], outside: list[float], words: str
) -> None:
    interval = Interval.parse(text)
    assert interval.notation() == text
    assert str(interval) == words
    assert all(v in interval for v in inside)
    assert not any(v in interval for v in outside)
    assert not any(v in interval for v in (math.nan, math.inf, -math.inf))


def test_a_violation_names_the_range_and_the_value() -> None:
    assert Interval.parse("(0, 10]").violation(12) == "must be in (0, 10], got 12"
    assert Interval.parse("[0, 1)").violation(0.5) is None
    assert Interval.parse("[0, inf)").violation(-0.5, " (a note)") == "must be >= 0 (a note), got -0.5"


def test_narrowing_by_another_field_keeps_the_tighter_bound() -> None:
    declared = Interval.parse("[0, inf)")
    assert str(declared.below(4, inclusive=False)) == "in [0, 4)"
    assert str(Interval.parse("[1, inf)").below(18, inclusive=True)) == "in [1, 18]"
    assert str(Interval.parse("(0, inf)").above(0.003, inclusive=False)) == "> 0.003"
    assert Interval.parse("[0, 5]").below(10, inclusive=True) == Interval.parse("[0, 5]")


@pytest.mark.parametrize("text", ["", "0, 1", "[1, 0]", "[0 1]", "{0, 1}", "[a, 1]", "[0, 1, 2]"])
def test_a_malformed_interval_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"interval|could not convert"):
        Interval.parse(text)


# -- paths ------------------------------------------------------------------------------------------------------


def test_a_path_walks_through_nested_messages() -> None:
    fields = protoreflect.field_path(SPEC, "fine_tuning.stage.optimizer.momentum")
    assert [f.name for f in fields] == ["fine_tuning", "stage", "optimizer", "momentum"]
    assert protoreflect.field_path(SPEC, ["fineTuning", "stage"], json_names=True)[-1].name == "stage"


def test_an_unknown_name_and_a_walk_through_a_scalar_are_typed_errors() -> None:
    with pytest.raises(FieldNotFound) as missing:
        protoreflect.field_path(SPEC, "classifier.lr")
    assert (missing.value.parent, missing.value.name, missing.value.message.name) == ("classifier", "lr", "StageSpec")
    assert isinstance(missing.value, KeyError)
    with pytest.raises(NotAMessage) as scalar:
        protoreflect.field_path(SPEC, "classifier.epochs.value")
    assert (scalar.value.where, scalar.value.name) == ("classifier.epochs", "value")
    assert isinstance(scalar.value, ValueError)
    with pytest.raises(FieldNotFound):
        protoreflect.field_path(SPEC, "fineTuning")  # JSON names only when asked for


# -- enums ------------------------------------------------------------------------------------------------------


def test_enum_values_by_short_name() -> None:
    arch = pb.Architecture.DESCRIPTOR
    assert protoreflect.enum_prefix(arch) == "ARCHITECTURE_"
    assert protoreflect.short_name(arch, pb.ARCHITECTURE_MOBILENET_V2) == "MOBILENET_V2"
    assert protoreflect.short_name(arch, 99) == "99"
    for written in ("MOBILENET_V2", "mobilenet-v2", "ARCHITECTURE_MOBILENET_V2", pb.ARCHITECTURE_MOBILENET_V2):
        assert protoreflect.enum_number(arch, written) == pb.ARCHITECTURE_MOBILENET_V2
    assert protoreflect.enum_number(arch, "MOBILENET_V2", short_names=False) is None
    assert protoreflect.enum_number(arch, "ARCHITECTURE_MOBILENET_V2", short_names=False) == 8
    assert protoreflect.enum_number(arch, True) is None
    assert protoreflect.enum_number(arch, 99) is None
    assert protoreflect.enum_value(job_pb2.Stage, "fine_tuning") == job_pb2.STAGE_FINE_TUNING


class _Colour(enum.StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    AMP_BF16 = "amp_bf16"
    AMP_FP16 = "amp_fp16"


def test_an_enum_map_pairs_members_by_short_name_and_gives_zero_to_the_member_without_a_value() -> None:
    mapping = EnumMap(pb.Precision, _Colour)
    assert mapping.to_python(pb.PRECISION_FP32) is _Colour.FP32
    assert mapping.to_python(0) is _Colour.AUTO
    assert mapping.to_proto(_Colour.AUTO) == pb.PRECISION_UNSPECIFIED
    assert mapping.to_proto(_Colour.AMP_BF16) == pb.PRECISION_AMP_BF16
    assert mapping.to_python(42) is None
    assert EnumMap(pb.Architecture, config.Architecture).to_python(0) is None  # the field's default says


def test_an_enum_map_refuses_enums_that_drifted_apart() -> None:
    class Missing(enum.StrEnum):
        FP32 = "fp32"

    class TwoExtra(enum.StrEnum):
        FP32 = "fp32"
        AMP_BF16 = "amp_bf16"
        AMP_FP16 = "amp_fp16"
        AUTO = "auto"
        OTHER = "other"

    with pytest.raises(KeyError):
        EnumMap(pb.Precision, Missing)
    with pytest.raises(TypeError, match="without a Precision value"):
        EnumMap(pb.Precision, TwoExtra)


# -- rules ------------------------------------------------------------------------------------------------------


def test_a_position_overrides_the_rules_of_its_nested_field() -> None:
    own = protoreflect.field_rules(pb.StageSpec.DESCRIPTOR, "epochs")
    classifier = protoreflect.field_rules(SPEC, "classifier.epochs")
    fine_tuning = protoreflect.field_rules(SPEC, "fine_tuning.stage.epochs")
    assert (own.default, own.range) == (None, Interval.parse("[1, 1000]"))
    assert (classifier.default, classifier.range) == (10, Interval.parse("[1, 1000]"))
    assert (fine_tuning.default, fine_tuning.range) == (5, Interval.parse("[1, 5]"))
    assert protoreflect.field_default(SPEC, "fine_tuning.stage.batch_size") == 32  # not overridden: the field's own


def test_defaults_are_typed_by_the_field() -> None:
    assert protoreflect.field_default(SPEC, "classifier.learning_rate") == 0.003  # float32, read back as written
    assert protoreflect.field_default(SPEC, "model.architecture") == pb.ARCHITECTURE_MOBILENET_V2
    assert protoreflect.field_default(SPEC, "classifier.early_stopping.restore_best_weights") is True
    assert protoreflect.field_default(SPEC, "run.precision") == pb.PRECISION_UNSPECIFIED  # no declared default
    assert protoreflect.field_default(SPEC, "augmentation.rotation_degrees") == 0.0
    assert protoreflect.field_default(REQUEST, "min_learning_rate") == 1e-7  # a double: no float32 rounding
    classifier_dim = protoreflect.field_path(SPEC, "model.classifier_dim")[-1]
    with pytest.raises(ValueError, match="out of range for int32"):
        protoreflect.typed_value(classifier_dim, "20000000000")


def test_field_behaviour() -> None:
    assert protoreflect.field_behavior(SPEC.fields_by_name["dataset"]) == ("REQUIRED",)
    assert protoreflect.field_behavior(SPEC.fields_by_name["run"]) == ("OPTIONAL",)


# -- what training_spec.proto declares ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*SPEC_FIELDS, *(f"request.{p}" for p in REQUEST_FIELDS)])
def test_every_declared_rule_parses_and_its_default_is_allowed(path: str) -> None:
    root, name = (REQUEST, path.removeprefix("request.")) if path.startswith("request.") else (SPEC, path)
    rules = protoreflect.field_rules(root, name)  # raises ValueError for a rule that does not parse
    field = protoreflect.field_path(root, name)[-1]
    # Unset must be valid, whether the field declares a default or relies on its zero value (a field with presence
    # and no declared default has no static default: its rule is in code).
    static = rules.default is not None or not field.has_presence
    if rules.range is not None and field.enum_type is None and static:
        default = protoreflect.field_default(root, name)
        assert default in rules.range, (path, default, rules.range)


@pytest.mark.parametrize("path", list(SPEC_FIELDS))
def test_every_nested_override_names_a_field_of_the_nested_message(path: str) -> None:
    field = SPEC_FIELDS[path]
    for nested in field.GetOptions().Extensions[protoreflect.field_rules_pb2.field_rules].nested:
        assert field.message_type is not None, path
        protoreflect.field_path(field.message_type, nested.field)


@pytest.mark.parametrize("path", [p for p, f in SPEC_FIELDS.items() if f.cpp_type in NUMBERS])
def test_every_numeric_spec_field_declares_its_range_and_with_presence_its_default(path: str) -> None:
    field, rules = SPEC_FIELDS[path], protoreflect.field_rules(SPEC, path)
    if path == "run.seed":
        assert rules == protoreflect.Rules()  # any uint64; 0 is a seed like any other
        return
    assert rules.range is not None, path
    if field.has_presence and protoreflect.real_oneof(field) is None:
        assert (rules.default is None) == (path in DERIVED_DEFAULTS), path
    else:
        assert rules.default is None, f"{path}: without presence, unset is its zero value; declare no default"


@pytest.mark.parametrize("path", list(REQUEST_FIELDS))
def test_every_sweep_field_declares_a_default_and_a_range(path: str) -> None:
    rules = protoreflect.field_rules(REQUEST, path)
    assert rules.default is not None
    assert rules.range is not None


@pytest.mark.parametrize("path", [*SPEC_FIELDS, *REQUEST_FIELDS])
def test_every_field_declares_its_behaviour(path: str) -> None:
    field = SPEC_FIELDS.get(path) or REQUEST_FIELDS[path]
    behaviour = protoreflect.field_behavior(field)
    assert behaviour in (("REQUIRED",), ("OPTIONAL",)), path
    assert (behaviour == ("REQUIRED",)) == (path in {"dataset", "dataset.uri"}), path


@pytest.mark.parametrize("path", [p for p, f in SPEC_FIELDS.items() if f.enum_type is not None])
def test_every_enum_field_default_is_a_config_member(path: str) -> None:
    enum_type = SPEC_FIELDS[path].enum_type
    mapping = next(m for m in vars(config).values() if isinstance(m, EnumMap) and m.proto is enum_type)
    assert mapping.to_python(protoreflect.field_default(SPEC, path)) is not None, path


def test_float_defaults_are_float32_decimals() -> None:
    for path, field in SPEC_FIELDS.items():
        default = protoreflect.field_rules(SPEC, path).default
        if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT and default is not None:
            assert float32.shortest(default) == default, path


def test_the_reference_lists_every_field_with_its_rules_and_comment() -> None:
    docs = protoreflect.spec_reference(SPEC)
    assert [d.path for d in docs] == list(SPEC_FIELDS)
    by_path = {d.path: d for d in docs}
    assert by_path["classifier.epochs"].default == 10
    assert by_path["fine_tuning.stage.epochs"].rules.range == Interval.parse("[1, 5]")
    assert by_path["fine_tuning.stage.learning_rate"].default is None  # derived: the description says how
    assert by_path["dataset.uri"].default is None  # required
    assert by_path["dataset.class_balancing"].description.startswith("How training batches")  # the enum's comment
    assert "classifier's / 10" in by_path["fine_tuning.stage.learning_rate"].description
