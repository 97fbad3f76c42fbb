"""Client-side helpers: channels to VisionTune servers, health polling, reflection listing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from visiontune.settings import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["is_serving", "list_services", "make_channel", "wait_for_serving"]

# grpc's classes are generic only in grpc-stubs; subscripting them at runtime raises.
if TYPE_CHECKING:
    _UnaryUnaryClientInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamClientInterceptor = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryClientInterceptor = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamClientInterceptor = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnaryClientInterceptor = grpc.UnaryUnaryClientInterceptor
    _UnaryStreamClientInterceptor = grpc.UnaryStreamClientInterceptor
    _StreamUnaryClientInterceptor = grpc.StreamUnaryClientInterceptor
    _StreamStreamClientInterceptor = grpc.StreamStreamClientInterceptor


class _TokenPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._metadata: grpc.Metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self._metadata, None)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: grpc.Metadata | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _TokenClientInterceptor(
    _UnaryUnaryClientInterceptor,
    _UnaryStreamClientInterceptor,
    _StreamUnaryClientInterceptor,
    _StreamStreamClientInterceptor,
):
    """Adds the bearer token on an insecure channel (call credentials are refused without TLS)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=(*(details.metadata or ()), self._header),
            credentials=details.credentials,
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def make_channel(
    target: str,
    *,
    tls_ca: Path | None = None,
    tls: bool = False,
    token: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A channel to a VisionTune server.

    TLS when `tls_ca` is given (trusting that PEM bundle) or `tls` is true (trusting the system roots).
    `token` is sent as `authorization: Bearer <token>` on every call.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if tls_ca is not None or tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None
        )
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_TokenPlugin(token), name="bearer")
            )
        return grpc.secure_channel(target, credentials, options=options)
    channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _TokenClientInterceptor(token))
    return channel


# Codes that mean "not up yet": keep polling. Anything else (UNIMPLEMENTED: no health service) is final.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND})


def wait_for_serving(
    target: str | grpc.Channel,
    service: str = "",
    timeout: float = 10.0,
    *,
    tls_ca: Path | None = None,
    tls: bool = False,
) -> None:
    """Poll `grpc.health.v1.Health/Check` until `service` ("" = the whole server) is SERVING.

    `target` is an address (a channel is made and closed here) or an existing channel. Raises TimeoutError
    with the last answer seen, or grpc.RpcError when the server answers with a final error.
    """
    channel = make_channel(target, tls_ca=tls_ca, tls=tls) if isinstance(target, str) else target
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{target if isinstance(target, str) else 'server'}: {service or 'server'} "
                    f"not SERVING after {timeout:g}s (last: {last})"
                )
            try:
                response = stub.Check(request, timeout=min(remaining, 2.0), wait_for_ready=True)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                last = exc.code().name
            else:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    finally:
        if isinstance(target, str):
            channel.close()


def is_serving(target: str, service: str = "", timeout: float = 2.0) -> bool:
    """True when `service` at `target` answers SERVING within `timeout`; never raises for a down server."""
    try:
        wait_for_serving(target, service, timeout)
    except (TimeoutError, grpc.RpcError):
        return False
    return True


def list_services(target: str | grpc.Channel, timeout: float = 5.0) -> list[str]:
    """The fully-qualified service names a server exposes through server reflection, sorted."""
    channel = make_channel(target) if isinstance(target, str) else target
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names: list[str] = []
        for response in stub.ServerReflectionInfo(iter([request]), timeout=timeout):
            names.extend(service.name for service in response.list_services_response.service)
        return sorted(names)
    finally:
        if isinstance(target, str):
            channel.close()
