"""A real local PostgreSQL server process for the local stack (`visiontune up --database postgresql`) and the tests.

Debian's `postgresql` package ships initdb, pg_ctl and postgres under /usr/lib/postgresql/<version>/bin; this
runs a private cluster from them: initdb into the data directory (password authentication, a generated
superuser password), the server on a loopback port with its Unix socket inside the data directory, so it
never touches the machine's own cluster or /var/run/postgresql. PostgreSQL refuses to run as root: when this
process is root, the server runs as the `postgres` system user the package creates, which owns the directory.

    python -m visiontune.devstack.postgres --data-dir D --port P

runs one in the foreground until SIGTERM/SIGINT and prints its URL.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final

from visiontune.devstack.ports import free_port, port_is_free

__all__ = ["PostgresError", "PostgresProcess", "find_bin_dir"]

BIN_ENV: Final = "VISIONTUNE_POSTGRES_BIN"
_DEBIAN_ROOT: Final = Path("/usr/lib/postgresql")
_SYSTEM_USER: Final = "postgres"
_SUPERUSER: Final = "visiontune"
_PASSWORD_FILE: Final = "visiontune-password"
_LOG_TAIL_BYTES: Final = 4000


class PostgresError(RuntimeError):
    """The PostgreSQL binaries are missing, or the server did not start or died."""


def find_bin_dir() -> Path:
    """`$VISIONTUNE_POSTGRES_BIN`, else the newest /usr/lib/postgresql/<version>/bin, else where `pg_ctl` is on PATH."""
    configured = os.environ.get(BIN_ENV)
    candidates = [Path(configured)] if configured else []
    if _DEBIAN_ROOT.is_dir():
        versions = sorted(
            (p for p in _DEBIAN_ROOT.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True
        )
        candidates += [v / "bin" for v in versions]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise PostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install Debian's 'postgresql' package "
        f"(apt-get install postgresql) or set {BIN_ENV} to the directory that holds them"
    )


# Servers still running when the interpreter exits are stopped, so a crashed test run leaves no strays.
_live: weakref.WeakSet[PostgresProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.kill()


class PostgresProcess:
    """One private PostgreSQL cluster on loopback; `with PostgresProcess(dir) as pg:` starts and stops it.

    The data directory is kept: starting again on the same directory reuses the cluster and its password
    (what `visiontune up` does across restarts, and what the outage tests do after a kill).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        bin_dir: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.root = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        self.log_path = Path(log_path) if log_path is not None else self.root / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- properties -------------------------------------------------------------------------------------

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def user(self) -> str:
        return _SUPERUSER

    @property
    def password(self) -> str:
        return (self.root / _PASSWORD_FILE).read_text().strip()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver) for `database` on this server, with the superuser's password."""
        return f"postgresql+psycopg://{_SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostgresProcess:
        """initdb on first use, then start the server and return once it accepts connections."""
        with self._lock:
            if self.running:
                return self
            if not port_is_free(self.host, self.port):
                raise PostgresError(f"cannot start PostgreSQL: {self.host}:{self.port} is already in use")
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.cluster_dir / "PG_VERSION").is_file():
                self._initdb()
            self._remove_stale_pid_file()
            self.socket_dir.mkdir(exist_ok=True)
            self._chown(self.socket_dir)
            uid, gid = self._owner()
            with open(self.log_path, "ab") as log:
                log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting on {self.host}:{self.port}\n".encode())
                log.flush()
                # `postgres` itself, not `pg_ctl start`: the pid we hold is the server's, so stop/kill reach it.
                self._proc = subprocess.Popen(
                    [
                        str(self.bin_dir / "postgres"),
                        "-D",
                        str(self.cluster_dir),
                        "-h",
                        self.host,
                        "-p",
                        str(self.port),
                        "-k",
                        str(self.socket_dir),
                        # Small and quick: a test server, not a tuned one; fsync stays on (no data lost).
                        "-c",
                        "shared_buffers=32MB",
                        "-c",
                        "max_connections=200",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    user=uid,
                    group=gid,
                )
            _live.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT: roll back open transactions, checkpoint), SIGKILL after `timeout`. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL to the postmaster and its children, no shutdown: what a crash or a node loss does."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # The whole process group: backends left behind would keep the shared memory and the port.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _live.discard(self)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a plain identifier) and return its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and underscores only")
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"PostgresProcess({self.host}:{self.port}, {state}, data_dir={str(self.root)!r})"

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - max_bytes))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    # -- internals --------------------------------------------------------------------------------------

    def _owner(self) -> tuple[int | None, int | None]:
        """The (uid, gid) to run a child as: `postgres` when we are root (PostgreSQL refuses root), else ours."""
        if os.geteuid() != 0:
            return None, None
        try:
            entry = pwd.getpwnam(_SYSTEM_USER)
        except KeyError as err:
            raise PostgresError(
                f"PostgreSQL cannot run as root and there is no {_SYSTEM_USER!r} user; install Debian's "
                "'postgresql' package (it creates one) or run as an ordinary user"
            ) from err
        return entry.pw_uid, entry.pw_gid

    def _chown(self, path: Path) -> None:
        uid, gid = self._owner()
        if uid is not None and gid is not None:
            os.chown(path, uid, gid)

    def _initdb(self) -> None:
        uid, gid = self._owner()
        password = secrets.token_urlsafe(18)
        password_file = self.root / _PASSWORD_FILE
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        self._chown(self.root)
        self._chown(password_file)
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.cluster_dir),
                "-U",
                _SUPERUSER,
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a fresh, empty cluster: nothing to lose if the machine dies now
            ],
            capture_output=True,
            text=True,
            cwd="/",
            user=uid,
            group=gid,
        )
        if result.returncode != 0:
            raise PostgresError(f"initdb failed (exit {result.returncode}): {result.stderr.strip() or result.stdout}")

    def _remove_stale_pid_file(self) -> None:
        """After a SIGKILL the postmaster.pid stays; PostgreSQL itself checks whether its pid is alive, but a
        recycled pid would block the start, so a pid file whose process is not a postgres is removed."""
        pid_file = self.cluster_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"postgres" not in cmdline:
            pid_file.unlink(missing_ok=True)
        else:
            raise PostgresError(f"{self.cluster_dir} is in use by a running PostgreSQL (pid {pid}); stop it first")

    def _psql(self, sql: str) -> str:
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                _SUPERUSER,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"},
        )
        if result.returncode != 0:
            raise PostgresError(f"psql {sql!r} failed: {result.stderr.strip()}")
        return result.stdout

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else None
                raise PostgresError(
                    f"PostgreSQL exited with code {code} during start-up; log {self.log_path}:\n{self.log_tail()}"
                )
            check = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "1"],
                capture_output=True,
                text=True,
            )
            if check.returncode == 0:
                return
            last = check.stdout.strip() or check.stderr.strip()
            if time.monotonic() >= deadline:
                raise PostgresError(
                    f"PostgreSQL at {self.host}:{self.port} was not ready after {timeout:.0f} s ({last}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)


# -- CLI --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visiontune.devstack.postgres", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="where the cluster keeps its state")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5432, help="port (default: 5432)")
    parser.add_argument("--database", default="visiontune", help="a database to create on first start")
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = PostgresProcess(args.data_dir, host=args.host, port=args.port)
        fresh = not (server.cluster_dir / "PG_VERSION").is_file()
        server.start()
        if fresh:
            server.create_database(args.database)
    except (PostgresError, ValueError) as err:
        print(f"postgres: {err}", file=sys.stderr)
        return 1
    print(f"postgres: ready at {server.host}:{server.port} (pid {server.pid}, data {server.root})", flush=True)
    while not stop_requested.wait(0.5):
        if not server.running:
            print(f"postgres: the server exited; log tail:\n{server.log_tail()}", file=sys.stderr)
            return 1
    server.stop()
    print("postgres: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
