"""Rich gRPC errors: `google.rpc.Status` with `BadRequest` field violations, and reading them back.

Servers report every invalid field of a spec in one INVALID_ARGUMENT (docs/architecture.md §3), carried as a
`google.rpc.BadRequest` detail in the `grpc-status-details-bin` trailer; clients read it with
`field_violations`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "FieldViolation",
    "abort_with",
    "field_violations",
    "invalid_argument",
]

# The summary goes into the `grpc-message` header as well; the full list is in the details. Capping the
# summary keeps a spec with hundreds of bad fields under the client's default 8 KiB metadata limit.
_SUMMARY_MAX_FIELDS = 10


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: a dotted path (`stage1.learning_rate`) and what is wrong with it."""

    field: str
    description: str


def _summary(violations: Sequence[FieldViolation]) -> str:
    n = len(violations)
    shown = "; ".join(f"{v.field} ({v.description})" for v in violations[:_SUMMARY_MAX_FIELDS])
    more = f"; and {n - _SUMMARY_MAX_FIELDS} more" if n > _SUMMARY_MAX_FIELDS else ""
    return f"{n} invalid field{'s' if n != 1 else ''}: {shown}{more}"


def invalid_argument(violations: Sequence[FieldViolation], message: str | None = None) -> grpc.Status:
    """An INVALID_ARGUMENT status whose BadRequest detail lists every violation (not only the first)."""
    if not violations:
        raise ValueError("invalid_argument needs at least one field violation")
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message=message if message is not None else _summary(violations),
        details=[detail],
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def abort_with(context: grpc.ServicerContext, status: grpc.Status) -> NoReturn:
    """End the current call with `status` (code, message and the details trailer)."""
    context.abort_with_status(status)


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations carried by a failed call; empty when it carries none."""
    try:
        # A failed blocking call's RpcError is also its grpc.Call (code, details, trailers).
        status = rpc_status.from_call(cast(grpc.Call, error))
    except (AttributeError, ValueError):
        # Not a call-shaped error (no trailers), or trailers that contradict the call's code.
        return []
    if status is None:
        return []
    found: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found
