"""The one error hierarchy of both services: what went wrong, and the gRPC status code it travels as.

Domain code (the job store, the artifact store, the engines, the study functions) raises these, or its own
subclasses of them, and knows nothing of gRPC: each class names its status code as a plain string (the
`google.rpc.Code` name). `visiontune.status` turns an error into a `grpc.Status` and the server runtime does
that for every servicer method (`visiontune.server.ErrorStatusInterceptor`), so a servicer only raises
(docs/architecture.md §3). An error that is not a `VisionTuneError` is a bug and reaches the client as UNKNOWN.

`InvalidArgument` carries every bad field of a request, not only the first: the client gets them all in one
`google.rpc.BadRequest` detail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Code",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "VisionTuneError",
    "parse_field",
    "reraise_as",
]

T = TypeVar("T")

# The status codes the hierarchy uses (names of `grpc.StatusCode` and `google.rpc.Code` alike).
Code = Literal[
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "ABORTED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
]

# The summary goes into the `grpc-message` header as well; the full list is in the details. Capping the
# summary keeps a spec with hundreds of bad fields under the client's default 8 KiB metadata limit.
_SUMMARY_MAX_FIELDS = 10


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: a dotted path (`stage1.learning_rate`) and what is wrong with it."""

    field: str
    description: str


class VisionTuneError(Exception):
    """Base of every error raised on purpose; `message` is what the client reads. INTERNAL unless a subclass
    says otherwise."""

    code: ClassVar[Code] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(VisionTuneError):
    """The request has bad fields, all of them listed in `violations` (sent as `google.rpc.BadRequest`)."""

    code: ClassVar[Code] = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = tuple(violations)
        super().__init__(message if message is not None else self.summary(self.violations))

    @classmethod
    def summary(cls, violations: Sequence[FieldViolation]) -> str:
        """`2 invalid fields: a (why); b (why)`, naming at most 10 of them (`counted` and `item` word it)."""
        n = len(violations)
        shown = "; ".join(cls.item(v) for v in violations[:_SUMMARY_MAX_FIELDS])
        more = f"; and {n - _SUMMARY_MAX_FIELDS} more" if n > _SUMMARY_MAX_FIELDS else ""
        return f"{cls.counted(n)}: {shown}{more}"

    @staticmethod
    def counted(n: int) -> str:
        return f"{n} invalid field{'s' if n != 1 else ''}"

    @staticmethod
    def item(violation: FieldViolation) -> str:
        return f"{violation.field} ({violation.description})"


class NotFound(VisionTuneError):
    """The resource the request names does not exist."""

    code: ClassVar[Code] = "NOT_FOUND"


class AlreadyExists(VisionTuneError):
    """A resource with this ID (or this request ID) exists already."""

    code: ClassVar[Code] = "ALREADY_EXISTS"


class FailedPrecondition(VisionTuneError):
    """The request is well formed, but what it refers to is not in a state that allows it (fix that first)."""

    code: ClassVar[Code] = "FAILED_PRECONDITION"


class Aborted(VisionTuneError):
    """A concurrent change won (a compare-and-set failed); retrying the whole read-modify-write may succeed."""

    code: ClassVar[Code] = "ABORTED"


class ResourceExhausted(VisionTuneError):
    """The request exceeds a limit (too many images, too many bytes)."""

    code: ClassVar[Code] = "RESOURCE_EXHAUSTED"


class Unavailable(VisionTuneError):
    """A backend (S3, Triton) did not answer; the same request may succeed later."""

    code: ClassVar[Code] = "UNAVAILABLE"


def parse_field(field: str, parse: Callable[[str], T], value: str, error: type[InvalidArgument] = InvalidArgument) -> T:
    """`parse(value)`, or `error` naming `field` when it raises ValueError (`names.InvalidName`)."""
    try:
        return parse(value)
    except ValueError as err:
        raise error([FieldViolation(field, str(err))]) from err


@contextlib.contextmanager
def reraise_as(error: Callable[[str], VisionTuneError], *causes: type[Exception]) -> Iterator[None]:
    """Raise `error(str(cause))` for any of `causes` raised in the block: for a call whose failures all mean
    the same thing to this caller (an unreadable dataset is the client's precondition to fix, whatever S3 said)."""
    try:
        yield
    except causes as err:
        raise error(str(err)) from err
