"""A SQL database both services can share: an embedded SQLite file or a PostgreSQL server, chosen by one URL.

`sqlite:///path/file.sqlite3` is the embedded default of the local stack (one machine, several processes);
`postgresql://user:password@host:port/db` is for shared use (several replicas, Kubernetes). Both go through
SQLAlchemy Core, so a store writes its queries once; what differs per dialect is here:

- SQLite: WAL mode (readers never wait for the writer), foreign keys on, a busy timeout, and every write in
  `BEGIN IMMEDIATE` so the write lock is taken up front (a deferred transaction that upgrades from read to
  write can fail with SQLITE_BUSY without the busy handler being consulted).
- PostgreSQL: psycopg 3, a connection pool checked before use (a connection the server dropped is replaced, not
  handed out), READ COMMITTED with explicit row locks (`FOR UPDATE`, `SKIP LOCKED`) where a store needs them.

Every transaction runs through `Database.write` / `Database.read`, which retry what is worth retrying:
serialization failures and deadlocks a few times at once, and a lost or refused connection (a server restart, a
network blip) for up to the outage window (`visiontune.outages`), so a 30-second database restart is waited
through. A transaction is retried as a whole, never half-applied: a store's function gets a connection in a
fresh transaction each time, and commits only when it returns.

Opening a `Database` connects once and refuses a URL it cannot use with one line naming the host and the cause
(`DatabaseConfigError`): a wrong password, an unknown database, nobody listening, an unknown host. Later, the same
refusals of the login (a password rotated under a running service) are not an outage either: DatabaseConfigError
at once, not a wait (`_is_lost_connection` says which errors are waited through).
"""

from __future__ import annotations

import copy
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.engine import Connection, Engine

from visiontune import errors
from visiontune.outages import OutageListener, OutagePolicy, OutageTooLong, ride_out

__all__ = [
    "Database",
    "DatabaseClosed",
    "DatabaseConfigError",
    "DatabaseError",
    "DatabaseUnavailable",
    "Dialect",
    "describe_db_error",
    "normalize_url",
]

log = logging.getLogger("visiontune.database")

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]

# SQLSTATEs: retried at once (a concurrent transaction won), and "the server is going or coming".
_RETRY_AT_ONCE: Final = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
_SERVER_GONE: Final = frozenset({"57P01", "57P02", "57P03", "08000", "08003", "08006", "08001", "08004"})
# SQLSTATEs that mean the URL is wrong: retrying cannot help.
_CONFIG_STATES: Final = {
    "28P01": "wrong password",
    "28000": "authentication rejected",
    "3D000": "no such database",
    "42501": "permission denied",
}
# The same, for a connection the server refused while it was being made: libpq reports no SQLSTATE then, only the
# server's message (in its lc_messages; the English ones here) or its own, so these are matched on the text.
_CONFIG_MESSAGES: Final = (
    (re.compile(r"password authentication failed|no password supplied|password is required"), "wrong password"),
    (re.compile(r'database "[^"]*" does not exist'), "no such database"),
    (re.compile(r'role "[^"]*" does not exist'), "no such user"),
    (re.compile(r"no pg_hba\.conf entry|authentication failed"), "authentication rejected"),
    (re.compile(r"permission denied for database|must be superuser|not permitted to log in"), "permission denied"),
    (re.compile(r"invalid port number|invalid integer value|invalid connection option|invalid sslmode"), "bad URL"),
)
# What libpq puts before the cause of a failed connection: the host and port, which the caller's message names.
_CONNECT_PREFIX: Final = re.compile(
    r"^(connection failed: |connection is bad: )?"
    r'(connection to server (at "[^"]*"( \([^)]*\))?, port \d+|on socket "[^"]*") failed: )?'
    r"(FATAL: +)?"
)
_MAX_QUICK_RETRIES: Final = 10
_CONNECT_TIMEOUT_S: Final = 5


class DatabaseError(errors.VisionTuneError):
    """A database operation failed on purpose-checked grounds; the message is one line."""


class DatabaseConfigError(DatabaseError, errors.FailedPrecondition):
    """The database URL cannot be used: a wrong password, an unknown database, a host nobody answers on."""


class DatabaseClosed(DatabaseError, errors.Unavailable):
    """The `Database` was closed (its owner is shutting down): another replica, or this one restarted, can answer."""


class DatabaseUnavailable(DatabaseError, errors.Unavailable):
    """The database stayed unreachable past the outage window, or kept failing transactions."""


def normalize_url(url: str) -> sa.URL:
    """The URL SQLAlchemy should use: `postgresql://` and `postgres://` mean psycopg 3 (the driver we ship)."""
    try:
        parsed = sa.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:  # ValueError: a port that is not a number
        what = "its port is not a number" if isinstance(err, ValueError) else "it is not a URL"
        raise DatabaseConfigError(
            f"database URL {_redact(url)!r}: {what} (expected sqlite:///path or postgresql://user:password@host:port/db)"
        ) from err
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend != "sqlite":
        raise DatabaseConfigError(f"database URL {_redact(url)!r}: only sqlite:// and postgresql:// are supported")
    return parsed


def _redact(url: str) -> str:
    """The URL without its password (for messages), also when SQLAlchemy cannot parse it."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return re.sub(r"^([^:/@]*://[^:/@]*:)[^@]*@", r"\1***@", url)


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    state = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    return str(state) if state else None


def _first_line(exc: BaseException) -> str:
    """The driver's message: its first line, without SQLAlchemy's SQL echo and background link, nor libpq's
    'connection to server at "h", port p failed: ' and 'FATAL:' (the caller's message names the host)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    first = " ".join(text[0].split()) if text else ""
    return _CONNECT_PREFIX.sub("", first, count=1) or type(orig).__name__


def _config_cause(exc: BaseException) -> str | None:
    """What is wrong with the URL when `exc` says it cannot work (a wrong password, no such database, ...); None for
    anything else (an outage among them)."""
    state = _sqlstate(exc)
    if state in _CONFIG_STATES:
        return _CONFIG_STATES[state]
    if state is None and isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        message = _first_line(exc)
        for pattern, cause in _CONFIG_MESSAGES:
            if pattern.search(message):
                return cause
    return None


def describe_db_error(exc: BaseException) -> str:
    """A short, one-line cause, e.g. `wrong password: password authentication failed for user "vt"`, `Connection
    refused`, `terminating connection due to administrator command`."""
    first = _first_line(exc)
    cause = _config_cause(exc)
    return f"{cause}: {first}" if cause is not None else first


def _is_lost_connection(exc: BaseException) -> bool:
    """The server is unreachable, restarting or went away mid-transaction: wait for it (the outage window).

    Waited through: a connection the server closed (57P01 admin shutdown, 57P02 crash of another backend, "server
    closed the connection unexpectedly"), a refused or timed-out connection, an unresolvable host (DNS during a
    restart), "the database system is starting up / not yet accepting connections" (57P03; at connect libpq gives
    no SQLSTATE, only the text), SQLite's "database is locked" past the busy timeout. Not waited: a URL that cannot
    work (`_config_cause`: a wrong password, an unknown database or user) and every error of the SQL itself.
    """
    if _config_cause(exc) is not None:
        return False
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = _sqlstate(exc)
    if state in _SERVER_GONE:
        return True
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        orig = getattr(exc, "orig", exc)
        if isinstance(orig, sqlite3.Error):
            # SQLite: another process holds the lock past the busy timeout (a stuck writer, not an outage of ours,
            # but the same cure: wait and try again). Its other operational errors (no such table, a full disk) are
            # not made better by waiting.
            return "database is locked" in str(orig).lower()
        # psycopg gives every error the server sent a SQLSTATE: one without is the connection's own failure.
        return state is None
    return False


@dataclass(frozen=True, slots=True)
class _Target:
    dialect: Dialect
    endpoint: str  # host:port/db or the file's path, for messages (never the password)


class Database:
    """One database URL, its engine and pool, and retried transactions. Thread-safe; one per process."""

    def __init__(
        self,
        url: str,
        *,
        policy: OutagePolicy | None = None,
        listener: OutageListener | None = None,
        service: str = "the database",
        pool_size: int = 5,
        sqlite_busy_timeout_s: float = 10.0,
        check: bool = True,
    ) -> None:
        self.url = normalize_url(url)
        self.policy = policy if policy is not None else OutagePolicy.from_env()
        self.listener = listener
        self.service = service
        self._stop = threading.Event()
        if self.url.get_backend_name() == "sqlite":
            self.target = _Target("sqlite", str(self.url.database or ":memory:"))
            self.engine = self._sqlite_engine(sqlite_busy_timeout_s)
        else:
            host = f"{self.url.host or 'localhost'}:{self.url.port or 5432}"
            self.target = _Target("postgresql", f"{host}/{self.url.database or ''}")
            self.engine = sa.create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,  # a connection the server dropped (restart) is replaced, not handed out
                pool_recycle=1800,
                connect_args={"connect_timeout": _CONNECT_TIMEOUT_S, "application_name": "visiontune"},
            )
        if check:
            self._check()

    # -- properties

    @property
    def dialect(self) -> Dialect:
        return self.target.dialect

    @property
    def endpoint(self) -> str:
        return self.target.endpoint

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.target.endpoint) if self.dialect == "sqlite" else None

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)})"

    def with_outage(self, policy: OutagePolicy) -> Database:
        """This database (the same pool) with another outage policy, e.g. a short one for request paths. Close the
        original, not the copy."""
        clone = copy.copy(self)
        clone.policy = policy
        return clone

    # -- lifecycle

    def close(self) -> None:
        """Stop waiting for outages and close the pool. Idempotent."""
        self._stop.set()
        self.engine.dispose()

    def _sqlite_engine(self, busy_timeout_s: float) -> Engine:
        path = self.url.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            self.url,
            # isolation_level=None: the driver issues no BEGIN of its own; the "begin" hook below does.
            connect_args={"timeout": busy_timeout_s, "isolation_level": None, "check_same_thread": False},
        )

        @sa.event.listens_for(engine, "connect")
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("vt_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def _check(self) -> None:
        """Connect once; refuse a URL that cannot work with one line naming the host and the cause."""
        try:
            if self.dialect == "sqlite":
                # Outside any transaction (SQLite cannot change the journal mode inside one); WAL is persistent.
                raw = self.engine.raw_connection()
                try:
                    cursor = raw.cursor()
                    mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    cursor.close()
                finally:
                    raw.close()
                if str(mode).lower() != "wal":
                    raise DatabaseConfigError(f"could not put {self.endpoint} in WAL mode (journal_mode is {mode!r})")
            else:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
        except (sqlalchemy.exc.DBAPIError, sqlite3.DatabaseError) as err:
            self.engine.dispose()
            raise DatabaseConfigError(
                f"cannot use {self.service} at {self.endpoint}: {describe_db_error(err)}"
            ) from err

    # -- transactions

    def write(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn(conn)` in a write transaction and commit; retried as a whole (see the module doc)."""
        return self._transaction(fn, write=True)

    def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn(conn)` in a read transaction (one consistent snapshot on SQLite); retried like write."""
        return self._transaction(fn, write=False)

    def _transaction(self, fn: Callable[[Connection], T], *, write: bool) -> T:
        def once() -> T:
            if self._stop.is_set():
                raise DatabaseClosed(f"{self.service} at {self.endpoint} is closed")
            quick = 0
            while True:
                try:
                    with self.engine.connect() as conn:
                        if write:
                            conn.execution_options(vt_write=True)
                        try:
                            result = fn(conn)
                            conn.commit()
                        except BaseException:
                            conn.rollback()
                            raise
                        return result
                except sqlalchemy.exc.DBAPIError as err:
                    if _sqlstate(err) not in _RETRY_AT_ONCE or quick >= _MAX_QUICK_RETRIES:
                        raise
                    quick += 1
                    time.sleep(0.01 * quick)

        try:
            return ride_out(
                once,
                service=self.service,
                endpoint=self.endpoint,
                is_outage=_is_lost_connection,
                describe=describe_db_error,
                policy=self.policy,
                listener=self.listener,
                stop=self._stop,
            )
        except OutageTooLong as err:
            raise DatabaseUnavailable(str(err)) from err
        except sqlalchemy.exc.DBAPIError as err:
            if _config_cause(err) is not None:
                # The server answers but refuses us (a password rotated under a running service): not an outage.
                raise DatabaseConfigError(
                    f"cannot use {self.service} at {self.endpoint}: {describe_db_error(err)}"
                ) from err
            if _sqlstate(err) in _RETRY_AT_ONCE:
                raise DatabaseUnavailable(
                    f"{self.service} at {self.endpoint}: a transaction kept conflicting with concurrent ones "
                    f"({_MAX_QUICK_RETRIES} retries): {describe_db_error(err)}"
                ) from err
            raise
