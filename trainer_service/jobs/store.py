"""The trainer's job store: jobs, tuning studies and their event logs in one SQLite file.

Why SQLite in WAL mode: one machine runs the trainer (docs/architecture.md §6); WAL lets the gRPC thread pool read
while a worker subprocess appends events, and the file survives a restart of the trainer. The same file
is where Optuna's RDB storage will keep its own tables later, so every table here carries a ``vt_``
prefix (Optuna owns names such as ``studies`` and ``trials``) and the schema version lives in
``PRAGMA user_version``, which SQLAlchemy/Alembic never touch.

Plain Python only: no protobuf, no gRPC. The servicer converts records to messages; the errors are
`visiontune.errors` classes that the server runtime turns into status codes.

Concurrency model:
- one sqlite3 connection per thread (``threading.local``), so readers never queue behind one lock;
- every write runs in ``BEGIN IMMEDIATE`` so the write lock is taken up front (a deferred transaction
  that upgrades from read to write can fail with SQLITE_BUSY without the busy handler being consulted);
- several processes may open the same file; ``busy_timeout`` makes them wait for each other.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from visiontune import errors, names, pagination

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

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------- errors


class JobStoreError(errors.VisionTuneError):
    """Base class of every error the job store raises on purpose (the store is closed, for one)."""


class NotFound(JobStoreError, errors.NotFound):
    """The job or study does not exist."""


class AlreadyExists(JobStoreError, errors.AlreadyExists):
    """A job or study with this id exists and was not created by the same request."""


class Conflict(JobStoreError, errors.Aborted):
    """A compare-and-set failed: the resource is not in one of the expected states."""


class SchemaError(JobStoreError, errors.FailedPrecondition):
    """The database file has a schema this code cannot use (newer, or not a job store at all)."""


# -------------------------------------------------------------------------------------------- records


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    # A tuning trial stopped early by its study's pruner (the worker records it; terminal).
    PRUNED = "PRUNED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_JOB_STATES


class StudyState(enum.StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_STUDY_STATES


_TERMINAL_JOB_STATES: Final = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PRUNED}
)
_TERMINAL_STUDY_STATES: Final = frozenset({StudyState.SUCCEEDED, StudyState.FAILED, StudyState.CANCELLED})


class ResourceType(enum.StrEnum):
    """What an event belongs to: one events table serves jobs and studies."""

    JOB = "job"
    STUDY = "study"


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    state: JobState
    spec_json: str
    display_name: str
    request_id: str | None
    create_time: datetime
    update_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    # How many times increment_attempt was called: 0 until the executor starts the first attempt.
    attempt: int
    error: str | None
    result_json: str | None
    labels: dict[str, str]
    study_id: str | None
    trial_number: int | None


@dataclass(frozen=True, slots=True)
class StudyRecord:
    study_id: str
    state: StudyState
    spec_json: str
    display_name: str
    request_id: str | None
    create_time: datetime
    update_time: datetime
    end_time: datetime | None
    error: str | None
    result_json: str | None


@dataclass(frozen=True, slots=True)
class EventRecord:
    resource_type: ResourceType
    resource_id: str
    sequence: int  # 1, 2, 3, ... per resource, no gaps
    time: datetime
    kind: str
    payload_json: str


# ------------------------------------------------------------------------------------------ time codec


def _to_us(dt: datetime) -> int:
    # Integer microseconds since the epoch: exact, sortable, and cheap to compare in SQL (pagination).
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"the job store needs timezone-aware datetimes, got naive {dt!r}")
    return (dt - _EPOCH) // _MICROSECOND


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _opt_from_us(us: int | None) -> datetime | None:
    return None if us is None else _from_us(us)


# ----------------------------------------------------------------------------------------- migrations

Migration = Callable[[sqlite3.Connection], None]


def _migration_1_initial(conn: sqlite3.Connection) -> None:
    statements = (
        """
        CREATE TABLE vt_studies (
            study_id     TEXT PRIMARY KEY,
            state        TEXT NOT NULL,
            spec_json    TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            request_id   TEXT UNIQUE,
            create_time  INTEGER NOT NULL,
            update_time  INTEGER NOT NULL,
            end_time     INTEGER,
            error        TEXT,
            result_json  TEXT
        )
        """,
        "CREATE INDEX vt_studies_by_create ON vt_studies (create_time, study_id)",
        """
        CREATE TABLE vt_jobs (
            job_id       TEXT PRIMARY KEY,
            state        TEXT NOT NULL,
            spec_json    TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            request_id   TEXT UNIQUE,
            create_time  INTEGER NOT NULL,
            update_time  INTEGER NOT NULL,
            start_time   INTEGER,
            end_time     INTEGER,
            attempt      INTEGER NOT NULL DEFAULT 0,
            error        TEXT,
            result_json  TEXT,
            labels_json  TEXT NOT NULL DEFAULT '{}',
            study_id     TEXT REFERENCES vt_studies (study_id),
            trial_number INTEGER
        )
        """,
        "CREATE INDEX vt_jobs_by_create ON vt_jobs (create_time, job_id)",
        # claim_next_queued and jobs_in_states look jobs up by state, oldest first.
        "CREATE INDEX vt_jobs_by_state ON vt_jobs (state, create_time, job_id)",
        "CREATE INDEX vt_jobs_by_study ON vt_jobs (study_id, create_time, job_id)",
        # One table for job and study events; the primary key is also what makes a sequence unique.
        """
        CREATE TABLE vt_events (
            resource_type TEXT NOT NULL CHECK (resource_type IN ('job', 'study')),
            resource_id   TEXT NOT NULL,
            sequence      INTEGER NOT NULL,
            time          INTEGER NOT NULL,
            kind          TEXT NOT NULL,
            payload_json  TEXT NOT NULL,
            PRIMARY KEY (resource_type, resource_id, sequence)
        ) WITHOUT ROWID
        """,
    )
    for statement in statements:
        conn.execute(statement)


# Ordered: migration i takes the schema from version i to i + 1. Append only, never edit a shipped one.
_MIGRATIONS: Final[tuple[Migration, ...]] = (_migration_1_initial,)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


# ---------------------------------------------------------------------------------- resource plumbing

_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class _Table:
    """What the shared create/get/list/update code needs to know about one resource table."""

    name: str  # a constant from this module, never user input, so it is safe to format into SQL
    id_column: str
    resource_type: ResourceType
    noun: str  # for error messages
    resource_name: Callable[[str], str]  # the ID's API name (`jobs/{id}`), for error messages


_JOBS: Final = _Table("vt_jobs", "job_id", ResourceType.JOB, "job", names.job_name)
_STUDIES: Final = _Table("vt_studies", "study_id", ResourceType.STUDY, "study", names.study_name)


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        state=JobState(row["state"]),
        spec_json=row["spec_json"],
        display_name=row["display_name"],
        request_id=row["request_id"],
        create_time=_from_us(row["create_time"]),
        update_time=_from_us(row["update_time"]),
        start_time=_opt_from_us(row["start_time"]),
        end_time=_opt_from_us(row["end_time"]),
        attempt=row["attempt"],
        error=row["error"],
        result_json=row["result_json"],
        labels=json.loads(row["labels_json"]),
        study_id=row["study_id"],
        trial_number=row["trial_number"],
    )


def _study_from_row(row: sqlite3.Row) -> StudyRecord:
    return StudyRecord(
        study_id=row["study_id"],
        state=StudyState(row["state"]),
        spec_json=row["spec_json"],
        display_name=row["display_name"],
        request_id=row["request_id"],
        create_time=_from_us(row["create_time"]),
        update_time=_from_us(row["update_time"]),
        end_time=_opt_from_us(row["end_time"]),
        error=row["error"],
        result_json=row["result_json"],
    )


def _event_from_row(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        resource_type=ResourceType(row["resource_type"]),
        resource_id=row["resource_id"],
        sequence=row["sequence"],
        time=_from_us(row["time"]),
        kind=row["kind"],
        payload_json=row["payload_json"],
    )


def _require_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------ the store


class _ThreadConnection:
    """Holds one thread's connection; weak-referenceable, unlike sqlite3.Connection itself.

    The thread-local slot keeps it alive; when the thread ends, the holder is freed and closes its
    connection, so a churning thread pool does not leak file handles. close() reaches live ones through
    a WeakSet.
    """

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        # Explicitly: in 3.11 a connection sits in a reference cycle with its statement cache, so
        # dropping the last reference alone would leave the file open until the cycle collector runs.
        self.conn.close()


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
        self._path = Path(path)
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        # How often wait_for_events re-reads the file to notice appends made by other processes.
        self._poll_interval_s = poll_interval_s
        self._local = threading.local()
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        self._closed = False
        # In-process appends bump the generation and notify, so waiters wake at once.
        self._events_changed = threading.Condition()
        self._events_generation = 0

        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JobStoreError(f"could not put {self._path} in WAL mode (journal_mode is {mode!r})")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise SchemaError(f"{self._path} is not a usable job store database: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- lifecycle

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close every thread's connection and wake all waiters. Idempotent."""
        with self._connections_lock:
            self._closed = True
            holders = list(self._connections)
            self._connections.clear()
        for holder in holders:
            holder.conn.close()
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

    # -- connections and transactions

    def _conn(self) -> sqlite3.Connection:
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is not None and not self._closed:
            return holder.conn
        with self._connections_lock:
            if self._closed:
                raise JobStoreError(f"the job store at {self._path} is closed")
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False only so
            # close() may close this connection from another thread.
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            holder = _ThreadConnection(conn)
            self._connections.add(holder)
            self._local.holder = holder
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # A read transaction gives several SELECTs one consistent snapshot.
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Under the write lock, so two processes opening a fresh file do not both migrate it.
        with self._write():
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"{self._path} has job store schema version {version}, but this code only knows "
                    f"versions up to {SCHEMA_VERSION}; upgrade the trainer before opening it"
                )
            for migration in _MIGRATIONS[version:]:
                migration(conn)
            if version != SCHEMA_VERSION:
                # PRAGMA cannot take a bound parameter; SCHEMA_VERSION is an int constant.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def _now_us(self) -> int:
        return _to_us(self._clock())

    # -- shared resource code

    def _insert_idempotent(
        self,
        table: _Table,
        resource_id: str,
        request_id: str | None,
        values: dict[str, Any],
        from_row: Callable[[sqlite3.Row], _R],
    ) -> tuple[_R, bool]:
        _require_id(resource_id, table.id_column)
        if request_id == "":
            request_id = None  # proto3's empty string means "no request id"
        with self._write() as conn:
            # Check and insert in one write transaction: a retry racing the original sees one or the other.
            if request_id is not None:
                row = conn.execute(
                    f"SELECT * FROM {table.name} WHERE request_id = ?", (request_id,)
                ).fetchone()
                if row is not None:
                    return from_row(row), False
            if conn.execute(
                f"SELECT 1 FROM {table.name} WHERE {table.id_column} = ?", (resource_id,)
            ).fetchone():
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
            row = conn.execute(
                f"SELECT * FROM {table.name} WHERE {table.id_column} = ?", (resource_id,)
            ).fetchone()
            return from_row(row), True

    @staticmethod
    def _fetch_row(conn: sqlite3.Connection, table: _Table, resource_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            f"SELECT * FROM {table.name} WHERE {table.id_column} = ?", (resource_id,)
        ).fetchone()
        if row is None:
            # The API's words: the servicer passes this message on to the client as it is.
            raise NotFound(f"{table.resource_name(resource_id)} does not exist")
        return row

    def _get(self, table: _Table, resource_id: str, from_row: Callable[[sqlite3.Row], _R]) -> _R:
        return from_row(self._fetch_row(self._conn(), table, resource_id))

    def _list_page(
        self,
        table: _Table,
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
            self._conn()
            .execute(
                f"SELECT * FROM {table.name} {clause} "
                f"ORDER BY create_time DESC, {table.id_column} DESC LIMIT ?",
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
        table: _Table,
        resource_id: str,
        new_state: JobState | StudyState,
        expected: Iterable[JobState | StudyState] | None,
        error: str | None,
        result_json: str | None,
        entering_running_sets_start: bool,
    ) -> sqlite3.Row:
        with self._write() as conn:
            row = self._fetch_row(conn, table, resource_id)
            current = row["state"]
            if expected is not None:
                allowed = {s.value for s in expected}
                if current not in allowed:
                    raise Conflict(
                        f"{table.noun} {resource_id!r} is {current}, expected one of {sorted(allowed)}"
                    )
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
            _JOBS,
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
            _job_from_row,
        )

    def get_job(self, job_id: str) -> JobRecord:
        return self._get(_JOBS, job_id, _job_from_row)

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
        return self._list_page(
            _JOBS, where, params, [state_values, study_id], page_size, page_token, _job_from_row
        )

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
            _JOBS, job_id, JobState(new_state), expected, error, result_json, entering_running_sets_start=True
        )
        return _job_from_row(row)

    def increment_attempt(self, job_id: str) -> JobRecord:
        """Add one to the job's attempt counter (the executor calls it when it starts an attempt)."""
        with self._write() as conn:
            self._fetch_row(conn, _JOBS, job_id)
            conn.execute(
                "UPDATE vt_jobs SET attempt = attempt + 1, update_time = ? WHERE job_id = ?",
                (self._now_us(), job_id),
            )
            return _job_from_row(self._fetch_row(conn, _JOBS, job_id))

    def claim_next_queued(self) -> JobRecord | None:
        """Atomically move the oldest QUEUED job to RUNNING and return it; None when none is queued.

        The select and the update share one write transaction, so two claimers (threads or
        processes) never get the same job. The attempt counter is left to increment_attempt.
        """
        with self._write() as conn:
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
            return _job_from_row(self._fetch_row(conn, _JOBS, row["job_id"]))

    def jobs_in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """All jobs in any of ``states``, oldest first (e.g. to recover RUNNING jobs after a restart)."""
        values = sorted({JobState(s).value for s in states})
        if not values:
            return []
        rows = (
            self._conn()
            .execute(
                f"SELECT * FROM vt_jobs WHERE state IN ({', '.join('?' for _ in values)}) "
                "ORDER BY create_time, job_id",
                values,
            )
            .fetchall()
        )
        return [_job_from_row(r) for r in rows]

    def delete_job(self, job_id: str, *, expected: set[JobState] | None = None) -> None:
        """Delete a job and its events; with ``expected``, only if it is in one of those states."""
        with self._write() as conn:
            row = self._fetch_row(conn, _JOBS, job_id)
            if expected is not None and row["state"] not in {s.value for s in expected}:
                raise Conflict(
                    f"job {job_id!r} is {row['state']}, expected one of {sorted(s.value for s in expected)}"
                )
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
            _STUDIES,
            study_id,
            request_id,
            {"state": StudyState.RUNNING.value, "spec_json": spec_json, "display_name": display_name},
            _study_from_row,
        )

    def get_study(self, study_id: str) -> StudyRecord:
        return self._get(_STUDIES, study_id, _study_from_row)

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
        return self._list_page(
            _STUDIES, where, params, [state_values], page_size, page_token, _study_from_row
        )

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
            _STUDIES,
            study_id,
            StudyState(new_state),
            expected,
            error,
            result_json,
            entering_running_sets_start=False,
        )
        return _study_from_row(row)

    # -- events (shared by jobs and studies)

    def _append_event(self, table: _Table, resource_id: str, kind: str, payload_json: str) -> EventRecord:
        with self._write() as conn:
            self._fetch_row(conn, table, resource_id)
            # MAX+1 inside the write transaction: the write lock serialises appenders across threads
            # and processes, so sequences never collide and have no gaps.
            (sequence,) = conn.execute(
                "SELECT COALESCE(MAX(sequence), 0) + 1 FROM vt_events "
                "WHERE resource_type = ? AND resource_id = ?",
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
        return EventRecord(table.resource_type, resource_id, sequence, _from_us(now), kind, payload_json)

    def _events_after(
        self, table: _Table, resource_id: str, after_sequence: int, limit: int
    ) -> list[EventRecord]:
        limit = max(1, min(limit, MAX_EVENTS_PER_CALL))
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM vt_events WHERE resource_type = ? AND resource_id = ? AND sequence > ? "
                "ORDER BY sequence LIMIT ?",
                (table.resource_type.value, resource_id, after_sequence, limit),
            ).fetchall()
            if not rows:
                self._fetch_row(conn, table, resource_id)  # no events vs. no such resource
        return [_event_from_row(r) for r in rows]

    def _wait_for_events(
        self, table: _Table, resource_id: str, after_sequence: int, timeout_s: float, limit: int
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
                if self._closed:
                    raise JobStoreError(f"the job store at {self._path} is closed")
                # Skip the wait if an in-process append landed since we read; otherwise sleep until
                # notified, or one poll interval to catch appends made by other processes.
                if self._events_generation == generation:
                    self._events_changed.wait(min(self._poll_interval_s, remaining))

    def append_event(self, job_id: str, kind: str, payload_json: str) -> EventRecord:
        """Append an event to a job's log; its sequence is the job's previous highest plus one."""
        return self._append_event(_JOBS, job_id, kind, payload_json)

    def events_after(self, job_id: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        """A job's events with sequence > ``after_sequence``, in order, at most ``limit`` of them."""
        return self._events_after(_JOBS, job_id, after_sequence, limit)

    def wait_for_events(
        self, job_id: str, after_sequence: int, timeout_s: float, *, limit: int = 1000
    ) -> list[EventRecord]:
        """Block until the job has events after ``after_sequence`` or ``timeout_s`` passes ([] then).

        Appends in this process wake the waiter at once; appends from other processes are noticed
        within one poll interval. Raises NotFound if the job does not exist (or is deleted while
        waiting) and JobStoreError if the store is closed while waiting.
        """
        return self._wait_for_events(_JOBS, job_id, after_sequence, timeout_s, limit)

    def append_study_event(self, study_id: str, kind: str, payload_json: str) -> EventRecord:
        return self._append_event(_STUDIES, study_id, kind, payload_json)

    def study_events_after(
        self, study_id: str, after_sequence: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        return self._events_after(_STUDIES, study_id, after_sequence, limit)

    def wait_for_study_events(
        self, study_id: str, after_sequence: int, timeout_s: float, *, limit: int = 1000
    ) -> list[EventRecord]:
        return self._wait_for_events(_STUDIES, study_id, after_sequence, timeout_s, limit)
