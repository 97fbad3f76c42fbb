"""Versioned, append-only schema migrations for a store on `visiontune.database` (the job store, the prediction store).

A store declares its `Schema`: the migrations in order (migration i takes the schema from version i to i + 1; a
shipped one is never edited), where the version is kept, and a lock key. `migrate` brings a database to the latest
version in one transaction. On PostgreSQL it holds an advisory lock (the store's own key), so two replicas starting
together on a fresh database do not both migrate it: the second waits, then finds the schema current.

Where the version is kept: a one-row table of the store's own, on both databases; or, for the job store's SQLite
files (which had it before PostgreSQL support), SQLite's ``PRAGMA user_version``, which SQLAlchemy/Alembic (Optuna's
tables in the same file) never touch. Several stores may share one database: each has its own tables, version and
lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.engine import Connection

from visiontune.database import Database, Dialect, describe_db_error

__all__ = ["Migration", "Schema", "migrate", "schema_version"]

Migration = Callable[[Connection, Dialect], None]


@dataclass(frozen=True, slots=True)
class Schema:
    """One store's schema history, and how to talk about it."""

    store: str  # "job store", for messages
    service: str  # "the trainer": who to upgrade when the database is newer than the code
    migrations: tuple[Migration, ...]
    version_table: str  # a constant name, never user input (it is formatted into SQL)
    lock_key: int  # the PostgreSQL advisory lock migrations hold; one per store
    # Only the job store: on SQLite its version is PRAGMA user_version (the files made before the table existed).
    sqlite_user_version: bool = False

    @property
    def version(self) -> int:
        return len(self.migrations)

    def _uses_pragma(self, dialect: Dialect) -> bool:
        return self.sqlite_user_version and dialect == "sqlite"

    def read_version(self, conn: Connection, dialect: Dialect, *, create: bool) -> int:
        if self._uses_pragma(dialect):
            return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
        if create:
            conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {self.version_table} (version INTEGER NOT NULL)")
        elif not sa.inspect(conn).has_table(self.version_table):
            return 0
        return int(conn.exec_driver_sql(f"SELECT version FROM {self.version_table}").scalar() or 0)

    def write_version(self, conn: Connection, dialect: Dialect, version: int) -> None:
        if self._uses_pragma(dialect):
            # PRAGMA cannot take a bound parameter; the version is an int.
            conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")
            return
        conn.exec_driver_sql(f"DELETE FROM {self.version_table}")
        conn.execute(sa.text(f"INSERT INTO {self.version_table} (version) VALUES (:v)"), {"v": version})


def migrate(db: Database, schema: Schema, error: Callable[[str], Exception]) -> int:
    """Bring `db` to `schema.version` and return the version found; raises `error(message)` for a newer schema or a
    database that is not this store's."""

    def run(conn: Connection) -> int:
        if db.dialect == "postgresql":
            # Held to the end of the transaction: a second replica waits, then finds the schema current.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": schema.lock_key})
        found = schema.read_version(conn, db.dialect, create=True)
        if found > schema.version:
            raise error(
                f"{db.endpoint} has {schema.store} schema version {found}, but this code only knows versions up to "
                f"{schema.version}; upgrade {schema.service} before opening it"
            )
        for migration in schema.migrations[found:]:
            migration(conn, db.dialect)
        if found != schema.version:
            schema.write_version(conn, db.dialect, schema.version)
        return found

    try:
        return db.write(run)
    except sqlalchemy.exc.DatabaseError as err:
        raise error(f"{db.endpoint} is not a usable {schema.store} database: {describe_db_error(err)}") from err


def schema_version(db: Database, schema: Schema) -> int:
    """The version recorded in the database (0 before the first migration)."""
    return db.read(lambda conn: schema.read_version(conn, db.dialect, create=False))
