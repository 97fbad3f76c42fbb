"""Worker rows (the Kubernetes executor's Jobs in the job store), on SQLite and PostgreSQL: the cluster-wide cap holds
across claimers, a stopped or expired replica's running workers are released still RUNNING, and adopted once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from trainer_service.jobs.store import JobState, JobStore, WorkerClaim


def _name(job_id: str, attempt: int) -> str:
    return f"vt-{job_id}-{attempt}"


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    with JobStore(database_url) as jobs:
        yield jobs


def test_claims_stop_at_the_cap_until_a_row_is_released(store: JobStore) -> None:
    for i in range(5):
        store.create_job(f"j{i}", "{}")
    claim = WorkerClaim(_name, cap=3)
    claimed = [store.claim_next_queued("r1", start_attempt=True, worker=claim) for _ in range(4)]
    assert [r.job_id if r else None for r in claimed] == ["j0", "j1", "j2", None]
    assert [w.name for w in store.workers()] == ["vt-j0-1", "vt-j1-1", "vt-j2-1"]
    # A finished job keeps its row (its Job still exists) until the Job is gone.
    store.update_state("j0", JobState.SUCCEEDED)
    assert store.claim_next_queued("r1", start_attempt=True, worker=claim) is None
    store.release_worker("vt-j0-1")
    record = store.claim_next_queued("r1", start_attempt=True, worker=claim)
    assert record is not None
    assert record.job_id == "j3"


def test_concurrent_claimers_never_exceed_the_cap(store: JobStore) -> None:
    for i in range(12):
        store.create_job(f"j{i:02d}", "{}")
    claim = WorkerClaim(_name, cap=4)
    got: list[str] = []
    lock = threading.Lock()

    def claimer(owner: str) -> None:
        for _ in range(6):
            record = store.claim_next_queued(owner, start_attempt=True, worker=claim)
            if record is not None:
                with lock:
                    got.append(record.job_id)

    threads = [threading.Thread(target=claimer, args=(f"r{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4
    assert len(set(got)) == 4
    assert len(store.workers()) == 4


def test_a_clean_stop_releases_running_workers_and_another_replica_adopts_them(store: JobStore) -> None:
    store.create_job("j", "{}")
    claim = WorkerClaim(_name, cap=8)
    store.claim_next_queued("r1", start_attempt=True, worker=claim)
    released = store.release_workers("r1")
    assert [w.name for w in released] == ["vt-j-1"]
    job = store.get_job("j")
    assert (job.state, job.owner, job.attempt) == (JobState.RUNNING, None, 1)
    adopted = store.adopt_workers("r2")
    assert [(w.name, w.owner) for w in adopted] == [("vt-j-1", "r2")]
    assert store.get_job("j").owner == "r2"
    assert store.adopt_workers("r3") == []  # adopted once


def test_an_expired_replica_s_workers_are_released_not_requeued(store: JobStore) -> None:
    store.register_replica("dead", host="h", pid=1)
    store.register_replica("live", host="h", pid=2)
    store.create_job("k8s", "{}")
    store.create_job("local", "{}")
    store.claim_next_queued("dead", start_attempt=True, worker=WorkerClaim(_name, cap=8))
    store.claim_next_queued("dead", start_attempt=True)  # a local worker: no row, dies with its replica
    takeover = store.expire_replicas(timedelta(seconds=-1), keep="live")
    assert takeover.released_jobs == ("k8s",)
    assert takeover.requeued == ("local",)
    assert store.get_job("k8s").state == JobState.RUNNING
    assert store.get_job("local").state == JobState.QUEUED
    assert [w.owner for w in store.workers()] == [None]
