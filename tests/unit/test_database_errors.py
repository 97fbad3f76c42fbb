"""Which PostgreSQL errors `visiontune.database` waits through, read off a real server the tests stop, kill and restart.

A server going or coming (a fast shutdown, a SIGKILL, a crashed backend, refused connections while it is down, "the
database system is starting up" while it recovers) is an outage: waited through for the outage window. A URL that
cannot work (a wrong or rotated password, an unknown database or user) is not: waiting would only hide it.

The server is this module's own (not the session's, which every other test uses).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.engine import Connection, Engine
from visiontune.database import Database, DatabaseConfigError, _is_lost_connection, describe_db_error
from visiontune.devstack.postgres import PostgresProcess
from visiontune.outages import Outage, OutagePolicy


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresProcess]:
    # Under /tmp, not pytest's temp root: as root the server runs as `postgres`, which cannot enter that.
    root = Path(tempfile.mkdtemp(prefix="visiontune-pg-outage-"))
    pg = PostgresProcess(root).start(timeout=60)
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def url(server: PostgresProcess) -> str:
    server.start(timeout=60)  # a test that failed half-way may have left it down
    return server.create_database("t_" + secrets.token_hex(6))


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    # A bare engine: what the driver raises, before `Database` retries it.
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    yield engine
    engine.dispose()


def _error(fn: Callable[[], object]) -> sqlalchemy.exc.DBAPIError:
    with pytest.raises(sqlalchemy.exc.DBAPIError) as caught:
        fn()
    return caught.value


def _select_1(conn: Connection) -> Callable[[], object]:
    return lambda: conn.exec_driver_sql("SELECT 1").scalar()


def _until_it_answers(engine: Engine) -> list[sqlalchemy.exc.DBAPIError]:
    """Connect as fast as the server answers until a connection succeeds: the distinct errors seen, in order."""
    seen: dict[str, sqlalchemy.exc.DBAPIError] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return list(seen.values())
        except sqlalchemy.exc.DBAPIError as err:
            seen.setdefault(describe_db_error(err), err)
    pytest.fail(f"the server did not answer within 60 s: {list(seen)}")


def _restart_and_collect(server: PostgresProcess, engine: Engine) -> list[sqlalchemy.exc.DBAPIError]:
    """Start the server in a thread and connect meanwhile: the errors seen until it answers."""
    starter = threading.Thread(target=server.start, kwargs={"timeout": 60})
    starter.start()
    try:
        return _until_it_answers(engine)
    finally:
        starter.join()


def _assert_waited(err: sqlalchemy.exc.DBAPIError, cause: str) -> None:
    assert _is_lost_connection(err), (cause, err)
    assert describe_db_error(err) == cause
    assert "\n" not in describe_db_error(err)


def test_a_server_that_stops_is_killed_or_restarts_is_waited_through(server: PostgresProcess, engine: Engine) -> None:
    # An operator's restart (a fast shutdown): the open connection is told why.
    conn = engine.connect()
    conn.exec_driver_sql("SELECT 1")
    conn.commit()
    server.stop()
    stopped = _error(_select_1(conn))
    conn.close()
    assert stopped.orig is not None
    assert stopped.orig.sqlstate == "57P01"  # type: ignore[attr-defined]
    _assert_waited(stopped, "terminating connection due to administrator command")
    # While it is down: refused.
    _assert_waited(_error(engine.connect), "Connection refused")
    server.start(timeout=60)

    # A crash: the server SIGKILLed with a transaction open.
    conn = engine.connect()
    conn.exec_driver_sql("SELECT 1")  # a transaction is open now
    server.kill()
    killed = _error(_select_1(conn))
    conn.close()
    assert _is_lost_connection(killed)
    assert describe_db_error(killed) in (
        "terminating connection due to unexpected postmaster exit",  # the backend saw its postmaster go first
        "consuming input failed: server closed the connection unexpectedly",  # or died without a word
    )
    # Its restart (crash recovery): refused, then "starting up" (57P03, which libpq reports at connect as text only),
    # then "not yet accepting connections"; each waited through.
    restarting = _restart_and_collect(server, engine)
    causes = [describe_db_error(err) for err in restarting]
    assert "the database system is starting up" in causes, causes
    for err in restarting:
        assert _is_lost_connection(err), err

    # One backend crashing: the server drops every connection and recovers.
    victim, bystander = engine.connect(), engine.connect()
    pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    victim.commit()
    bystander.exec_driver_sql("SELECT 1")
    bystander.commit()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    for conn in (victim, bystander):
        _assert_waited(_error(_select_1(conn)), "consuming input failed: server closed the connection unexpectedly")
        conn.close()
    # Meanwhile it recovers: "the database system is in recovery mode" (when a connection comes in time), waited.
    for err in _until_it_answers(engine):
        assert _is_lost_connection(err), err


def test_a_url_that_cannot_work_is_not_waited_on(server: PostgresProcess, url: str) -> None:
    good = sa.make_url(url)
    refused = {
        "wrong password": good.set(password="not-the-password"),
        "no such database": good.set(database="no_such_db"),
        "no such user": good.set(username="nobody"),  # PostgreSQL says "password authentication failed" for it too
    }
    expected = {
        "wrong password": 'wrong password: password authentication failed for user "visiontune"',
        "no such database": 'no such database: database "no_such_db" does not exist',
        "no such user": 'wrong password: password authentication failed for user "nobody"',
    }
    for name, bad in refused.items():
        engine = sa.create_engine(bad)
        try:
            err = _error(engine.connect)
        finally:
            engine.dispose()
        assert not _is_lost_connection(err), name
        assert describe_db_error(err) == expected[name]
        assert "not-the-password" not in describe_db_error(err)

    # Through `Database`, with a long window: refused at once, one line naming the host, no password.
    database = Database(
        refused["wrong password"].render_as_string(hide_password=False),
        policy=OutagePolicy(window_s=60),
        service="the job database",
        check=False,
    )
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseConfigError) as caught:
            database.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
    finally:
        database.close()
    assert time.monotonic() - started < 5
    assert str(caught.value) == (
        f"cannot use the job database at {good.host}:{good.port}/{good.database}: {expected['wrong password']}"
    )


def test_a_password_rotated_under_a_running_service_fails_at_once(server: PostgresProcess, url: str) -> None:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE ROLE app LOGIN PASSWORD 'first'")
        conn.exec_driver_sql(f'GRANT ALL ON DATABASE "{sa.make_url(url).database}" TO app')
    app_url = sa.make_url(url).set(username="app", password="first").render_as_string(hide_password=False)
    database = Database(app_url, policy=OutagePolicy(window_s=60), service="the job database")
    try:
        assert database.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar()) == 1
        with admin.connect() as conn:
            conn.exec_driver_sql("ALTER ROLE app PASSWORD 'second'")
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
        started = time.monotonic()
        with pytest.raises(DatabaseConfigError, match="wrong password: password authentication failed"):
            database.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
        assert time.monotonic() - started < 5  # the pool's new connection is refused: not an outage
    finally:
        database.close()
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP OWNED BY app")
            conn.exec_driver_sql("DROP ROLE app")
        admin.dispose()


class _Heard:
    def __init__(self) -> None:
        self.started: list[Outage] = []
        self.ended: list[float] = []

    def outage_started(self, outage: Outage) -> None:
        self.started.append(outage)

    def outage_ended(self, outage: Outage, waited_s: float) -> None:
        self.ended.append(waited_s)


def test_transactions_in_flight_when_the_server_is_killed_are_applied_whole_after_the_restart(
    server: PostgresProcess, url: str
) -> None:
    heard = _Heard()
    database = Database(url, policy=OutagePolicy(window_s=60), listener=heard, service="the job database")
    database.write(lambda conn: conn.exec_driver_sql("CREATE TABLE pairs (n int, side text, PRIMARY KEY (n, side))"))
    done = threading.Event()
    written: list[int] = []
    failures: list[BaseException] = []

    def pair(n: int) -> Callable[[Connection], None]:
        def run(conn: Connection) -> None:
            # Two rows with a pause between: a kill lands inside a transaction. ON CONFLICT: a commit the server made
            # but whose answer the kill swallowed is run again, and must not fail on its own rows.
            conn.exec_driver_sql(f"INSERT INTO pairs VALUES ({n}, 'a') ON CONFLICT DO NOTHING")
            conn.exec_driver_sql("SELECT pg_sleep(0.05)")
            conn.exec_driver_sql(f"INSERT INTO pairs VALUES ({n}, 'b') ON CONFLICT DO NOTHING")

        return run

    def writer() -> None:
        n = 0
        try:
            while not done.is_set():
                database.write(pair(n))
                written.append(n)
                n += 1
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            failures.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 5:
            time.sleep(0.05)
        server.kill()
        time.sleep(3)
        before_restart = len(written)
        server.start(timeout=60)
        deadline = time.monotonic() + 60
        while len(written) < before_restart + 5 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
    finally:
        done.set()
        thread.join(timeout=90)
    try:
        assert not failures, failures
        assert len(written) >= before_restart + 5  # it carried on after the restart
        rows = database.read(lambda conn: conn.exec_driver_sql("SELECT n, side FROM pairs ORDER BY n, side").all())
        # Every pair whole, none half-written, none lost, none twice.
        assert [tuple(r) for r in rows] == [(n, side) for n in written for side in ("a", "b")]
        assert len(heard.started) == 1
        assert len(heard.ended) == 1
        assert heard.started[0].service == "the job database"
        assert heard.ended[0] >= 3
    finally:
        database.close()


def test_on_sqlite_only_a_held_write_lock_is_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    database = Database(f"sqlite:///{path}", policy=OutagePolicy(window_s=60), sqlite_busy_timeout_s=0.1)
    try:
        database.write(lambda conn: conn.exec_driver_sql("CREATE TABLE t (n int)"))
        missing = _error(lambda: database.read(lambda conn: conn.exec_driver_sql("SELECT * FROM nope").all()))
        assert not _is_lost_connection(missing)
        assert describe_db_error(missing) == "no such table: nope"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's writer, stuck
        try:
            with database.engine.connect() as conn:
                conn.execution_options(vt_write=True)
                locked = _error(lambda: conn.exec_driver_sql("INSERT INTO t VALUES (1)"))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert _is_lost_connection(locked)
        assert describe_db_error(locked) == "database is locked"
    finally:
        database.close()
