"""The gRPC server runtime both services run on (client-side helpers live in `visiontune.client`).

What every VisionTune server gets (docs/architecture.md §3): `grpc.health.v1` health, server reflection, graceful
shutdown on SIGTERM (health flips to NOT_SERVING, in-flight calls drain, new calls are refused), message
size limits, optional TLS (mutual with a client CA), scoped bearer tokens and an audit log (`visiontune.auth`,
docs/security.md), and one error mapping: a `VisionTuneError` raised
by any servicer method, unary or streaming, ends the call with its status (`ErrorStatusInterceptor`). A
service plugs in through `ServiceBinding`s; this module knows nothing about the services' own protobuf modules.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from visiontune import status
from visiontune.auth import AuditInterceptor, ScopeInterceptor, TokenFileError, TokenRegistry
from visiontune.calls import Continuation, Handler, ServerInterceptor, behavior, handler_like, observed
from visiontune.errors import VisionTuneError
from visiontune.settings import ServerSettings

__all__ = [
    "AUTH_EXEMPT_PREFIXES",
    "CallLoggingInterceptor",
    "ErrorStatusInterceptor",
    "GrpcServer",
    "ServerStartError",
    "ServiceBinding",
]

log = logging.getLogger(__name__)


HEALTH_SERVICE_NAME: str = health.SERVICE_NAME
REFLECTION_SERVICE_NAME: str = reflection.SERVICE_NAME

# Kubernetes gRPC probes and tooling (grpcurl list/describe) carry no token, so these stay open.
AUTH_EXEMPT_PREFIXES: tuple[str, ...] = (
    f"/{HEALTH_SERVICE_NAME}/",
    f"/{REFLECTION_SERVICE_NAME}/",
    "/grpc.reflection.v1.ServerReflection/",
)


class ServerStartError(RuntimeError):
    """The server could not start (port in use, unreadable TLS files); the message is one line for the CLI."""


@dataclass
class ServiceBinding:
    """One gRPC service to serve: its full name (health and reflection list it) and how to add it."""

    name: str  # full service name, e.g. "visiontune.v1.TrainingService"
    register: Callable[[grpc.Server], None]  # e.g. lambda s: add_TrainingServiceServicer_to_server(svc, s)


# --------------------------------------------------------------------------------------------- interceptors


class CallLoggingInterceptor(ServerInterceptor):
    """Logs every call at DEBUG with method, code and duration_ms; costs one level check when DEBUG is off."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("visiontune.rpc")

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or not self._log.isEnabledFor(logging.DEBUG):
            return handler
        method = handler_call_details.method
        fn = behavior(handler)
        # Health probes would flood the log; the non-blocking Watch must keep its grpc-specific attributes.
        if method.startswith(f"/{HEALTH_SERVICE_NAME}/") or getattr(fn, "experimental_non_blocking", False):
            return handler
        wrapped = observed(fn, handler.response_streaming, functools.partial(self._done, method))
        return handler_like(handler, wrapped, keep_serializers=True)

    def _done(self, method: str, _context: grpc.ServicerContext, code: grpc.StatusCode, duration_ms: float) -> None:
        self._log.debug("rpc", extra={"method": method, "code": code.name, "duration_ms": duration_ms})


class ErrorStatusInterceptor(ServerInterceptor):
    """Ends a call whose servicer method raised a `VisionTuneError` with that error's status
    (`visiontune.status.abort`): the one place both services map errors to status codes.

    Streaming methods are wrapped too, so an error raised before or while the stream yields ends it the same
    way. Any other exception is left to gRPC, which answers UNKNOWN: it is a bug, not an answer.
    """

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        fn = behavior(handler)
        # The health service's non-blocking Watch must keep its grpc-specific attributes; it raises nothing of ours.
        if getattr(fn, "experimental_non_blocking", False):
            return handler
        return handler_like(handler, self._wrap(fn, handler.response_streaming), keep_serializers=True)

    @staticmethod
    def _wrap(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from fn(request, context)
                except VisionTuneError as err:
                    status.abort(context, err)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(request, context)
            except VisionTuneError as err:
                status.abort(context, err)

        return unary


# ------------------------------------------------------------------------------------------------- server


def _bind_failure_reason(host: str, port: int) -> str:
    """Why binding host:port fails, asked of the OS (grpc's own error only says 'Failed to bind')."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot resolve host {host!r} ({exc.strerror or exc})"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(sockaddr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return "the address is not available"


class GrpcServer:
    """A gRPC server with health, reflection, limits, optional TLS/auth, and a graceful stop.

    Typical use in a service's `main`:
    `GrpcServer(settings, [binding], service_label="trainer").run_forever()`.
    Tests use `start()` / `stop()` with port 0 and read `.port`.
    """

    def __init__(
        self,
        settings: ServerSettings,
        bindings: Sequence[ServiceBinding],
        *,
        service_label: str,
        max_workers: int | None = None,
        on_stop: Callable[[], None] | None = None,
        registry: TokenRegistry | None = None,
    ) -> None:
        """`registry`: who may call what; None builds one from settings.auth_token_file / auth_token (none when
        both are unset: authentication off). The service passes the one its servicers ask who calls."""
        self._settings = settings
        if registry is None:
            try:
                registry = TokenRegistry.from_settings(settings.auth_token_file, settings.auth_token)
            except TokenFileError as err:
                raise ServerStartError(str(err)) from err
        self._registry = registry
        self._bindings = list(bindings)
        self._label = service_label
        self._max_workers = max_workers or settings.rpc_threads
        self._on_stop = on_stop
        self._server: grpc.Server | None = None
        self._health: Any = None  # grpc_health's HealthServicer (untyped)
        self._executors: list[futures.ThreadPoolExecutor] = []
        self._port: int | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._terminated = threading.Event()
        self._stop_requested = threading.Event()  # set by a signal; the thread in wait() performs the stop
        self._wake = threading.Event()  # set with either of the two above; both are permanent
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    # -- properties

    @property
    def port(self) -> int:
        """The bound port (the one the OS picked when settings.port is 0)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{self._settings.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self._settings.tls_cert is not None

    @property
    def registry(self) -> TokenRegistry | None:
        """The principals this server accepts; None when authentication is off."""
        return self._registry

    @property
    def service_names(self) -> list[str]:
        return [b.name for b in self._bindings]

    # -- lifecycle

    def _credentials(self) -> grpc.ServerCredentials | None:
        cert, key, client_ca = self._settings.tls_cert, self._settings.tls_key, self._settings.tls_client_ca
        if cert is None and key is None:
            if client_ca is not None:
                raise ServerStartError("mutual TLS (--tls-client-ca) needs TLS: give --tls-cert and --tls-key too")
            return None
        if cert is None or key is None:
            raise ServerStartError("TLS needs both a certificate and a private key (--tls-cert, --tls-key)")
        try:
            pair = (Path(key).read_bytes(), Path(cert).read_bytes())
            roots = Path(client_ca).read_bytes() if client_ca is not None else None
        except OSError as exc:
            raise ServerStartError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
        # Mutual TLS: the handshake itself refuses a client without a certificate signed by the client CA.
        return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)

    def start(self) -> None:
        """Build, bind and start the server; returns once it accepts calls. Raises ServerStartError."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the server is already started")
            s = self._settings
            credentials = self._credentials()
            options = [
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.max_receive_message_length", s.max_message_bytes),
                # grpc enables SO_REUSEPORT by default: a second server on a busy port would then start and
                # silently share it. A port in use must be an error.
                ("grpc.so_reuseport", 0),
            ]
            # The audit log wraps the scope check, so a denied call is audited with its final code.
            interceptors: list[ServerInterceptor] = [
                CallLoggingInterceptor(),
                AuditInterceptor(self._registry, exempt_prefixes=AUTH_EXEMPT_PREFIXES),
            ]
            if self._registry is not None:
                interceptors.append(ScopeInterceptor(self._registry, exempt_prefixes=AUTH_EXEMPT_PREFIXES))
            # Innermost, next to the servicers: the logging interceptor then sees the mapped status code.
            interceptors.append(ErrorStatusInterceptor())
            rpc_pool = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix=f"{self._label}-rpc")
            # Health Watch streams run on their own small pool so they never take an RPC worker.
            health_pool = futures.ThreadPoolExecutor(2, thread_name_prefix=f"{self._label}-health")
            self._executors = [rpc_pool, health_pool]
            server = grpc.server(rpc_pool, interceptors=interceptors, options=options)

            for binding in self._bindings:
                binding.register(server)
            self._health = health.HealthServicer(experimental_non_blocking=True, experimental_thread_pool=health_pool)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            for name in ["", *self.service_names]:
                self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
            reflection.enable_server_reflection(
                (*self.service_names, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME), server
            )

            address = f"{s.host}:{s.port}"
            try:
                if credentials is not None:
                    port = server.add_secure_port(address, credentials)
                else:
                    port = server.add_insecure_port(address)
            except RuntimeError:  # recent grpc raises "Failed to bind"; older versions return 0
                port = 0
            if port == 0:
                self._shutdown_executors()
                raise ServerStartError(
                    f"{self._label}: cannot listen on {address}: {_bind_failure_reason(s.host, s.port)}"
                )
            server.start()
            self._server = server
            self._port = port

    def set_serving(self, service: str, serving: bool) -> None:
        """Report one service (or "" for the whole server) as SERVING or NOT_SERVING, e.g. while a model
        loads. Ignored once a stop began: then everything is NOT_SERVING for good."""
        if self._health is None:
            raise RuntimeError("the server is not started")
        response = health_pb2.HealthCheckResponse
        status = response.SERVING if serving else response.NOT_SERVING
        self._health.set(service, status)

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health goes NOT_SERVING, new calls are refused, in-flight calls get `grace` seconds
        (settings.grace_seconds when None; 0 cancels them at once), then on_stop runs. Safe to call twice:
        a second caller waits for the first one's stop to finish."""
        with self._lock:
            server = self._server
            if server is None or self._stopping:
                already = self._stopping
                server = None
            else:
                self._stopping = True
        if server is None:
            if already:
                self._terminated.wait()
            else:  # never started: nothing to drain
                self._terminated.set()
                self._wake.set()
            return

        grace_s = self._settings.grace_seconds if grace is None else max(0.0, grace)
        log.info("stopping", extra={"grace_s": grace_s})
        # Health first, so load balancers and probes stop routing here while the calls drain.
        self._health.enter_graceful_shutdown()
        drained = server.stop(grace_s)
        # grpc cancels what is left at the deadline and then sets the event; the margin only guards a wedge.
        if not drained.wait(grace_s + 5.0):
            log.warning("the server did not terminate within the grace period")
        self._shutdown_executors()
        try:
            if self._on_stop is not None:
                self._on_stop()
        except Exception:
            log.exception("on_stop failed")
        finally:
            self._terminated.set()
            self._wake.set()
            log.info("stopped")

    def _shutdown_executors(self) -> None:
        # wait=False: a handler still running after the grace period cannot be killed; do not hang on it.
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False).

        When a signal asked for a stop, this thread performs the graceful stop, so call it from the main
        thread after `install_signal_handlers()`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._terminated.is_set():
                return True
            if self._stop_requested.is_set():
                name = signal.Signals(self._signal).name if self._signal is not None else "request"
                log.info("shutdown requested", extra={"signal": name})
                self.stop()
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            # Bounded waits keep the main thread responsive to signals on every platform.
            self._wake.wait(1.0 if remaining is None else min(remaining, 1.0))

    def request_stop(self) -> None:
        """Ask the thread in `wait()` to stop gracefully (what SIGTERM does); returns at once."""
        self._stop_requested.set()
        self._wake.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Runs on the main thread between bytecodes: only set flags (no locks, no logging) unless forced.
        if not self._stop_requested.is_set():
            self._signal = signum
            self.request_stop()
            return
        # A second signal during the drain: the operator does not want to wait; cancel in-flight calls.
        server = self._server
        if server is not None:
            threading.Thread(target=server.stop, args=(None,), name="force-stop", daemon=True).start()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT trigger a graceful stop with settings.grace_seconds (a second one cancels the
        drain). Must be called from the main thread, which must then call `wait()`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()

    def run_forever(self) -> None:
        """start + signal handlers + a "listening" log line + wait; returns after a graceful stop."""
        self.start()
        self.install_signal_handlers()
        try:
            log.info(
                "listening",
                extra={
                    "address": self.address,
                    "port": self.port,
                    "tls": self.tls,
                    "mtls": self._settings.tls_client_ca is not None,
                    "auth": self._registry is not None,
                    "services": self.service_names,
                    "label": self._label,
                },
            )
            self.wait()
        finally:
            self._restore_signal_handlers()
            if not self._terminated.is_set():  # e.g. KeyboardInterrupt raised by a foreign handler
                self.stop()
