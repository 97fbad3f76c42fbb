"""Client-side helpers: channels to VisionTune servers, health polling, reflection listing.

Several replicas of one service are reached through one channel: `replicas_target` lists their addresses in a
gRPC `ipv4:`/`ipv6:` target, and `make_channel` gives such a target the `round_robin` policy, so consecutive calls
go to the replicas in turn (gRPC's default, pick_first, would send every call to the first that answers).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from visiontune.settings import DEFAULT_MAX_MESSAGE_BYTES

__all__ = [
    "is_serving",
    "list_services",
    "make_channel",
    "replica_addresses",
    "replicas_target",
    "round_robin",
    "wait_for_serving",
]

_ADDRESS_SCHEMES = ("ipv4:", "ipv6:")

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


def _split_address(address: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError when there is no port."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r}: not host:port")
    return host.removeprefix("[").removesuffix("]"), port


def replicas_target(addresses: Sequence[str]) -> str:
    """The gRPC target for one server (its address as given) or for several replicas of one service:
    `ipv4:10.0.0.1:50051,10.0.0.2:50051` (or `ipv6:[::1]:50051,...`), which `make_channel` balances round-robin.

    Several addresses must be IP literals of one family: gRPC's address-list targets do not resolve names (a host
    name with several replicas behind it is a DNS name or a load balancer: give that as the one address)."""
    if not addresses:
        raise ValueError("no server address")
    if len(addresses) == 1:
        return addresses[0].strip()
    versions = set()
    parts = []
    for address in addresses:
        host, port = _split_address(address)
        try:
            version = ipaddress.ip_address(host).version
        except ValueError as err:
            raise ValueError(
                f"{address!r}: several replicas are listed by IP address (127.0.0.1:50051,127.0.0.1:50061), not by "
                "host name; for a name with several replicas behind it, give that one name"
            ) from err
        versions.add(version)
        parts.append(f"[{host}]:{port}" if version == 6 else f"{host}:{port}")
    if len(versions) > 1:
        raise ValueError(f"{', '.join(addresses)}: IPv4 and IPv6 addresses in one list")
    return f"ipv{versions.pop()}:" + ",".join(parts)


def replica_addresses(value: str) -> list[str]:
    """The replica addresses in a comma-separated list (what VISIONTUNE_TRAINER / VISIONTUNE_INFERENCE hold); a
    gRPC target with a scheme (`dns:///name:port`, `ipv4:a,b`) is one opaque target."""
    if "://" in value or value.startswith(_ADDRESS_SCHEMES):
        return [value.strip()]
    return [part.strip() for part in value.split(",") if part.strip()]


def round_robin(target: str) -> bool:
    """Whether `target` lists several addresses (a `replicas_target`): its channel balances calls round-robin."""
    return target.startswith(_ADDRESS_SCHEMES) and "," in target


def make_channel(
    target: str,
    *,
    tls_ca: Path | None = None,
    tls: bool = False,
    token: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls_client_cert: Path | None = None,
    tls_client_key: Path | None = None,
) -> grpc.Channel:
    """A channel to a VisionTune server.

    TLS when `tls_ca` is given (trusting that PEM bundle) or `tls` is true (trusting the system roots);
    `tls_client_cert` and `tls_client_key` (PEM, both or neither) present a client certificate, for a server
    that requires one (mutual TLS) and imply TLS. `token` is sent as `authorization: Bearer <token>` on every
    call. A target listing several replicas (`replicas_target`) gets the round-robin policy: each call goes to
    the next replica that is up.
    """
    if (tls_client_cert is None) != (tls_client_key is None):
        raise ValueError("a client certificate needs its private key: give both or neither")
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if round_robin(target):
        options.append(("grpc.lb_policy_name", "round_robin"))
    if tls_ca is not None or tls or tls_client_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None,
            private_key=Path(tls_client_key).read_bytes() if tls_client_key is not None else None,
            certificate_chain=Path(tls_client_cert).read_bytes() if tls_client_cert is not None else None,
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
    tls_client_cert: Path | None = None,
    tls_client_key: Path | None = None,
) -> None:
    """Poll `grpc.health.v1.Health/Check` until `service` ("" = the whole server) is SERVING.

    `target` is an address (a channel is made and closed here, with the TLS arguments of `make_channel`) or an
    existing channel. Raises TimeoutError with the last answer seen, or grpc.RpcError when the server answers
    with a final error.
    """
    if isinstance(target, str):
        channel = make_channel(
            target, tls_ca=tls_ca, tls=tls, tls_client_cert=tls_client_cert, tls_client_key=tls_client_key
        )
    else:
        channel = target
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


def is_serving(
    target: str,
    service: str = "",
    timeout: float = 2.0,
    *,
    tls_ca: Path | None = None,
    tls_client_cert: Path | None = None,
    tls_client_key: Path | None = None,
) -> bool:
    """True when `service` at `target` answers SERVING within `timeout`; never raises for a down server."""
    try:
        wait_for_serving(
            target, service, timeout, tls_ca=tls_ca, tls_client_cert=tls_client_cert, tls_client_key=tls_client_key
        )
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
