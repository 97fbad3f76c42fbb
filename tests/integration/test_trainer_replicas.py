"""Several trainer replicas on one real PostgreSQL: jobs claimed once, a SIGKILLed replica's work taken over.

Two real `python -m trainer_service` processes share one database and one bucket, each with one job slot and a
short lease (4 s) so a takeover happens within seconds. One replica is killed with SIGKILL, as a node loss or the
OOM killer would; nothing of it gets to clean up. What must hold: every job ends SUCCEEDED exactly once, the jobs
that were running on the dead replica resumed from their checkpoints (2 worker starts, the second one a resume),
every other job started once; a study driven by the dead replica finishes on the other one with exactly its
trials, one job per trial.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from tests.integration.trainer_helpers import Trainer, start_trainer, tiny_spec
from trainer_service.jobs.store import JobRecord, JobState, JobStore, StudyState
from visiontune import names
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_spec_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

LEASE_S = 4.0
T = TypeVar("T")


def _wait_for(what: str, check: Callable[[], T | None], timeout: float = 300, every: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def replicas(
    shapes: ArtifactStore, s3_server: S3ServerProcess, postgres_url: str, tmp_path: Path
) -> Iterator[list[Trainer]]:
    """Two trainer replicas (`a`, `b`) on one PostgreSQL database and one bucket, one job slot each."""
    started: list[Trainer] = []
    try:
        for name in ("a", "b"):
            data = tmp_path / name
            data.mkdir()
            started.append(
                start_trainer(
                    shapes,
                    s3_server,
                    data,
                    "--replica-id",
                    f"replica-{name}",
                    "--lease-ttl-s",
                    str(LEASE_S),
                    "--job-slots",
                    "1",
                    # The URL (with its password) goes in the environment, as the stack and Kubernetes pass it.
                    env={"VISIONTUNE_DATABASE_URL": postgres_url},
                )
            )
        yield started
    finally:
        for trainer in started:
            if trainer.proc.poll() is None:
                trainer.stop()


def _kill(trainer: Trainer) -> None:
    trainer.channel.close()
    os.kill(trainer.proc.pid, signal.SIGKILL)
    trainer.proc.wait(timeout=30)


def _worker_starts(jobs: JobStore, job: JobRecord) -> list[str]:
    """The state messages of a job's RUNNING transitions: one per worker start ("started", "resumed ...")."""
    out = []
    for event in jobs.events_after(job.job_id, 0, limit=10_000):
        if event.kind == "state_changed":
            payload = json.loads(event.payload_json)
            if payload.get("state") == "JOB_STATE_RUNNING":
                out.append(payload.get("message", ""))
    return out


JOBS = 12  # enough that both replicas run several while one is killed mid-job


def test_two_replicas_run_12_jobs_once_each_and_take_over_a_killed_one(
    replicas: list[Trainer], postgres_url: str
) -> None:
    a, b = replicas
    spec = tiny_spec(epochs=3)
    spec.output_model = "replicas"
    created: list[str] = []
    for i in range(JOBS):
        via = replicas[i % 2]  # CreateJob on either replica: one shared queue
        job = via.stub.CreateJob(
            training_service_pb2.CreateJobRequest(
                job=job_pb2.Job(display_name=f"job {i}", spec=spec), request_id=f"replicas-{i}"
            ),
            timeout=30,
        )
        created.append(names.parse_job_name(job.name))

    with JobStore(postgres_url) as jobs:
        # Kill replica a while it runs a job that has committed a checkpoint, after a few jobs are done.
        def victim() -> JobRecord | None:
            done = jobs.jobs_in_states({JobState.SUCCEEDED})
            if len(done) < 4:
                return None
            for record in jobs.jobs_in_states({JobState.RUNNING}, owner="replica-a"):
                # A committed checkpoint too (it is committed in the background after the epoch): the takeover
                # must resume from it.
                if record.checkpoint_sha256 is not None and any(
                    e.kind == "epoch_ended" for e in jobs.events_after(record.job_id, 0, limit=10_000)
                ):
                    return record
            return None

        running_on_a = _wait_for("replica a to run a job past its first epoch", victim)
        _kill(a)
        killed_at = time.monotonic()

        def taken_over() -> bool:
            return jobs.get_job(running_on_a.job_id).attempt >= 2

        _wait_for("replica b to take the killed replica's job over", taken_over, timeout=120)
        takeover_s = time.monotonic() - killed_at

        def all_done() -> list[JobRecord] | None:
            records = [jobs.get_job(job_id) for job_id in created]
            return records if all(r.state.is_terminal for r in records) else None

        final = _wait_for("every job to end", all_done, timeout=600, every=1.0)
        assert Counter(r.state for r in final) == {JobState.SUCCEEDED: JOBS}, [
            (r.job_id, r.state, r.error) for r in final
        ]
        # Exactly once: one model version per job, no job ended twice (one terminal state event each).
        for record in final:
            ends = [
                json.loads(e.payload_json).get("state")
                for e in jobs.events_after(record.job_id, 0, limit=10_000)
                if e.kind == "state_changed"
            ]
            assert ends.count("JOB_STATE_SUCCEEDED") == 1, (record.job_id, ends)
        attempts = {r.job_id: r.attempt for r in final}
        starts = {r.job_id: _worker_starts(jobs, r) for r in final}
        assert attempts[running_on_a.job_id] == 2
        assert len(starts[running_on_a.job_id]) == 2
        assert starts[running_on_a.job_id][1].startswith("resumed")
        warnings = [
            json.loads(e.payload_json)
            for e in jobs.events_after(running_on_a.job_id, 0, limit=10_000)
            if e.kind == "warning"
        ]
        assert any(w.get("code") == "resumed" for w in warnings), warnings  # from its checkpoint, not from scratch
        others = {job_id: n for job_id, n in attempts.items() if job_id != running_on_a.job_id}
        assert set(others.values()) == {1}, others
        assert all(len(starts[job_id]) == 1 for job_id in others)
        # Both replicas did work; replica b (the survivor) finished the taken-over job.
        assert jobs.replicas()[0].replica_id == "replica-b"
        print(
            f"\n{JOBS} jobs on 2 replicas, replica a SIGKILLed mid-job: all SUCCEEDED once; job {running_on_a.job_id} "
            f"taken over {takeover_s:.1f} s after the kill (lease {LEASE_S:g} s); "
            f"(worker starts, jobs): {sorted(Counter(attempts.values()).items())}"
        )
    # The survivor still answers for every job.
    listed = b.stub.ListJobs(training_service_pb2.ListJobsRequest(page_size=100), timeout=30)
    assert len(listed.jobs) == JOBS


def _study_spec(max_trials: int) -> study_pb2.StudySpec:
    return study_pb2.StudySpec(
        base_spec=tiny_spec(epochs=3),
        parameters=[
            study_pb2.SearchParameter(
                path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-4, max=0.05, log=True)
            )
        ],
        objective=study_pb2.Objective(metric=training_spec_pb2.METRIC_VALIDATION_LOSS),
        budget=study_pb2.StudyBudget(max_trials=max_trials),
        parallelism=2,
        sampler=study_pb2.SAMPLER_TPE,
        seed=11,
    )


def test_a_study_whose_runner_is_killed_finishes_on_the_other_replica(
    replicas: list[Trainer], postgres_url: str
) -> None:
    a, b = replicas
    max_trials = 5
    study = a.stub.CreateStudy(
        training_service_pb2.CreateStudyRequest(
            study=study_pb2.Study(display_name="takeover", spec=_study_spec(max_trials)),
            study_id="takeover",
            request_id="takeover-1",
        ),
        timeout=60,
    )
    # Followed live on replica b from the start: the events a's runner writes first, then b's own.
    streamed: list[study_pb2.StudyEvent] = []
    watcher = threading.Thread(
        target=lambda: streamed.extend(
            b.stub.WatchStudy(training_service_pb2.WatchStudyRequest(name=study.name), timeout=900)
        ),
        daemon=True,
    )
    watcher.start()
    with JobStore(postgres_url) as jobs:
        assert jobs.get_study("takeover").owner == "replica-a"  # a's runner drives it

        def two_trials_running_one_done() -> bool:
            trial_jobs = [
                j for j in jobs.list_jobs(study_id="takeover", page_size=100)[0] if j.trial_number is not None
            ]
            return sum(j.state.is_terminal for j in trial_jobs) >= 1 and len(trial_jobs) >= 3

        _wait_for("the study to have finished a trial and queued more", two_trials_running_one_done)
        _kill(a)
        _wait_for("replica b's runner to take the study", lambda: jobs.get_study("takeover").owner == "replica-b", 120)

        def ended() -> bool:
            return jobs.get_study("takeover").state.is_terminal

        _wait_for("the study to end", ended, timeout=600, every=1.0)
        record = jobs.get_study("takeover")
        assert record.state == StudyState.SUCCEEDED, record.error
        trial_jobs = [j for j in jobs.list_jobs(study_id="takeover", page_size=100)[0] if j.trial_number is not None]
    # Exactly max_trials trials, one job per trial: none lost, none run twice.
    assert sorted(j.trial_number or 0 for j in trial_jobs) == list(range(max_trials))
    assert all(j.trial_number is not None for j in trial_jobs)
    assert all(j.state.is_terminal for j in trial_jobs)
    finished = b.stub.GetStudy(training_service_pb2.GetStudyRequest(name=study.name), timeout=30)
    assert finished.state == study_pb2.STUDY_STATE_SUCCEEDED
    assert len(finished.trials) == max_trials
    assert sorted(t.job for t in finished.trials) == sorted(names.job_name(j.job_id) for j in trial_jobs)
    assert finished.best_trial in range(max_trials)
    watcher.join(timeout=60)
    assert not watcher.is_alive(), "WatchStudy on replica b did not end with the study"
    assert [e.sequence for e in streamed] == list(range(1, len(streamed) + 1))
    assert streamed[0].state_changed == study_pb2.STUDY_STATE_RUNNING  # written by replica a
    assert streamed[-1].state_changed == study_pb2.STUDY_STATE_SUCCEEDED  # written by replica b
    trial_updates = {e.trial_updated.number for e in streamed if e.HasField("trial_updated")}
    assert trial_updates == set(range(max_trials))
