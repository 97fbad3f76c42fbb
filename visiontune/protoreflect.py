"""What the v1 descriptors say about a field: its path, its enum's values, its rules, its behaviour.

Every layer that reads a request by field path uses this module, so each fact about a field is written once, in the
.proto (docs/architecture.md §4, docs/spec.md):
- `field_path`: the one dotted-path lookup (`classifier.optimizer.momentum`) over a message descriptor;
- enums by short name (`MOBILENET_V2` is `ARCHITECTURE_MOBILENET_V2`), and `EnumMap` pairing a proto enum with the
  Python enum whose member names are those short names;
- `field_rules`: the `(visiontune.v1.field_rules)` option of field_rules.proto, with the overrides a message-typed
  field declares for its nested fields in that position; `Interval` reads, tests and words its range;
- `field_behavior`: the `google.api.field_behavior` annotations (REQUIRED, OPTIONAL);
- `spec_reference`: every field below a message with all of the above and its .proto comment, in declaration
  order, for the generated docs and the spec-file reference.

Imports no service: the trainer's validator, the spec files and the generator all build on it.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from google.api import field_behavior_pb2  # type: ignore[import-untyped]  # ships .pyi stubs, no py.typed
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, OneofDescriptor

from visiontune import float32
from visiontune.v1 import field_rules_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "INT_BOUNDS",
    "EnumMap",
    "FieldDoc",
    "FieldNotFound",
    "Interval",
    "NotAMessage",
    "Rules",
    "enum_number",
    "enum_prefix",
    "enum_value",
    "field_behavior",
    "field_default",
    "field_path",
    "field_rules",
    "find_field",
    "fits",
    "format_number",
    "is_float",
    "is_integer",
    "real_oneof",
    "short_name",
    "spec_reference",
    "type_name",
    "typed_value",
]

# -- field types ------------------------------------------------------------------------------------------------

INT_BOUNDS: Final = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOATS: Final = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
_INT_NAMES: Final = {
    FieldDescriptor.CPPTYPE_INT32: "int32",
    FieldDescriptor.CPPTYPE_UINT32: "uint32",
    FieldDescriptor.CPPTYPE_INT64: "int64",
    FieldDescriptor.CPPTYPE_UINT64: "uint64",
}


def is_integer(field: FieldDescriptor) -> bool:
    return field.cpp_type in INT_BOUNDS


def is_float(field: FieldDescriptor) -> bool:
    return field.cpp_type in _FLOATS


def fits(field: FieldDescriptor, value: float) -> bool:
    """Whether a finite number fits the field's type: an integer type's bounds, float32's largest value."""
    if field.cpp_type in INT_BOUNDS:
        lo, hi = INT_BOUNDS[field.cpp_type]
        return lo <= value <= hi
    if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        return abs(value) <= float32.MAX
    return True


def type_name(field: FieldDescriptor) -> str:
    """The field's type as the .proto writes it: `int32`, `float`, `Architecture`, `StageSpec`."""
    if field.message_type is not None:
        return str(field.message_type.name)
    if field.enum_type is not None:
        return str(field.enum_type.name)
    if field.cpp_type in _INT_NAMES:
        return _INT_NAMES[field.cpp_type]
    return {
        FieldDescriptor.CPPTYPE_FLOAT: "float",
        FieldDescriptor.CPPTYPE_DOUBLE: "double",
        FieldDescriptor.CPPTYPE_BOOL: "bool",
        FieldDescriptor.CPPTYPE_STRING: "string",
    }.get(field.cpp_type, "bytes")


def format_number(value: float) -> str:
    """A number as messages print it: ints as written, floats in at most 9 significant digits (float32's)."""
    return str(value) if isinstance(value, int) else f"{value:.9g}"


# -- fields by path ---------------------------------------------------------------------------------------------


class FieldNotFound(KeyError):
    """`message` (at `parent`, a dotted path; "" for the root) has no field `name`."""

    def __init__(self, message: Descriptor, name: str, parent: str) -> None:
        self.message, self.name, self.parent = message, name, parent
        self.known = [f.name for f in message.fields]
        super().__init__(
            f"{parent or message.name} ({message.name}) has no field {name!r}; its fields are {', '.join(self.known)}"
        )


class NotAMessage(ValueError):
    """The path walks on through `field` (at dotted `where`), which is a scalar or a list, to `name`."""

    def __init__(self, where: str, field: FieldDescriptor, name: str) -> None:
        self.where, self.field, self.name = where, field, name
        super().__init__(f"{where} is not a message, so it has no field {name!r}")


def real_oneof(field: FieldDescriptor) -> OneofDescriptor | None:
    """The declared oneof `field` is in; None for proto3 `optional` fields, which sit in a synthetic one."""
    oneof = field.containing_oneof
    if oneof is None or (len(oneof.fields) == 1 and oneof.name == f"_{field.name}"):
        return None
    return oneof


def find_field(message: Descriptor, name: str, *, json_names: bool = False) -> FieldDescriptor | None:
    """The field `name` names: its snake_case name or, with `json_names`, its camelCase JSON name."""
    field: FieldDescriptor | None = message.fields_by_name.get(name)
    if field is None and json_names:
        field = next((f for f in message.fields if f.json_name == name), None)
    return field


def field_path(
    root: Descriptor,
    path: str | Sequence[str],
    *,
    json_names: bool = False,
) -> tuple[FieldDescriptor, ...]:
    """The fields a dotted path walks through, root first: `classifier.epochs` -> (classifier, epochs).

    FieldNotFound (a KeyError) for a name a message lacks; NotAMessage (a ValueError) for a path that goes on
    through a scalar or a repeated field.
    """
    names = path.split(".") if isinstance(path, str) else list(path)
    fields: list[FieldDescriptor] = []
    message = root
    for name in names:
        if fields:
            last = fields[-1]
            if last.message_type is None or last.is_repeated:
                raise NotAMessage(".".join(f.name for f in fields), last, name)
            message = last.message_type
        field = find_field(message, name, json_names=json_names)
        if field is None:
            raise FieldNotFound(message, name, ".".join(f.name for f in fields))
        fields.append(field)
    return tuple(fields)


# -- enums ------------------------------------------------------------------------------------------------------


def enum_prefix(enum_type: EnumDescriptor) -> str:
    """`ARCHITECTURE_` for Architecture: the zero value's name without `UNSPECIFIED` (the API's convention)."""
    zero = str(enum_type.values_by_number[0].name)
    return zero.removesuffix("UNSPECIFIED") if zero.endswith("_UNSPECIFIED") else ""


def short_name(enum_type: EnumDescriptor, number: int) -> str:
    """`MOBILENET_V2` for ARCHITECTURE_MOBILENET_V2; an unknown number as its digits, so it survives a round trip."""
    value = enum_type.values_by_number.get(number)
    if value is None:
        return str(number)
    return str(value.name).removeprefix(enum_prefix(enum_type))


def enum_number(enum_type: EnumDescriptor, value: object, *, short_names: bool = True) -> int | None:
    """The number of the value `value` names, or None: a value's number, or its name. With `short_names` the name
    may also lack the prefix and be in any case, with '-' for '_' (`mobilenet-v2`); without, it is exact."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value in enum_type.values_by_number else None
    if not isinstance(value, str):
        return None
    candidates = [value]
    if short_names:
        name = value.strip().upper().replace("-", "_")
        candidates = [name, enum_prefix(enum_type) + name]
    for candidate in candidates:
        found = enum_type.values_by_name.get(candidate)
        if found is not None:
            return int(found.number)
    return None


P = TypeVar("P", bound=int)
E = TypeVar("E", bound=enum.Enum)


def enum_value(proto: _EnumTypeWrapper[P], value: object) -> P:
    """`enum_number` for a generated enum (`job_pb2.Stage`), typed as its values; ValueError for no value."""
    number = enum_number(proto.DESCRIPTOR, value)
    if number is None:
        raise ValueError(f"{value!r} is not a value of {proto.DESCRIPTOR.name}")
    return proto.Value(proto.DESCRIPTOR.values_by_number[number].name)


class EnumMap(Generic[P, E]):
    """A generated proto enum (`training_spec_pb2.Architecture`) and the Python enum whose member names are its
    values' short names (`RESNET18` for `ARCHITECTURE_RESNET18`). The zero value maps to the one member without a
    proto value, if any (Precision.AUTO: the zero value is itself the default); otherwise to nothing, and a field's
    default says what it means.
    """

    def __init__(self, proto: _EnumTypeWrapper[P], python: type[E]) -> None:
        descriptor = proto.DESCRIPTOR
        prefix = enum_prefix(descriptor)
        self.proto = descriptor
        self.allowed = ", ".join(v.name for v in descriptor.values)
        self._zero = proto.Value(descriptor.values_by_number[0].name)
        self._to_python: dict[int, E] = {}
        self._to_proto: dict[E, P] = {}
        for value in descriptor.values:
            if value.number != 0:
                member = python[str(value.name).removeprefix(prefix)]  # a KeyError at import: the enums drifted
                self._to_python[value.number] = member
                self._to_proto[member] = proto.Value(value.name)
        extra = [m for m in python if m not in self._to_proto]
        if len(extra) > 1:
            raise TypeError(f"{python.__name__} members without a {descriptor.name} value: {extra}")
        if extra:
            self._to_python[0] = extra[0]

    def to_python(self, number: int) -> E | None:
        """None for a number this server does not know (a newer client), and for 0 where no member stands for it."""
        return self._to_python.get(number)

    def to_proto(self, member: E) -> P:
        return self._to_proto.get(member, self._zero)


# -- rules ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An interval as field_rules.proto writes it: `(0, 10]`, `[0, 1)`, `[0, inf)`."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Interval:
        """ValueError unless `text` is `[lo, hi]` with either bracket round (open) and `inf` allowed."""
        body = text.strip()
        if len(body) < 5 or body[0] not in "[(" or body[-1] not in "])" or body[1:-1].count(",") != 1:
            raise ValueError(f"not an interval such as [0, 1) or (0, inf): {text!r}")
        lo, hi = (float(part) for part in body[1:-1].split(","))
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"not an interval such as [0, 1) or (0, inf): {text!r}")
        return cls(lo, hi, lo_open=body[0] == "(", hi_open=body[-1] == ")")

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):  # NaN compares false to everything; inf is never a meaningful setting
            return False
        above = self.lo < value if self.lo_open else self.lo <= value
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        """As a violation words it: `in (0, 10]`, or `>= 0` without an upper bound."""
        if math.isinf(self.hi):
            return f"{'>' if self.lo_open else '>='} {format_number(self.lo)}"
        return f"in {self.notation()}"

    def notation(self) -> str:
        """As field_rules.proto writes it: `(0, 10]`, `[0, inf)`."""
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"{left}{_bound(self.lo)}, {_bound(self.hi)}{right}"

    def below(self, hi: float, *, inclusive: bool) -> Interval:
        """This interval capped at `hi` (a limit set by another field)."""
        if hi < self.hi or (hi == self.hi and not inclusive):
            return Interval(self.lo, hi, self.lo_open, not inclusive)
        return self

    def above(self, lo: float, *, inclusive: bool) -> Interval:
        """This interval floored at `lo` (a limit set by another field)."""
        if lo > self.lo or (lo == self.lo and not inclusive):
            return Interval(lo, self.hi, not inclusive, self.hi_open)
        return self

    def violation(self, value: float, note: str = "") -> str | None:
        """None when `value` is in the interval, else its description: "must be in (0, 10], got 12"."""
        if value in self:
            return None
        return f"must be {self}{note}, got {format_number(value)}"


def _bound(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format_number(int(value) if float(value).is_integer() else value)


@dataclass(frozen=True)
class Rules:
    """A field's rules in one position: its default typed by the field (None: its zero value, or a default that
    depends on other fields) and its range (None: any value of its type)."""

    default: Any = None
    range: Interval | None = None


def _options(field: FieldDescriptor) -> field_rules_pb2.FieldRules:
    return field.GetOptions().Extensions[field_rules_pb2.field_rules]


@functools.cache
def field_rules(root: Descriptor, path: str) -> Rules:
    """The rules of the field at dotted `path` below `root`, where a message-typed field on the way may override
    the nested field's own (the outermost override wins). ValueError for a rule that does not parse."""
    fields = field_path(root, path)
    declared: list[field_rules_pb2.FieldRules] = []
    for i, outer in enumerate(fields[:-1]):
        rest = ".".join(f.name for f in fields[i + 1 :])
        declared += [n.rules for n in _options(outer).nested if n.field == rest]
    declared.append(_options(fields[-1]))
    default_text = next((r.default for r in declared if r.default), "")
    range_text = next((r.range for r in declared if r.range), "")
    leaf = fields[-1]
    try:
        default = typed_value(leaf, default_text) if default_text else None
        interval = Interval.parse(range_text) if range_text else None
    except ValueError as err:
        raise ValueError(f"{root.name}.{path}: bad field_rules option: {err}") from err
    return Rules(default=default, range=interval)


def typed_value(field: FieldDescriptor, text: str) -> Any:
    """`text` as a value of the field's type: a float field's as float32 keeps it, an enum's as its number."""
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_BOOL and text in ("true", "false"):
        return text == "true"
    if cpp in INT_BOUNDS:
        number = int(text)
        if not fits(field, number):
            raise ValueError(f"{number} is out of range for {type_name(field)}")
        return number
    if cpp in _FLOATS:
        real = float(text)
        return float32.shortest(real) if cpp == FieldDescriptor.CPPTYPE_FLOAT else real
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        assert field.enum_type is not None  # an enum field always has its enum type
        value = enum_number(field.enum_type, text)
        if value is None:
            raise ValueError(f"{text!r} is not a value of {field.enum_type.name}")
        return value
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return text
    raise ValueError(f"a {type_name(field)} field takes no default, got {text!r}")


def field_default(root: Descriptor, path: str) -> Any:
    """What the field at `path` takes when unset: its rules' default, else its type's zero value (an enum's as a
    number). E.g. `field_default(TrainingSpec.DESCRIPTOR, "classifier.epochs")`."""
    declared = field_rules(root, path).default
    if declared is not None:
        return declared
    return _zero(field_path(root, path)[-1])


def _zero(field: FieldDescriptor) -> Any:
    return {
        FieldDescriptor.CPPTYPE_BOOL: False,
        FieldDescriptor.CPPTYPE_STRING: "",
        FieldDescriptor.CPPTYPE_FLOAT: 0.0,
        FieldDescriptor.CPPTYPE_DOUBLE: 0.0,
    }.get(field.cpp_type, 0)


# -- behaviour --------------------------------------------------------------------------------------------------


def field_behavior(field: FieldDescriptor) -> tuple[str, ...]:
    """The field's `google.api.field_behavior` annotations by name: ("REQUIRED",), ("OPTIONAL",), ()."""
    values = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    return tuple(field_behavior_pb2.FieldBehavior.Name(v) for v in values)


# -- the reference ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDoc:
    """One field of a spec reference, in the position `path` names."""

    path: str
    field: FieldDescriptor
    rules: Rules
    behavior: tuple[str, ...]
    description: str  # the field's .proto comment; without one, its message's or enum's

    @property
    def depth(self) -> int:
        return self.path.count(".")

    @property
    def default(self) -> Any:
        """The default as the reference shows it: the declared one, else the zero value; None for a message field,
        a required field, a oneof member, and a field whose default depends on others (its description says how)."""
        if self.field.message_type is not None or "REQUIRED" in self.behavior:
            return None
        if self.rules.default is not None:
            return self.rules.default
        return None if self.field.has_presence else _zero(self.field)


def spec_reference(root: Descriptor, comments: Mapping[str, str] | None = None) -> list[FieldDoc]:
    """Every field below `root`, depth first in declaration order, a message field before its own fields.

    `comments` maps full names (`visiontune.v1.StageSpec.epochs`) to .proto comments; by default the ones
    `make protos` extracted into visiontune/v1/proto_comments.py.
    """
    if comments is None:
        from visiontune.v1.proto_comments import COMMENTS

        comments = COMMENTS
    out: list[FieldDoc] = []

    def walk(message: Descriptor, prefix: str) -> None:
        for field in message.fields:
            path = f"{prefix}{field.name}"
            description = comments.get(field.full_name, "")
            kind = field.message_type or field.enum_type
            if not description and kind is not None:
                description = comments.get(kind.full_name, "")
            out.append(FieldDoc(path, field, field_rules(root, path), field_behavior(field), description))
            if field.message_type is not None and not field.is_repeated:
                walk(field.message_type, f"{path}.")

    walk(root, "")
    return out
