"""The job store's tables, their versioned migrations, and rows to records.

One schema for both databases (`visiontune.database`: SQLite embedded, PostgreSQL shared). Every table carries a
``vt_`` prefix because Optuna's RDB storage keeps its own tables (``studies``, ``trials``, ...) in the same
database. Times are integer microseconds since the epoch: exact, sortable, cheap to compare in SQL (keyset
pagination), and the same on both databases.

Migrations are numbered and append-only (`visiontune.migrations` runs them). The version lives in SQLite's
``PRAGMA user_version`` (which SQLAlchemy/Alembic never touch, and which files made before PostgreSQL support
already use) and in PostgreSQL in the ``vt_schema_version`` table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from visiontune import migrations, names
from visiontune.database import Database, Dialect
from visiontune.migrations import Migration, Schema

from trainer_service.jobs.records import (
    EventRecord,
    JobRecord,
    JobState,
    ReplicaRecord,
    ResourceType,
    SchemaError,
    StudyRecord,
    StudyState,
    WorkerRecord,
)

__all__ = [
    "EVENTS",
    "JOBS",
    "MIGRATIONS",
    "REPLICAS",
    "SCHEMA_VERSION",
    "STUDIES",
    "WORKERS",
    "Resource",
    "event_from_row",
    "from_us",
    "job_from_row",
    "migrate",
    "replica_from_row",
    "schema_version",
    "study_from_row",
    "to_us",
    "worker_from_row",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
# Any constant: the key of the advisory lock migrations hold on PostgreSQL ("vt" + "jobs" in ASCII).
_MIGRATION_LOCK: Final = 0x76746A6F6273


# ------------------------------------------------------------------------------------------ time codec


def to_us(dt: datetime) -> int:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"the job store needs timezone-aware datetimes, got naive {dt!r}")
    return (dt - _EPOCH) // _MICROSECOND


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _opt_from_us(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)


# ------------------------------------------------------------------------------------------- the tables

# What the queries see: the schema at SCHEMA_VERSION. The DDL that makes it is the migrations below.
_metadata = sa.MetaData()

STUDIES_TABLE: Final = sa.Table(
    "vt_studies",
    _metadata,
    sa.Column("study_id", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text),
    sa.Column("create_time", sa.BigInteger, nullable=False),
    sa.Column("update_time", sa.BigInteger, nullable=False),
    sa.Column("end_time", sa.BigInteger),
    sa.Column("error", sa.Text),
    sa.Column("result_json", sa.Text),
    # The replica whose study runner drives the study; NULL while nobody does (taken by the next runner).
    sa.Column("owner", sa.Text),
    # The authenticated principal that created it ('' without authentication): per-caller quotas count by it.
    sa.Column("creator", sa.Text, nullable=False),
)

JOBS_TABLE: Final = sa.Table(
    "vt_jobs",
    _metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text),
    sa.Column("create_time", sa.BigInteger, nullable=False),
    sa.Column("update_time", sa.BigInteger, nullable=False),
    sa.Column("start_time", sa.BigInteger),
    sa.Column("end_time", sa.BigInteger),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("result_json", sa.Text),
    sa.Column("labels_json", sa.Text, nullable=False),
    sa.Column("study_id", sa.Text),
    sa.Column("trial_number", sa.Integer),
    # The replica running the job's current attempt; NULL while it is queued or after it ended.
    sa.Column("owner", sa.Text),
    sa.Column("creator", sa.Text, nullable=False),
    # sha256 of the checkpoint object the last epoch committed: a resume loads nothing else.
    sa.Column("checkpoint_sha256", sa.Text),
)

EVENTS: Final = sa.Table(
    "vt_events",
    _metadata,
    sa.Column("resource_type", sa.Text, primary_key=True),
    sa.Column("resource_id", sa.Text, primary_key=True),
    sa.Column("sequence", sa.Integer, primary_key=True),
    sa.Column("time", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("payload_json", sa.Text, nullable=False),
)

REPLICAS: Final = sa.Table(
    "vt_replicas",
    _metadata,
    sa.Column("replica_id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("start_time", sa.BigInteger, nullable=False),
    sa.Column("heartbeat_time", sa.BigInteger, nullable=False),
)

# Workers that live outside the trainer's process tree (the Kubernetes executor's Jobs), one row per Job that may
# exist: the row is taken in the claim's transaction and dropped only once the Job is gone, so counting rows bounds
# the Jobs in the cluster, across replicas.
WORKERS: Final = sa.Table(
    "vt_workers",
    _metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("job_id", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    # The replica looking after the worker; NULL: released (its replica stopped or died), any replica adopts it.
    sa.Column("owner", sa.Text),
    sa.Column("create_time", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class Resource:
    """What the store's shared create/get/list/update code needs to know about one resource table."""

    table: sa.Table
    id_column: str
    resource_type: ResourceType
    noun: str  # for error messages
    resource_name: Callable[[str], str]  # the ID's API name (`jobs/{id}`), for error messages

    @property
    def id(self) -> sa.Column[Any]:
        return self.table.c[self.id_column]


JOBS: Final = Resource(JOBS_TABLE, "job_id", ResourceType.JOB, "job", names.job_name)
STUDIES: Final = Resource(STUDIES_TABLE, "study_id", ResourceType.STUDY, "study", names.study_name)


# ----------------------------------------------------------------------------------------- migrations


def _migration_1_initial(conn: Connection, dialect: Dialect) -> None:
    # INTEGER is 64-bit in SQLite but 32-bit in PostgreSQL: times (microseconds) need BIGINT there.
    big = "INTEGER" if dialect == "sqlite" else "BIGINT"
    without_rowid = " WITHOUT ROWID" if dialect == "sqlite" else ""
    statements = (
        f"""
        CREATE TABLE vt_studies (
            study_id     TEXT PRIMARY KEY,
            state        TEXT NOT NULL,
            spec_json    TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            request_id   TEXT UNIQUE,
            create_time  {big} NOT NULL,
            update_time  {big} NOT NULL,
            end_time     {big},
            error        TEXT,
            result_json  TEXT
        )
        """,
        "CREATE INDEX vt_studies_by_create ON vt_studies (create_time, study_id)",
        f"""
        CREATE TABLE vt_jobs (
            job_id       TEXT PRIMARY KEY,
            state        TEXT NOT NULL,
            spec_json    TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            request_id   TEXT UNIQUE,
            create_time  {big} NOT NULL,
            update_time  {big} NOT NULL,
            start_time   {big},
            end_time     {big},
            attempt      INTEGER NOT NULL DEFAULT 0,
            error        TEXT,
            result_json  TEXT,
            labels_json  TEXT NOT NULL DEFAULT '{{}}',
            study_id     TEXT REFERENCES vt_studies (study_id),
            trial_number INTEGER
        )
        """,
        "CREATE INDEX vt_jobs_by_create ON vt_jobs (create_time, job_id)",
        # claim_next_queued and jobs_in_states look jobs up by state, oldest first.
        "CREATE INDEX vt_jobs_by_state ON vt_jobs (state, create_time, job_id)",
        "CREATE INDEX vt_jobs_by_study ON vt_jobs (study_id, create_time, job_id)",
        # One table for job and study events; the primary key is also what makes a sequence unique.
        f"""
        CREATE TABLE vt_events (
            resource_type TEXT NOT NULL CHECK (resource_type IN ('job', 'study')),
            resource_id   TEXT NOT NULL,
            sequence      INTEGER NOT NULL,
            time          {big} NOT NULL,
            kind          TEXT NOT NULL,
            payload_json  TEXT NOT NULL,
            PRIMARY KEY (resource_type, resource_id, sequence)
        ){without_rowid}
        """,
    )
    for statement in statements:
        conn.exec_driver_sql(statement)


def _migration_2_replicas(conn: Connection, dialect: Dialect) -> None:
    """Several trainer replicas on one database: who runs each job and drives each study, and who is alive."""
    big = "INTEGER" if dialect == "sqlite" else "BIGINT"
    statements = (
        "ALTER TABLE vt_jobs ADD COLUMN owner TEXT",
        "ALTER TABLE vt_studies ADD COLUMN owner TEXT",
        "CREATE INDEX vt_jobs_by_owner ON vt_jobs (owner, state)",
        "CREATE INDEX vt_studies_by_owner ON vt_studies (owner, state)",
        f"""
        CREATE TABLE vt_replicas (
            replica_id     TEXT PRIMARY KEY,
            host           TEXT NOT NULL,
            pid            INTEGER NOT NULL,
            start_time     {big} NOT NULL,
            heartbeat_time {big} NOT NULL
        )
        """,
    )
    for statement in statements:
        conn.exec_driver_sql(statement)


def _migration_3_workers(conn: Connection, dialect: Dialect) -> None:
    """Workers outside the trainer (Kubernetes Jobs): a row per Job that may exist, for the cluster-wide cap and
    for adopting a stopped or dead replica's running Jobs."""
    big = "INTEGER" if dialect == "sqlite" else "BIGINT"
    statements = (
        f"""
        CREATE TABLE vt_workers (
            name        TEXT PRIMARY KEY,
            job_id      TEXT NOT NULL,
            attempt     INTEGER NOT NULL,
            owner       TEXT,
            create_time {big} NOT NULL
        )
        """,
        "CREATE INDEX vt_workers_by_owner ON vt_workers (owner)",
        "CREATE INDEX vt_workers_by_job ON vt_workers (job_id)",
    )
    for statement in statements:
        conn.exec_driver_sql(statement)


def _migration_4_creators_and_checkpoints(conn: Connection, dialect: Dialect) -> None:
    """Who created each job and study (per-caller quotas), and the digest of each job's committed checkpoint (a
    resume verifies the object before it unpickles anything)."""
    statements = (
        "ALTER TABLE vt_jobs ADD COLUMN creator TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vt_jobs ADD COLUMN checkpoint_sha256 TEXT",
        "ALTER TABLE vt_studies ADD COLUMN creator TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX vt_jobs_by_creator ON vt_jobs (creator, state)",
        "CREATE INDEX vt_studies_by_creator ON vt_studies (creator, state)",
    )
    for statement in statements:
        conn.exec_driver_sql(statement)


# Ordered: migration i takes the schema from version i to i + 1. Append only, never edit a shipped one.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _migration_1_initial,
    _migration_2_replicas,
    _migration_3_workers,
    _migration_4_creators_and_checkpoints,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


SCHEMA: Final = Schema(
    store="job store",
    service="the trainer",
    migrations=MIGRATIONS,
    version_table="vt_schema_version",
    lock_key=_MIGRATION_LOCK,
    sqlite_user_version=True,
)


def migrate(db: Database) -> int:
    """Bring the database to SCHEMA_VERSION; SchemaError for a newer schema. Returns the version found."""
    return migrations.migrate(db, SCHEMA, SchemaError)


def schema_version(db: Database) -> int:
    return migrations.schema_version(db, SCHEMA)


# ------------------------------------------------------------------------------------------ rows to records

Row = Mapping[Any, Any]  # a RowMapping: column name -> value


def job_from_row(row: Row) -> JobRecord:
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
        owner=row["owner"],
        creator=row["creator"],
        checkpoint_sha256=row["checkpoint_sha256"],
    )


def study_from_row(row: Row) -> StudyRecord:
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
        owner=row["owner"],
        creator=row["creator"],
    )


def event_from_row(row: Row) -> EventRecord:
    return EventRecord(
        resource_type=ResourceType(row["resource_type"]),
        resource_id=row["resource_id"],
        sequence=row["sequence"],
        time=from_us(row["time"]),
        kind=row["kind"],
        payload_json=row["payload_json"],
    )


def replica_from_row(row: Row) -> ReplicaRecord:
    return ReplicaRecord(
        replica_id=row["replica_id"],
        host=row["host"],
        pid=row["pid"],
        start_time=from_us(row["start_time"]),
        heartbeat_time=from_us(row["heartbeat_time"]),
    )


def worker_from_row(row: Row) -> WorkerRecord:
    return WorkerRecord(
        name=row["name"],
        job_id=row["job_id"],
        attempt=row["attempt"],
        owner=row["owner"],
        create_time=from_us(row["create_time"]),
    )
