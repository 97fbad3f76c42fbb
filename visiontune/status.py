"""VisionTune errors on the wire: the one map from `VisionTuneError` to a gRPC status, and reading it back.

Servers end a failed call with `abort` (the server runtime does it for every servicer method): the error's
status code and its message, and for INVALID_ARGUMENT every field violation as a `google.rpc.BadRequest`
detail in the `grpc-status-details-bin` trailer (docs/architecture.md §3). Clients read those back with
`field_violations`. Kept apart from `visiontune.errors` so that the domain code raising errors does not
import gRPC.

Messages and violations often quote what the client sent, which can be any size; the status a client reads
travels in the trailers, which a gRPC client refuses past 8 KiB (16 KiB for certain) with RESOURCE_EXHAUSTED
instead of the real code. So `to_status` and `abort` bound them here, for every error of every service: the
message to MESSAGE_MAX_BYTES, each description to DESCRIPTION_MAX_BYTES, and the violations to
VIOLATIONS_MAX_BYTES in all (the first ones kept, the message saying how many more there were).
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
    "DESCRIPTION_MAX_BYTES",
    "MESSAGE_MAX_BYTES",
    "VIOLATIONS_MAX_BYTES",
    "abort",
    "bounded_violations",
    "clip",
    "field_violations",
    "invalid_argument",
    "status_code",
    "to_status",
]


# UTF-8 bytes. The message travels twice (grpc-message, percent-encoded: up to 3x; and inside the base64 details,
# 4/3x), the violations once, base64: at these bounds the trailers stay near 6 KiB, under the 8 KiB a client takes.
MESSAGE_MAX_BYTES = 512
DESCRIPTION_MAX_BYTES = 512
VIOLATIONS_MAX_BYTES = 3072
_ELLIPSIS = "…"


def clip(text: str, max_bytes: int) -> str:
    """`text` if its UTF-8 takes at most `max_bytes`, else its longest prefix that fits with an ellipsis after it
    (never a broken character)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    room = max_bytes - len(_ELLIPSIS.encode())
    return data[: max(room, 0)].decode(errors="ignore") + _ELLIPSIS


def bounded_violations(violations: Sequence[FieldViolation]) -> tuple[list[FieldViolation], int]:
    """The violations as they go on the wire: each description clipped, the first ones within
    VIOLATIONS_MAX_BYTES (always at least one); and how many were left out."""
    kept: list[FieldViolation] = []
    used = 0
    for v in violations:
        clipped = FieldViolation(clip(v.field, DESCRIPTION_MAX_BYTES), clip(v.description, DESCRIPTION_MAX_BYTES))
        size = len(clipped.field.encode()) + len(clipped.description.encode())
        if kept and used + size > VIOLATIONS_MAX_BYTES:
            break
        kept.append(clipped)
        used += size
    return kept, len(violations) - len(kept)


def _message(error: VisionTuneError, left_out: int = 0) -> str:
    if not left_out:
        return clip(error.message, MESSAGE_MAX_BYTES)
    suffix = f" ({left_out} more violation{'s' if left_out != 1 else ''} not sent)"
    return clip(error.message, MESSAGE_MAX_BYTES - len(suffix.encode())) + suffix


def status_code(error: VisionTuneError) -> grpc.StatusCode:
    """The gRPC status code a client sees for `error`."""
    return grpc.StatusCode[error.code]


def to_status(error: VisionTuneError) -> grpc.Status:
    """`error` as a rich `grpc.Status`: code, message and, for InvalidArgument, the BadRequest detail; bounded in
    size (see the module's docstring)."""
    details = []
    left_out = 0
    if isinstance(error, InvalidArgument):
        violations, left_out = bounded_violations(error.violations)
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        details.append(detail)
    message = _message(error, left_out)
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def invalid_argument(violations: Sequence[FieldViolation], message: str | None = None) -> grpc.Status:
    """An INVALID_ARGUMENT status whose BadRequest detail lists every violation (not only the first)."""
    return to_status(InvalidArgument(violations, message))


def abort(context: grpc.ServicerContext, error: VisionTuneError) -> NoReturn:
    """End the current call with `error`'s status. Only INVALID_ARGUMENT carries a details trailer."""
    if isinstance(error, InvalidArgument):
        context.abort_with_status(to_status(error))
    context.abort(status_code(error), _message(error))


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
