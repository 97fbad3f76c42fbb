"""Errors the inference engine raises, each tied to the gRPC status a client should see.

The engine stays free of gRPC; the servicer turns `ServiceError.code` (a `grpc.StatusCode` name) into
the call's status, with every field violation in the details for INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence

from visiontune.errors import FieldViolation


class ServiceError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)


class InvalidRequest(ServiceError):
    code = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:10])
        more = f"; and {len(violations) - 10} more" if len(violations) > 10 else ""
        super().__init__(f"{len(violations)} invalid field(s): {shown}{more}", violations)


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class TooLarge(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class Internal(ServiceError):
    code = "INTERNAL"
