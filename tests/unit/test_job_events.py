"""A job's warnings: each once per job (not once per attempt), and the S3-outage events a worker's store records."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from trainer_service.jobs import events
from trainer_service.jobs.store import JobStore
from visiontune.outages import Outage


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        store.create_job("job-1", "{}")
        yield store


def _warnings(jobs: JobStore) -> list[tuple[str, str]]:
    found = []
    for event in jobs.events_after("job-1", 0, limit=10_000):
        if event.kind == "warning":
            warning = events.to_proto(event).warning
            found.append((warning.code, warning.message))
    return found


def test_a_warning_the_log_already_holds_is_not_recorded_again(jobs: JobStore) -> None:
    # What two attempts of one job record: the data checks run in each, the resume note differs per attempt.
    first = events.record_warning(jobs, "job-1", "few_images", "label 'cat' has 3 training images")
    events.record_warning(jobs, "job-1", "corrupt_image", "skipped undecodable image datasets/d/cat/x.jpg")
    again = events.record_warning(jobs, "job-1", "few_images", "label 'cat' has 3 training images")
    events.record_warning(jobs, "job-1", "corrupt_image", "skipped undecodable image datasets/d/cat/x.jpg")
    events.record_warning(jobs, "job-1", "resumed", "resuming repeat 1, classifier stage after epoch 2")
    # Same code, another message: another warning. Same message under another code: another one too.
    events.record_warning(jobs, "job-1", "few_images", "label 'dog' has 2 training images")
    events.record_warning(jobs, "job-1", "unknown_label", "label 'cat' has 3 training images")

    assert again.sequence == first.sequence  # the earlier event is returned
    assert _warnings(jobs) == [
        ("few_images", "label 'cat' has 3 training images"),
        ("corrupt_image", "skipped undecodable image datasets/d/cat/x.jpg"),
        ("resumed", "resuming repeat 1, classifier stage after epoch 2"),
        ("few_images", "label 'dog' has 2 training images"),
        ("unknown_label", "label 'cat' has 3 training images"),
    ]


def test_once_false_records_every_time(jobs: JobStore) -> None:
    for _ in range(2):
        events.record_warning(jobs, "job-1", events.S3_UNAVAILABLE, "S3 at h:1 is back after 3 s", once=False)
    assert len(_warnings(jobs)) == 2


def _outage(cause: str = "connection refused") -> Outage:
    return Outage("S3", "127.0.0.1:9000", datetime(2026, 1, 1, 12, 1, 2, tzinfo=UTC), cause)


def test_an_outage_is_one_warning_when_the_wait_starts_and_one_when_s3_is_back(jobs: JobStore) -> None:
    listener = events.OutageEvents(jobs, "job-1")
    listener.outage_started(_outage())
    # The image downloads wait side by side: the job sees one wait.
    listener.outage_started(_outage("connection reset"))
    listener.outage_ended(_outage(), 31.2)
    listener.outage_ended(_outage("connection reset"), 31.4)
    # A second outage is news again, even with the same words.
    listener.outage_started(_outage())
    listener.outage_ended(_outage(), 31.2)

    waiting = "waiting for S3 at 127.0.0.1:9000 since 12:01:02 UTC (connection refused)"
    back = "S3 at 127.0.0.1:9000 is back after 31 s"
    assert _warnings(jobs) == [("s3_unavailable", m) for m in (waiting, back, waiting, back)]


def test_concurrent_waits_are_one_outage(jobs: JobStore) -> None:
    listener = events.OutageEvents(jobs, "job-1")
    barrier = threading.Barrier(8)

    def wait_once() -> None:
        barrier.wait()
        listener.outage_started(_outage())

    threads = [threading.Thread(target=wait_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_warnings(jobs)) == 1


def test_a_job_store_that_cannot_take_the_event_means_a_log_line(
    jobs: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    listener = events.OutageEvents(jobs, "job-1")
    jobs.close()
    with caplog.at_level(logging.WARNING, logger="trainer_service.jobs.events"):
        listener.outage_started(_outage())  # does not raise: the wait for S3 goes on
    assert "waiting for S3 at 127.0.0.1:9000 since 12:01:02 UTC (connection refused)" in caplog.text
    assert "not recorded as a job event" in caplog.text


def _db_outage(since: datetime, cause: str = "Connection refused") -> Outage:
    return Outage("the job database", "127.0.0.1:5432/jobs", since, cause)


def test_a_database_outage_is_one_warning_when_the_database_is_back(jobs: JobStore) -> None:
    # Nothing at the start: the database cannot take an event during its own outage.
    listener = events.DatabaseOutageEvents(jobs, "job-1")
    first = datetime(2026, 1, 1, 12, 1, 2, tzinfo=UTC)
    listener.outage_started(_db_outage(first))
    listener.outage_started(_db_outage(first.replace(second=5), "the database system is starting up"))
    assert _warnings(jobs) == []
    # The later wait is the one that ends first: the outage still dates from the first wait, and lasts from there.
    listener.outage_ended(_db_outage(first.replace(second=5)), 28.4)
    listener.outage_ended(_db_outage(first), 31.2)
    assert _warnings(jobs) == [
        (
            "database_unavailable",
            "the job database at 127.0.0.1:5432/jobs was unreachable from 12:01:02 UTC for 31 s "
            "(Connection refused); the job carried on",
        )
    ]


def test_a_database_listener_without_its_store_yet_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The worker's listener exists before its job store does (it is one of the store's arguments).
    listener = events.DatabaseOutageEvents(None, "job-1")
    with caplog.at_level(logging.WARNING, logger="trainer_service.jobs.events"):
        listener.outage_started(_db_outage(datetime(2026, 1, 1, 12, 1, 2, tzinfo=UTC)))
        listener.outage_ended(_db_outage(datetime(2026, 1, 1, 12, 1, 2, tzinfo=UTC)), 3.0)
    assert "unreachable from 12:01:02 UTC for 3 s (Connection refused); the job carried on" in caplog.text
    assert "not recorded as a job event" in caplog.text
    with JobStore(tmp_path / "jobs.sqlite3", outage_listener=listener) as jobs:
        listener.bind(jobs)
        jobs.create_job("job-1", "{}")
        listener.outage_started(_db_outage(datetime(2026, 1, 1, 12, 2, 0, tzinfo=UTC)))
        listener.outage_ended(_db_outage(datetime(2026, 1, 1, 12, 2, 0, tzinfo=UTC)), 4.0)
        assert [code for code, _ in _warnings(jobs)] == ["database_unavailable"]
