"""A training job survives a restart of the S3 server: the worker waits, says so in the job's events, and carries on.

The S3 server here is the test's own (killed and restarted on the same data directory and port), so the session's
server, which every other test uses, is not touched.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
from tests.integration.trainer_helpers import (
    Trainer,
    create_job,
    get_job,
    start_shapes_trainer,
    tiny_spec,
    watch_job,
    watch_job_until,
)
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.v1 import job_pb2, training_service_pb2

pytestmark = pytest.mark.integration

OUTAGE_S = 30


@pytest.mark.slow  # two jobs and a 30-second outage: about 2 minutes on 2 cores (`make test-slow`)
def test_a_job_waits_through_an_s3_restart_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    keys = {"access_key": "outage-" + secrets.token_hex(3), "secret_key": secrets.token_urlsafe(16)}
    s3 = S3ServerProcess(tmp_path / "s3", **keys).start(timeout=60)
    restarted: S3ServerProcess | None = None
    trainer: Trainer | None = None
    try:
        trainer = start_shapes_trainer(s3, tmp_path, "outage")
        spec = tiny_spec(epochs=4, fine_tuning_epochs=1, seed=3)
        reference = create_job(trainer, spec, "reference")
        assert watch_job(trainer, reference.name)[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED

        job = create_job(trainer, spec, "outage")
        watch_job_until(trainer, job.name, lambda e: e.HasField("epoch_ended"))
        s3.kill()
        time.sleep(OUTAGE_S)
        restarted = S3ServerProcess(tmp_path / "s3", port=s3.port, **keys).start(timeout=60)
        events = watch_job(trainer, job.name)

        assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED, events[-1]
        warnings = [e.warning.message for e in events if e.warning.code == "s3_unavailable"]
        assert len(warnings) == 2, warnings
        assert warnings[0].startswith(f"waiting for S3 at {s3.endpoint} since ")
        assert warnings[0].endswith(" UTC (connection refused)")
        assert warnings[1].startswith(f"S3 at {s3.endpoint} is back after ")
        done, ref = get_job(trainer, job.name), get_job(trainer, reference.name)
        assert done.attempt == 1  # the same worker carried on: no retry, no resume
        assert not any(e.warning.code == "resumed" for e in events)
        for key in ("val_accuracy", "val_loss", "train_loss", "open_set_threshold"):
            assert done.result.metrics[key].mean == pytest.approx(ref.result.metrics[key].mean, rel=1e-4, abs=1e-5), key
        assert done.result.model_version == "models/shapes/versions/outage"
    finally:
        if trainer is not None:
            trainer.stop()
        s3.kill()
        if restarted is not None:
            restarted.stop()


def test_past_the_window_a_job_fails_with_one_line_and_a_cancel_ends_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISIONTUNE_OUTAGE_WINDOW_S", "15")  # the trainer's workers inherit it
    keys = {"access_key": "outage-" + secrets.token_hex(3), "secret_key": secrets.token_urlsafe(16)}
    s3 = S3ServerProcess(tmp_path / "s3", **keys).start(timeout=60)
    trainer: Trainer | None = None
    try:
        trainer = start_shapes_trainer(s3, tmp_path, "gone")
        spec = tiny_spec(epochs=50)
        cancelled = create_job(trainer, spec, "cancelled")
        watch_job_until(trainer, cancelled.name, lambda e: e.HasField("epoch_ended"))
        s3.kill()  # for good
        watch_job_until(trainer, cancelled.name, lambda e: e.warning.code == "s3_unavailable")
        started = time.monotonic()
        trainer.stub.CancelJob(training_service_pb2.CancelJobRequest(name=cancelled.name), timeout=10)
        events = watch_job(trainer, cancelled.name)
        assert events[-1].state_changed.state == job_pb2.JOB_STATE_CANCELLED
        assert time.monotonic() - started < 12  # the cancel ended the wait; it did not sit out the window

        failed = create_job(trainer, spec, "failed")  # its first write, the spec, meets the dead server
        events = watch_job(trainer, failed.name)
        job = get_job(trainer, failed.name)
        assert job.state == job_pb2.JOB_STATE_FAILED
        assert job.attempt == 1  # failed on purpose, not a crashed worker retried
        assert "\n" not in job.error.message
        assert job.error.message.startswith(f"S3 at http://{s3.endpoint} was unreachable for ")
        assert "longer than the outage window (15 s, VISIONTUNE_OUTAGE_WINDOW_S): put '" in job.error.message
        assert job.error.message.endswith("/jobs/failed/spec.json' failed: connection refused")
        assert events[-1].state_changed.message == job.error.message
        waiting = [e.warning.message for e in events if e.warning.code == "s3_unavailable"]
        assert len(waiting) == 1
        assert waiting[0].startswith(f"waiting for S3 at {s3.endpoint} since ")
    finally:
        if trainer is not None:
            trainer.stop()
        s3.kill()
