"""The artifact store against a real S3 server process (SeaweedFS or MinIO) on loopback; no mocks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import threading
import time
from pathlib import Path

import pytest
import urllib3
from minio.error import S3Error
from visiontune.devstack.ports import free_port
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.outages import NO_WAIT, Outage, OutagePolicy, OutageTooLong
from visiontune.settings import S3Settings
from visiontune.store import (
    MANIFEST,
    PART_SIZE,
    ArtifactStore,
    ModelVersionExists,
    ObjectNotFound,
    RetryPolicy,
    StoreConfigError,
    StoreError,
    StoreOutageTooLong,
    StoreUnavailable,
    is_unreachable,
    retry_call,
    sha256_file,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)


def _manifest(**fields: object) -> bytes:
    return json.dumps({"labels": ["cat", "dog"], **fields}).encode()


class _Chunks(io.RawIOBase):
    """A non-seekable stream of `size` pseudo-random bytes, as a pipe or a socket would give."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._left = size
        self._rng = hashlib.sha256(b"seed")
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._left, 64 * 1024)
        block = (self._rng.digest() * (n // 32 + 1))[:n]
        self._rng.update(block[:32])
        buffer[:n] = block
        self.sha256.update(block)
        self._left -= n
        return n


class _GatedStream(io.RawIOBase):
    """Seekable random bytes that stop at `gate_at` until released, so a test can act mid-upload."""

    def __init__(self, size: int, gate_at: int) -> None:
        super().__init__()
        self._data = io.BytesIO(os.urandom(size))
        self._gate_at = gate_at
        self.reached = threading.Event()
        self.release = threading.Event()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        pos = self._data.tell()
        if pos >= self._gate_at:
            self.reached.set()
            self.release.wait(60)
            return self._data.readinto(buffer)
        view = memoryview(buffer)[: min(len(buffer), self._gate_at - pos)]
        return self._data.readinto(view)


# -- objects ------------------------------------------------------------------------------------------------


def test_bytes_round_trip_stat_and_exists(store: ArtifactStore) -> None:
    etag = store.put_bytes("jobs/job-a/spec.json", b'{"epochs": 3}', content_type="application/json")
    assert store.get_bytes("jobs/job-a/spec.json") == b'{"epochs": 3}'
    info = store.stat("jobs/job-a/spec.json")
    assert (info.key, info.size, info.etag) == ("jobs/job-a/spec.json", 13, etag)
    assert info.last_modified is not None
    assert store.exists("jobs/job-a/spec.json")
    assert not store.exists("jobs/job-a/missing.json")


def test_file_round_trip_and_atomic_download(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(os.urandom(3 * MiB + 17))
    store.put_file("models/m/versions/v1/model.pt", src)

    dest = tmp_path / "out" / "model.pt"
    assert store.download_file("models/m/versions/v1/model.pt", dest) == dest
    assert sha256_file(dest) == sha256_file(src)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pt"]  # no temporary left behind

    with pytest.raises(ObjectNotFound):
        store.download_file("models/m/versions/v1/nope.pt", tmp_path / "out" / "nope.pt")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pt"]


def test_stream_of_unknown_length_goes_multipart_and_streams_back(store: ArtifactStore) -> None:
    size = 20 * MiB + 123  # more than one 16 MiB part
    assert size > PART_SIZE
    source = _Chunks(size)
    store.put_stream("jobs/job-b/checkpoints/last.pt", source)  # length unknown
    assert store.stat("jobs/job-b/checkpoints/last.pt").size == size

    digest = hashlib.sha256()
    with store.open("jobs/job-b/checkpoints/last.pt") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == source.sha256.hexdigest()


def test_list_by_prefix_and_delete_prefix(store: ArtifactStore) -> None:
    for key in (
        "datasets/a/cat/1.png",
        "datasets/a/cat/2.png",
        "datasets/a/dog/3.png",
        "datasets/ab/x.png",
        "jobs/j/spec.json",
    ):
        store.put_bytes(key, key.encode())

    listed = list(store.list("datasets/a/"))
    assert [i.key for i in listed] == ["datasets/a/cat/1.png", "datasets/a/cat/2.png", "datasets/a/dog/3.png"]
    assert all(i.size == len(i.key) and i.etag for i in listed)
    shallow = list(store.list("datasets/a/", recursive=False))
    assert [(i.key, i.is_dir) for i in shallow] == [("datasets/a/cat/", True), ("datasets/a/dog/", True)]

    assert store.delete_prefix("datasets/a/") == 3
    assert [i.key for i in store.list("datasets/")] == ["datasets/ab/x.png"]
    assert store.delete_prefix("datasets/none/") == 0
    with pytest.raises(ValueError, match="whole bucket"):
        store.delete_prefix("")


def test_missing_objects_raise_object_not_found_naming_endpoint_and_key(
    store: ArtifactStore, s3_server: S3ServerProcess
) -> None:
    with pytest.raises(ObjectNotFound) as err:
        store.get_bytes("models/m/versions/v9/model.pt")
    assert s3_server.endpoint in str(err.value)
    assert "models/m/versions/v9/model.pt" in str(err.value)
    with pytest.raises(ObjectNotFound):
        store.stat("nope")
    with pytest.raises(ObjectNotFound), store.open("nope"):
        pass


# -- model versions -----------------------------------------------------------------------------------------


def test_model_version_is_invisible_until_committed(store: ArtifactStore, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(os.urandom(64 * 1024))
    writer = store.begin_model_version("flowers", "v1")
    writer.put_file("model.pt", weights)
    writer.put_bytes("plots/loss.png", b"\x89PNG fake")

    assert store.list_model_versions("flowers") == []
    assert not store.model_version_exists("flowers", "v1")
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.get_manifest("flowers", "v1")

    manifest = _manifest(sha256=sha256_file(weights))
    writer.commit(manifest)
    assert store.list_model_versions("flowers") == ["v1"]
    assert store.model_version_exists("flowers", "v1")
    assert store.get_manifest("flowers", "v1") == manifest
    assert store.stat("models/flowers/versions/v1/plots/loss.png").size == 9

    with pytest.raises(ModelVersionExists):
        store.begin_model_version("flowers", "v1")
    with pytest.raises(RuntimeError):
        writer.put_bytes("late.txt", b"x")


def test_abort_and_failed_block_remove_what_was_written(store: ArtifactStore) -> None:
    writer = store.begin_model_version("flowers", "v2")
    writer.put_bytes("model.pt", b"weights")
    writer.put_bytes("plots/a.png", b"png")
    assert writer.abort() == 2
    assert list(store.list("models/flowers/versions/v2/")) == []

    def fail_half_way() -> None:
        with store.begin_model_version("flowers", "v3") as w:
            w.put_bytes("model.pt", b"weights")
            raise KeyError("the trainer failed half-way")

    with pytest.raises(KeyError):
        fail_half_way()
    assert list(store.list("models/flowers/versions/v3/")) == []
    assert store.list_model_versions("flowers") == []


def test_ids_and_paths_are_validated(store: ArtifactStore) -> None:
    for bad in ("Flowers", "1flowers", "a" * 64, "flow_ers", ""):
        with pytest.raises(ValueError, match="lowercase letters"):
            store.begin_model_version(bad, "v1")
        with pytest.raises(ValueError, match="lowercase letters"):
            store.list_model_versions(bad)
    writer = store.begin_model_version("flowers", "v4")
    for bad_path in ("../model.pt", "/abs", "a//b", MANIFEST, "plots/../x"):
        with pytest.raises(ValueError, match=r"invalid artifact path|written by commit"):
            writer.put_bytes(bad_path, b"x")
    with pytest.raises(ValueError, match="JSON"):
        writer.commit(b"not json")
    writer.abort()


def test_kill_9_mid_upload_leaves_no_visible_version(tmp_path: Path) -> None:
    """Acceptance: SIGKILL the S3 server while a version uploads; after a restart readers see nothing."""
    keys = {"access_key": "kill-" + secrets.token_hex(3), "secret_key": secrets.token_urlsafe(16)}
    data_dir = tmp_path / "s3"
    server = S3ServerProcess(data_dir, **keys)
    server.start()
    restarted: S3ServerProcess | None = None
    try:
        # A short outage window: the server stays down, and the upload is to fail rather than wait for it.
        store = ArtifactStore.connect(server.settings("kill-test"), retry=FAST_RETRY, outage=OutagePolicy(window_s=1))
        store.ensure_bucket()
        stream = _GatedStream(40 * MiB, gate_at=20 * MiB)
        failure: list[BaseException] = []

        def upload() -> None:
            try:
                with store.begin_model_version("resnet", "v1") as writer:
                    writer.put_bytes("labels.json", b'["cat", "dog"]')
                    writer.put_stream("model.pt", stream)  # a multipart upload, stopped at 20 MiB
                    writer.commit(_manifest())
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which asserts on it
                failure.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        assert stream.reached.wait(60), "the upload never reached the gate"
        server.kill()
        stream.release.set()
        thread.join(60)
        assert not thread.is_alive()

        assert len(failure) == 1
        err = failure[0]
        assert isinstance(err, StoreError), repr(err)
        assert isinstance(err, StoreUnavailable)
        message = str(err)
        assert server.endpoint in message  # host:port
        assert "models/resnet/versions/v1/model.pt" in message
        assert "refused" in message or "connection" in message  # the cause
        assert "\n" not in message

        restarted = S3ServerProcess(data_dir, port=server.port, **keys)
        restarted.start()
        after = ArtifactStore.connect(restarted.settings("kill-test"), retry=FAST_RETRY)
        after.check()
        assert after.list_model_versions("resnet") == []
        assert not after.model_version_exists("resnet", "v1")
        with pytest.raises(ObjectNotFound):
            after.get_manifest("resnet", "v1")
        # The part that did land is still there, and still invisible to readers.
        assert after.exists("models/resnet/versions/v1/labels.json")

        # A retry of the same version starts clean and commits.
        with after.begin_model_version("resnet", "v1") as writer:
            writer.put_bytes("model.pt", b"small weights")
            writer.commit(_manifest())
        assert after.list_model_versions("resnet") == ["v1"]
        assert not after.exists("models/resnet/versions/v1/labels.json")
    finally:
        server.kill()
        if restarted is not None:
            restarted.stop()


# -- configuration errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["secret", "access"])
def test_wrong_credentials_give_a_one_line_config_error(s3_server: S3ServerProcess, which: str) -> None:
    good = s3_server.settings("creds-" + secrets.token_hex(4))
    ArtifactStore.connect(good).ensure_bucket()
    bad = S3Settings(
        endpoint=good.endpoint,
        bucket=good.bucket,
        access_key="nobody" if which == "access" else good.access_key,
        secret_key="wrong-secret-123" if which == "secret" else good.secret_key,
    )
    store = ArtifactStore.connect(bad, retry=FAST_RETRY)
    with pytest.raises(StoreConfigError) as err:
        store.check()
    message = str(err.value)
    assert "\n" not in message
    assert "credentials" in message
    assert s3_server.endpoint in message
    assert ("InvalidAccessKeyId" if which == "access" else "SignatureDoesNotMatch") in message
    with pytest.raises(StoreConfigError, match="credentials"):
        store.ensure_bucket()


def test_missing_bucket_fails_check(s3_server: S3ServerProcess) -> None:
    store = ArtifactStore.connect(s3_server.settings("never-created-" + secrets.token_hex(4)))
    with pytest.raises(StoreConfigError, match="does not exist") as err:
        store.check()
    assert s3_server.endpoint in str(err.value)
    with pytest.raises(StoreConfigError, match="does not exist"):
        store.put_bytes("x", b"x")


def test_unreachable_endpoint_fails_fast_with_one_line() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    # check() never waits out an outage; the put below fails at once because this store's window is NO_WAIT.
    store = ArtifactStore.connect(
        S3Settings(endpoint=endpoint, access_key="a", secret_key="b", bucket="bkt"), retry=FAST_RETRY, outage=NO_WAIT
    )
    started = time.monotonic()
    with pytest.raises(StoreConfigError) as err:
        store.check()
    assert time.monotonic() - started < 10
    assert isinstance(err.value, StoreUnavailable)  # also: a waiting caller may keep retrying
    message = str(err.value)
    assert "\n" not in message
    assert endpoint in message
    assert "unreachable" in message
    assert "refused" in message

    with pytest.raises(StoreUnavailable, match="after 3 attempts"):
        store.put_bytes("models/m/versions/v1/model.pt", b"x")


def test_unresolvable_host_is_a_config_error() -> None:
    store = ArtifactStore.connect(
        S3Settings(endpoint="no-such-host.invalid:9000", access_key="a", secret_key="b", bucket="bkt"),
        retry=RetryPolicy(attempts=1),
    )
    with pytest.raises(StoreConfigError, match=r"no-such-host\.invalid:9000.*resolve"):
        store.check()


# -- the retry policy ---------------------------------------------------------------------------------------


def _s3_error(code: str, status: int) -> S3Error:
    return S3Error(urllib3.HTTPResponse(status=status), code, "from the test", "/bkt/key", None, None)


@pytest.fixture
def sleeps() -> list[float]:
    return []


def test_transient_errors_are_retried_then_succeed(sleeps: list[float]) -> None:
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=2.0, multiplier=2.0)
    transient: list[Exception] = [
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
        _s3_error("SlowDown", 503),
        ConnectionRefusedError(111, "refused"),
    ]
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if transient:
            raise transient.pop(0)
        return "ok"

    assert retry_call(flaky, policy, sleep=sleeps.append) == "ok"
    assert calls == 4
    assert len(sleeps) == 3
    # Exponential with jitter: each wait lies in [base/2, base] for base 0.1, 0.2, 0.4.
    for wait, base in zip(sleeps, (0.1, 0.2, 0.4), strict=True):
        assert base / 2 <= wait <= base


def test_an_unreachable_server_is_an_outage_other_errors_are_not() -> None:
    outage: list[BaseException] = [
        urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] refused"),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
        urllib3.exceptions.ConnectTimeoutError(None, "timed out"),
        ConnectionRefusedError(111, "refused"),
        _s3_error("ServiceUnavailable", 503),
        _s3_error("SlowDown", 503),
    ]
    other: list[BaseException] = [
        urllib3.exceptions.NameResolutionError("no-such-host.invalid", None, OSError("unknown")),  # type: ignore[arg-type]
        _s3_error("InternalError", 500),  # transient: the short retry policy, not the outage window
        _s3_error("NoSuchKey", 404),
        _s3_error("SignatureDoesNotMatch", 403),
        ValueError("not an S3 error"),
    ]
    assert [is_unreachable(e) for e in outage] == [True] * len(outage)
    assert [is_unreachable(e) for e in other] == [False] * len(other)


def test_non_transient_errors_are_not_retried(sleeps: list[float]) -> None:
    for error in (_s3_error("NoSuchKey", 404), _s3_error("SignatureDoesNotMatch", 403)):
        calls = 0

        def fails(error: Exception = error) -> None:
            nonlocal calls
            calls += 1
            raise error

        with pytest.raises(S3Error):
            retry_call(fails, RetryPolicy(), sleep=sleeps.append)
        assert calls == 1
    assert sleeps == []


def test_store_gives_up_after_the_policy_against_a_dead_server(sleeps: list[float]) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    store = ArtifactStore.connect(
        S3Settings(endpoint=endpoint, access_key="a", secret_key="b", bucket="bkt"),
        retry=RetryPolicy(attempts=4),
        sleep=sleeps.append,
        outage=NO_WAIT,  # the retry policy alone: an outage wait would sleep on a real clock
    )
    with pytest.raises(StoreUnavailable) as err:
        store.get_bytes("jobs/j/events.jsonl")
    assert len(sleeps) == 3  # 4 attempts, no real waiting
    assert all(0 < s <= 2.0 for s in sleeps)
    assert endpoint in str(err.value)
    assert "jobs/j/events.jsonl" in str(err.value)
    assert err.value.cause == "connection refused"


# -- outages of the server ------------------------------------------------------------------------------------


class _Heard:
    """An OutageListener that keeps what it heard."""

    def __init__(self) -> None:
        self.started: list[Outage] = []
        self.ended: list[tuple[Outage, float]] = []

    def outage_started(self, outage: Outage) -> None:
        self.started.append(outage)

    def outage_ended(self, outage: Outage, waited_s: float) -> None:
        self.ended.append((outage, waited_s))


def test_a_restart_of_the_server_within_the_outage_window_is_waited_through(tmp_path: Path) -> None:
    keys = {"access_key": "out-" + secrets.token_hex(3), "secret_key": secrets.token_urlsafe(16)}
    server = S3ServerProcess(tmp_path / "s3", **keys).start(timeout=60)
    restarted: S3ServerProcess | None = None
    try:
        heard = _Heard()
        store = ArtifactStore.connect(
            server.settings("outage"), retry=FAST_RETRY, outage=OutagePolicy(window_s=120), listener=heard
        )
        store.ensure_bucket()
        store.put_bytes("jobs/j/spec.json", b'{"epochs": 3}')
        server.kill()

        got: list[bytes] = []
        failed: list[BaseException] = []

        def read() -> None:
            try:
                got.append(store.get_bytes("jobs/j/spec.json"))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which asserts on it
                failed.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 30
        while not heard.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(heard.started) == 1, failed
        outage = heard.started[0]
        assert (outage.service, outage.endpoint, outage.cause) == ("S3", server.endpoint, "connection refused")
        assert f"waiting for S3 at {server.endpoint} since " in outage.waiting_message()
        time.sleep(2)  # the outage lasts a while
        assert reader.is_alive()

        restarted = S3ServerProcess(tmp_path / "s3", port=server.port, **keys).start(timeout=60)
        reader.join(120)
        assert not reader.is_alive()
        assert failed == []
        assert got == [b'{"epochs": 3}']  # the same call, carried on
        assert len(heard.ended) == 1
        assert heard.ended[0][1] >= 2
        store.put_bytes("jobs/j/events.jsonl", b"{}\n")  # and the store goes on working
        assert [o.key for o in store.list("jobs/j/")] == ["jobs/j/events.jsonl", "jobs/j/spec.json"]
    finally:
        server.kill()
        if restarted is not None:
            restarted.stop()


def test_an_outage_longer_than_the_window_fails_with_one_line_then_fails_fast(tmp_path: Path) -> None:
    port = free_port()
    keys = {"access_key": "out-" + secrets.token_hex(3), "secret_key": secrets.token_urlsafe(16)}
    settings = S3Settings(endpoint=f"127.0.0.1:{port}", bucket="outage", **keys)
    heard = _Heard()
    store = ArtifactStore.connect(settings, retry=FAST_RETRY, outage=OutagePolicy(window_s=2), listener=heard)

    started = time.monotonic()
    with pytest.raises(StoreOutageTooLong) as err:
        store.put_bytes("jobs/j/checkpoints/last.pt", b"weights")
    assert 1 <= time.monotonic() - started < 20  # no retry is made past the window
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"S3 at http://{settings.endpoint} was unreachable for ")
    assert "longer than the outage window (2 s, VISIONTUNE_OUTAGE_WINDOW_S)" in message
    assert message.endswith("put 'outage/jobs/j/checkpoints/last.pt' failed: connection refused")
    assert isinstance(err.value, StoreUnavailable)  # what callers of the store catch
    assert isinstance(err.value, OutageTooLong)  # what code handling any backing service's outage catches
    assert err.value.code == "UNAVAILABLE"
    assert err.value.waited_s >= 0.5
    assert len(heard.started) == 1
    assert heard.ended == []

    # The wait has run out: clean-up calls after the failure do not wait a second window.
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="after 3 attempts"):
        store.delete_prefix("jobs/j/checkpoints/")
    assert time.monotonic() - started < 2
    assert len(heard.started) == 1

    # Once the server answers again, so do calls, and a later outage is waited for again.
    with S3ServerProcess(tmp_path / "s3", port=port, **keys) as server:
        store.ensure_bucket()
        store.put_bytes("jobs/j/spec.json", b"{}")
        server.kill()
        with pytest.raises(StoreOutageTooLong):
            store.get_bytes("jobs/j/spec.json")
        assert len(heard.started) == 2


def test_non_rewindable_streams_are_not_retried_through_an_outage() -> None:
    """What a failed attempt read from a pipe is gone: a retry would store a truncated object."""
    store = ArtifactStore.connect(
        S3Settings(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b", bucket="bkt"),
        retry=FAST_RETRY,
        outage=OutagePolicy(window_s=60),
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="after 1 attempt: connection refused") as err:
        store.put_stream("models/m/versions/v1/model.pt", _Chunks(MiB))
    assert not isinstance(err.value, StoreOutageTooLong)
    assert time.monotonic() - started < 5
