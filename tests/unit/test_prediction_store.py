"""The inference service's prediction store on both of its databases: real SQLite files and a real PostgreSQL
server (the `database_url` fixture runs each test once per backend; no mocks).

Several replicas are several stores on one database URL: each test that needs two replicas opens two."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
import sqlalchemy as sa
from inference_service.feedback import (
    FeedbackError,
    FeedbackResult,
    ImagePrediction,
    Outcome,
    PredictionsUnavailable,
    RequestRecord,
)
from inference_service.predictions.schema import FEEDBACK, PREDICTIONS, SCHEMA_VERSION, VERSIONS, SchemaError, to_us
from inference_service.predictions.store import Janitor, SqlPredictionStore
from trainer_service.jobs.store import JobStore
from visiontune.database import DatabaseConfigError
from visiontune.devstack.postgres import PostgresProcess

T0 = datetime(2025, 1, 1, tzinfo=UTC)
LABELS = ("cat", "dog")


class Clock:
    """A clock the test moves by hand (thread-safe reads)."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_store(database_url: str, clock: Clock) -> Iterator[Callable[..., SqlPredictionStore]]:
    """Opens stores on the test's database (one per replica), closed at the end."""
    opened: list[SqlPredictionStore] = []

    def make(**kwargs: object) -> SqlPredictionStore:
        store = SqlPredictionStore(database_url, clock=clock, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., SqlPredictionStore]) -> SqlPredictionStore:
    return open_store()


def request(*predictions: tuple[str, bool], model: str = "m", version: str = "v1") -> RequestRecord:
    return RequestRecord(
        model, version, LABELS, tuple(ImagePrediction(label, unknown) for label, unknown in predictions)
    )


def record_many(store: SqlPredictionStore, clock: Clock, n: int, *, per_tick: int = 1) -> None:
    """`n` one-image requests r0000, r0001, ... in one transaction (fast; the janitor is under test, not record),
    `per_tick` of them at each microsecond."""
    store.record("first", request(("cat", False)))  # the version's labels row, as record writes it
    start = to_us(clock())
    rows = [
        {
            "request_id": f"r{i:04d}",
            "model": "m",
            "version": "v1",
            "images_json": '[["cat",false]]',
            "create_time": start + i // per_tick,
        }
        for i in range(n)
    ]
    store.database.write(lambda conn: conn.execute(sa.insert(PREDICTIONS), rows))
    store.database.write(lambda conn: conn.execute(sa.delete(PREDICTIONS).where(PREDICTIONS.c.request_id == "first")))
    clock.advance(timedelta(microseconds=n))


def count(store: SqlPredictionStore, table: sa.Table) -> int:
    return int(
        store.database.read(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
    )


# ------------------------------------------------------------------------------------------- scoring


def test_each_prediction_and_truth_gets_its_outcome(store: SqlPredictionStore) -> None:
    assert store.record("r1", request(("cat", False), ("cat", False), ("dog", True), ("cat", False), ("dog", True)))
    got = [
        store.report("r1", 0, "cat"),
        store.report("r1", 1, "dog"),
        store.report("r1", 2, "dog"),
        store.report("r1", 3, None),
        store.report("r1", 4, None),
    ]
    assert [r.outcome for r in got] == [
        Outcome.CORRECT,
        Outcome.MISCLASSIFIED,
        Outcome.FALSE_REJECTION,
        Outcome.FALSE_POSITIVE,
        Outcome.TRUE_REJECTION,
    ]
    assert {(r.duplicate, r.model, r.version) for r in got} == {(False, "m", "v1")}


def test_a_second_report_is_a_duplicate_with_the_first_outcome(store: SqlPredictionStore) -> None:
    store.record("r1", request(("cat", False)))
    assert store.report("r1", 0, "dog") == FeedbackResult(Outcome.MISCLASSIFIED, False, "m", "v1")
    # Another truth does not change what was scored.
    assert store.report("r1", 0, None) == FeedbackResult(Outcome.MISCLASSIFIED, True, "m", "v1")
    assert store.report("r1", 0, "cat") == FeedbackResult(Outcome.MISCLASSIFIED, True, "m", "v1")
    assert count(store, FEEDBACK) == 1


def test_a_report_on_another_replica_and_after_a_restart_is_the_same_one(
    open_store: Callable[..., SqlPredictionStore],
) -> None:
    a, b = open_store(), open_store()
    assert a.record("r1", request(("cat", False), ("cat", True)))
    assert b.report("r1", 0, "cat") == FeedbackResult(Outcome.CORRECT, False, "m", "v1")
    assert a.report("r1", 0, "cat").duplicate
    a.close()
    b.close()
    restarted = open_store()
    assert restarted.report("r1", 0, None) == FeedbackResult(Outcome.CORRECT, True, "m", "v1")
    assert restarted.report("r1", 1, "cat") == FeedbackResult(Outcome.FALSE_REJECTION, False, "m", "v1")
    assert restarted.schema_version() == SCHEMA_VERSION


def test_a_request_id_is_recorded_once_across_replicas(open_store: Callable[..., SqlPredictionStore]) -> None:
    a, b = open_store(), open_store()
    assert a.record("r1", request(("cat", False)))
    assert not b.record("r1", request(("dog", False)))  # the id is taken: nothing recorded
    assert not a.record("r1", request(("dog", False)))
    assert b.report("r1", 0, "cat").outcome == Outcome.CORRECT  # the first record stands


def test_a_replayed_insert_of_the_same_record_counts_as_recorded(store: SqlPredictionStore) -> None:
    # What a transaction retried after a commit whose acknowledgement was lost finds: its own row (same content,
    # same microsecond). It is recorded, not a clash with another request.
    assert store.record("r1", request(("cat", False)))
    assert store.record("r1", request(("cat", False)))
    assert not store.record("r1", request(("cat", True)))


def test_a_version_s_labels_are_written_once(open_store: Callable[..., SqlPredictionStore]) -> None:
    a, b = open_store(), open_store()
    for i in range(5):
        (a if i % 2 else b).record(f"r{i}", request(("cat", False)))
    a.record("other", request(("cat", False), version="v2"))
    assert count(a, VERSIONS) == 2
    assert count(a, PREDICTIONS) == 6


def test_reports_that_refer_to_nothing_say_which_part(store: SqlPredictionStore) -> None:
    store.record("r1", request(("cat", False)))
    with pytest.raises(FeedbackError, match="unknown to every replica, or older than the 168 h") as unknown:
        store.report("never", 0, "cat")
    assert unknown.value.kind == "request"
    with pytest.raises(FeedbackError, match="classified 1 image") as index:
        store.report("r1", 1, "cat")
    assert index.value.kind == "index"
    with pytest.raises(FeedbackError, match="-1 is out of range"):
        store.report("r1", -1, "cat")
    with pytest.raises(
        FeedbackError, match=r"'cow' is not a label of models/m/versions/v1 \(labels: cat, dog\)"
    ) as label:
        store.report("r1", 0, "cow")
    assert label.value.kind == "label"
    assert count(store, FEEDBACK) == 0  # nothing scored by a refused report


# ------------------------------------------------------------------------------------------- concurrency


def test_concurrent_reports_from_threads_are_scored_once(store: SqlPredictionStore) -> None:
    store.record("r1", request(("cat", False)))
    truths = ["cat", "dog", None] * 4
    barrier = threading.Barrier(len(truths))
    results: list[FeedbackResult] = []
    lock = threading.Lock()

    def report(truth: str | None) -> None:
        barrier.wait(timeout=30)
        result = store.report("r1", 0, truth)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=report, args=(truth,)) for truth in truths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == len(truths)
    [first] = [r for r in results if not r.duplicate]
    assert {r.outcome for r in results} == {first.outcome}  # every duplicate answers the winner's outcome


def _report_from_another_process(url: str, barrier: Barrier, reports: int, out: Queue[tuple[str, bool]]) -> None:
    # A spawned child: a replica of its own on the same database.
    store = SqlPredictionStore(url)
    try:
        barrier.wait(timeout=60)
        for i in range(reports):
            result = store.report("r1", 0, ("cat", None)[i % 2])
            out.put((result.outcome.value, result.duplicate))
    finally:
        store.close()


def test_concurrent_reports_from_processes_are_scored_once(database_url: str, store: SqlPredictionStore) -> None:
    store.record("r1", request(("cat", False)))
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent holds open database handles
    processes, reports = 4, 5
    barrier = ctx.Barrier(processes)
    out: Queue[tuple[str, bool]] = ctx.Queue()
    children = [
        ctx.Process(target=_report_from_another_process, args=(database_url, barrier, reports, out))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=120) for _ in range(processes * reports)]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sum(not duplicate for _, duplicate in results) == 1
    assert len({outcome for outcome, _ in results}) == 1
    assert count(store, FEEDBACK) == 1


# ------------------------------------------------------------------------------------------- retention


def test_the_janitor_deletes_predictions_past_the_retention_with_their_feedback(
    open_store: Callable[..., SqlPredictionStore], clock: Clock
) -> None:
    store = open_store(retention=timedelta(hours=2))
    store.record("old", request(("cat", False)))
    store.report("old", 0, "cat")
    clock.advance(timedelta(hours=1))
    store.record("recent", request(("cat", False)))
    clock.advance(timedelta(hours=1, seconds=1))  # "old" is 2 h 1 s old, "recent" 1 h 1 s
    assert store.expire() == 1
    assert store.expire() == 0
    with pytest.raises(FeedbackError, match="older than the 2 h") as gone:
        store.report("old", 0, "cat")
    assert gone.value.kind == "request"
    assert count(store, FEEDBACK) == 0  # gone with its prediction
    assert store.report("recent", 0, "cat").outcome == Outcome.CORRECT


def test_the_janitor_keeps_the_newest_capacity_requests(
    open_store: Callable[..., SqlPredictionStore], clock: Clock
) -> None:
    store = open_store(capacity=1500)
    record_many(store, clock, 2600, per_tick=2)  # pairs share a time: ties are broken by request id
    for i in range(0, 2600, 100):
        store.report(f"r{i:04d}", 0, "cat")
    assert store.expire() == 1100  # more than one delete batch of 1000
    assert count(store, PREDICTIONS) == 1500
    with pytest.raises(FeedbackError, match="beyond its newest 1500 requests"):
        store.report("r1099", 0, "cat")
    assert store.report("r1101", 0, "cat").outcome == Outcome.CORRECT
    assert count(store, FEEDBACK) == 15 + 1  # r1100 .. r2500 by hundreds, and the one just made


def test_janitors_on_every_replica_at_once_delete_each_row_once(
    open_store: Callable[..., SqlPredictionStore], clock: Clock
) -> None:
    stores = [open_store(capacity=100) for _ in range(3)]
    record_many(stores[0], clock, 2500)
    deleted: list[int] = []
    barrier = threading.Barrier(len(stores))

    def expire(store: SqlPredictionStore) -> None:
        barrier.wait(timeout=30)
        deleted.append(store.expire())

    threads = [threading.Thread(target=expire, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(deleted) == 2400
    assert count(stores[0], PREDICTIONS) == 100


def test_the_janitor_thread_runs_at_start_and_stops(
    open_store: Callable[..., SqlPredictionStore], clock: Clock
) -> None:
    store = open_store(retention=timedelta(hours=1))
    store.record("old", request(("cat", False)))
    clock.advance(timedelta(hours=2))
    janitor = Janitor(store, interval_s=3600)
    janitor.start()
    deadline = time.monotonic() + 30
    while count(store, PREDICTIONS) and time.monotonic() < deadline:
        time.sleep(0.05)
    janitor.stop()
    assert count(store, PREDICTIONS) == 0


# ------------------------------------------------------------------------------------------- the database


def test_it_shares_a_database_with_the_job_store(database_url: str, clock: Clock) -> None:
    # The same PostgreSQL database (or SQLite file) may hold both services' tables: neither migration reads or
    # writes the other's version.
    with JobStore(database_url) as jobs:
        predictions = SqlPredictionStore(database_url, clock=clock)
        try:
            jobs.create_job("j1", "{}")
            predictions.record("r1", request(("cat", False)))
            assert predictions.schema_version() == SCHEMA_VERSION
        finally:
            predictions.close()
        job_version = jobs.schema_version()
    with JobStore(database_url) as jobs:
        assert jobs.schema_version() == job_version
        assert jobs.get_job("j1").job_id == "j1"
    reopened = SqlPredictionStore(database_url, clock=clock)
    try:
        assert reopened.report("r1", 0, "cat").outcome == Outcome.CORRECT
    finally:
        reopened.close()


def test_a_newer_schema_is_refused(store: SqlPredictionStore, database_url: str) -> None:
    store.database.write(
        lambda conn: conn.exec_driver_sql(f"UPDATE vt_inference_schema_version SET version = {SCHEMA_VERSION + 1}")
    )
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade the inference service"):
        SqlPredictionStore(database_url)


def test_a_closed_store_is_unavailable(store: SqlPredictionStore) -> None:
    store.close()
    with pytest.raises(PredictionsUnavailable, match=r"the prediction database at .* is closed"):
        store.record("r1", request(("cat", False)))
    with pytest.raises(PredictionsUnavailable):
        store.report("r1", 0, "cat")


def test_a_database_it_cannot_use_is_one_line_naming_the_host(postgres_server: PostgresProcess) -> None:
    good = postgres_server.url()
    wrong_password = sa.make_url(good).set(password="not-the-password").render_as_string(hide_password=False)
    with pytest.raises(DatabaseConfigError) as refused:
        SqlPredictionStore(wrong_password)
    message = str(refused.value)
    assert "\n" not in message
    assert f"the prediction database at 127.0.0.1:{sa.make_url(good).port}" in message
    assert "password authentication failed" in message
    assert "not-the-password" not in message
