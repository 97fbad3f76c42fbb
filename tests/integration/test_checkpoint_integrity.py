"""A checkpoint replaced in the bucket is never unpickled: the job store's digest of it is checked first.

Anyone who can write under `jobs/` could otherwise run code inside the worker, which holds the bucket's and the
database's credentials. The payload here is a real torch.save file whose pickle calls `exec` to create a file:
the test first proves that an unguarded `torch.load` does run it.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.integration.trainer_helpers import (
    Trainer,
    committed_checkpoint,
    create_job,
    tiny_spec,
    watch_job,
    watch_job_until,
    worker_pid,
)
from trainer_service.engine.recipe import ResumeState
from trainer_service.jobs import artifacts
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, training_service_pb2

pytestmark = pytest.mark.integration


class _CreatesAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_checkpoint(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": _CreatesAFile(marker)}, buffer)
    return buffer.getvalue()


def test_the_payload_runs_code_when_loaded_unguarded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(malicious_checkpoint(marker)), weights_only=False)
    assert marker.read_text() == "pwned"  # so the tests below would notice a load


def test_the_weights_only_loader_refuses_the_payload_even_without_the_digest(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="exec"):
        ResumeState.from_bytes(malicious_checkpoint(marker))
    assert not marker.exists()


def test_a_checkpoint_whose_bytes_changed_is_an_integrity_error_before_any_load(
    store: ArtifactStore, tmp_path: Path
) -> None:
    digest = artifacts.save_checkpoint(store, "j", {"repeat": 0})
    marker = tmp_path / "pwned"
    store.put_bytes(artifacts.checkpoint_key("j", digest), malicious_checkpoint(marker))
    with pytest.raises(artifacts.CheckpointIntegrityError, match=f"the worker wrote {digest}"):
        artifacts.load_checkpoint(store, "j", digest)
    assert not marker.exists()
    store.delete(artifacts.checkpoint_key("j", digest))
    with pytest.raises(artifacts.CheckpointIntegrityError, match="missing"):
        artifacts.load_checkpoint(store, "j", digest)
    assert artifacts.load_checkpoint(store, "j", None) is None


def test_a_resumed_job_whose_checkpoint_was_replaced_fails_with_an_integrity_error(
    trainer: Trainer, shapes: ArtifactStore, tmp_path: Path
) -> None:
    job = create_job(trainer, tiny_spec(epochs=6, seed=1), "tampered")
    watch_job_until(trainer, job.name, lambda e: e.HasField("epoch_ended") and e.epoch_ended.epoch == 2)
    pid = worker_pid("tampered")
    assert pid is not None
    # Frozen, the worker writes nothing more while every checkpoint object is replaced under it.
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        # Until the job store names a checkpoint (committed in the background, after its object was put): the
        # retry must find one to load.
        while committed_checkpoint(trainer, "tampered") is None:
            assert time.monotonic() < deadline, "no checkpoint was committed"
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.2)
            os.kill(pid, signal.SIGSTOP)
        keys = [o.key for o in shapes.list(artifacts.checkpoints_prefix("tampered"))]
        marker = tmp_path / "pwned"
        for key in keys:
            shapes.put_bytes(key, malicious_checkpoint(marker))
    finally:
        os.kill(pid, signal.SIGKILL)

    events = watch_job(trainer, job.name)
    done = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=job.name), timeout=10)
    assert done.state == job_pb2.JOB_STATE_FAILED, done
    assert done.attempt == 2  # the retry found the replaced object and stopped there, not retried further
    assert "was replaced in the bucket; refusing to load it" in done.error.message
    assert not marker.exists()
    assert not any(e.HasField("warning") and e.warning.code == "resumed" for e in events)
