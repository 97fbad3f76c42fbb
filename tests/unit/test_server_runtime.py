"""The shared gRPC server runtime over real loopback gRPC: health, reflection, auth, TLS, limits, shutdown,
rich errors and structured logs. No mocks; a tiny generic bytes-in/bytes-out service stands in for the
real servicers.

One module because every test runs the same `GrpcServer` through the same fixture and stub; sections follow
server.py (lifecycle, interceptors, auth, TLS, errors, logs)."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tests.tls_certs import make_mutual_tls
from visiontune.auth import METHOD_SCOPES, MUTATING_METHODS, Scope, token_sha256
from visiontune.client import make_channel, wait_for_serving
from visiontune.errors import FieldViolation
from visiontune.logs import configure_logging
from visiontune.server import GrpcServer, ServerStartError, ServiceBinding
from visiontune.settings import S3Settings, ServerSettings
from visiontune.status import field_violations, invalid_argument
from visiontune.v1 import inference_service_pb2, training_service_pb2

REPO = Path(__file__).resolve().parents[2]
SERVICE = "visiontune.test.Echo"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
THREE_VIOLATIONS = [
    FieldViolation("stage1.learning_rate", "must be in (0, 1], got 3"),
    FieldViolation("dataset.uri", "is required"),
    FieldViolation("model.dropout", "must be in [0, 1), got 1.5"),
]


class EchoService:
    """Raw-bytes methods: Echo, Slow (blocks until `release`), Count (server stream), Invalid, NotImpl."""

    def __init__(self) -> None:
        self.slow_started = threading.Event()
        self.release = threading.Event()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.slow_started.set()
        self.release.wait(10)
        return b"done:" + request

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(3):
            yield str(i).encode()

    def invalid(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort_with_status(invalid_argument(THREE_VIOLATIONS))

    def not_impl(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Echo.NotImpl is not implemented by this server")

    def binding(self) -> ServiceBinding:
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Invalid": grpc.unary_unary_rpc_method_handler(self.invalid),
            "NotImpl": grpc.unary_unary_rpc_method_handler(self.not_impl),
        }
        generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
        return ServiceBinding(SERVICE, lambda server: server.add_generic_rpc_handlers((generic,)))


class FakeApi:
    """Every RPC of both real services, bytes in and bytes out (b"ok"): what the scope checks guard, without the
    servicers behind them."""

    SERVICES = (
        training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
        inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    )

    @staticmethod
    def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"ok"

    @staticmethod
    def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"ok"

    def bindings(self) -> list[ServiceBinding]:
        bindings = []
        for service in self.SERVICES:
            handlers = {
                m.name: grpc.unary_stream_rpc_method_handler(self._stream)
                if m.server_streaming
                else grpc.unary_unary_rpc_method_handler(self._unary)
                for m in service.methods
            }
            bindings.append(ServiceBinding(service.full_name, self._register(service.full_name, handlers)))
        return bindings

    @staticmethod
    def _register(name: str, handlers: dict[str, Any]) -> Callable[[grpc.Server], None]:
        generic = grpc.method_handlers_generic_handler(name, handlers)
        return lambda server: server.add_generic_rpc_handlers((generic,))

    @staticmethod
    def call(channel: grpc.Channel, method: str, token: str | None) -> bytes:
        """One call of `method` with `token`; raises grpc.RpcError as the server answers."""
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        streaming = method.rsplit("/", 1)[1].startswith("Watch")
        if streaming:
            return b"".join(channel.unary_stream(method, None, None)(b"", timeout=5, metadata=metadata))
        result: bytes = channel.unary_unary(method, None, None)(b"", timeout=5, metadata=metadata)
        return result


def unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{SERVICE}/{method}", None, None)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, data_dir=tmp_path, s3=S3Settings(), grace_seconds=5.0)


@pytest.fixture
def start_server(settings: ServerSettings) -> Iterator[Callable[..., tuple[GrpcServer, EchoService]]]:
    """Starts servers with per-test setting overrides; stops every one of them at teardown."""
    started: list[GrpcServer] = []

    def start(*, fake_api: bool = False, **overrides: Any) -> tuple[GrpcServer, EchoService]:
        service = EchoService()
        bindings = [service.binding(), *(FakeApi().bindings() if fake_api else [])]
        server = GrpcServer(replace(settings, **overrides), bindings, service_label="test")
        server.start()
        started.append(server)
        return server, service

    yield start
    for server in started:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # `cryptography` is not in the venv, so the self-signed certificate comes from the openssl CLI.
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


# ------------------------------------------------------------------------------------------ health/reflection


def test_health_is_serving_for_the_server_and_each_binding(start_server: Any) -> None:
    server, _ = start_server()
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"
    wait_for_serving(server.address, SERVICE, timeout=5)
    with make_channel(server.address) as channel:
        assert health_status(channel) == SERVING
        assert health_status(channel, SERVICE) == SERVING
        with pytest.raises(grpc.RpcError) as err:
            health_status(channel, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        server.set_serving(SERVICE, False)
        assert health_status(channel, SERVICE) == NOT_SERVING
        with pytest.raises(TimeoutError, match="NOT_SERVING"):
            wait_for_serving(channel, SERVICE, timeout=0.3)


def test_reflection_lists_the_registered_services(start_server: Any) -> None:
    server, _ = start_server()
    with make_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


# ------------------------------------------------------------------------------------------------------ auth


def test_bearer_token_guards_unary_and_streaming_calls_but_not_health(start_server: Any) -> None:
    server, _ = start_server(auth_token="s3cret")
    with make_channel(server.address) as plain, make_channel(server.address, token="s3cret") as good:
        for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", "Basic s3cret"),)]:
            with pytest.raises(grpc.RpcError) as err:
                unary(plain, "Echo")(b"hi", timeout=5, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == "missing or invalid bearer token"
        with pytest.raises(grpc.RpcError) as err:
            list(plain.unary_stream(f"/{SERVICE}/Count", None, None)(b"", timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        assert unary(good, "Echo")(b"hi", timeout=5) == b"hi"
        assert list(good.unary_stream(f"/{SERVICE}/Count", None, None)(b"", timeout=5)) == [b"0", b"1", b"2"]
        # Probes carry no token: health and reflection stay open.
        assert health_status(plain, SERVICE) == SERVING
        wait_for_serving(server.address, timeout=5)
        # An unknown method is still UNIMPLEMENTED, not a misleading UNAUTHENTICATED.
        with pytest.raises(grpc.RpcError) as err:
            plain.unary_unary(f"/{SERVICE}/Nope", None, None)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


PRINCIPAL_TOKENS = {scope: f"{scope}-token" for scope in Scope}


def write_token_file(path: Path, principals: dict[str, tuple[list[str], str]]) -> Path:
    """{name: (scopes, token)} as a token file holding the tokens' sha256, swapped in as Kubernetes does."""
    entries = [{"name": n, "scopes": scopes, "sha256": token_sha256(t)} for n, (scopes, t) in principals.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"principals": entries}))
    tmp.replace(path)
    return path


@pytest.fixture
def one_principal_per_scope(tmp_path: Path) -> Path:
    return write_token_file(
        tmp_path / "tokens.json", {f"only-{s}": ([str(s)], token) for s, token in PRINCIPAL_TOKENS.items()}
    )


def test_each_scope_opens_exactly_its_methods_and_admin_opens_all(
    start_server: Any, one_principal_per_scope: Path
) -> None:
    server, _ = start_server(fake_api=True, auth_token_file=one_principal_per_scope)
    with make_channel(server.address) as channel:
        for scope, token in PRINCIPAL_TOKENS.items():
            for method, needed in METHOD_SCOPES.items():
                if scope in (needed, Scope.ADMIN):
                    assert FakeApi.call(channel, method, token) == b"ok", (scope, method)
                    continue
                with pytest.raises(grpc.RpcError) as err:
                    FakeApi.call(channel, method, token)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (scope, method)
                assert err.value.details() == f"principal 'only-{scope}' lacks the {needed} scope that {method} needs"
            with pytest.raises(grpc.RpcError) as err:
                FakeApi.call(channel, method, "not-a-known-token")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A method missing from the table (the echo service here) is closed to everyone but admins: fail closed.
        echo = f"/{SERVICE}/Echo"
        assert FakeApi.call(channel, echo, PRINCIPAL_TOKENS[Scope.ADMIN]) == b""
        with pytest.raises(grpc.RpcError) as err:
            FakeApi.call(channel, echo, PRINCIPAL_TOKENS[Scope.READ])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == f"{echo} is open to admin tokens only ('only-read')"
        assert health_status(channel, SERVICE) == SERVING


def test_the_legacy_auth_token_is_an_admin_beside_the_token_file(start_server: Any, tmp_path: Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.json", {"kiosk": (["classify"], "kiosk-token")})
    server, _ = start_server(fake_api=True, auth_token="s3cret", auth_token_file=tokens)
    assert server.registry is not None
    assert {p.name for p in server.registry.principals} == {"default", "kiosk"}
    with make_channel(server.address, token="s3cret") as admin, make_channel(server.address) as plain:
        for method in METHOD_SCOPES:
            assert FakeApi.call(admin, method, None) == b"ok"
        assert FakeApi.call(plain, "/visiontune.v1.InferenceService/Classify", "kiosk-token") == b"ok"


def test_a_changed_token_file_is_used_without_a_restart(start_server: Any, tmp_path: Path) -> None:
    path = write_token_file(tmp_path / "tokens.json", {"ci": (["train"], "old-token")})
    server, _ = start_server(fake_api=True, auth_token_file=path)
    create = "/visiontune.v1.TrainingService/CreateJob"
    with make_channel(server.address) as channel:
        assert FakeApi.call(channel, create, "old-token") == b"ok"
        write_token_file(path, {"ci": (["read"], "new-token")})
        deadline = time.monotonic() + 5
        refused: grpc.StatusCode | None = None
        while refused is None:  # the server looks at the file at most once a second
            try:
                FakeApi.call(channel, create, "old-token")
            except grpc.RpcError as exc:
                refused = exc.code()
            assert time.monotonic() < deadline, "the new token file was not picked up"
            time.sleep(0.1)
        assert refused == grpc.StatusCode.UNAUTHENTICATED
        assert FakeApi.call(channel, "/visiontune.v1.TrainingService/GetJob", "new-token") == b"ok"
        with pytest.raises(grpc.RpcError) as err:
            FakeApi.call(channel, create, "new-token")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        path.write_text("{ not json")  # a broken update never opens anything and keeps the last good file
        time.sleep(1.2)
        assert FakeApi.call(channel, "/visiontune.v1.TrainingService/GetJob", "new-token") == b"ok"
        with pytest.raises(grpc.RpcError) as err:
            FakeApi.call(channel, create, "old-token")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_broken_token_file_is_a_start_error(settings: ServerSettings, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"principals": [{"name": "ci", "scopes": ["write"], "token": "t"}]}')
    with pytest.raises(ServerStartError, match=r"tokens.json: principals\[0\] \(ci\): unknown scope\(s\) write"):
        GrpcServer(replace(settings, auth_token_file=path), [], service_label="test")


@pytest.mark.usefixtures("root_logging")
def test_mutating_and_denied_calls_write_one_audit_line_each(
    start_server: Any, one_principal_per_scope: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json", service="inference")
    server, _ = start_server(fake_api=True, auth_token_file=one_principal_per_scope)
    classify_token, train_token = PRINCIPAL_TOKENS[Scope.CLASSIFY], PRINCIPAL_TOKENS[Scope.TRAIN]
    deploy, create = "/visiontune.v1.InferenceService/DeployModel", "/visiontune.v1.TrainingService/CreateJob"
    with make_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError):
            FakeApi.call(channel, deploy, classify_token)
        FakeApi.call(channel, create, train_token)
        FakeApi.call(channel, "/visiontune.v1.TrainingService/GetJob", PRINCIPAL_TOKENS[Scope.READ])  # not audited
        FakeApi.call(channel, "/visiontune.v1.TrainingService/WatchJob", PRINCIPAL_TOKENS[Scope.READ])
        with pytest.raises(grpc.RpcError):
            FakeApi.call(channel, "/visiontune.v1.TrainingService/WatchJob", None)
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    audit = [r for r in records if r["logger"] == "visiontune.audit"]
    assert [(r["principal"], r["method"], r["outcome"]) for r in audit] == [
        ("only-classify", deploy, "PERMISSION_DENIED"),
        ("only-train", create, "OK"),
        ("", "/visiontune.v1.TrainingService/WatchJob", "UNAUTHENTICATED"),
    ]
    for record in audit:
        assert record["msg"] == "audit"
        assert record["service"] == "inference"
        assert record["duration_ms"] >= 0
        assert record["peer"].startswith("ipv4:127.0.0.1:")
        assert record["time"].endswith("Z")
        assert record["resources"] == {}  # the fake API's requests are raw bytes
        assert not any(token in json.dumps(record) for token in PRINCIPAL_TOKENS.values())
    assert {deploy, create} <= MUTATING_METHODS


@pytest.mark.usefixtures("root_logging")
def test_without_auth_mutating_calls_are_still_audited(start_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", service="trainer")
    server, _ = start_server(fake_api=True)
    assert server.registry is None
    with make_channel(server.address) as channel:
        FakeApi.call(channel, "/visiontune.v1.TrainingService/CancelJob", None)
        FakeApi.call(channel, "/visiontune.v1.TrainingService/ListJobs", None)
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    audit = [r for r in records if r["logger"] == "visiontune.audit"]
    assert [(r["principal"], r["method"], r["outcome"]) for r in audit] == [
        ("", "/visiontune.v1.TrainingService/CancelJob", "OK")
    ]


# ------------------------------------------------------------------------------------------------------- TLS


def test_tls_with_token_works_with_the_ca_and_refuses_plaintext(
    start_server: Any, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    server, _ = start_server(tls_cert=cert, tls_key=key, auth_token="s3cret")
    assert server.tls
    wait_for_serving(server.address, SERVICE, timeout=5, tls_ca=cert)
    # The token rides on call credentials over TLS.
    with make_channel(server.address, tls_ca=cert, token="s3cret") as channel:
        assert unary(channel, "Echo")(b"secure", timeout=5) == b"secure"
    with make_channel(server.address, tls_ca=cert) as no_token:
        with pytest.raises(grpc.RpcError) as err:
            unary(no_token, "Echo")(b"x", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(server.address, token="s3cret") as plaintext:
        with pytest.raises(grpc.RpcError) as err:
            unary(plaintext, "Echo")(b"x", timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_client_ca(start_server: Any, tmp_path: Path) -> None:
    certs = make_mutual_tls(tmp_path / "tls")
    server, _ = start_server(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)
    wait_for_serving(
        server.address, SERVICE, timeout=5, tls_ca=certs.ca, tls_client_cert=certs.client_cert,
        tls_client_key=certs.client_key,
    )  # fmt: skip
    with make_channel(
        server.address, tls_ca=certs.ca, tls_client_cert=certs.client_cert, tls_client_key=certs.client_key
    ) as channel:
        assert unary(channel, "Echo")(b"mutual", timeout=5) == b"mutual"
    # No client certificate, or one another CA signed: the handshake fails, no call reaches a handler.
    for cert, key in ((None, None), (certs.stranger_cert, certs.stranger_key)):
        with make_channel(server.address, tls_ca=certs.ca, tls_client_cert=cert, tls_client_key=key) as channel:
            with pytest.raises(grpc.RpcError) as err:
                unary(channel, "Echo")(b"x", timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, cert
    with pytest.raises(ValueError, match="needs its private key"):
        make_channel(server.address, tls_client_cert=certs.client_cert)


def test_a_client_ca_without_a_server_certificate_is_a_start_error(settings: ServerSettings, tmp_path: Path) -> None:
    server = GrpcServer(replace(settings, tls_client_ca=tmp_path / "ca.pem"), [], service_label="test")
    with pytest.raises(ServerStartError, match="mutual TLS"):
        server.start()


def test_missing_tls_file_is_a_clear_start_error(settings: ServerSettings, tmp_path: Path) -> None:
    server = GrpcServer(
        replace(settings, tls_cert=tmp_path / "nope.pem", tls_key=tmp_path / "nope.key"), [], service_label="test"
    )
    with pytest.raises(ServerStartError, match=r"cannot read TLS file .*nope"):
        server.start()


# ------------------------------------------------------------------------------------------ limits and ports


def test_message_size_limit_is_resource_exhausted(start_server: Any) -> None:
    server, _ = start_server(max_message_bytes=1024)
    with make_channel(server.address, max_message_bytes=1 << 20) as channel:
        assert unary(channel, "Echo")(b"x" * 512, timeout=5) == b"x" * 512
        with pytest.raises(grpc.RpcError) as err:
            unary(channel, "Echo")(b"x" * 4096, timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_port_in_use_is_a_clear_one_line_error(start_server: Any, settings: ServerSettings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerStartError) as err:
            GrpcServer(replace(settings, port=port), [], service_label="trainer").start()
    message = str(err.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port}" in message
    assert "in use" in message

    # Another gRPC server on the same port must fail too, not share it through SO_REUSEPORT.
    first, _ = start_server()
    with pytest.raises(ServerStartError, match="in use"):
        GrpcServer(replace(settings, port=first.port), [], service_label="trainer").start()


# ----------------------------------------------------------------------------------------------- rich errors


def test_invalid_argument_carries_every_field_violation(start_server: Any) -> None:
    server, _ = start_server()
    with make_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            unary(channel, "Invalid")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == (
            "3 invalid fields: stage1.learning_rate (must be in (0, 1], got 3); dataset.uri (is required); "
            "model.dropout (must be in [0, 1), got 1.5)"
        )
        assert field_violations(err.value) == THREE_VIOLATIONS

        with pytest.raises(grpc.RpcError) as err:
            unary(channel, "NotImpl")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.value.details() == "Echo.NotImpl is not implemented by this server"
        assert field_violations(err.value) == []


def test_invalid_argument_summary_is_capped_but_details_are_complete() -> None:
    many = [FieldViolation(f"f{i}", "bad") for i in range(25)]
    status = invalid_argument(many)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details.startswith("25 invalid fields: f0 (bad); ")
    assert status.details.endswith("; and 15 more")
    assert invalid_argument(many[:1]).details == "1 invalid field: f0 (bad)"
    with pytest.raises(ValueError, match="at least one"):
        invalid_argument([])


# -------------------------------------------------------------------------------------------------- shutdown


def test_graceful_stop_drains_in_flight_calls_and_refuses_new_ones(settings: ServerSettings) -> None:
    stopped: list[bool] = []
    service = EchoService()
    server = GrpcServer(settings, [service.binding()], service_label="test", on_stop=lambda: stopped.append(True))
    server.start()
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5.0})
    try:
        with make_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == SERVING
            in_flight = unary(channel, "Slow").future(b"job", timeout=15)
            assert service.slow_started.wait(5)

            began = time.monotonic()
            stopper.start()
            # Health flips before the listener closes, so watchers (load balancers) hear it first.
            assert next(watch).status == NOT_SERVING
            watch.cancel()  # a Watch is an in-flight call too; let it go so the drain can finish

            # Wait until the server refuses new calls (stop() flips health, then stops the server). A call
            # racing with grpc core's shutdown can come back CANCELLED (never run); after that, UNAVAILABLE.
            refused: list[grpc.StatusCode] = []
            while grpc.StatusCode.UNAVAILABLE not in refused and time.monotonic() - began < 5:
                try:
                    unary(channel, "Echo")(b"late", timeout=2)
                except grpc.RpcError as exc:
                    refused.append(exc.code())
                else:
                    assert not refused, "a call succeeded after the server had begun refusing calls"
                    time.sleep(0.02)
            assert refused[-1:] == [grpc.StatusCode.UNAVAILABLE]
            assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
            assert not in_flight.done()

            service.release.set()
            assert in_flight.result(timeout=10) == b"done:job"
            stopper.join(10)
            assert not stopper.is_alive()
            assert time.monotonic() - began < 5  # it drained; it did not sit out the grace period
            assert stopped == [True]
            assert server.wait(timeout=0)
    finally:
        service.release.set()
        server.stop(grace=0)
        if stopper.is_alive():
            stopper.join(10)


SIGTERM_SERVER = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    import grpc
    from visiontune.logs import configure_logging
    from visiontune.server import GrpcServer, ServiceBinding
    from visiontune.settings import S3Settings, ServerSettings

    configure_logging("INFO", "json", service="sigterm-test")
    log = logging.getLogger("helper")

    def slow(request, context):
        log.info("slow call started")
        time.sleep(1.0)
        return b"done:" + request

    generic = grpc.method_handlers_generic_handler(
        "visiontune.test.Echo", {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
    )
    settings = ServerSettings(host="127.0.0.1", port=0, data_dir=Path(sys.argv[1]), s3=S3Settings(),
                              grace_seconds=5.0)
    GrpcServer(
        settings,
        [ServiceBinding("visiontune.test.Echo", lambda s: s.add_generic_rpc_handlers((generic,)))],
        service_label="sigterm-test",
        on_stop=lambda: log.info("on_stop ran"),
    ).run_forever()
    """
)


def test_sigterm_drains_the_in_flight_call_and_exits_zero(tmp_path: Path) -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SERVER, str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    records: list[dict[str, Any]] = []
    assert proc.stderr is not None
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()

    def until(msg: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            record: dict[str, Any] = json.loads(line)  # every stderr line is one JSON object
            records.append(record)
            if record["msg"] == msg:
                return record
        raise AssertionError(f"no {msg!r} log line; saw {records}")

    try:
        listening = until("listening")
        assert listening["service"] == "sigterm-test"
        assert listening["tls"] is False
        assert listening["auth"] is False
        with make_channel(listening["address"]) as channel:
            in_flight = unary(channel, "Slow").future(b"job", timeout=15)
            until("slow call started")
            proc.send_signal(signal.SIGTERM)
            assert in_flight.result(timeout=10) == b"done:job"
        assert proc.wait(timeout=5) == 0
        until("stopped")
        messages = [r["msg"] for r in records]
        order = [messages.index(m) for m in ("shutdown requested", "on_stop ran", "stopped")]
        assert order == sorted(order)
        assert next(r for r in records if r["msg"] == "shutdown requested")["signal"] == "SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------- logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_json_logs_are_one_object_per_line_with_the_service(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", service="trainer")
    configure_logging("info", "json", service="trainer")  # idempotent: still one handler
    log = logging.getLogger("visiontune.test")
    log.debug("hidden")
    log.info("job created", extra={"job": "jobs/42", "path": Path("/tmp/x")})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("job failed")

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "job created"
    assert first["service"] == "trainer"
    assert first["level"] == "INFO"
    assert first["logger"] == "visiontune.test"
    assert first["job"] == "jobs/42"
    assert first["path"] == "/tmp/x"
    assert first["ts"].endswith("Z")
    assert "T" in first["ts"]
    assert second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["exc"]


@pytest.mark.usefixtures("root_logging")
def test_text_logs_are_readable_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text", service="inference")
    logging.getLogger("visiontune.test").info("deployed", extra={"model": "models/a", "version": 3})
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("INFO  inference visiontune.test: deployed model='models/a' version=3")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "yaml", service="x")


@pytest.mark.usefixtures("root_logging")
def test_calls_are_logged_at_debug_with_code_and_duration(
    start_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("DEBUG", "json", service="trainer")
    server, _ = start_server(auth_token="s3cret")
    with make_channel(server.address, token="s3cret") as good, make_channel(server.address) as plain:
        unary(good, "Echo")(b"x", timeout=5)
        with pytest.raises(grpc.RpcError):
            unary(plain, "Echo")(b"x", timeout=5)
        list(good.unary_stream(f"/{SERVICE}/Count", None, None)(b"", timeout=5))
    rpc = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    rpc = [r for r in rpc if r["msg"] == "rpc"]
    assert [(r["method"], r["code"]) for r in rpc] == [
        (f"/{SERVICE}/Echo", "OK"),
        (f"/{SERVICE}/Echo", "UNAUTHENTICATED"),
        (f"/{SERVICE}/Count", "OK"),
    ]
    assert all(r["duration_ms"] >= 0 for r in rpc)
