"""The job store's per-creator quotas and its checkpoint commit, on SQLite and on a real PostgreSQL (the
`database_url` fixture runs each test once per backend)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_service.jobs.store import (
    SCHEMA_VERSION,
    Conflict,
    CreatorQuota,
    JobState,
    JobStore,
    QuotaExceeded,
    StudyState,
)
from visiontune import errors


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    with JobStore(database_url) as s:
        yield s


def test_a_creator_may_queue_up_to_its_quota_and_others_are_not_counted(store: JobStore) -> None:
    quota = CreatorQuota(2, "--max-queued-jobs-per-caller")
    store.create_job("a1", "{}", creator="alice", quota=quota)
    store.create_job("a2", "{}", creator="alice", quota=quota)
    store.create_job("b1", "{}", creator="bob", quota=quota)
    with pytest.raises(QuotaExceeded, match=r"caller 'alice' already has 2 jobs queued, the limit is 2 \(--max-q"):
        store.create_job("a3", "{}", creator="alice", quota=quota)
    assert isinstance(QuotaExceeded("x"), errors.ResourceExhausted)  # RESOURCE_EXHAUSTED on the wire

    # Only queued jobs count: one that started frees a place.
    store.update_state("a1", JobState.RUNNING)
    record, created = store.create_job("a3", "{}", creator="alice", quota=quota)
    assert created
    assert record.creator == "alice"
    assert store.get_job("b1").creator == "bob"


def test_a_replayed_request_is_answered_even_with_the_quota_full(store: JobStore) -> None:
    quota = CreatorQuota(1)
    first, _ = store.create_job("j1", "{}", request_id="r1", creator="c", quota=quota)
    again, created = store.create_job("j1", "{}", request_id="r1", creator="c", quota=quota)
    assert (again.job_id, created) == (first.job_id, False)
    with pytest.raises(QuotaExceeded, match="caller 'c' already has 1 job queued"):
        store.create_job("j2", "{}", creator="c", quota=quota)
    store.create_job("j3", "{}", creator="c", quota=CreatorQuota(0))  # 0: no limit


def test_running_studies_are_capped_per_creator(store: JobStore) -> None:
    quota = CreatorQuota(1, "--max-active-studies-per-caller")
    store.create_study("s1", "{}", creator="", quota=quota)
    with pytest.raises(QuotaExceeded, match=r"all callers together \(no authentication\) already has 1 study running"):
        store.create_study("s2", "{}", creator="", quota=quota)
    store.update_study_state("s1", StudyState.SUCCEEDED)
    assert store.create_study("s2", "{}", creator="", quota=quota)[0].creator == ""


def test_a_checkpoint_is_committed_only_by_the_jobs_current_attempt(store: JobStore) -> None:
    store.create_job("j", "{}")
    attempt = store.increment_attempt("j").attempt
    assert store.get_job("j").checkpoint_sha256 is None
    assert store.commit_checkpoint("j", attempt, "a" * 64) is None
    assert store.commit_checkpoint("j", attempt, "b" * 64) == "a" * 64
    assert store.get_job("j").checkpoint_sha256 == "b" * 64

    newer = store.increment_attempt("j").attempt
    with pytest.raises(Conflict, match=f"attempt {newer}, not {attempt}"):
        store.commit_checkpoint("j", attempt, "c" * 64)
    assert store.get_job("j").checkpoint_sha256 == "b" * 64  # the stale attempt changed nothing
    assert store.commit_checkpoint("j", newer, None) == "b" * 64
    assert store.get_job("j").checkpoint_sha256 is None


def test_a_version_3_database_gains_creators_and_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with JobStore(f"sqlite:///{path}") as s:
        s.create_job("old", "{}")
    # Back to how version 3 looked: no creator, no checkpoint digest.
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX vt_jobs_by_creator")
        conn.execute("DROP INDEX vt_studies_by_creator")
        conn.execute("ALTER TABLE vt_jobs DROP COLUMN creator")
        conn.execute("ALTER TABLE vt_jobs DROP COLUMN checkpoint_sha256")
        conn.execute("ALTER TABLE vt_studies DROP COLUMN creator")
        conn.execute("PRAGMA user_version = 3")
    with JobStore(f"sqlite:///{path}") as s:
        assert s.schema_version() == SCHEMA_VERSION == 4
        old = s.get_job("old")
        assert (old.creator, old.checkpoint_sha256) == ("", None)
