"""VisionTune errors on the wire: the one map from `VisionTuneError` to a gRPC status, and reading it back.

Servers end a failed call with `abort` (the server runtime does it for every servicer method): the error's
status code and its message, and for INVALID_ARGUMENT every field violation as a `google.rpc.BadRequest`
detail in the `grpc-status-details-bin` trailer (docs/architecture.md §3). Clients read those back with
`field_violations`. Kept apart from `visiontune.errors` so that the domain code raising errors does not
import gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from visiontune.errors import FieldViolation, InvalidArgument, VisionTuneError

__all__ = [
    "abort",
    "field_violations",
    "invalid_argument",
    "status_code",
    "to_status",
]


def status_code(error: VisionTuneError) -> grpc.StatusCode:
    """The gRPC status code a client sees for `error`."""
    return grpc.StatusCode[error.code]


def to_status(error: VisionTuneError) -> grpc.Status:
    """`error` as a rich `grpc.Status`: code, message and, for InvalidArgument, the BadRequest detail."""
    details = []
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        details.append(detail)
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def invalid_argument(violations: Sequence[FieldViolation], message: str | None = None) -> grpc.Status:
    """An INVALID_ARGUMENT status whose BadRequest detail lists every violation (not only the first)."""
    return to_status(InvalidArgument(violations, message))


def abort(context: grpc.ServicerContext, error: VisionTuneError) -> NoReturn:
    """End the current call with `error`'s status. Only INVALID_ARGUMENT carries a details trailer."""
    if isinstance(error, InvalidArgument):
        context.abort_with_status(to_status(error))
    context.abort(status_code(error), error.message)


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
