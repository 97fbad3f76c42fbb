"""`CheckpointUploader`'s contract with the training thread: uploads run in order, one at a time, on another
thread; what is uploaded is the checkpoint as it was when submitted; an upload's error reaches the training thread
at its next call. The upload here is a function the test holds at a gate (the real one, to S3 and the job store,
is exercised in tests/integration/test_checkpoint_uploads.py)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from trainer_service.jobs.checkpoints import CheckpointUploader
from trainer_service.jobs.store import Conflict

WAIT_S = 30.0  # how long anything the test waits for may take (it happens in milliseconds)
STILL_S = 0.3  # how long something that must not happen is watched for


class GatedUploads:
    """An upload function that records each checkpoint it is given and holds until the test opens its gate."""

    def __init__(self) -> None:
        self.started: list[threading.Event] = [threading.Event() for _ in range(8)]
        self.gates: list[threading.Event] = [threading.Event() for _ in range(8)]
        self.uploaded: list[dict[str, Any]] = []
        self.threads: set[str] = set()
        self.failures: dict[int, BaseException] = {}
        self._lock = threading.Lock()
        self._calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def __call__(self, data: bytes) -> None:
        with self._lock:
            call = self._calls
            self._calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.threads.add(threading.current_thread().name)
        self.started[call].set()
        try:
            assert self.gates[call].wait(WAIT_S), f"upload {call} was never let through"
            if call in self.failures:
                raise self.failures[call]
            self.uploaded.append(torch.load(io.BytesIO(data), weights_only=True))
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture
def uploads() -> GatedUploads:
    return GatedUploads()


@pytest.fixture
def uploader(uploads: GatedUploads) -> Iterator[CheckpointUploader]:
    up = CheckpointUploader(uploads)
    yield up
    for gate in uploads.gates:
        gate.set()
    up.close()


def _in_background(call: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    """`call` on a thread of its own (standing in for the training thread while the test watches it)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - handed to the test, which asserts on it
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_uploads_run_in_order_one_at_a_time_off_the_calling_thread(
    uploads: GatedUploads, uploader: CheckpointUploader
) -> None:
    uploader.submit({"epoch": 1})
    assert uploads.started[0].wait(WAIT_S)  # submit returned while its upload runs on

    second, errors = _in_background(lambda: uploader.submit({"epoch": 2}))
    second.join(STILL_S)
    assert second.is_alive()  # waits for the first upload: one in flight
    assert not uploads.started[1].is_set()
    uploads.gates[0].set()
    second.join(WAIT_S)
    assert not second.is_alive()
    assert not errors
    assert uploads.started[1].wait(WAIT_S)

    uploads.gates[1].set()
    uploader.submit({"epoch": 3})
    uploads.gates[2].set()
    uploader.flush()
    assert [u["epoch"] for u in uploads.uploaded] == [1, 2, 3]
    assert uploads.most_in_flight == 1
    assert threading.current_thread().name not in uploads.threads
    assert len(uploads.threads) == 1  # one background thread for all of them


def test_the_checkpoint_is_the_state_as_submitted(uploads: GatedUploads, uploader: CheckpointUploader) -> None:
    weights = torch.zeros(3)
    state = {"model": {"w": weights}, "history": [1]}
    uploader.submit(state)
    weights += 1  # the next optimizer step, in place, while the upload has not even started its put
    state["history"].append(2)
    uploads.gates[0].set()
    uploader.flush()
    assert torch.equal(uploads.uploaded[0]["model"]["w"], torch.zeros(3))
    assert uploads.uploaded[0]["history"] == [1]


def test_flush_waits_for_the_upload_in_flight(uploads: GatedUploads, uploader: CheckpointUploader) -> None:
    uploader.flush()  # nothing in flight: returns at once
    uploader.submit({"epoch": 1})
    flushing, errors = _in_background(uploader.flush)
    flushing.join(STILL_S)
    assert flushing.is_alive()
    assert not uploads.uploaded
    uploads.gates[0].set()
    flushing.join(WAIT_S)
    assert not flushing.is_alive()
    assert not errors
    assert [u["epoch"] for u in uploads.uploaded] == [1]


def test_an_upload_error_is_raised_by_the_next_submit_once(uploads: GatedUploads, uploader: CheckpointUploader) -> None:
    uploads.failures[0] = Conflict("job 'j' is on attempt 3, not 2: checkpoint not kept")
    uploads.gates[0].set()
    uploader.submit({"epoch": 1})
    with pytest.raises(Conflict, match="attempt 3, not 2"):
        uploader.submit({"epoch": 2})
    assert not uploads.started[1].is_set()  # the checkpoint that met the error went nowhere
    uploader.flush()  # raised once: the caller has it
    uploads.gates[1].set()
    uploader.submit({"epoch": 3})
    uploader.flush()
    assert [u["epoch"] for u in uploads.uploaded] == [3]


def test_an_upload_error_is_raised_by_flush(uploads: GatedUploads, uploader: CheckpointUploader) -> None:
    uploads.failures[0] = OSError("the bucket is gone")
    uploader.submit({"epoch": 1})
    uploads.gates[0].set()
    with pytest.raises(OSError, match="the bucket is gone"):
        uploader.flush()
    uploader.flush()
