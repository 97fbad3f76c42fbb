"""The executor's sweep: a job this replica owns but runs no worker for (what a claim replayed after a database
outage can leave) is resumed, or cancelled if it was being cancelled; other replicas' jobs are left alone."""

from __future__ import annotations

from pathlib import Path

from trainer_service.jobs import events
from trainer_service.jobs.executor import JobExecutor
from trainer_service.jobs.local_workers import LocalWorkers
from trainer_service.jobs.store import JobState, JobStore
from visiontune.settings import S3Settings


def test_a_job_owned_here_without_a_worker_is_resumed_or_cancelled(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        for job_id in ("lost", "cancelling", "elsewhere", "queued"):
            jobs.create_job(job_id, "{}")
        # Claims (oldest first) whose answers an outage swallowed: RUNNING here, and no worker was ever started.
        claimed = [jobs.claim_next_queued("r1", start_attempt=True) for _ in range(2)]
        assert [r.job_id if r else None for r in claimed] == ["lost", "cancelling"]
        jobs.update_state("cancelling", JobState.CANCELLING, expected={JobState.RUNNING})
        elsewhere = jobs.claim_next_queued("r2", start_attempt=True)  # another replica's, with its worker
        assert elsewhere is not None
        assert elsewhere.job_id == "elsewhere"

        executor = JobExecutor(jobs, LocalWorkers(S3Settings(), tmp_path, database_url=jobs.url), replica_id="r1")
        executor.sweep_orphans()

        assert {r.job_id: (r.state, r.owner) for r in jobs.jobs_in_states(set(JobState))} == {
            "lost": (JobState.QUEUED, None),
            "cancelling": (JobState.CANCELLED, None),
            "elsewhere": (JobState.RUNNING, "r2"),
            "queued": (JobState.QUEUED, None),
        }
        (note,) = [events.to_proto(e).state_changed.message for e in jobs.events_after("lost")]
        assert note == "the trainer found the job without its worker; resuming from the last checkpoint"
        assert jobs.get_job("lost").attempt == 1  # the next claim starts attempt 2, from the checkpoint
