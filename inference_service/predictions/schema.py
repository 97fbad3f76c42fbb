"""The prediction store's tables and their versioned migrations.

One schema for both databases (`visiontune.database`: SQLite embedded, PostgreSQL shared). The tables carry the
``vt_`` prefix of every VisionTune table and names of their own, so the trainer's job store may live in the same
PostgreSQL database. Times are integer microseconds since the epoch, as in the job store.

Migrations are numbered and append-only: migration i takes the schema from version i to i + 1; a shipped one is
never edited. The version lives in a table of the inference service's own, ``vt_inference_schema_version``, on
both databases: the job store keeps its version in ``PRAGMA user_version`` (SQLite) and ``vt_schema_version``
(PostgreSQL), and neither store may read the other's. Two replicas starting together on a fresh PostgreSQL do not
both migrate it: the migration holds an advisory lock (a key of its own, not the job store's).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from visiontune import errors, migrations
from visiontune.database import Database, Dialect
from visiontune.migrations import Migration, Schema

__all__ = [
    "FEEDBACK",
    "MIGRATIONS",
    "PREDICTIONS",
    "SCHEMA_VERSION",
    "VERSIONS",
    "SchemaError",
    "migrate",
    "schema_version",
    "to_us",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
# The key of the advisory lock migrations hold on PostgreSQL ("vt" + "infer" in ASCII; the job store's differs).
_MIGRATION_LOCK: Final = 0x7674696E666572
_VERSION_TABLE: Final = "vt_inference_schema_version"


class SchemaError(errors.FailedPrecondition):
    """The database has a prediction store schema this code cannot use (newer, or not a database at all)."""


def to_us(dt: datetime) -> int:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"the prediction store needs timezone-aware datetimes, got naive {dt!r}")
    return (dt - _EPOCH) // _MICROSECOND


# ------------------------------------------------------------------------------------------- the tables

# What the queries see: the schema at SCHEMA_VERSION. The DDL that makes it is the migrations below.
_metadata = sa.MetaData()

# A served version's labels, once per version rather than in every prediction (a model may have thousands). Never
# deleted: one small row per version ever served, which a replica may keep serving for longer than the retention.
VERSIONS: Final = sa.Table(
    "vt_prediction_versions",
    _metadata,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("labels_json", sa.Text, nullable=False),
    sa.Column("create_time", sa.BigInteger, nullable=False),
)

# One row per Classify request: its one INSERT.
PREDICTIONS: Final = sa.Table(
    "vt_predictions",
    _metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    # [[top-1 label, unknown verdict], ...] in image order
    sa.Column("images_json", sa.Text, nullable=False),
    sa.Column("create_time", sa.BigInteger, nullable=False),
)

# One row per scored image; the primary key is what makes a report count once across replicas.
FEEDBACK: Final = sa.Table(
    "vt_feedback",
    _metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("image_index", sa.Integer, primary_key=True),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("true_label", sa.Text),  # NULL: reported as of an unknown class
    sa.Column("report_time", sa.BigInteger, nullable=False),
)


# ----------------------------------------------------------------------------------------- migrations


def _migration_1_initial(conn: Connection, dialect: Dialect) -> None:
    # BIGINT: 64-bit on both (INTEGER is 32-bit in PostgreSQL); SQLite reads it as INTEGER.
    statements = (
        """
        CREATE TABLE vt_prediction_versions (
            model       TEXT NOT NULL,
            version     TEXT NOT NULL,
            labels_json TEXT NOT NULL,
            create_time BIGINT NOT NULL,
            PRIMARY KEY (model, version)
        )
        """,
        """
        CREATE TABLE vt_predictions (
            request_id  TEXT PRIMARY KEY,
            model       TEXT NOT NULL,
            version     TEXT NOT NULL,
            images_json TEXT NOT NULL,
            create_time BIGINT NOT NULL,
            FOREIGN KEY (model, version) REFERENCES vt_prediction_versions (model, version)
        )
        """,
        # The janitor deletes the oldest first.
        "CREATE INDEX vt_predictions_by_time ON vt_predictions (create_time, request_id)",
        """
        CREATE TABLE vt_feedback (
            request_id  TEXT NOT NULL REFERENCES vt_predictions (request_id) ON DELETE CASCADE,
            image_index INTEGER NOT NULL,
            outcome     TEXT NOT NULL,
            true_label  TEXT,
            report_time BIGINT NOT NULL,
            PRIMARY KEY (request_id, image_index)
        )
        """,
    )
    for statement in statements:
        conn.exec_driver_sql(statement)


# Ordered: migration i takes the schema from version i to i + 1. Append only, never edit a shipped one.
MIGRATIONS: Final[tuple[Migration, ...]] = (_migration_1_initial,)
SCHEMA_VERSION: Final = len(MIGRATIONS)


SCHEMA: Final = Schema(
    store="prediction store",
    service="the inference service",
    migrations=MIGRATIONS,
    version_table=_VERSION_TABLE,
    lock_key=_MIGRATION_LOCK,
)


def migrate(db: Database) -> int:
    """Bring the database to SCHEMA_VERSION; SchemaError for a newer schema. Returns the version found."""
    return migrations.migrate(db, SCHEMA, SchemaError)


def schema_version(db: Database) -> int:
    """The version recorded in the database (0 before the first migration)."""
    return migrations.schema_version(db, SCHEMA)
