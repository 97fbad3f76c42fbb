"""The one error -> status mapping (docs/architecture.md §3): every `VisionTuneError` class of the project, the
status code it reaches a client with, over real loopback gRPC for unary and streaming methods alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from inference_service.deployments import NoLiveVersion, NotDeployed, NotReady
from inference_service.errors import InvalidRequest
from inference_service.feedback import PredictionsUnavailable
from inference_service.predictions import schema as predictions_schema
from trainer_service.datasets.listing import DatasetError
from trainer_service.engine.models import WeightsUnavailable
from trainer_service.jobs import records
from trainer_service.jobs.executor import SlotsBusy
from trainer_service.tuning.studies import StudyPreconditionFailed
from visiontune import database, errors, outages, status, store_errors
from visiontune.client import make_channel
from visiontune.errors import FieldViolation, VisionTuneError
from visiontune.pagination import InvalidPage
from visiontune.server import GrpcServer, ServiceBinding
from visiontune.settings import S3Settings, ServerSettings

Code = grpc.StatusCode
VIOLATIONS = [FieldViolation("a.b", "must be > 0"), FieldViolation("c", "required")]
S3 = {"endpoint": "http://127.0.0.1:9000", "key": "k"}

# Every error class with the code a client must see, written out here rather than read from the classes, so
# that a class mapped wrongly fails. A new class must be added (test_every_error_class_is_listed).
EXPECTED: list[tuple[Callable[[], VisionTuneError], Code]] = [
    (lambda: VisionTuneError("an invariant broke"), Code.INTERNAL),
    (lambda: errors.InvalidArgument(VIOLATIONS), Code.INVALID_ARGUMENT),
    (lambda: errors.NotFound("jobs/x does not exist"), Code.NOT_FOUND),
    (lambda: errors.AlreadyExists("job 'x' already exists"), Code.ALREADY_EXISTS),
    (lambda: errors.FailedPrecondition("jobs/x already ended"), Code.FAILED_PRECONDITION),
    (lambda: errors.Aborted("a concurrent change won"), Code.ABORTED),
    (lambda: errors.ResourceExhausted("65 images in one request; the limit is 64"), Code.RESOURCE_EXHAUSTED),
    (lambda: errors.Unavailable("Triton did not answer"), Code.UNAVAILABLE),
    (lambda: InvalidPage([FieldViolation("page_token", "invalid page_token 'x'")]), Code.INVALID_ARGUMENT),
    # the artifact store
    (lambda: store_errors.StoreError("S3 at e: delete failed", **S3), Code.INTERNAL),
    (lambda: store_errors.StoreConfigError("S3 at e rejected the credentials", **S3), Code.FAILED_PRECONDITION),
    (lambda: store_errors.ObjectNotFound("S3 at e: object 'b/k' does not exist", **S3), Code.NOT_FOUND),
    (lambda: store_errors.StoreUnavailable("S3 at e unavailable", **S3), Code.UNAVAILABLE),
    (lambda: store_errors.StoreUnreachable("S3 at e is unreachable", **S3), Code.UNAVAILABLE),
    (lambda: store_errors.ModelVersionExists("models/m/versions/v1 is committed", **S3), Code.ALREADY_EXISTS),
    (
        lambda: store_errors.StoreOutageTooLong("S3 at e was unreachable", cause="refused", waited_s=300, **S3),
        Code.UNAVAILABLE,
    ),
    # any backing service
    (
        lambda: outages.OutageTooLong("S3 at e was unreachable", service="S3", endpoint="e", waited_s=300),
        Code.UNAVAILABLE,
    ),
    # the job store
    (lambda: records.JobStoreError("the job store at x is closed"), Code.INTERNAL),
    (lambda: database.DatabaseError("the job database at h:5432/db failed"), Code.INTERNAL),
    (
        lambda: database.DatabaseConfigError("cannot use the job database at h:5432/db: wrong password"),
        Code.FAILED_PRECONDITION,
    ),
    (lambda: database.DatabaseUnavailable("the job database at h:5432/db was unreachable for 300 s"), Code.UNAVAILABLE),
    (lambda: database.DatabaseClosed("the job database at h:5432/db is closed"), Code.UNAVAILABLE),
    (lambda: records.NotFound("jobs/x does not exist"), Code.NOT_FOUND),
    (lambda: records.AlreadyExists("job 'x' already exists"), Code.ALREADY_EXISTS),
    (lambda: records.Conflict("job 'x' is RUNNING, expected one of ['QUEUED']"), Code.ABORTED),
    (lambda: records.QuotaExceeded("caller 'a' already has 2 jobs queued, the limit is 2"), Code.RESOURCE_EXHAUSTED),
    (lambda: records.SchemaError("x has job store schema version 9"), Code.FAILED_PRECONDITION),
    # the trainer's domain
    (lambda: SlotsBusy(2, 600.0), Code.RESOURCE_EXHAUSTED),
    (lambda: StudyPreconditionFailed("studies/s has no completed trial yet"), Code.FAILED_PRECONDITION),
    (lambda: DatasetError("dataset s3://b/d: no images found"), Code.FAILED_PRECONDITION),
    (lambda: WeightsUnavailable("model weights s3://b/w.pth are not a torch.save file"), Code.FAILED_PRECONDITION),
    # the inference service
    (lambda: InvalidRequest(VIOLATIONS), Code.INVALID_ARGUMENT),
    (lambda: NoLiveVersion("no version can answer"), Code.INTERNAL),  # a base: the registry raises its subclasses
    (lambda: PredictionsUnavailable("the prediction store at h:5432/db did not answer"), Code.UNAVAILABLE),
    (lambda: predictions_schema.SchemaError("x has prediction store schema version 9"), Code.FAILED_PRECONDITION),
    (lambda: NotDeployed("models/m has no deployed version"), Code.NOT_FOUND),
    (lambda: NotReady("models/m/versions/v1 is loading"), Code.UNAVAILABLE),
]
ERRORS = [make() for make, _ in EXPECTED]
IDS = [type(error).__module__ + "." + type(error).__name__ for error in ERRORS]
OURS = ("visiontune.", "trainer_service.", "inference_service.")


def _subclasses(cls: type[VisionTuneError]) -> set[type[VisionTuneError]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_every_error_class_is_listed() -> None:
    listed = {type(error) for error in ERRORS}
    assert len(listed) == len(ERRORS), "a class is listed twice"
    defined = {cls for cls in _subclasses(VisionTuneError) if cls.__module__.startswith(OURS)} | {VisionTuneError}
    assert defined - listed == set(), "add these classes, with the code a client must see, to EXPECTED"


@pytest.mark.parametrize(("error", "code"), list(zip(ERRORS, [code for _, code in EXPECTED], strict=True)), ids=IDS)
def test_each_class_has_its_status_code(error: VisionTuneError, code: grpc.StatusCode) -> None:
    assert status.status_code(error) == code
    rich = status.to_status(error)
    assert (rich.code, rich.details) == (code, error.message)


def test_domain_errors_are_also_the_shared_ones() -> None:
    # `except errors.NotFound` catches every domain's NotFound; the job store's base class still works.
    assert isinstance(records.NotFound("x"), errors.NotFound)
    assert isinstance(records.Conflict("x"), records.JobStoreError)
    assert isinstance(store_errors.ObjectNotFound("x", endpoint="e"), errors.NotFound)
    assert isinstance(store_errors.StoreUnreachable("x", endpoint="e"), store_errors.StoreConfigError)
    assert isinstance(InvalidPage(VIOLATIONS), ValueError)  # callers outside gRPC catch a bad page as ValueError
    assert NotDeployed("x").deployed is False
    assert NotReady("x").deployed is True


def test_invalid_argument_messages_of_both_services() -> None:
    assert errors.InvalidArgument(VIOLATIONS).message == "2 invalid fields: a.b (must be > 0); c (required)"
    assert InvalidRequest(VIOLATIONS).message == "2 invalid field(s): a.b: must be > 0; c: required"
    assert errors.InvalidArgument(VIOLATIONS, "spec refused").message == "spec refused"
    with pytest.raises(ValueError, match="at least one"):
        errors.InvalidArgument([])


def test_parse_field_and_reraise_as() -> None:
    def parse(value: str) -> int:
        return int(value)

    assert errors.parse_field("steps", parse, "12") == 12
    with pytest.raises(errors.InvalidArgument) as bad:
        errors.parse_field("steps", parse, "twelve")
    assert [v.field for v in bad.value.violations] == ["steps"]

    with (
        pytest.raises(errors.FailedPrecondition, match="S3 at e: gone") as raised,
        errors.reraise_as(errors.FailedPrecondition, store_errors.StoreError),
    ):
        raise store_errors.StoreUnavailable("S3 at e: gone", endpoint="e")
    assert isinstance(raised.value.__cause__, store_errors.StoreUnavailable)
    with pytest.raises(KeyError), errors.reraise_as(errors.FailedPrecondition, store_errors.StoreError):
        raise KeyError("x")  # not one of the causes: unchanged


# ------------------------------------------------------------------------------------------------ on the wire

# Errors quoting what a client sent, far past what a client takes in trailers (8 KiB): a 30 KB ID, a hundred bad
# fields each quoting a long value.
HUGE_ID = "é" * 15_000
HUGE: dict[bytes, VisionTuneError] = {
    b"huge-id": errors.InvalidArgument([FieldViolation("job_id", f"invalid job ID {HUGE_ID!r}")]),
    b"many": errors.InvalidArgument([FieldViolation(f"f{i}", "must be a name, got " + "x" * 900) for i in range(100)]),
    b"huge-message": errors.NotFound(f"jobs/{HUGE_ID} does not exist"),
}

SERVICE = "visiontune.test.Raiser"


class Raiser:
    """Raw-bytes methods raising ERRORS[int(request)]: Unary, Stream (after one message) and Early (a streaming
    method that raises before it returns its iterator, as WatchJob does for an unknown job)."""

    @staticmethod
    def _error(request: bytes) -> Exception:
        if request in HUGE:
            return HUGE[request]
        return ERRORS[int(request)] if request != b"bug" else RuntimeError("a bug")

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise self._error(request)

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise self._error(request)

    def early(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        raise self._error(request)

    def binding(self) -> ServiceBinding:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Early": grpc.unary_stream_rpc_method_handler(self.early),
        }
        generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
        return ServiceBinding(SERVICE, lambda server: server.add_generic_rpc_handlers((generic,)))


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    settings = ServerSettings(
        host="127.0.0.1", port=0, data_dir=Path(tmp_path_factory.mktemp("raiser")), s3=S3Settings(), grace_seconds=1.0
    )
    server = GrpcServer(settings, [Raiser().binding()], service_label="test")
    server.start()
    with make_channel(server.address) as channel:
        yield channel
    server.stop(grace=0)


def _call(channel: grpc.Channel, method: str, request: bytes) -> tuple[grpc.RpcError, list[bytes]]:
    """The call's error, and the messages a streaming call received before it."""
    received: list[bytes] = []
    try:
        if method == "Unary":
            channel.unary_unary(f"/{SERVICE}/Unary", None, None)(request, timeout=5)
        else:
            received.extend(channel.unary_stream(f"/{SERVICE}/{method}", None, None)(request, timeout=5))
    except grpc.RpcError as failed:
        return failed, received
    raise AssertionError(f"{method}({request!r}) succeeded")


@pytest.mark.parametrize("method", ["Unary", "Stream", "Early"])
@pytest.mark.parametrize("index", range(len(EXPECTED)), ids=IDS)
def test_a_raised_error_reaches_the_client_as_its_status(channel: grpc.Channel, method: str, index: int) -> None:
    error, code = ERRORS[index], EXPECTED[index][1]
    failed, received = _call(channel, method, str(index).encode())
    assert failed.code() == code
    assert failed.details() == error.message
    expected_violations = list(error.violations) if isinstance(error, errors.InvalidArgument) else []
    assert status.field_violations(failed) == expected_violations
    assert received == ([b"first"] if method == "Stream" else [])


@pytest.mark.parametrize("method", ["Unary", "Stream"])
def test_any_other_exception_is_a_bug_and_stays_unknown(channel: grpc.Channel, method: str) -> None:
    failed, _ = _call(channel, method, b"bug")
    assert failed.code() == grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize("method", ["Unary", "Stream"])
@pytest.mark.parametrize("request_bytes", sorted(HUGE))
def test_an_error_quoting_a_huge_value_still_reaches_the_client_as_its_status(
    channel: grpc.Channel, method: str, request_bytes: bytes
) -> None:
    # Unbounded, the trailers exceed the client's limit and it sees RESOURCE_EXHAUSTED instead.
    error = HUGE[request_bytes]
    failed, _ = _call(channel, method, request_bytes)
    assert failed.code() == status.status_code(error)
    details = failed.details() or ""
    assert len(details.encode()) <= status.MESSAGE_MAX_BYTES
    assert details.startswith(error.message[:20])
    violations = status.field_violations(failed)
    if not isinstance(error, errors.InvalidArgument):
        assert violations == []
        return
    assert violations, "the violations must still arrive"
    assert sum(len(v.field.encode()) + len(v.description.encode()) for v in violations) <= status.VIOLATIONS_MAX_BYTES
    assert [v.field for v in violations] == [v.field for v in error.violations[: len(violations)]]
    left_out = len(error.violations) - len(violations)
    if left_out:
        assert details.endswith(f"({left_out} more violations not sent)")


def test_clip_keeps_short_text_and_never_breaks_a_character() -> None:
    assert status.clip("short", 10) == "short"
    clipped = status.clip("é" * 10, 8)
    assert clipped == "éé…"
    assert len(clipped.encode()) <= 8
