"""How the server's interceptors wrap a method handler: a handler of the same kind running other code, and a
behaviour observed until the call ends with its final status code.

Shared by `visiontune.server` (call logging, error mapping) and `visiontune.auth` (scopes, audit log), so the way
a call's outcome is read exists once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

__all__ = ["Continuation", "Handler", "ServerInterceptor", "behavior", "final_code", "handler_like", "observed"]

# grpc's classes are generic only in grpc-stubs; subscripting them at runtime raises. The interceptors of
# `visiontune.server` and `visiontune.auth` use these names.
if TYPE_CHECKING:
    ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], "grpc.RpcMethodHandler[Any, Any] | None"]
else:
    ServerInterceptor = grpc.ServerInterceptor
    Handler = Any
    Continuation = Any


# Called when a call ends: its context, the final status code and how long the behaviour ran in ms.
OnDone = Callable[[grpc.ServicerContext, grpc.StatusCode, float], None]


def handler_like(handler: Handler, behavior: Callable[..., Any], *, keep_serializers: bool) -> Handler:
    """A handler of the same kind (unary/streaming on each side) as `handler`, running `behavior`.

    Without serializers (`keep_serializers=False`) the request reaches `behavior` as raw bytes: never parsed."""
    req = handler.request_deserializer if keep_serializers else None
    resp = handler.response_serializer if keep_serializers else None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, req, resp)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, req, resp)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, req, resp)
    return grpc.unary_unary_rpc_method_handler(behavior, req, resp)


def behavior(handler: Handler) -> Callable[..., Any]:
    fn = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
    assert fn is not None, "a method handler always has one behaviour"
    return fn


def final_code(context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: the one set on the context (an abort, the error mapping), else OK when the
    behaviour returned, CANCELLED when the client went away from a stream, UNKNOWN for any other exception."""
    code: grpc.StatusCode | None = getattr(context, "code", lambda: None)()
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def observed(
    fn: Callable[..., Any],
    streaming: bool,
    on_done: OnDone,
    *,
    before: Callable[[Any, grpc.ServicerContext], None] | None = None,
) -> Callable[..., Any]:
    """`fn` (a unary or response-streaming behaviour) that calls `on_done` once the call is over, whatever way it
    ended; `before` sees the request first."""

    def done(context: grpc.ServicerContext, started: float, error: BaseException | None) -> None:
        on_done(context, final_code(context, error), round((time.perf_counter() - started) * 1e3, 3))

    if streaming:

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            error: BaseException | None = None
            if before is not None:
                before(request, context)
            try:
                yield from fn(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                done(context, started, error)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        error: BaseException | None = None
        if before is not None:
            before(request, context)
        try:
            return fn(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            done(context, started, error)

    return unary
