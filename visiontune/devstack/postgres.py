"""A real local PostgreSQL server process for the local stack (`visiontune up --database postgresql`) and the tests.

Debian's `postgresql` package ships initdb, pg_ctl and postgres under /usr/lib/postgresql/<version>/bin; this
runs a private cluster from them: initdb into the data directory (password authentication, a generated
superuser password), the server on a loopback port with its Unix socket inside the data directory, so it
never touches the machine's own cluster or /var/run/postgresql. PostgreSQL refuses to run as root: when this
process is root, the server runs as the `postgres` system user the package creates, which owns the directory
(and must be able to enter every directory above it).

    python -m visiontune.devstack.postgres --data-dir D --port P [--database NAME] [--password-file F]

runs one in the foreground until SIGTERM/SIGINT, creating the database when it is missing; its server dies with it,
a kill -9 included (PR_SET_PDEATHSIG), as the local stack's S3 server does. The password is never printed: it is
in the password file (mode 0600), which `visiontune up` keeps in the stack's state directory.
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
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final
from urllib.parse import quote

import psycopg

from visiontune.devstack.lifetime import die_with_parent, log_tail
from visiontune.devstack.ports import free_port, port_is_free

__all__ = ["SUPERUSER", "PostgresError", "PostgresProcess", "accepts", "find_bin_dir", "postmaster_pid", "url_for"]

BIN_ENV: Final = "VISIONTUNE_POSTGRES_BIN"
_DEBIAN_ROOT: Final = Path("/usr/lib/postgresql")
_SYSTEM_USER: Final = "postgres"
SUPERUSER: Final = "visiontune"
_PASSWORD_FILE: Final = "visiontune-password"  # under the data directory, unless a password file is given
CLUSTER_DIR: Final = "cluster"
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


def url_for(host: str, port: int, password: str, database: str) -> str:
    """A SQLAlchemy URL (psycopg 3 driver) for `database` as the cluster's superuser."""
    return f"postgresql+psycopg://{SUPERUSER}:{quote(password, safe='')}@{host}:{port}/{database}"


def accepts(host: str, port: int, password: str, database: str, timeout: float = 2.0) -> bool:
    """Whether the server logs `SUPERUSER` into `database` within `timeout`: up, the database made, the password
    right (what a store needs, unlike pg_isready's "accepting connections")."""
    try:
        with psycopg.connect(
            host=host,
            port=port,
            user=SUPERUSER,
            password=password,
            dbname=database,
            connect_timeout=max(1, round(timeout)),
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of a PostgreSQL server still running on the cluster under `data_dir` (its postmaster.pid names a
    live process whose command line names the cluster), or None. Also finds one whose wrapper is gone."""
    cluster = Path(data_dir).resolve() / CLUSTER_DIR
    try:
        pid = int((cluster / "postmaster.pid").read_text().splitlines()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(cluster).encode() in cmdline else None


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

    `password_file` is where the superuser's password is kept (mode 0600, owned by this process's user), by
    default inside the data directory; one that exists before the first start is used, else one is generated.
    `die_with_parent`: the server gets SIGINT (a fast shutdown) when the thread that starts it ends, so start it
    from a thread that lives as long as the process.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        bin_dir: Path | None = None,
        log_path: Path | None = None,
        password_file: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.root = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        self.log_path = Path(log_path) if log_path is not None else self.root / "postgres.log"
        self.password_file = Path(password_file).resolve() if password_file is not None else self.root / _PASSWORD_FILE
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- properties -------------------------------------------------------------------------------------

    @property
    def cluster_dir(self) -> Path:
        return self.root / CLUSTER_DIR

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver) for `database` on this server, with the superuser's password."""
        return url_for(self.host, self.port, self.password, database)

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostgresProcess:
        """initdb on first use, then start the server and return once it accepts connections."""
        with self._lock:
            if self.running:
                return self
            if not port_is_free(self.host, self.port):
                raise PostgresError(f"cannot start PostgreSQL: {self.host}:{self.port} is already in use")
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_reachable()
            if not (self.cluster_dir / "PG_VERSION").is_file():
                self._initdb()
            elif not self.password_file.is_file():
                raise PostgresError(
                    f"the cluster in {self.cluster_dir} exists but its password file {self.password_file} is gone, "
                    f"so nobody can log in: restore the file, or remove {self.root} to start afresh (its data is lost)"
                )
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
                    preexec_fn=die_with_parent(os.getpid(), signal.SIGINT) if self.die_with_parent else None,
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
        _check_identifier(name)
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def ensure_database(self, name: str) -> bool:
        """CREATE DATABASE `name` unless it exists; True if it was created."""
        _check_identifier(name)
        if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            return False
        self._psql(f'CREATE DATABASE "{name}"')
        return True

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
        return log_tail(self.log_path, max_bytes)

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

    def _check_reachable(self) -> None:
        """As root the server runs as `postgres`, which must enter every directory above the data directory; say so
        here rather than let initdb fail with "Permission denied" on a path (pytest's 0700 temp root, a home)."""
        uid, gid = self._owner()
        if uid is None or gid is None:
            return
        groups = set(os.getgrouplist(_SYSTEM_USER, gid))
        for parent in reversed(self.root.parents):
            info = parent.stat()
            bit = stat.S_IXUSR if info.st_uid == uid else stat.S_IXGRP if info.st_gid in groups else stat.S_IXOTH
            if not info.st_mode & bit:
                raise PostgresError(
                    f"PostgreSQL runs as the {_SYSTEM_USER!r} user here (this process is root), and that user cannot "
                    f"enter {parent} (mode {stat.S_IMODE(info.st_mode):o}): choose a data directory it can reach, "
                    f"or `chmod o+x {parent}`"
                )

    def _initdb(self) -> None:
        uid, gid = self._owner()
        if self.password_file.is_file():
            password = self.password  # clients already have it: a fresh cluster keeps it
        else:
            password = secrets.token_urlsafe(18)
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            _write_private(self.password_file, password)
        self._chown(self.root)
        # initdb reads the password from a file its own user can read: a copy inside the data directory, removed
        # once the cluster exists (the kept file stays this process's user's, mode 0600).
        password_file = self.root / ".initdb-password"
        _write_private(password_file, password)
        self._chown(password_file)
        try:
            self._run_initdb(password_file, uid, gid)
        finally:
            password_file.unlink(missing_ok=True)

    def _run_initdb(self, password_file: Path, uid: int | None, gid: int | None) -> None:
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.cluster_dir),
                "-U",
                SUPERUSER,
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
                SUPERUSER,
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


def _check_identifier(name: str) -> None:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r}: letters, digits and underscores only")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file readable by its owner only, from the first byte (no window with the umask's mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    path.chmod(0o600)  # an existing file keeps its mode through O_CREAT


# -- CLI --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visiontune.devstack.postgres", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="where the cluster keeps its state")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5432, help="port (default: 5432)")
    parser.add_argument("--database", default="visiontune", help="a database to create when it is missing")
    parser.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help=f"the superuser's password (mode 0600; made on first start; default: DATA_DIR/{_PASSWORD_FILE})",
    )
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = PostgresProcess(
        args.data_dir, host=args.host, port=args.port, password_file=args.password_file, die_with_parent=True
    )
    try:
        server.start()
        if server.ensure_database(args.database):
            print(f"postgres: created the database {args.database}", flush=True)
    except (PostgresError, ValueError) as err:
        server.stop()
        print(f"postgres: {err}", file=sys.stderr)
        return 1
    print(
        f"postgres: ready at {server.host}:{server.port}/{args.database} as {SUPERUSER} (pid {server.pid}, data "
        f"{server.root}, password in {server.password_file})",
        flush=True,
    )
    while not stop_requested.wait(0.5):
        if not server.running:
            print(f"postgres: the server exited; log tail:\n{server.log_tail()}", file=sys.stderr)
            return 1
    server.stop()
    print("postgres: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
