"""Hypothesis strategies for TrainingSpec and StudySpec messages: what a hostile, buggy or careless client sends.

Built from the protobuf descriptors, so a field added to the .proto is fuzzed without touching this module:
- `hostile_messages(descriptor)`: any message of that type, every field possibly set (scalars at their type's
  boundaries and beyond any rule: NaN, inf, negatives, huge integers; empty, huge, unicode, NUL and path-traversal
  strings; undefined enum numbers; repeated fields of random length; nested messages and oneofs, recursively to a
  bounded depth);
- `mostly_valid_training_specs()` / `mostly_valid_study_specs()`: a valid base spec with zero to a few fields
  changed, each to an in-range value (the field's `field_rules`), a hostile one, or cleared, so that most examples
  reach the deep, cross-field checks and some pass them;
- `training_specs()` / `study_specs()`: both mixed, what the fuzz tests draw.

Shared by the trainer's fuzz tests (over gRPC against a live trainer, default and slow suites).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from visiontune import float32
from visiontune.protoreflect import INT_BOUNDS, Interval, field_rules, real_oneof, spec_reference
from visiontune.v1 import study_pb2, training_spec_pb2

from tests.integration.trainer_helpers import DATASET, tiny_spec

M = TypeVar("M", bound=Message)

MAX_DEPTH = 4
MAX_REPEATED = 4

# Strings a client should never get past validation with, or that stress the code reading them.
HOSTILE_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "..",
    "../",
    "../../etc/passwd",
    "jobs/..",
    "jobs/../studies/x",
    "datasets/../..",
    "/",
    "//",
    "/abs/path",
    "s3://",
    "s3:///x",
    "s3://other/x",
    "s3://other/../x",
    "s3://bucket-name",
    "s3://UPPER/x",
    "s3://a/b/../../c",
    "file:///etc/passwd",
    "http://127.0.0.1/x",
    "models/",
    "models/x/../../y",
    "%2e%2e/%2e%2e",
    "datasets\\..\\x",
    "\u202e\u0635\u00e9\U0001f600",
    "\ud7ff\ue000\uffff",
    "NaN",
    "inf",
    "-1",
    "true",
    "ARCHITECTURE_RESNET18",
    "classifier.learning_rate",
    "x" * 1024,
    "é" * 5000,
    "a/" * 2000,
)


def _hostile_strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=8).map(lambda s: f"{DATASET}/{s}"),
        st.builds(lambda n: "y" * n, st.integers(0, 200_000)),
    )


def _int_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = INT_BOUNDS[field.cpp_type]
    edges = sorted(
        {v for v in (lo, lo + 1, -1, 0, 1, 2, 3, 7, 64, 1000, 4096, 10_001, 2**31 - 1, hi - 1, hi) if lo <= v <= hi}
    )
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -2000), min(hi, 2000)), st.integers(lo, hi))


FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-38, 1e-7, 10.0, 1e30, float32.MAX, -float32.MAX)


def _float_values(field: FieldDescriptor) -> st.SearchStrategy[float]:
    if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        specials = (math.nan, math.inf, -math.inf, *FLOAT_EDGES)
        return st.one_of(st.sampled_from(specials), st.floats(width=32), st.floats(-10, 10, width=32))
    return st.one_of(
        st.sampled_from((math.nan, math.inf, -math.inf, *FLOAT_EDGES, 1e300, -1e300, 5e-324)),
        st.floats(),
        st.floats(-10, 10),
    )


def _enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    assert field.enum_type is not None
    defined = [v.number for v in field.enum_type.values]
    undefined = st.one_of(
        st.sampled_from((-1, max(defined) + 1, 99, 2**31 - 1, -(2**31))), st.integers(-(2**31), 2**31 - 1)
    )
    return st.one_of(st.sampled_from(defined), undefined)


def hostile_scalars(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Any value the wire can carry for a scalar or enum field, weighted to its boundaries."""
    cpp = field.cpp_type
    if cpp in INT_BOUNDS:
        return _int_values(field)
    if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return _float_values(field)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum_values(field)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    return _hostile_strings()


@st.composite
def _fill(draw: st.DrawFn, message: Message, depth: int) -> None:
    """Set a random subset of `message`'s fields to hostile values; messages below `depth` stay empty."""
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # the stubs type it as a union with upb's own class
    fields: list[FieldDescriptor] = list(descriptor.fields)
    # One member of each declared oneof may be set (setting another would only clear it again).
    chosen: dict[str, str] = {}
    for field in fields:
        declared = real_oneof(field)
        if declared is not None and declared.name not in chosen:
            chosen[declared.name] = draw(st.sampled_from([f.name for f in declared.fields]))
    for field in fields:
        declared = real_oneof(field)
        if declared is not None and chosen[declared.name] != field.name:
            continue
        if not draw(st.booleans()):
            continue
        _set_hostile(draw, message, field, depth)


def _set_hostile(draw: st.DrawFn, message: Message, field: FieldDescriptor, depth: int) -> None:
    """Overwrite `field` of `message` with a hostile value (a list for a repeated field)."""
    message.ClearField(field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        target = getattr(message, field.name)
        for _ in range(draw(st.integers(0, MAX_REPEATED))):
            key = draw(hostile_scalars(key_field))
            if value_field.message_type is not None:
                draw(_fill(target[key], depth - 1))
            else:
                target[key] = draw(hostile_scalars(value_field))
        return
    if field.is_repeated:
        target = getattr(message, field.name)
        for _ in range(draw(st.integers(0, MAX_REPEATED))):
            if field.message_type is not None:
                item = target.add()
                if depth > 0:
                    draw(_fill(item, depth - 1))
            else:
                target.append(draw(hostile_scalars(field)))
        return
    if field.message_type is not None:
        child = getattr(message, field.name)
        child.SetInParent()
        if depth > 0:
            draw(_fill(child, depth - 1))
        return
    setattr(message, field.name, draw(hostile_scalars(field)))


def hostile_messages(cls: type[M], depth: int = MAX_DEPTH) -> st.SearchStrategy[M]:
    """Any `cls` message: every field possibly set to a hostile value, nested messages to `depth`."""

    @st.composite
    def build(draw: st.DrawFn) -> M:
        message = cls()
        draw(_fill(message, depth))
        return message

    return build()


# -- mostly valid: a valid base with a few fields changed --------------------------------------------------------


def valid_training_spec() -> training_spec_pb2.TrainingSpec:
    """A spec the trainer accepts (the integration tests' tiny job)."""
    return tiny_spec(epochs=2)


def valid_study_spec() -> study_pb2.StudySpec:
    """A study spec the trainer accepts: two parameters, a small budget."""
    return study_pb2.StudySpec(
        base_spec=valid_training_spec(),
        parameters=[
            study_pb2.SearchParameter(
                path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-4, max=0.05, log=True)
            ),
            study_pb2.SearchParameter(
                path="model.classifier_dim", categorical=study_pb2.Categorical(values=["16", "32"])
            ),
        ],
        objective=study_pb2.Objective(metric=training_spec_pb2.METRIC_VALIDATION_LOSS),
        budget=study_pb2.StudyBudget(max_trials=2),
        parallelism=1,
        sampler=study_pb2.SAMPLER_TPE,
        pruner=study_pb2.PrunerSpec(type=study_pb2.PRUNER_TYPE_MEDIAN, min_resource=1, startup_trials=1),
        seed=7,
    )


@cache
def _leaf_paths(root: Descriptor) -> tuple[tuple[str, FieldDescriptor], ...]:
    """Every field below `root` by dotted path (the spec reference's walk: into singular messages only)."""
    return tuple((doc.path, doc.field) for doc in spec_reference(root, comments={}))


def _in_range(interval: Interval, field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values inside `interval` for a numeric field: its bounds where closed, and values between."""
    if field.cpp_type in INT_BOUNDS:
        tlo, thi = INT_BOUNDS[field.cpp_type]
        lo, hi = tlo, thi
        if not math.isinf(interval.lo):
            lo = max(lo, math.floor(interval.lo) + 1 if interval.lo_open else math.ceil(interval.lo))
        if not math.isinf(interval.hi):
            hi = min(hi, math.ceil(interval.hi) - 1 if interval.hi_open else math.floor(interval.hi))
        return st.sampled_from((lo, hi)) | st.integers(lo, min(hi, lo + 100)) | st.integers(lo, hi)
    # float64 draws: a float field rounds them to float32 on the wire, which may land on an open bound (fine)
    flo = -float32.MAX if math.isinf(interval.lo) else interval.lo
    fhi = float32.MAX if math.isinf(interval.hi) else interval.hi
    return st.floats(flo, fhi, exclude_min=interval.lo_open, exclude_max=interval.hi_open, allow_nan=False).filter(
        lambda v: v in interval
    )


def _plausible(root: Descriptor, path: str, field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """A value the field may well accept: in its declared range, a defined enum value, a known-good string."""
    interval = field_rules(root, path).range
    if interval is not None and field.cpp_type != FieldDescriptor.CPPTYPE_ENUM:
        return _in_range(interval, field)
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values])
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return st.sampled_from(("", DATASET, f"{DATASET}/", "shapes", "models/shapes", "s3://other/datasets/x"))
    if field.cpp_type in INT_BOUNDS:
        return st.integers(0, 100)
    return hostile_scalars(field)


def _walk_to(message: Message, path: str) -> tuple[Message, str]:
    """The message holding the last field of dotted `path`, and that field's name (creating parents on the way)."""
    *parents, name = path.split(".")
    for part in parents:
        message = getattr(message, part)
    return message, name


@st.composite
def _mutate(draw: st.DrawFn, message: Message, root: Descriptor, max_changes: int) -> None:
    """Change one to `max_changes` fields of `message` (of type `root`): to a plausible value, a hostile one, or
    cleared."""
    leaves = _leaf_paths(root)
    for _ in range(draw(st.integers(1, max_changes))):
        path, field = draw(st.sampled_from(leaves))
        holder, name = _walk_to(message, path)
        how = draw(st.sampled_from(("plausible", "plausible", "hostile", "clear")))
        if how == "clear":
            holder.ClearField(name)
        elif how == "hostile" or field.is_repeated or field.message_type is not None:
            _set_hostile(draw, holder, field, 2)
        else:
            setattr(holder, name, draw(_plausible(root, path, field)))


@st.composite
def mostly_valid_training_specs(draw: st.DrawFn, max_changes: int = 3) -> training_spec_pb2.TrainingSpec:
    """The valid base spec, unchanged (sometimes) or with one to `max_changes` fields changed."""
    spec = valid_training_spec()
    if draw(st.integers(0, 9)) > 0:
        draw(_mutate(spec, training_spec_pb2.TrainingSpec.DESCRIPTOR, max_changes))
    return spec


def _searchable_paths() -> list[tuple[str, FieldDescriptor]]:
    return [(p, f) for p, f in _leaf_paths(training_spec_pb2.TrainingSpec.DESCRIPTOR) if f.message_type is None]


@st.composite
def search_parameters(draw: st.DrawFn) -> study_pb2.SearchParameter:
    """A parameter over a real TrainingSpec field (sometimes a made-up path), its domain plausible for the field's
    type or not."""
    path, field = draw(st.sampled_from(_searchable_paths()))
    interval = field_rules(training_spec_pb2.TrainingSpec.DESCRIPTOR, path).range
    if draw(st.integers(0, 9)) == 0:
        path, interval = draw(_hostile_strings()), None
    param = study_pb2.SearchParameter(path=path)
    kind = draw(st.sampled_from(("float", "int", "categorical", "none")))
    if kind == "float":
        values = (
            _in_range(interval, field)
            if interval is not None and field.cpp_type not in INT_BOUNDS
            else st.floats(width=64)
        )
        lo, hi = sorted((float(draw(values)), float(draw(values))))
        param.float_range.CopyFrom(
            study_pb2.FloatRange(
                min=lo, max=hi, log=draw(st.booleans()), step=draw(st.sampled_from((0.0, 0.0, 0.1, -1.0, math.nan)))
            )
        )
    elif kind == "int":
        ints = st.integers(-(2**63), 2**63 - 1) | st.integers(-5, 300)
        lo, hi = sorted((draw(ints), draw(ints)))
        param.int_range.CopyFrom(
            study_pb2.IntRange(
                min=lo, max=hi, log=draw(st.booleans()), step=draw(st.sampled_from((0, 1, 1, 2, -1, 2**62)))
            )
        )
    elif kind == "categorical":
        words = st.sampled_from(("true", "false", "1", "16", "32", "0.01", "NaN", "inf", "-1", "")) | _hostile_strings()
        if field.enum_type is not None:
            words = words | st.sampled_from([v.name for v in field.enum_type.values])
        param.categorical.CopyFrom(study_pb2.Categorical(values=draw(st.lists(words, max_size=5))))
    return param


@st.composite
def mostly_valid_study_specs(draw: st.DrawFn, max_changes: int = 3) -> study_pb2.StudySpec:
    """The valid base study, unchanged (sometimes) or with its parameters, its base spec or its other fields
    changed."""
    spec = valid_study_spec()
    if draw(st.integers(0, 9)) == 0:
        return spec
    for _ in range(draw(st.integers(1, max_changes))):
        where = draw(st.sampled_from(("parameters", "parameters", "base_spec", "study")))
        if where == "parameters":
            params = list(spec.parameters)
            action = draw(st.sampled_from(("add", "replace", "drop")))
            if action == "drop" and params:
                params.pop(draw(st.integers(0, len(params) - 1)))
            elif action == "replace" and params:
                params[draw(st.integers(0, len(params) - 1))] = draw(search_parameters())
            else:
                params.append(draw(search_parameters()))
            del spec.parameters[:]
            spec.parameters.extend(params)
        elif where == "base_spec":
            draw(_mutate(spec.base_spec, training_spec_pb2.TrainingSpec.DESCRIPTOR, 1))
        else:
            draw(_mutate(spec, study_pb2.StudySpec.DESCRIPTOR, 1))
    return spec


def _mixed(hostile: st.SearchStrategy[M], mostly_valid: st.SearchStrategy[M]) -> st.SearchStrategy[M]:
    """One in four fully hostile, the rest mostly valid (they reach the cross-field checks)."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 0 else mostly_valid)


def training_specs() -> st.SearchStrategy[training_spec_pb2.TrainingSpec]:
    return _mixed(hostile_messages(training_spec_pb2.TrainingSpec), mostly_valid_training_specs())


def study_specs() -> st.SearchStrategy[study_pb2.StudySpec]:
    return _mixed(hostile_messages(study_pb2.StudySpec), mostly_valid_study_specs())
