"""The SQLite side of the job store: per-thread connections and transactions, the tables and their
migrations, and rows to records and back. `trainer_service.jobs.store` runs its operations on these.

Every table carries a ``vt_`` prefix because Optuna's RDB storage keeps its own tables (``studies``,
``trials``, ...) in the same file; the schema version lives in ``PRAGMA user_version``, which
SQLAlchemy/Alembic never touch. Times are integer microseconds since the epoch: exact, sortable, and cheap
to compare in SQL (keyset pagination). A PostgreSQL store would have a module like this one and share
`trainer_service.jobs.records`.

Concurrency model:
- one sqlite3 connection per thread (``threading.local``), so readers never queue behind one lock;
- every write runs in ``BEGIN IMMEDIATE`` so the write lock is taken up front (a deferred transaction
  that upgrades from read to write can fail with SQLITE_BUSY without the busy handler being consulted);
- several processes may open the same file; ``busy_timeout`` makes them wait for each other.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from visiontune import names

from trainer_service.jobs.records import (
    EventRecord,
    JobRecord,
    JobState,
    JobStoreError,
    ResourceType,
    SchemaError,
    StudyRecord,
    StudyState,
)

__all__ = [
    "JOBS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STUDIES",
    "SqliteDatabase",
    "Table",
    "event_from_row",
    "from_us",
    "job_from_row",
    "study_from_row",
    "to_us",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


# ------------------------------------------------------------------------------------------ time codec


def to_us(dt: datetime) -> int:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"the job store needs timezone-aware datetimes, got naive {dt!r}")
    return (dt - _EPOCH) // _MICROSECOND


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _opt_from_us(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)


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
MIGRATIONS: Final[tuple[Migration, ...]] = (_migration_1_initial,)
SCHEMA_VERSION: Final = len(MIGRATIONS)


# ------------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True, slots=True)
class Table:
    """What the store's shared create/get/list/update code needs to know about one resource table."""

    name: str  # a constant from this module, never user input, so it is safe to format into SQL
    id_column: str
    resource_type: ResourceType
    noun: str  # for error messages
    resource_name: Callable[[str], str]  # the ID's API name (`jobs/{id}`), for error messages


JOBS: Final = Table("vt_jobs", "job_id", ResourceType.JOB, "job", names.job_name)
STUDIES: Final = Table("vt_studies", "study_id", ResourceType.STUDY, "study", names.study_name)


def job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        state=JobState(row["state"]),
        spec_json=row["spec_json"],
        display_name=row["display_name"],
        request_id=row["request_id"],
        create_time=from_us(row["create_time"]),
        update_time=from_us(row["update_time"]),
        start_time=_opt_from_us(row["start_time"]),
        end_time=_opt_from_us(row["end_time"]),
        attempt=row["attempt"],
        error=row["error"],
        result_json=row["result_json"],
        labels=json.loads(row["labels_json"]),
        study_id=row["study_id"],
        trial_number=row["trial_number"],
    )


def study_from_row(row: sqlite3.Row) -> StudyRecord:
    return StudyRecord(
        study_id=row["study_id"],
        state=StudyState(row["state"]),
        spec_json=row["spec_json"],
        display_name=row["display_name"],
        request_id=row["request_id"],
        create_time=from_us(row["create_time"]),
        update_time=from_us(row["update_time"]),
        end_time=_opt_from_us(row["end_time"]),
        error=row["error"],
        result_json=row["result_json"],
    )


def event_from_row(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        resource_type=ResourceType(row["resource_type"]),
        resource_id=row["resource_id"],
        sequence=row["sequence"],
        time=from_us(row["time"]),
        kind=row["kind"],
        payload_json=row["payload_json"],
    )


# ------------------------------------------------------------------------------------------- connections


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


class SqliteDatabase:
    """The job store's SQLite file in WAL mode, migrated to SCHEMA_VERSION on open: one connection per
    thread, write and read transactions. Raises SchemaError for a file it cannot use."""

    def __init__(self, path: Path, *, busy_timeout_s: float) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        self._closed = False

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self.connection()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JobStoreError(f"could not put {self.path} in WAL mode (journal_mode is {mode!r})")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise SchemaError(f"{self.path} is not a usable job store database: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        with self._connections_lock:
            self._closed = True
            holders = list(self._connections)
            self._connections.clear()
        for holder in holders:
            holder.conn.close()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use); JobStoreError once the database is closed."""
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is not None and not self._closed:
            return holder.conn
        with self._connections_lock:
            if self._closed:
                raise JobStoreError(f"the job store at {self.path} is closed")
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False only so
            # close() may close this connection from another thread.
            conn = sqlite3.connect(
                self.path,
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
    def write(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        # A read transaction gives several SELECTs one consistent snapshot.
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Under the write lock, so two processes opening a fresh file do not both migrate it.
        with self.write():
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"{self.path} has job store schema version {version}, but this code only knows "
                    f"versions up to {SCHEMA_VERSION}; upgrade the trainer before opening it"
                )
            for migration in MIGRATIONS[version:]:
                migration(conn)
            if version != SCHEMA_VERSION:
                # PRAGMA cannot take a bound parameter; SCHEMA_VERSION is an int constant.
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])
