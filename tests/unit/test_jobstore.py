"""Tests of the trainer's job store on both of its databases: real SQLite files and a real PostgreSQL server
(the `database_url` fixture runs each test once per backend; no mocks).

One module for the store's one contract, in the order of store.py's sections (opening, jobs, studies, events,
replicas), sharing its clock and store fixtures; the newer creator quotas and checkpoint commit are in
test_store_creators.py, the worker rows in test_worker_rows.py."""

from __future__ import annotations

import base64
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from trainer_service.jobs.store import (
    SCHEMA_VERSION,
    AlreadyExists,
    Conflict,
    JobState,
    JobStore,
    JobStoreError,
    NotFound,
    ResourceType,
    SchemaError,
    StudyState,
)
from visiontune.pagination import DEFAULT_PAGE_SIZE

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class StepClock:
    """A deterministic clock: each reading is one second after the previous one (thread-safe)."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(seconds=1)) -> None:
        self._next = start
        self._step = step
        self._lock = threading.Lock()
        self.last = start

    def __call__(self) -> datetime:
        with self._lock:
            self.last = self._next
            self._next += self._step
            return self.last


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A SQLite file, for the tests of what only SQLite has (WAL, PRAGMA user_version)."""
    return tmp_path / "state" / "jobs.sqlite3"  # the parent dir does not exist yet


@pytest.fixture
def db_url(database_url: str) -> str:
    """The store's database: every test that takes it runs on SQLite and on a real PostgreSQL."""
    return database_url


@pytest.fixture
def store(db_url: str, clock: StepClock) -> Iterator[JobStore]:
    with JobStore(db_url, clock=clock) as s:
        yield s


# ------------------------------------------------------------------------------------------- opening


def test_open_creates_parent_dir_wal_and_schema_version(db_path: Path) -> None:
    with JobStore(db_path) as store:
        assert store.path == db_path
    assert db_path.is_file()
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        raw.close()
    # Our tables carry a prefix so Optuna's tables ("studies", "trials", ...) can share the file.
    assert {"vt_jobs", "vt_studies", "vt_events"} <= tables
    assert "studies" not in tables


def test_reopen_keeps_jobs_events_and_version(db_url: str, clock: StepClock) -> None:
    with JobStore(db_url, clock=clock) as s:
        s.create_job("j1", '{"a": 1}', display_name="first", labels={"team": "cv"}, request_id="r1")
        s.update_state("j1", JobState.RUNNING)
        s.append_event("j1", "state", '{"state": "RUNNING"}')
        s.append_event("j1", "epoch", '{"epoch": 1}')
        before = s.get_job("j1")

    with JobStore(db_url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_job("j1") == before
        assert [e.kind for e in s.events_after("j1")] == ["state", "epoch"]
        # The sequence continues where it left off, and request-id idempotency survives the restart.
        assert s.append_event("j1", "epoch", '{"epoch": 2}').sequence == 3
        again, created = s.create_job("j1", '{"a": 1}', request_id="r1")
        assert not created
        assert again.job_id == "j1"

    with JobStore(db_url, clock=clock) as s:  # a third open runs no migration twice
        assert s.schema_version() == SCHEMA_VERSION
        assert len(s.events_after("j1")) == 3


def test_newer_schema_raises_schema_error(db_path: Path) -> None:
    JobStore(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(SchemaError, match=rf"version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}"):
        JobStore(db_path)


def test_not_a_database_raises_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a sqlite database, not even close" * 100)
    with pytest.raises(SchemaError, match="not a usable job store"):
        JobStore(path)


def test_closed_store_raises(store: JobStore) -> None:
    store.create_job("j1", "{}")
    store.close()
    store.close()  # idempotent
    with pytest.raises(JobStoreError, match="closed"):
        store.get_job("j1")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_finished_threads_do_not_leak_connections(store: JobStore) -> None:
    store.create_job("j1", "{}")

    def open_fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    def churn() -> None:  # a churning thread pool: 8 short-lived threads, each taking a connection
        threads = [threading.Thread(target=store.get_job, args=("j1",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    for _ in range(3):
        churn()  # the pool now holds what it keeps (connections bounded by its size and overflow)
    warm = open_fds()
    for _ in range(10):
        churn()
    # A leak grows with every round: 80 more threads would leave 80+ more descriptors; the pool's bound is far less.
    assert open_fds() - warm < 30


def test_naive_clock_is_rejected(db_url: str) -> None:
    naive = datetime(2025, 1, 1)  # no tzinfo
    with JobStore(db_url, clock=lambda: naive) as s, pytest.raises(ValueError, match="aware"):
        s.create_job("j1", "{}")


def test_non_utc_clock_is_returned_as_utc(db_url: str) -> None:
    plus_two = timezone(timedelta(hours=2))
    with JobStore(db_url, clock=lambda: datetime(2025, 1, 1, 12, tzinfo=plus_two)) as s:
        job, _ = s.create_job("j1", "{}")
    assert job.create_time == datetime(2025, 1, 1, 10, tzinfo=UTC)
    assert job.create_time.utcoffset() == timedelta(0)


# ---------------------------------------------------------------------------------------------- jobs


def test_create_and_get_job(store: JobStore) -> None:
    job, created = store.create_job(
        "j1",
        '{"epochs": 3}',
        display_name="cats vs dogs",
        request_id="req-1",
        labels={"team": "cv", "env": "dev"},
    )
    assert created
    assert job.job_id == "j1"
    assert job.state is JobState.QUEUED
    assert job.spec_json == '{"epochs": 3}'
    assert job.display_name == "cats vs dogs"
    assert job.request_id == "req-1"
    assert job.labels == {"team": "cv", "env": "dev"}
    assert job.create_time == job.update_time == T0
    assert job.create_time.tzinfo is not None
    assert (job.start_time, job.end_time, job.error, job.result_json) == (None, None, None, None)
    assert job.attempt == 0
    assert (job.study_id, job.trial_number) == (None, None)
    assert store.get_job("j1") == job


def test_create_is_idempotent_on_request_id(store: JobStore) -> None:
    first, created1 = store.create_job("j1", '{"v": 1}', request_id="req-1")
    again, created2 = store.create_job("j1", '{"v": 1}', request_id="req-1")
    # A retry that picked a fresh job id still gets the job the first call made.
    other_id, created3 = store.create_job("j2", '{"v": 1}', request_id="req-1")
    assert created1
    assert not created2
    assert not created3
    assert again == first
    assert other_id == first
    jobs, _ = store.list_jobs()
    assert [j.job_id for j in jobs] == ["j1"]


def test_same_job_id_from_another_request_already_exists(store: JobStore) -> None:
    store.create_job("j1", "{}", request_id="req-1")
    with pytest.raises(AlreadyExists, match="j1"):
        store.create_job("j1", "{}", request_id="req-2")
    with pytest.raises(AlreadyExists):
        store.create_job("j1", "{}")
    # Without a request id there is no idempotency: a second create of the same id is refused.
    store.create_job("j2", "{}")
    with pytest.raises(AlreadyExists):
        store.create_job("j2", "{}")


def test_get_unknown_job_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound, match="nope"):
        store.get_job("nope")
    with pytest.raises(NotFound):
        store.update_state("nope", JobState.RUNNING)
    with pytest.raises(NotFound):
        store.increment_attempt("nope")
    with pytest.raises(NotFound):
        store.delete_job("nope")


def test_empty_job_id_rejected(store: JobStore) -> None:
    with pytest.raises(ValueError, match="job_id"):
        store.create_job("", "{}")


def _collect_pages(
    store: JobStore, page_size: int, *, states: set[JobState] | None = None, study_id: str | None = None
) -> list[list[str]]:
    """Follow next-page tokens to the end; the ids of each page."""
    pages: list[list[str]] = []
    token = ""
    while True:
        jobs, token = store.list_jobs(states=states, study_id=study_id, page_size=page_size, page_token=token)
        pages.append([j.job_id for j in jobs])
        if not token:
            return pages
        assert len(pages) < 100, "pagination does not terminate"


def test_list_jobs_paginates_newest_first(store: JobStore) -> None:
    ids = [f"job-{i}" for i in range(7)]
    for job_id in ids:
        store.create_job(job_id, "{}")
    pages = _collect_pages(store, 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [j for p in pages for j in p]
    assert flat == list(reversed(ids))  # newest first, none missing, none twice


def test_list_jobs_pagination_breaks_time_ties_by_id(db_url: str) -> None:
    # Every job created at the same instant: the id must keep the order total and the pages disjoint.
    with JobStore(db_url, clock=lambda: T0) as s:
        ids = [f"job-{i}" for i in range(7)]
        for job_id in ids:
            s.create_job(job_id, "{}")
        pages = _collect_pages(s, 3)
    assert [j for p in pages for j in p] == sorted(ids, reverse=True)


def test_list_jobs_pagination_is_stable_under_inserts(store: JobStore) -> None:
    for i in range(5):
        store.create_job(f"old-{i}", "{}")
    first, token = store.list_jobs(page_size=2)
    store.create_job("newer", "{}")  # lands before page one; must not shift later pages
    second, _ = store.list_jobs(page_size=10, page_token=token)
    assert [j.job_id for j in first] == ["old-4", "old-3"]
    assert [j.job_id for j in second] == ["old-2", "old-1", "old-0"]


def test_list_jobs_state_and_study_filter(store: JobStore) -> None:
    store.create_study("s1", "{}")
    for i in range(6):
        store.create_job(f"j{i}", "{}", study_id="s1" if i % 2 else None, trial_number=i if i % 2 else None)
    store.update_state("j0", JobState.RUNNING)
    store.update_state("j1", JobState.RUNNING)
    store.update_state("j2", JobState.FAILED, error="boom")

    running, token = store.list_jobs(states={JobState.RUNNING})
    assert [j.job_id for j in running] == ["j1", "j0"]
    assert token == ""
    queued_or_failed = _collect_pages(store, 2, states={JobState.QUEUED, JobState.FAILED})
    assert [j for p in queued_or_failed for j in p] == ["j5", "j4", "j3", "j2"]
    in_study = _collect_pages(store, 2, study_id="s1")
    assert [j for p in in_study for j in p] == ["j5", "j3", "j1"]
    running_in_study, _ = store.list_jobs(states={JobState.RUNNING}, study_id="s1")
    assert [(j.job_id, j.trial_number) for j in running_in_study] == [("j1", 1)]
    assert len(store.list_jobs(states=set())[0]) == 6  # an empty filter is no filter


def test_list_jobs_bad_page_token(store: JobStore) -> None:
    for i in range(3):
        store.create_job(f"j{i}", "{}")
    _, token = store.list_jobs(page_size=1)
    assert token
    with pytest.raises(ValueError, match="invalid page_token"):
        store.list_jobs(page_token="!!! not base64 !!!")
    with pytest.raises(ValueError, match="invalid page_token"):
        store.list_jobs(page_token=base64.urlsafe_b64encode(b"not json").decode())
    with pytest.raises(ValueError, match="invalid page_token"):
        store.list_jobs(page_token=base64.urlsafe_b64encode(b'{"t": "x", "id": 3, "f": ""}').decode())
    with pytest.raises(ValueError, match="different filter"):
        store.list_jobs(page_token=token, states={JobState.RUNNING})
    with pytest.raises(ValueError, match="page_size"):
        store.list_jobs(page_size=-1)


def test_list_jobs_page_size_default_and_clamp(db_url: str) -> None:
    with JobStore(db_url, clock=StepClock(step=timedelta(milliseconds=1))) as s:
        for i in range(1001):
            s.create_job(f"j{i:04d}", "{}")
        default_page, _ = s.list_jobs(page_size=0)
        clamped, token = s.list_jobs(page_size=5000)
        rest, last_token = s.list_jobs(page_size=5000, page_token=token)
    assert len(default_page) == DEFAULT_PAGE_SIZE
    assert len(clamped) == 1000
    assert [j.job_id for j in rest] == ["j0000"]
    assert last_token == ""


def test_update_state_sets_times_error_and_result(store: JobStore, clock: StepClock) -> None:
    store.create_job("j1", "{}")
    running = store.update_state("j1", JobState.RUNNING, expected={JobState.QUEUED})
    started = clock.last
    assert running.state is JobState.RUNNING
    assert running.start_time == started
    assert running.update_time == started
    assert running.end_time is None

    done = store.update_state("j1", JobState.SUCCEEDED, result_json='{"acc": 0.9}', expected={JobState.RUNNING})
    assert done.state is JobState.SUCCEEDED
    assert done.start_time == started  # unchanged
    assert done.end_time == clock.last
    assert done.end_time > started
    assert done.result_json == '{"acc": 0.9}'
    assert done.error is None
    assert store.get_job("j1") == done

    store.create_job("j2", "{}")
    failed = store.update_state("j2", JobState.FAILED, error="CUDA out of memory")
    assert failed.error == "CUDA out of memory"
    assert failed.start_time is None  # it never ran
    assert failed.end_time is not None


def test_update_state_compare_and_set_conflict(store: JobStore) -> None:
    store.create_job("j1", "{}")
    store.update_state("j1", JobState.RUNNING)
    with pytest.raises(Conflict, match="RUNNING"):
        store.update_state("j1", JobState.CANCELLED, expected={JobState.QUEUED})
    assert store.get_job("j1").state is JobState.RUNNING  # nothing changed
    cancelling = store.update_state("j1", JobState.CANCELLING, expected={JobState.QUEUED, JobState.RUNNING})
    assert cancelling.state is JobState.CANCELLING
    assert cancelling.end_time is None


def test_requeue_keeps_first_start_and_clears_end(store: JobStore) -> None:
    store.create_job("j1", "{}")
    first = store.update_state("j1", JobState.RUNNING)
    store.update_state("j1", JobState.FAILED, error="preempted")
    requeued = store.update_state("j1", JobState.QUEUED, expected={JobState.FAILED})
    assert requeued.end_time is None
    again = store.update_state("j1", JobState.RUNNING)
    assert again.start_time == first.start_time
    assert again.error == "preempted"  # kept until a new one is written


def test_increment_attempt(store: JobStore) -> None:
    store.create_job("j1", "{}")
    assert store.increment_attempt("j1").attempt == 1
    assert store.increment_attempt("j1").attempt == 2
    assert store.get_job("j1").attempt == 2


def test_claim_next_queued_takes_oldest_first(store: JobStore) -> None:
    assert store.claim_next_queued() is None
    for job_id in ["a", "b", "c"]:
        store.create_job(job_id, "{}")
    store.update_state("a", JobState.CANCELLED)  # not queued any more: skipped
    claimed_b = store.claim_next_queued()
    claimed_c = store.claim_next_queued()
    assert claimed_b is not None
    assert claimed_c is not None
    assert (claimed_b.job_id, claimed_c.job_id) == ("b", "c")
    assert claimed_b.state is JobState.RUNNING
    assert claimed_b.start_time is not None
    assert store.get_job("b").state is JobState.RUNNING
    assert store.claim_next_queued() is None


def test_claim_next_queued_can_start_the_attempt_in_the_same_transaction(store: JobStore) -> None:
    store.create_job("j1", "{}")
    first = store.claim_next_queued("r1", start_attempt=True)
    assert first is not None
    assert (first.state, first.owner, first.attempt) == (JobState.RUNNING, "r1", 1)
    store.update_state("j1", JobState.QUEUED, expected={JobState.RUNNING}, attempt=1)
    again = store.claim_next_queued("r2", start_attempt=True)
    assert again is not None
    assert (again.owner, again.attempt) == ("r2", 2)
    assert store.get_job("j1").attempt == 2


def test_claim_next_queued_concurrent_claimers_never_share_a_job(db_url: str) -> None:
    n_jobs, n_threads = 60, 8
    with JobStore(db_url) as s:
        for i in range(n_jobs):
            s.create_job(f"j{i:03d}", "{}")
        claimed: list[list[str]] = [[] for _ in range(n_threads)]
        barrier = threading.Barrier(n_threads)

        def claimer(slot: int) -> None:
            barrier.wait()
            while (job := s.claim_next_queued()) is not None:
                claimed[slot].append(job.job_id)

        threads = [threading.Thread(target=claimer, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        flat = [j for per_thread in claimed for j in per_thread]
        assert len(flat) == n_jobs
        assert set(flat) == {f"j{i:03d}" for i in range(n_jobs)}
        assert s.jobs_in_states({JobState.QUEUED}) == []
        assert len(s.jobs_in_states({JobState.RUNNING})) == n_jobs
        # Each claimer saw its jobs oldest-first.
        assert all(per_thread == sorted(per_thread) for per_thread in claimed)


def test_jobs_in_states_oldest_first(store: JobStore) -> None:
    for job_id in ["a", "b", "c", "d"]:
        store.create_job(job_id, "{}")
    store.update_state("b", JobState.RUNNING)
    store.update_state("d", JobState.CANCELLING)
    got = store.jobs_in_states({JobState.RUNNING, JobState.CANCELLING})
    assert [j.job_id for j in got] == ["b", "d"]
    assert store.jobs_in_states(set()) == []


def test_delete_job_removes_its_events(store: JobStore) -> None:
    store.create_job("j1", "{}")
    store.create_job("j2", "{}")
    store.append_event("j1", "state", "{}")
    store.append_event("j2", "state", "{}")
    with pytest.raises(Conflict):
        store.delete_job("j1", expected={JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
    store.delete_job("j1")
    with pytest.raises(NotFound):
        store.get_job("j1")
    with pytest.raises(NotFound):
        store.events_after("j1")
    assert len(store.events_after("j2")) == 1
    # The id is free again and its event log starts from 1.
    store.create_job("j1", "{}")
    assert store.append_event("j1", "state", "{}").sequence == 1


# -------------------------------------------------------------------------------------------- events


def test_events_sequence_and_paging(store: JobStore, clock: StepClock) -> None:
    store.create_job("j1", "{}")
    store.create_job("j2", "{}")
    appended = [store.append_event("j1", "epoch", f'{{"epoch": {i}}}') for i in range(5)]
    other = store.append_event("j2", "state", "{}")
    assert [e.sequence for e in appended] == [1, 2, 3, 4, 5]
    assert other.sequence == 1  # per job
    assert appended[0].resource_type is ResourceType.JOB
    assert appended[0].resource_id == "j1"
    assert appended[-1].time == clock.last - timedelta(seconds=1)
    assert store.events_after("j1") == appended
    assert [e.sequence for e in store.events_after("j1", after_sequence=3)] == [4, 5]
    assert [e.sequence for e in store.events_after("j1", after_sequence=1, limit=2)] == [2, 3]
    assert store.events_after("j1", after_sequence=5) == []
    with pytest.raises(NotFound):
        store.append_event("missing", "state", "{}")
    with pytest.raises(NotFound):
        store.events_after("missing")


def test_events_concurrent_thread_appenders_never_collide(store: JobStore) -> None:
    store.create_job("j1", "{}")
    n_threads, per_thread = 6, 25
    barrier = threading.Barrier(n_threads)
    got: list[list[int]] = [[] for _ in range(n_threads)]

    def appender(slot: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            got[slot].append(store.append_event("j1", "tick", f'{{"t": {slot}, "i": {i}}}').sequence)

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    total = n_threads * per_thread
    assert sorted(s for seqs in got for s in seqs) == list(range(1, total + 1))
    assert all(seqs == sorted(seqs) for seqs in got)
    stored = store.events_after("j1", limit=total + 10)
    assert [e.sequence for e in stored] == list(range(1, total + 1))


def _append_from_other_process(url: str, job_id: str, count: int, delay_s: float) -> None:
    # Runs in a spawned child: it opens its own store on the same database, as a worker subprocess will.
    time.sleep(delay_s)
    with JobStore(url) as s:
        for i in range(count):
            s.append_event(job_id, "child", f'{{"i": {i}}}')


def test_events_appended_from_another_process(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent holds open SQLite handles
    with JobStore(db_url, poll_interval_s=0.05) as s:
        s.create_job("j1", "{}")
        children = [ctx.Process(target=_append_from_other_process, args=(db_url, "j1", 40, 0.0)) for _ in range(2)]
        for child in children:
            child.start()
        # Keep appending until both children are done, so the three writers overlap.
        parent_count = 0
        deadline = time.monotonic() + 60
        while any(c.is_alive() for c in children) and time.monotonic() < deadline:
            s.append_event("j1", "parent", f'{{"i": {parent_count}}}')
            parent_count += 1
            time.sleep(0.002)  # overlap with the children without flooding the log while they start
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        events = s.events_after("j1", limit=10_000)
        while batch := s.events_after("j1", after_sequence=events[-1].sequence, limit=10_000):
            events += batch
    assert [e.sequence for e in events] == list(range(1, parent_count + 81))
    assert sum(e.kind == "child" for e in events) == 80
    assert sum(e.kind == "parent" for e in events) == parent_count


def test_wait_for_events_notices_another_process_by_polling(db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with JobStore(db_url, poll_interval_s=0.05) as s:
        s.create_job("j1", "{}")
        child = ctx.Process(target=_append_from_other_process, args=(db_url, "j1", 1, 0.0))
        child.start()
        try:
            events = s.wait_for_events("j1", after_sequence=0, timeout_s=30)
        finally:
            child.join(timeout=60)
    assert [(e.sequence, e.kind) for e in events] == [(1, "child")]
    assert child.exitcode == 0


def test_wait_for_events_wakes_on_in_process_append(store: JobStore) -> None:
    # A long poll interval proves the wake-up came from the in-process notification, not polling.
    with JobStore(store.url, poll_interval_s=30) as waiter_store:
        store.create_job("j1", "{}")
        waiter_store.append_event("j1", "state", '{"state": "QUEUED"}')
        timer = threading.Timer(0.2, waiter_store.append_event, args=("j1", "epoch", "{}"))
        start = time.monotonic()
        timer.start()
        events = waiter_store.wait_for_events("j1", after_sequence=1, timeout_s=20)
        elapsed = time.monotonic() - start
        timer.join()
    assert [(e.sequence, e.kind) for e in events] == [(2, "epoch")]
    assert 0.15 <= elapsed < 5


def test_wait_for_events_returns_at_once_when_events_exist(store: JobStore) -> None:
    store.create_job("j1", "{}")
    store.append_event("j1", "state", "{}")
    start = time.monotonic()
    events = store.wait_for_events("j1", after_sequence=0, timeout_s=10)
    assert time.monotonic() - start < 1
    assert [e.sequence for e in events] == [1]


def test_wait_for_events_times_out_empty(store: JobStore) -> None:
    store.create_job("j1", "{}")
    store.append_event("j1", "state", "{}")
    start = time.monotonic()
    events = store.wait_for_events("j1", after_sequence=1, timeout_s=0.3)
    elapsed = time.monotonic() - start
    assert events == []
    assert 0.3 <= elapsed < 3


def test_wait_for_events_unknown_job(store: JobStore) -> None:
    with pytest.raises(NotFound):
        store.wait_for_events("missing", after_sequence=0, timeout_s=1)


def test_close_wakes_waiters(db_url: str) -> None:
    s = JobStore(db_url, poll_interval_s=30)
    s.create_job("j1", "{}")
    outcome: list[BaseException | None] = []

    def waiter() -> None:
        try:
            s.wait_for_events("j1", after_sequence=0, timeout_s=20)
            outcome.append(None)
        except JobStoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    s.close()
    thread.join(timeout=10)
    assert time.monotonic() - start < 5
    assert len(outcome) == 1
    assert isinstance(outcome[0], JobStoreError)


# ------------------------------------------------------------------------------------------- studies


def test_studies_crud_and_idempotency(store: JobStore, clock: StepClock) -> None:
    study, created = store.create_study("s1", '{"trials": 10}', display_name="lr sweep", request_id="rq")
    assert created
    assert study.state is StudyState.RUNNING
    assert (study.display_name, study.request_id, study.end_time) == ("lr sweep", "rq", None)
    assert store.get_study("s1") == study
    again, created_again = store.create_study("s1-retry", '{"trials": 10}', request_id="rq")
    assert not created_again
    assert again == study
    with pytest.raises(AlreadyExists):
        store.create_study("s1", "{}", request_id="other")
    with pytest.raises(NotFound):
        store.get_study("missing")

    with pytest.raises(Conflict):
        store.update_study_state("s1", StudyState.CANCELLED, expected={StudyState.CANCELLING})
    cancelling = store.update_study_state("s1", StudyState.CANCELLING, expected={StudyState.RUNNING})
    assert cancelling.end_time is None
    done = store.update_study_state(
        "s1", StudyState.CANCELLED, result_json='{"best": 3}', expected={StudyState.CANCELLING}
    )
    assert done.state is StudyState.CANCELLED
    assert done.end_time == clock.last
    assert done.result_json == '{"best": 3}'


def test_list_studies_paginates_and_filters(store: JobStore) -> None:
    ids = [f"s{i}" for i in range(7)]
    for study_id in ids:
        store.create_study(study_id, "{}")
    store.update_study_state("s2", StudyState.FAILED, error="no trials finished")
    store.update_study_state("s5", StudyState.SUCCEEDED)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        studies, token = store.list_studies(page_size=3, page_token=token)
        seen += [s.study_id for s in studies]
        pages += 1
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(ids))

    finished, _ = store.list_studies(states={StudyState.FAILED, StudyState.SUCCEEDED})
    assert [s.study_id for s in finished] == ["s5", "s2"]
    with pytest.raises(ValueError, match="invalid page_token"):
        store.list_studies(page_token="garbage")
    # A job-list token is not a study-list token.
    for i in range(2):
        store.create_job(f"j{i}", "{}")
    _, job_token = store.list_jobs(page_size=1)
    with pytest.raises(ValueError, match="different filter"):
        store.list_studies(page_token=job_token)


def test_study_events_and_trial_jobs(store: JobStore) -> None:
    store.create_study("s1", "{}")
    store.create_job("j1", "{}")  # a job event must not share the study's sequence
    store.append_event("j1", "state", "{}")
    e1 = store.append_study_event("s1", "trial_started", '{"trial": 0}')
    e2 = store.append_study_event("s1", "trial_finished", '{"trial": 0}')
    assert (e1.sequence, e2.sequence) == (1, 2)
    assert e1.resource_type is ResourceType.STUDY
    assert store.study_events_after("s1") == [e1, e2]
    assert store.study_events_after("s1", after_sequence=1) == [e2]
    assert store.wait_for_study_events("s1", after_sequence=2, timeout_s=0.05) == []
    with pytest.raises(NotFound):
        store.append_study_event("j1", "x", "{}")  # a job id is not a study id

    trial, _ = store.create_job("trial-0", "{}", study_id="s1", trial_number=0)
    assert (trial.study_id, trial.trial_number) == ("s1", 0)
    with pytest.raises(NotFound, match="study"):
        store.create_job("trial-x", "{}", study_id="no-such-study")
