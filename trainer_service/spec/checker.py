"""One pass over a request that collects every violation, with each field's rules read from its descriptor.

`Checker` reads a field through the proto: an unset field takes its `field_rules` default (docs/spec.md), a float32
field reads back as the decimal the client wrote (0.003, not 0.0030000000260770…), and a value outside the field's
range is a violation naming the field path and the range: "must be in (0, 10], got 12". At most one violation per
path, the first problem found with it; the caller raises `SpecInvalid` with all of them (docs/architecture.md §3).
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from visiontune import float32, protoreflect
from visiontune.errors import FieldViolation
from visiontune.protoreflect import EnumMap, Interval

__all__ = ["Checker", "SpecInvalid"]

E = TypeVar("E", bound=enum.Enum)


class SpecInvalid(ValueError):
    """A request that breaks one or more rules; `violations` lists every bad field once."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class Checker:
    """Collects the violations of one request whose fields are named by paths below `root` (its descriptor)."""

    def __init__(self, root: Descriptor) -> None:
        self.root = root
        self._found: dict[str, str] = {}

    @property
    def violations(self) -> list[FieldViolation]:
        return [FieldViolation(path, description) for path, description in self._found.items()]

    def fail(self, path: str, description: str) -> None:
        self._found.setdefault(path, description)

    def failed(self, path: str) -> bool:
        return path in self._found

    def within(self, path: str, value: float, allowed: Interval | None, note: str = "") -> bool:
        """Whether `value` is in `allowed` (None: anything); if not, a violation: "must be in (0, 10], got 12"."""
        problem = None if allowed is None else allowed.violation(value, note)
        if problem is None:
            return True
        self.fail(path, problem)
        return False

    def range_of(self, path: str) -> Interval:
        """The declared range of the field at `path` (everything when none), for narrowing by another field's value."""
        return protoreflect.field_rules(self.root, path).range or Interval()

    def read(self, message: Message, path: str, *, default: Any = None) -> Any:
        """The value of the field `path` names, read from `message`, the message that holds it. Unset (a field with
        presence): `default` when given, else the field's declared default."""
        field = _field(message, path)
        if field.has_presence and not message.HasField(field.name):
            return protoreflect.field_default(self.root, path) if default is None else default
        value = getattr(message, field.name)
        return float32.shortest(value) if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT else value

    def number(
        self, message: Message, path: str, *, default: Any = None, allowed: Interval | None = None, note: str = ""
    ) -> Any:
        """`read`, then checked against `allowed` (by default the field's declared range); `failed(path)` tells."""
        value = self.read(message, path, default=default)
        self.within(
            path, value, allowed if allowed is not None else protoreflect.field_rules(self.root, path).range, note
        )
        return value

    def enum(self, message: Message, path: str, mapping: EnumMap[Any, E]) -> E:
        """The Python member of the enum field at `path`; the zero value is the field's default, and a number this
        server does not know is a violation (and reads as the default)."""
        number = getattr(message, _field(message, path).name)
        default = mapping.to_python(protoreflect.field_default(self.root, path))
        assert default is not None, f"{path}: the default has no {mapping.proto.name} member"  # tests guard this
        if number == 0:
            return default
        member = mapping.to_python(number)
        if member is None:
            self.fail(path, f"must be one of {mapping.allowed}, got {number}")
            return default
        return member


def _field(message: Message, path: str) -> FieldDescriptor:
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # the stubs type it as a union with upb's own class
    return descriptor.fields_by_name[path.rpartition(".")[2]]
