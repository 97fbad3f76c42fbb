"""The replica lease on both databases: heartbeats, expiring a dead replica, the guards against false takeovers.

Real job stores (SQLite files and a real PostgreSQL, the `database_url` fixture); leases of a fraction of a second
and explicit `tick()` calls instead of the lease's thread, so every step is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from trainer_service.jobs.replica import ReplicaLease, ReplicaSettings
from trainer_service.jobs.store import Conflict, JobState, JobStore, StudyState, Takeover

TTL_S = 0.5


@pytest.fixture
def jobs(database_url: str) -> Iterator[JobStore]:
    with JobStore(database_url) as store:
        yield store


def _lease(jobs: JobStore, name: str, taken: list[Takeover], lost: list[str]) -> ReplicaLease:
    return ReplicaLease(
        jobs,
        ReplicaSettings(name, lease_ttl_s=TTL_S),
        on_takeover=taken.append,
        on_lost=lambda: lost.append(name),
    )


def test_a_dead_replicas_jobs_and_studies_are_taken_over_once(jobs: JobStore) -> None:
    taken: list[Takeover] = []
    lost: list[str] = []
    alive, dead = _lease(jobs, "alive", taken, lost), _lease(jobs, "dead", taken, lost)
    alive.register()
    dead.register()
    for job_id in ("running", "cancelling", "queued"):
        jobs.create_job(job_id, "{}")
    assert jobs.claim_next_queued(owner="dead") is not None  # "running"
    assert jobs.claim_next_queued(owner="dead") is not None  # "cancelling"
    jobs.update_state("cancelling", JobState.CANCELLING)
    jobs.create_study("s1", "{}", owner="dead")

    alive.tick()
    assert taken == []  # nobody is older than the lease yet
    time.sleep(TTL_S * 1.2)
    alive.tick()  # alive renews; dead's heartbeat is now older than the lease

    assert len(taken) == 1
    assert taken[0].replicas == ("dead",)
    assert taken[0].requeued == ("running",)
    assert taken[0].cancelled == ("cancelling",)
    assert taken[0].released_studies == ("s1",)
    running = jobs.get_job("running")
    assert (running.state, running.owner) == (JobState.QUEUED, None)
    assert jobs.get_job("cancelling").state == JobState.CANCELLED
    assert jobs.get_job("queued").state == JobState.QUEUED  # untouched
    assert jobs.get_study("s1").owner is None
    assert jobs.get_study("s1").state == StudyState.RUNNING
    assert [r.replica_id for r in jobs.replicas()] == ["alive"]

    alive.tick()
    assert len(taken) == 1  # expired once

    # The dead replica comes back (it had only stalled): its lease is gone, so it stops its workers and re-registers.
    dead.tick()
    assert lost == ["dead"]
    assert sorted(r.replica_id for r in jobs.replicas()) == ["alive", "dead"]


def test_a_replica_expires_nobody_until_it_has_been_healthy_for_a_whole_lease(jobs: JobStore) -> None:
    taken: list[Takeover] = []
    other = _lease(jobs, "other", taken, [])
    other.register()
    time.sleep(TTL_S * 1.2)  # other's heartbeat is stale, as after a database outage everyone's is
    newcomer = _lease(jobs, "newcomer", taken, [])
    newcomer.register()
    newcomer.tick()
    assert taken == []  # it registered just now: it has not seen the others renew yet
    other.tick()  # the other replica is alive and renews within the lease
    time.sleep(TTL_S * 0.6)
    newcomer.tick()
    other.tick()
    time.sleep(TTL_S * 0.6)
    newcomer.tick()
    assert taken == []
    assert sorted(r.replica_id for r in jobs.replicas()) == ["newcomer", "other"]


def test_expire_replicas_keeps_the_caller_and_the_fresh(jobs: JobStore) -> None:
    jobs.register_replica("me", host="h", pid=1)
    jobs.register_replica("fresh", host="h", pid=2)
    assert jobs.expire_replicas(timedelta(seconds=60), keep="me").replicas == ()
    time.sleep(0.2)
    jobs.heartbeat("fresh")
    takeover = jobs.expire_replicas(timedelta(seconds=0.1), keep="me")
    assert takeover.replicas == ()  # "me" is kept, "fresh" just renewed
    assert jobs.heartbeat("me") is True
    jobs.deregister_replica("me")
    assert jobs.heartbeat("me") is False


def test_claims_are_owned_and_fenced_by_attempt(jobs: JobStore) -> None:
    jobs.create_job("j", "{}")
    claimed = jobs.claim_next_queued(owner="r1")
    assert claimed is not None
    assert claimed.owner == "r1"
    first = jobs.increment_attempt("j").attempt
    jobs.update_state("j", JobState.QUEUED)  # taken over
    assert jobs.get_job("j").owner is None
    assert jobs.claim_next_queued(owner="r2") is not None
    second = jobs.increment_attempt("j").attempt
    # The superseded attempt cannot end the job; the current one can.
    with pytest.raises(Conflict, match="attempt"):
        jobs.update_state("j", JobState.SUCCEEDED, attempt=first)
    done = jobs.update_state("j", JobState.SUCCEEDED, attempt=second)
    assert (done.state, done.owner) == (JobState.SUCCEEDED, None)
