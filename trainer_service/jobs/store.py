"""The trainer's job store: jobs, tuning studies and their event logs in one SQLite file.

Why SQLite in WAL mode: one machine runs the trainer (docs/architecture.md §6); WAL lets the gRPC thread pool read
while a worker subprocess appends events, and the file survives a restart of the trainer.

This module is the store's operations; its public methods are the interface the servicer, the executor, the
study runner and the workers use. What a second backend (PostgreSQL) would share lives apart: the records,
states and errors (`trainer_service.jobs.records`, re-exported here) and page sizes and tokens
(`visiontune.pagination`). What is SQLite's own, connections, transactions, tables and migrations, is in
`trainer_service.jobs.sqlite`.

No protobuf, no gRPC: the servicer converts records to messages, and the errors are `visiontune.errors`
classes that the server runtime turns into status codes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from visiontune import pagination

from trainer_service.jobs.records import (
    AlreadyExists,
    Conflict,
    EventRecord,
    JobRecord,
    JobState,
    JobStoreError,
    NotFound,
    ResourceType,
    SchemaError,
    StudyRecord,
    StudyState,
    utc_now,
)
from trainer_service.jobs.sqlite import (
    JOBS,
    SCHEMA_VERSION,
    STUDIES,
    SqliteDatabase,
    Table,
    event_from_row,
    from_us,
    job_from_row,
    study_from_row,
    to_us,
)

__all__ = [
    "SCHEMA_VERSION",
    "AlreadyExists",
    "Conflict",
    "EventRecord",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobStoreError",
    "NotFound",
    "ResourceType",
    "SchemaError",
    "StudyRecord",
    "StudyState",
    "utc_now",
]

MAX_EVENTS_PER_CALL: Final = 10_000

_R = TypeVar("_R")


def _require_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------ the store


class JobStore:
    """Jobs, studies and their event logs in a SQLite file. Thread-safe and multi-process safe."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime] = utc_now,
        busy_timeout_s: float = 10.0,
        poll_interval_s: float = 0.2,
    ) -> None:
        # In-process appends bump the generation and notify, so waiters wake at once.
        self._events_changed = threading.Condition()
        self._events_generation = 0
        self._clock = clock
        # How often wait_for_events re-reads the file to notice appends made by other processes.
        self._poll_interval_s = poll_interval_s
        self._db = SqliteDatabase(Path(path), busy_timeout_s=busy_timeout_s)

    # -- lifecycle

    @property
    def path(self) -> Path:
        return self._db.path

    def close(self) -> None:
        """Close every thread's connection and wake all waiters. Idempotent."""
        self._db.close()
        with self._events_changed:
            self._events_changed.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        return self._db.schema_version()

    def _now_us(self) -> int:
        return to_us(self._clock())

    # -- shared resource code

    def _insert_idempotent(
        self,
        table: Table,
        resource_id: str,
        request_id: str | None,
        values: dict[str, Any],
        from_row: Callable[[sqlite3.Row], _R],
    ) -> tuple[_R, bool]:
        _require_id(resource_id, table.id_column)
        if request_id == "":
            request_id = None  # proto3's empty string means "no request id"
        with self._db.write() as conn:
            # Check and insert in one write transaction: a retry racing the original sees one or the other.
            if request_id is not None:
                row = conn.execute(f"SELECT * FROM {table.name} WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return from_row(row), False
            if conn.execute(f"SELECT 1 FROM {table.name} WHERE {table.id_column} = ?", (resource_id,)).fetchone():
                raise AlreadyExists(f"{table.noun} {resource_id!r} already exists")
            now = self._now_us()
            columns = {
                table.id_column: resource_id,
                "request_id": request_id,
                "create_time": now,
                "update_time": now,
                **values,
            }
            names = ", ".join(columns)
            marks = ", ".join("?" for _ in columns)
            conn.execute(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", tuple(columns.values()))
            row = conn.execute(f"SELECT * FROM {table.name} WHERE {table.id_column} = ?", (resource_id,)).fetchone()
            return from_row(row), True

    @staticmethod
    def _fetch_row(conn: sqlite3.Connection, table: Table, resource_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            f"SELECT * FROM {table.name} WHERE {table.id_column} = ?", (resource_id,)
        ).fetchone()
        if row is None:
            # The API's words: the servicer passes this message on to the client as it is.
            raise NotFound(f"{table.resource_name(resource_id)} does not exist")
        return row

    def _get(self, table: Table, resource_id: str, from_row: Callable[[sqlite3.Row], _R]) -> _R:
        return from_row(self._fetch_row(self._db.connection(), table, resource_id))

    def _list_page(
        self,
        table: Table,
        where: list[str],
        params: list[Any],
        fingerprint_parts: Sequence[object],
        page_size: int,
        page_token: str,
        from_row: Callable[[sqlite3.Row], _R],
    ) -> tuple[list[_R], str]:
        size = pagination.page_size(page_size)
        fingerprint = pagination.filter_fingerprint([table.name, *fingerprint_parts])
        where, params = list(where), list(params)
        if page_token:
            after_us, after_id = pagination.decode_page_token(page_token, fingerprint, (int, str))
            # Keyset pagination, newest first: rows strictly "older" than the last one handed out.
            # Stable under concurrent inserts (new rows are newer), unlike OFFSET.
            where.append(f"(create_time < ? OR (create_time = ? AND {table.id_column} < ?))")
            params += [after_us, after_us, after_id]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = (
            self._db.connection()
            .execute(
                f"SELECT * FROM {table.name} {clause} ORDER BY create_time DESC, {table.id_column} DESC LIMIT ?",
                (*params, size + 1),  # one extra row tells whether there is a next page
            )
            .fetchall()
        )
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            next_token = pagination.encode_page_token((last["create_time"], last[table.id_column]), fingerprint)
        return [from_row(r) for r in rows], next_token

    def _update_state(
        self,
        table: Table,
        resource_id: str,
        new_state: JobState | StudyState,
        expected: Iterable[JobState | StudyState] | None,
        error: str | None,
        result_json: str | None,
        entering_running_sets_start: bool,
    ) -> sqlite3.Row:
        with self._db.write() as conn:
            row = self._fetch_row(conn, table, resource_id)
            current = row["state"]
            if expected is not None:
                allowed = {s.value for s in expected}
                if current not in allowed:
                    raise Conflict(f"{table.noun} {resource_id!r} is {current}, expected one of {sorted(allowed)}")
            now = self._now_us()
            sets = ["state = ?", "update_time = ?", "end_time = ?"]
            params: list[Any] = [new_state.value, now, now if new_state.is_terminal else None]
            if entering_running_sets_start and new_state.value == "RUNNING":
                # Keep the first start: a retried job still started when it first ran.
                sets.append("start_time = COALESCE(start_time, ?)")
                params.append(now)
            if error is not None:
                sets.append("error = ?")
                params.append(error)
            if result_json is not None:
                sets.append("result_json = ?")
                params.append(result_json)
            conn.execute(
                f"UPDATE {table.name} SET {', '.join(sets)} WHERE {table.id_column} = ?",
                (*params, resource_id),
            )
            return self._fetch_row(conn, table, resource_id)

    # -- jobs

    def create_job(
        self,
        job_id: str,
        spec_json: str,
        *,
        display_name: str = "",
        request_id: str | None = None,
        labels: dict[str, str] | None = None,
        study_id: str | None = None,
        trial_number: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create a QUEUED job. Returns (job, created).

        Idempotent on ``request_id``: a retry with the same request id returns the job the first call
        made and ``created=False``. A different request for an existing ``job_id`` raises AlreadyExists;
        an unknown ``study_id`` raises NotFound.
        """
        if study_id is not None:
            # Checked here for a clear message; the foreign key still guards it inside the transaction.
            try:
                self.get_study(study_id)
            except NotFound as err:
                raise NotFound(f"cannot add job {job_id!r} to study {study_id!r}: {err}") from err
        return self._insert_idempotent(
            JOBS,
            job_id,
            request_id,
            {
                "state": JobState.QUEUED.value,
                "spec_json": spec_json,
                "display_name": display_name,
                "labels_json": json.dumps(dict(labels or {}), sort_keys=True),
                "study_id": study_id,
                "trial_number": trial_number,
            },
            job_from_row,
        )

    def get_job(self, job_id: str) -> JobRecord:
        return self._get(JOBS, job_id, job_from_row)

    def list_jobs(
        self,
        *,
        states: set[JobState] | None = None,
        study_id: str | None = None,
        page_size: int = pagination.DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """One page of jobs, newest first, and the token of the next page ("" on the last page).

        An empty or None ``states`` means no state filter. ``page_size`` and ``page_token`` follow
        `visiontune.pagination`: 0 means the default size, a larger one than the maximum is clamped; a
        negative size, a malformed token or one issued for a different filter raise InvalidPage.
        """
        where: list[str] = []
        params: list[Any] = []
        state_values = sorted(JobState(s).value for s in states or ())
        if state_values:
            where.append(f"state IN ({', '.join('?' for _ in state_values)})")
            params += state_values
        if study_id is not None:
            where.append("study_id = ?")
            params.append(study_id)
        return self._list_page(JOBS, where, params, [state_values, study_id], page_size, page_token, job_from_row)

    def update_state(
        self,
        job_id: str,
        new_state: JobState,
        *,
        error: str | None = None,
        result_json: str | None = None,
        expected: set[JobState] | None = None,
    ) -> JobRecord:
        """Move a job to ``new_state``; with ``expected``, only if its current state is one of them.

        Raises Conflict when the compare-and-set fails. Entering RUNNING sets start_time (the first
        time only); a terminal state sets end_time, a non-terminal one clears it. ``error`` and
        ``result_json`` are written when given and otherwise kept.
        """
        row = self._update_state(
            JOBS, job_id, JobState(new_state), expected, error, result_json, entering_running_sets_start=True
        )
        return job_from_row(row)

    def increment_attempt(self, job_id: str) -> JobRecord:
        """Add one to the job's attempt counter (the executor calls it when it starts an attempt)."""
        with self._db.write() as conn:
            self._fetch_row(conn, JOBS, job_id)
            conn.execute(
                "UPDATE vt_jobs SET attempt = attempt + 1, update_time = ? WHERE job_id = ?",
                (self._now_us(), job_id),
            )
            return job_from_row(self._fetch_row(conn, JOBS, job_id))

    def claim_next_queued(self) -> JobRecord | None:
        """Atomically move the oldest QUEUED job to RUNNING and return it; None when none is queued.

        The select and the update share one write transaction, so two claimers (threads or
        processes) never get the same job. The attempt counter is left to increment_attempt.
        """
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT job_id FROM vt_jobs WHERE state = ? ORDER BY create_time, job_id LIMIT 1",
                (JobState.QUEUED.value,),
            ).fetchone()
            if row is None:
                return None
            now = self._now_us()
            conn.execute(
                "UPDATE vt_jobs SET state = ?, update_time = ?, start_time = COALESCE(start_time, ?), "
                "end_time = NULL WHERE job_id = ?",
                (JobState.RUNNING.value, now, now, row["job_id"]),
            )
            return job_from_row(self._fetch_row(conn, JOBS, row["job_id"]))

    def jobs_in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """All jobs in any of ``states``, oldest first (e.g. to recover RUNNING jobs after a restart)."""
        values = sorted({JobState(s).value for s in states})
        if not values:
            return []
        rows = (
            self._db.connection()
            .execute(
                f"SELECT * FROM vt_jobs WHERE state IN ({', '.join('?' for _ in values)}) ORDER BY create_time, job_id",
                values,
            )
            .fetchall()
        )
        return [job_from_row(r) for r in rows]

    def delete_job(self, job_id: str, *, expected: set[JobState] | None = None) -> None:
        """Delete a job and its events; with ``expected``, only if it is in one of those states."""
        with self._db.write() as conn:
            row = self._fetch_row(conn, JOBS, job_id)
            if expected is not None and row["state"] not in {s.value for s in expected}:
                raise Conflict(f"job {job_id!r} is {row['state']}, expected one of {sorted(s.value for s in expected)}")
            conn.execute(
                "DELETE FROM vt_events WHERE resource_type = ? AND resource_id = ?",
                (ResourceType.JOB.value, job_id),
            )
            conn.execute("DELETE FROM vt_jobs WHERE job_id = ?", (job_id,))

    # -- studies

    def create_study(
        self,
        study_id: str,
        spec_json: str,
        *,
        display_name: str = "",
        request_id: str | None = None,
    ) -> tuple[StudyRecord, bool]:
        """Create a RUNNING study. Idempotent on ``request_id`` exactly like create_job."""
        return self._insert_idempotent(
            STUDIES,
            study_id,
            request_id,
            {"state": StudyState.RUNNING.value, "spec_json": spec_json, "display_name": display_name},
            study_from_row,
        )

    def get_study(self, study_id: str) -> StudyRecord:
        return self._get(STUDIES, study_id, study_from_row)

    def list_studies(
        self,
        *,
        states: set[StudyState] | None = None,
        page_size: int = pagination.DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[StudyRecord], str]:
        """One page of studies, newest first; same rules as list_jobs."""
        where: list[str] = []
        params: list[Any] = []
        state_values = sorted(StudyState(s).value for s in states or ())
        if state_values:
            where.append(f"state IN ({', '.join('?' for _ in state_values)})")
            params += state_values
        return self._list_page(STUDIES, where, params, [state_values], page_size, page_token, study_from_row)

    def update_study_state(
        self,
        study_id: str,
        new_state: StudyState,
        *,
        error: str | None = None,
        result_json: str | None = None,
        expected: set[StudyState] | None = None,
    ) -> StudyRecord:
        """Compare-and-set a study's state; same rules as update_state (a study has no start_time)."""
        row = self._update_state(
            STUDIES,
            study_id,
            StudyState(new_state),
            expected,
            error,
            result_json,
            entering_running_sets_start=False,
        )
        return study_from_row(row)

    # -- events (shared by jobs and studies)

    def _append_event(self, table: Table, resource_id: str, kind: str, payload_json: str) -> EventRecord:
        with self._db.write() as conn:
            self._fetch_row(conn, table, resource_id)
            # MAX+1 inside the write transaction: the write lock serialises appenders across threads
            # and processes, so sequences never collide and have no gaps.
            (sequence,) = conn.execute(
                "SELECT COALESCE(MAX(sequence), 0) + 1 FROM vt_events WHERE resource_type = ? AND resource_id = ?",
                (table.resource_type.value, resource_id),
            ).fetchone()
            now = self._now_us()
            conn.execute(
                "INSERT INTO vt_events (resource_type, resource_id, sequence, time, kind, payload_json) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (table.resource_type.value, resource_id, sequence, now, kind, payload_json),
            )
        # After COMMIT, so a woken waiter can already read the row.
        with self._events_changed:
            self._events_generation += 1
            self._events_changed.notify_all()
        return EventRecord(table.resource_type, resource_id, sequence, from_us(now), kind, payload_json)

    def _events_after(self, table: Table, resource_id: str, after_sequence: int, limit: int) -> list[EventRecord]:
        limit = max(1, min(limit, MAX_EVENTS_PER_CALL))
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM vt_events WHERE resource_type = ? AND resource_id = ? AND sequence > ? "
                "ORDER BY sequence LIMIT ?",
                (table.resource_type.value, resource_id, after_sequence, limit),
            ).fetchall()
            if not rows:
                self._fetch_row(conn, table, resource_id)  # no events vs. no such resource
        return [event_from_row(r) for r in rows]

    def _wait_for_events(
        self, table: Table, resource_id: str, after_sequence: int, timeout_s: float, limit: int
    ) -> list[EventRecord]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._events_changed:
                generation = self._events_generation
            events = self._events_after(table, resource_id, after_sequence, limit)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return events
            with self._events_changed:
                if self._db.closed:
                    raise JobStoreError(f"the job store at {self.path} is closed")
                # Skip the wait if an in-process append landed since we read; otherwise sleep until
                # notified, or one poll interval to catch appends made by other processes.
                if self._events_generation == generation:
                    self._events_changed.wait(min(self._poll_interval_s, remaining))

    def append_event(self, job_id: str, kind: str, payload_json: str) -> EventRecord:
        """Append an event to a job's log; its sequence is the job's previous highest plus one."""
        return self._append_event(JOBS, job_id, kind, payload_json)

    def events_after(self, job_id: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        """A job's events with sequence > ``after_sequence``, in order, at most ``limit`` of them."""
        return self._events_after(JOBS, job_id, after_sequence, limit)

    def wait_for_events(
        self, job_id: str, after_sequence: int, timeout_s: float, *, limit: int = 1000
    ) -> list[EventRecord]:
        """Block until the job has events after ``after_sequence`` or ``timeout_s`` passes ([] then).

        Appends in this process wake the waiter at once; appends from other processes are noticed
        within one poll interval. Raises NotFound if the job does not exist (or is deleted while
        waiting) and JobStoreError if the store is closed while waiting.
        """
        return self._wait_for_events(JOBS, job_id, after_sequence, timeout_s, limit)

    def append_study_event(self, study_id: str, kind: str, payload_json: str) -> EventRecord:
        return self._append_event(STUDIES, study_id, kind, payload_json)

    def study_events_after(self, study_id: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        return self._events_after(STUDIES, study_id, after_sequence, limit)

    def wait_for_study_events(
        self, study_id: str, after_sequence: int, timeout_s: float, *, limit: int = 1000
    ) -> list[EventRecord]:
        return self._wait_for_events(STUDIES, study_id, after_sequence, timeout_s, limit)
