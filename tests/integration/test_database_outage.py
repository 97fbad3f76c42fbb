"""A training job survives a restart of its job database: the worker waits, and the job carries on where it was.

The PostgreSQL here is each test's own (killed with SIGKILL and restarted on the same data directory and port), so
the session's server, which every other test uses, is not touched. The trainer, its servicer, executor, study
runner and replica lease, and the job's worker all use it; none of them is restarted. Requests answer UNAVAILABLE
during the outage (after a few seconds' wait) and work again after it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tests.integration.trainer_helpers import (
    Trainer,
    create_job,
    get_job,
    start_shapes_trainer,
    tiny_spec,
    watch_job,
    watch_job_until,
    worker_pid,
)
from trainer_service.jobs.store import JobStore
from visiontune.client import is_serving
from visiontune.devstack.postgres import PostgresProcess
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.v1 import job_pb2

pytestmark = pytest.mark.integration

OUTAGE_S = 30


@pytest.fixture
def postgres() -> Iterator[PostgresProcess]:
    """A PostgreSQL of the test's own. Under /tmp: as root the server runs as `postgres`, which cannot enter pytest's
    temp root."""
    root = Path(tempfile.mkdtemp(prefix="visiontune-pg-outage-"))
    server = PostgresProcess(root).start(timeout=60)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _assert_whole_log(events: list[job_pb2.JobEvent]) -> None:
    """No torn log: sequences 1..n, each once, in order, and one final state at the end."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    finals = [e for e in events if e.state_changed.state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED)]
    assert finals == [events[-1]]


@pytest.mark.slow  # three jobs and a 30-second outage: about 3 minutes on 2 cores (`make test-slow`)
def test_a_job_waits_through_a_database_restart_and_matches_an_uninterrupted_run(
    postgres: PostgresProcess, s3_server: S3ServerProcess, tmp_path: Path
) -> None:
    url = postgres.create_database("jobs")
    endpoint = f"{postgres.host}:{postgres.port}/jobs"
    trainer = start_shapes_trainer(s3_server, tmp_path, "dboutage", "--database-url", url)
    try:
        spec = tiny_spec(epochs=4, fine_tuning_epochs=1, seed=3)
        reference = create_job(trainer, spec, "reference")
        assert watch_job(trainer, reference.name)[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED

        job = create_job(trainer, spec, "outage")
        watch_job_until(trainer, job.name, lambda e: e.HasField("epoch_ended"))
        postgres.kill()
        killed_at = time.monotonic()
        # Requests ride out a blip of a few seconds, then answer UNAVAILABLE with the database's one line.
        for call in (lambda: get_job(trainer, job.name), lambda: watch_job(trainer, job.name)):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as unavailable:
                call()
            assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (unavailable.value.details() or "").startswith(f"the job database at {endpoint} was unreachable")
            assert time.monotonic() - started < 10
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed_at)))
        assert worker_pid("outage") is not None  # the worker waits: it did not die
        postgres.start(timeout=60)
        down_s = time.monotonic() - killed_at

        events = watch_job(trainer, job.name)  # after the outage, without restarting the trainer
        assert get_job(trainer, job.name).state == job_pb2.JOB_STATE_SUCCEEDED
        _assert_whole_log(events)
        assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED, events[-1]
        done, ref = get_job(trainer, job.name), get_job(trainer, reference.name)
        assert done.attempt == 1  # the same worker carried on: no retry, no resume
        assert not any(e.warning.code == "resumed" for e in events)
        assert [e.state_changed.state for e in events if e.HasField("state_changed")] == [
            job_pb2.JOB_STATE_QUEUED,
            job_pb2.JOB_STATE_RUNNING,
            job_pb2.JOB_STATE_SUCCEEDED,
        ]
        for key in ("val_accuracy", "val_loss", "train_loss", "open_set_threshold"):
            assert done.result.metrics[key].mean == pytest.approx(ref.result.metrics[key].mean, rel=1e-4, abs=1e-5), key
        assert done.result.model_version == "models/shapes/versions/outage"

        # One warning, recorded when the database was back: after the epoch before the outage, before the end.
        outages = [(i, e.warning.message) for i, e in enumerate(events) if e.warning.code == "database_unavailable"]
        assert len(outages) == 1, outages
        index, message = outages[0]
        found = re.fullmatch(
            rf"the job database at {re.escape(endpoint)} was unreachable from \d\d:\d\d:\d\d UTC for (\d+) s "
            r"\((.+)\); the job carried on",
            message,
        )
        assert found is not None, message
        # The worker met the outage at its next write (an epoch's end, a fence check: within seconds of the kill) and
        # found the database back within its backoff (at most 5 s) of the restart.
        assert down_s - 15 <= int(found.group(1)) <= down_s + 10, (message, down_s)
        assert found.group(2) in (
            "Connection refused",
            "terminating connection due to unexpected postmaster exit",
            "consuming input failed: server closed the connection unexpectedly",
        ), message
        first_epoch = next(i for i, e in enumerate(events) if e.HasField("epoch_ended"))
        assert first_epoch < index < len(events) - 1

        # The rest of the trainer came through too: health, a new job claimed and run, the replica's lease renewed.
        assert is_serving(trainer.target, "visiontune.v1.TrainingService", 5.0)
        after = create_job(trainer, tiny_spec(epochs=1), "after")
        assert watch_job(trainer, after.name)[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
        with JobStore(url) as jobs:
            (replica,) = jobs.replicas()
            assert (jobs.get_job("outage").state.value, jobs.get_job("outage").owner) == ("SUCCEEDED", None)
        assert time.time() - replica.heartbeat_time.timestamp() < 30  # within one lease
    finally:
        trainer.stop()


def _worker_log_records(trainer: Trainer, job_id: str, attempt: int) -> list[dict[str, object]]:
    path = trainer.data_dir / "trainer" / "jobs" / job_id / f"worker-{attempt}.log"
    records = []
    for line in path.read_text().splitlines():
        assert not line.startswith("Traceback"), path.read_text()[-3000:]
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def test_past_the_window_the_worker_exits_and_the_job_resumes_or_fails_when_the_database_is_back(
    postgres: PostgresProcess, s3_server: S3ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    window_s = 8
    monkeypatch.setenv("VISIONTUNE_OUTAGE_WINDOW_S", str(window_s))  # the trainer's, and its workers'
    url = postgres.create_database("jobs")
    endpoint = f"{postgres.host}:{postgres.port}/jobs"
    trainer = start_shapes_trainer(s3_server, tmp_path, "dbgone", "--database-url", url, "--job-slots", "2")
    try:
        resumes = tiny_spec(epochs=6, seed=1)  # run.max_retries: the default, 2
        fails = tiny_spec(epochs=6, seed=2)
        fails.run.max_retries = 0
        jobs = {"resumes": create_job(trainer, resumes, "resumes"), "fails": create_job(trainer, fails, "fails")}
        for job in jobs.values():
            watch_job_until(trainer, job.name, lambda e: e.HasField("epoch_ended"))
        # Committed in the background after the epoch: the retry must find a checkpoint to resume from.
        with JobStore(url) as store:
            deadline = time.monotonic() + 60
            while store.get_job("resumes").checkpoint_sha256 is None:
                assert time.monotonic() < deadline, "no checkpoint was committed"
                time.sleep(0.05)
        postgres.kill()
        # Each worker waits one window, then exits: it cannot record anything, not even FAILED.
        deadline = time.monotonic() + window_s + 60
        while any(worker_pid(job_id) is not None for job_id in jobs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(worker_pid(job_id) is None for job_id in jobs)
        # Down for one more window: the executor's own wait to read how its workers ended runs out too. It keeps
        # them, and handles them once the database answers.
        time.sleep(window_s + 4)
        postgres.start(timeout=60)

        gone = re.compile(
            rf"the job database at {re.escape(endpoint)} was unreachable for \d+ s \(outage window {window_s} s\): .+"
        )
        for job_id in jobs:
            last = _worker_log_records(trainer, job_id, 1)[-1]
            assert last["level"] == "ERROR"
            assert gone.fullmatch(str(last["msg"])), last
            assert "exc" not in last

        # Max retries 0: FAILED, with the database's one line, once the database is back.
        events = watch_job(trainer, jobs["fails"].name)
        _assert_whole_log(events)
        failed = get_job(trainer, jobs["fails"].name)
        assert failed.state == job_pb2.JOB_STATE_FAILED
        assert failed.attempt == 1
        assert gone.fullmatch(failed.error.message), failed.error.message
        assert events[-1].state_changed.message == failed.error.message

        # The default retries: resumed from its last checkpoint by a second attempt, which succeeds.
        events = watch_job(trainer, jobs["resumes"].name)
        _assert_whole_log(events)
        resumed = get_job(trainer, jobs["resumes"].name)
        assert resumed.state == job_pb2.JOB_STATE_SUCCEEDED, events[-1]
        assert resumed.attempt == 2
        assert not resumed.error.message
        (queued,) = [e.state_changed.message for e in events if e.state_changed.state == job_pb2.JOB_STATE_QUEUED][1:]
        assert queued.startswith("the worker stopped: the job database at "), queued
        assert gone.fullmatch(queued.removeprefix("the worker stopped: ").split("; resuming")[0]), queued
        assert queued.endswith("; resuming from the last checkpoint (retry 1 of 2)"), queued
        assert any(e.warning.code == "resumed" for e in events)
        assert is_serving(trainer.target, "visiontune.v1.TrainingService", 5.0)
        trainer_log = next(tmp_path.glob("trainer-*.log")).read_text()
        assert "the executor's pass failed: the job database at " in trainer_log
        assert "Traceback" not in trainer_log
    finally:
        trainer.stop()
