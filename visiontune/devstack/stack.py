"""The local stack: an S3 server, optionally PostgreSQL, the trainer and the inference service as child processes
on loopback.

`up` starts them detached (they outlive the CLI), waits until each is healthy and records pids, ports,
credentials and log paths in `{data_dir}/stack/stack.json` (mode 0600). `status` and `down` read it.
Other CLI commands read it too, so `visiontune dataset push` talks to the stack with no flags.
One module because up, status and down share the state file and the component records; the pieces that stand
alone (ports, launch environment, the S3 and PostgreSQL processes) are modules of their own beside it.

The databases: SQLite files by default (the trainer's job store and the inference service's prediction store, one
replica each). `database="postgresql"` adds a private PostgreSQL cluster under `{data_dir}/postgres` (the
`python -m visiontune.devstack.postgres` wrapper, whose server dies with it) holding both stores in one database;
its password is kept in `{data_dir}/stack/postgres-password` (mode 0600) and reaches the services only through
their environment (VISIONTUNE_DATABASE_URL, VISIONTUNE_FEEDBACK_DATABASE_URL), never argv, the state file or the
output. The choice is remembered in `{data_dir}/stack/database`, so a later `up` uses the same database; a switch
is refused while the stack runs and, when it is down, said with what stays where.

Replicas: several trainers share the data directory (their job records are in PostgreSQL; worker logs are per
attempt) and each has a stable `--replica-id`, its component name, so a restarted stack resumes its own jobs at
once. Each further inference replica has a data directory of its own (its Triton's model repository is rebuilt at
start) under `{data_dir}/replicas/`. The first replica of each takes the given ports, the others free ones, all
recorded. Several replicas need PostgreSQL: they share the job database and the prediction store.

Security: none by default (loopback only). `security=StackSecurity(...)` (`visiontune up --tls-dir DIR
--auth-token-file FILE`) starts the trainers and inference replicas with mutual TLS and scoped tokens
(docs/security.md): the services present `server.pem`, require client certificates signed by `ca.pem`, and the
stack's own health checks present `client.pem`. The file paths (never a token) are kept in the state file.

The S3 component's pid is its wrapper (`python -m visiontune.devstack.s3server`); the real server (`weed`,
`minio`) dies with the wrapper, and `down` also stops any S3 server still running on the stack's data directory,
which `up` reports, with its pid, instead of failing on the server's lock. PostgreSQL's wrapper and server behave
the same way.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from visiontune.client import is_serving
from visiontune.devstack import postgres, s3server
from visiontune.devstack.launch import service_environment
from visiontune.devstack.ports import free_port, port_is_free
from visiontune.settings import (
    DATABASE_URL_ENV,
    DEFAULT_INFERENCE_PORT,
    DEFAULT_TRAINER_PORT,
    FEEDBACK_DATABASE_URL_ENV,
    S3Settings,
)
from visiontune.store import ArtifactStore, StoreError

HOST = "127.0.0.1"

DATABASES: Final = ("sqlite", "postgresql")
DEFAULT_DATABASE: Final = "sqlite"
DEFAULT_REPLICAS: Final = 1
DEFAULT_S3_PORT: Final = 9000
DEFAULT_METRICS_PORT: Final = 9464
DEFAULT_TRITON_PORTS: Final = (8001, 8000, 8002)  # gRPC, HTTP, metrics
TRITON_SHARED_MEMORY_MIN_BYTES: Final = 1 << 20  # batches from 1 MiB reach Triton through /dev/shm
DEFAULT_POSTGRES_PORT: Final = 5433  # not 5432: a machine's own PostgreSQL usually listens there
POSTGRES_DATABASE: Final = "visiontune"  # both stores' tables, apart by name (docs/architecture.md §6)
TRAINER: Final = "trainer"
INFERENCE: Final = "inference"
TRAINING_SERVICE: Final = "visiontune.v1.TrainingService"
INFERENCE_SERVICE: Final = "visiontune.v1.InferenceService"


class StackError(RuntimeError):
    """The stack could not be started, or is not running."""


@dataclass
class Component:
    name: str
    pid: int
    port: int
    log: str
    # What `ps` shows for it, to avoid signalling an unrelated process that reused the pid.
    marker: str
    grpc_service: str | None = None
    # Other endpoints it serves, by name (the inference service's metrics, its Triton's ports).
    endpoints: dict[str, str] = field(default_factory=dict)
    # What it is (s3, postgres, trainer, inference): replicas share a role and differ in name.
    role: str = ""

    def __post_init__(self) -> None:
        if not self.role:  # a state file from before replicas: the name was the role
            self.role = self.name

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass(frozen=True)
class Shape:
    """What a stack runs: its database and how many replicas of each service."""

    database: str = DEFAULT_DATABASE
    trainer_replicas: int = DEFAULT_REPLICAS
    inference_replicas: int = DEFAULT_REPLICAS

    def __str__(self) -> str:
        return (
            f"--database {self.database} --trainer-replicas {self.trainer_replicas} "
            f"--inference-replicas {self.inference_replicas}"
        )


@dataclass(frozen=True)
class StackSecurity:
    """Mutual TLS (and optionally a token file) for the stack's gRPC services. One CA signs the services'
    certificate and the clients': what a developer's stack needs, not a PKI."""

    ca: Path  # clients trust it for the services; the services require client certificates it signed
    cert: Path  # the services' certificate, valid for 127.0.0.1
    key: Path
    client_cert: Path  # what the stack presents for its own health checks
    client_key: Path
    token_file: Path | None = None  # VISIONTUNE_AUTH_TOKEN_FILE of the services; None: TLS only

    @classmethod
    def from_dir(cls, directory: Path, token_file: Path | None = None) -> StackSecurity:
        """ca.pem, server.pem, server.key, client.pem and client.key in `directory` (docs/security.md makes
        them with openssl); StackError naming a missing one."""
        files = {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise StackError(f"{directory}: missing {', '.join(missing)} (docs/security.md says how to make them)")
        if token_file is not None and not token_file.is_file():
            raise StackError(f"token file {token_file} does not exist")
        return cls(
            files["ca.pem"].resolve(),
            files["server.pem"].resolve(),
            files["server.key"].resolve(),
            files["client.pem"].resolve(),
            files["client.key"].resolve(),
            token_file.resolve() if token_file is not None else None,
        )

    def service_env(self) -> dict[str, str]:
        """The variables that turn a service's mutual TLS (and token file) on."""
        env = {
            "VISIONTUNE_TLS_CERT": str(self.cert),
            "VISIONTUNE_TLS_KEY": str(self.key),
            "VISIONTUNE_TLS_CLIENT_CA": str(self.ca),
        }
        if self.token_file is not None:
            env["VISIONTUNE_AUTH_TOKEN_FILE"] = str(self.token_file)
        return env

    def to_json(self) -> dict[str, str | None]:
        return {k: None if v is None else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: dict[str, str | None]) -> StackSecurity:
        token_file = raw.get("token_file")
        paths = {k: Path(v) for k, v in raw.items() if k != "token_file" and v is not None}
        return cls(**paths, token_file=Path(token_file) if token_file else None)


@dataclass
class StackState:
    data_dir: str
    s3: dict[str, object]
    components: list[Component] = field(default_factory=list)
    database: str = DEFAULT_DATABASE
    security: dict[str, str | None] | None = None  # StackSecurity.to_json(); None: plaintext, no tokens

    @property
    def stack_security(self) -> StackSecurity | None:
        return StackSecurity.from_json(self.security) if self.security is not None else None

    def serving(self, component: Component, timeout: float) -> bool:
        """Whether a gRPC component answers SERVING, over mutual TLS when the stack runs it."""
        assert component.grpc_service is not None
        sec = self.stack_security
        if sec is None:
            return is_serving(component.address, component.grpc_service, timeout)
        return is_serving(
            component.address,
            component.grpc_service,
            timeout,
            tls_ca=sec.ca,
            tls_client_cert=sec.client_cert,
            tls_client_key=sec.client_key,
        )

    @property
    def s3_settings(self) -> S3Settings:
        return S3Settings(**self.s3)  # type: ignore[arg-type]

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise StackError(f"no component {name!r} in the stack")

    def replicas(self, role: str) -> list[Component]:
        """The components of one role (every trainer, every inference replica), in start order."""
        found = [c for c in self.components if c.role == role]
        if not found:
            raise StackError(f"no {role} in the stack")
        return found

    @property
    def shape(self) -> Shape:
        return Shape(
            self.database,
            sum(c.role == TRAINER for c in self.components),
            sum(c.role == INFERENCE for c in self.components),
        )


def state_path(data_dir: Path) -> Path:
    return data_dir / "stack" / "stack.json"


def s3_data_dir(data_dir: Path) -> Path:
    return data_dir / "s3"


def postgres_data_dir(data_dir: Path) -> Path:
    return data_dir / "postgres"


def postgres_password_path(data_dir: Path) -> Path:
    """The stack's PostgreSQL superuser password (mode 0600): kept across `down`, as the cluster is."""
    return data_dir / "stack" / "postgres-password"


def database_choice_path(data_dir: Path) -> Path:
    """The database the stack last ran on; outlives `down`, so the next `up` uses the same one."""
    return data_dir / "stack" / "database"


def replica_data_dir(data_dir: Path, role: str, index: int) -> Path:
    """An inference replica's data directory: the stack's for the first, one under replicas/ for each other."""
    return data_dir if index == 1 else data_dir / "replicas" / f"{role}-{index}"


def replica_names(role: str, count: int) -> list[str]:
    """`trainer` for one replica (the name a one-replica stack always had), `trainer-1`, `trainer-2`, ... for more."""
    return [role] if count == 1 else [f"{role}-{i}" for i in range(1, count + 1)]


def remembered_database(data_dir: Path) -> str | None:
    try:
        choice = database_choice_path(data_dir).read_text().strip()
    except FileNotFoundError:
        return None
    return choice if choice in DATABASES else None


def plan_shape(
    database: str | None,
    trainer_replicas: int | None,
    inference_replicas: int | None,
    *,
    remembered: str | None,
) -> tuple[Shape, list[str]]:
    """The stack `up` starts from its arguments (None: not given) and the remembered database, with a line for each
    choice made for the user. StackError for a combination that cannot work."""
    trainers = DEFAULT_REPLICAS if trainer_replicas is None else trainer_replicas
    inferences = DEFAULT_REPLICAS if inference_replicas is None else inference_replicas
    counts = {"--trainer-replicas": trainers, "--inference-replicas": inferences}
    for flag, count in counts.items():
        if count < 1:
            raise StackError(f"{flag} must be at least 1, got {count}")
    if database is not None and database not in DATABASES:
        raise StackError(f"--database must be one of {', '.join(DATABASES)}, got {database!r}")
    several = [f"{flag} {count}" for flag, count in counts.items() if count > 1]
    notes = []
    if database == "sqlite" and several:
        raise StackError(
            f"{' and '.join(several)} needs --database postgresql: the replicas share the job database and the "
            "prediction store, and the stack shares them through PostgreSQL (SQLite is the one-replica default)"
        )
    if database is None and several:
        database = "postgresql"
        notes.append(
            f"{' and '.join(several)}: the replicas share the job database and the prediction store, so the stack "
            "runs them on PostgreSQL (--database postgresql)"
        )
    elif database is None:
        database = remembered or DEFAULT_DATABASE
        if remembered is not None and remembered != DEFAULT_DATABASE:
            notes.append(f"database: {remembered}, as the last `visiontune up` (--database sqlite switches)")
    return Shape(database, trainers, inferences), notes


def _database_data(data_dir: Path, database: str) -> Path | None:
    """Where `database`'s records of this stack are, when there are any."""
    if database == "postgresql":
        cluster = postgres_data_dir(data_dir) / postgres.CLUSTER_DIR
        return cluster if cluster.is_dir() else None
    jobs = data_dir / TRAINER / "jobs.sqlite3"  # the trainer's default under its data directory
    return jobs if jobs.is_file() else None


def switch_note(data_dir: Path, previous: str, chosen: str) -> str | None:
    """What happens to the records of the previous database when a stack that is down starts on another."""
    if previous == chosen:
        return None
    where = _database_data(data_dir, previous)
    if where is None:
        return None
    return (
        f"switching the stack's database from {previous} to {chosen}: the jobs, studies and feedback recorded in "
        f"{previous} ({where}) stay there, unused and not copied; `visiontune up --database {previous}` goes back "
        "to them. Datasets, models and deployments are in S3 and stay."
    )


def load_state(data_dir: Path) -> StackState | None:
    path = state_path(data_dir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return StackState(
        data_dir=raw["data_dir"],
        s3=raw["s3"],
        components=[Component(**c) for c in raw["components"]],
        database=raw.get("database", DEFAULT_DATABASE),
        security=raw.get("security"),
    )


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _save_state(state: StackState) -> None:
    # The file holds the S3 secret: readable by its owner only.
    _write_private(state_path(Path(state.data_dir)), json.dumps(asdict(state), indent=2))


def _check_port_free(port: int, what: str) -> None:
    if not port_is_free(HOST, port):
        raise StackError(f"port {port} for {what} is in use; choose another with flags (0 picks a free one)")


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(component: Component) -> bool:
    """Whether the component's process still runs (and is ours: its command line carries the marker)."""
    for _ in range(50):
        try:
            cmdline = Path(f"/proc/{component.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return False
        if cmdline:
            return component.marker in cmdline
        # An empty command line: a zombie, or a live process the kernel briefly cannot read (seen here
        # while a child starts up); only the first is dead.
        if _proc_state(component.pid) in (None, "Z", "X"):
            return False
        time.sleep(0.02)
    return True


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(
    name: str, args: list[str], *, log: Path, env: dict[str, str], marker: str, port: int, role: str = ""
) -> tuple[Component, subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: the children outlive `visiontune up` and do not get the terminal's Ctrl-C.
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return Component(name=name, pid=proc.pid, port=port, log=str(log), marker=marker, role=role), proc


def _wait_until(ready: Callable[[], bool], component: Component, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(component.log)
            raise StackError(f"{component.name} exited during start-up; log {component.log}:\n{tail}")
        if ready():
            return
        time.sleep(0.3)
    tail = _log_tail(component.log)
    raise StackError(f"{component.name} not ready after {timeout:.0f}s; log {component.log}:\n{tail}")


def _postgres_password(data_dir: Path) -> str | None:
    try:
        return postgres_password_path(data_dir).read_text().strip()
    except FileNotFoundError:
        return None


def database_url(data_dir: Path, port: int) -> str:
    """The URL (with the password) the stack's services get for its PostgreSQL; never shown."""
    password = _postgres_password(data_dir)
    if password is None:
        raise StackError(f"the stack's PostgreSQL password file {postgres_password_path(data_dir)} is missing")
    return postgres.url_for(HOST, port, password, POSTGRES_DATABASE)


def _postgres_ready(data_dir: Path, port: int, timeout: float = 2.0) -> bool:
    password = _postgres_password(data_dir)
    return password is not None and postgres.accepts(HOST, port, password, POSTGRES_DATABASE, timeout)


def shape_conflict(running: Shape, database: str | None, trainers: int | None, inferences: int | None) -> str:
    """The flags of `up` that ask for another stack than the running one ("" when none does)."""
    asked = {"--database": database, "--trainer-replicas": trainers, "--inference-replicas": inferences}
    has = {
        "--database": running.database,
        "--trainer-replicas": running.trainer_replicas,
        "--inference-replicas": running.inference_replicas,
    }
    return " ".join(f"{flag} {value}" for flag, value in asked.items() if value is not None and value != has[flag])


def up(
    data_dir: Path,
    *,
    s3_port: int = DEFAULT_S3_PORT,
    trainer_port: int = DEFAULT_TRAINER_PORT,
    inference_port: int = DEFAULT_INFERENCE_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    triton_ports: tuple[int, int, int] = DEFAULT_TRITON_PORTS,
    postgres_port: int = DEFAULT_POSTGRES_PORT,
    database: str | None = None,
    trainer_replicas: int | None = None,
    inference_replicas: int | None = None,
    job_slots: int = 0,
    security: StackSecurity | None = None,
    timeout: float = 90.0,
    echo: Callable[[str], None] = print,
) -> StackState:
    """Start the stack, or return the running one. A port of 0 picks a free one.

    `metrics_port` is the inference service's Prometheus endpoint, `triton_ports` its Triton's gRPC,
    HTTP and metrics ports (the first inference replica's; others get free ports, as do further trainers);
    `job_slots` each trainer's jobs at once (0: one per GPU, or 1 on a CPU). `database` (None: the one the stack
    last ran on, else sqlite; postgresql when several replicas are asked for) and the replica counts (None: 1, or
    the running stack's) are checked by `plan_shape`. `security` runs the gRPC services with mutual TLS and its
    token file (None: plaintext on loopback, no tokens)."""
    data_dir = data_dir.resolve()
    existing = load_state(data_dir)
    if existing and all(is_alive(c) for c in existing.components):
        differs = shape_conflict(existing.shape, database, trainer_replicas, inference_replicas)
        if differs:
            raise StackError(
                f"the stack is running with {existing.shape}; stop it with `visiontune down` before starting it "
                f"with {differs}"
            )
        echo("the stack is already running")
        return existing
    remembered = remembered_database(data_dir)
    shape, notes = plan_shape(database, trainer_replicas, inference_replicas, remembered=remembered)
    if existing:
        down(data_dir, echo=echo)
    # Before the ports: a server left running would hold the S3 port too, and its lock is the real problem.
    leftovers = s3server.servers_using(s3_data_dir(data_dir))
    if leftovers:
        pid, name = leftovers[0]
        raise StackError(
            f"{s3server.DataDirLocked(s3_data_dir(data_dir), pid, name)}, left from an earlier stack: stop it with "
            f"`kill {pid}` or `visiontune down`"
        )
    left_postgres = postgres.postmaster_pid(postgres_data_dir(data_dir))
    if shape.database == "postgresql" and left_postgres is not None:
        raise StackError(
            f"a PostgreSQL server (pid {left_postgres}) left from an earlier stack still runs on "
            f"{postgres_data_dir(data_dir)}: stop it with `kill -INT {left_postgres}` or `visiontune down`"
        )
    for line in notes:
        echo(line)
    switched = switch_note(data_dir, remembered or DEFAULT_DATABASE, shape.database)
    if switched:
        echo(switched)

    wanted = {
        "s3": s3_port,
        "trainer": trainer_port,
        "inference": inference_port,
        "metrics": metrics_port,
        "triton gRPC": triton_ports[0],
        "triton HTTP": triton_ports[1],
        "triton metrics": triton_ports[2],
    }
    if shape.database == "postgresql":
        wanted["postgres"] = postgres_port
    ports: dict[str, int] = {}
    for what, port in wanted.items():
        ports[what] = port or free_port(HOST, exclude=set(ports.values()))
    for what, port in ports.items():
        _check_port_free(port, what)
    taken = set(ports.values())

    def replica_port(what: str, index: int) -> int:
        """The first replica's port as chosen above; a free one for each other."""
        port = ports[what] if index == 1 else free_port(HOST, exclude=taken)
        taken.add(port)
        return port

    s3 = S3Settings(
        endpoint=f"{HOST}:{ports['s3']}",
        access_key="vt-" + secrets.token_hex(6),
        secret_key=secrets.token_urlsafe(24),
        bucket="visiontune",
    )
    state = StackState(
        data_dir=str(data_dir),
        s3=asdict(s3),
        database=shape.database,
        security=security.to_json() if security is not None else None,
    )
    logs = data_dir / "stack" / "logs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    try:
        _write_private(database_choice_path(data_dir), shape.database + "\n")
        s3_comp, s3_proc = _spawn(
            "s3",
            [
                py,
                "-m",
                "visiontune.devstack.s3server",
                "--data-dir",
                str(s3_data_dir(data_dir)),
                "--host",
                HOST,
                "--port",
                str(ports["s3"]),
            ],
            log=logs / "s3.log",
            # The keys in its environment (VISIONTUNE_S3_*), not argv: every user on the machine reads argv in `ps`.
            env={**env, **s3.to_env()},
            marker="visiontune.devstack.s3server",
            port=ports["s3"],
        )
        state.components.append(s3_comp)
        _save_state(state)
        echo(f"starting S3 server on {s3.url} ...")
        store = ArtifactStore.connect(s3)

        def s3_ready() -> bool:
            try:
                store.ensure_bucket()
                store.check()
            except StoreError:
                return False
            return True

        _wait_until(s3_ready, s3_comp, s3_proc, timeout)

        url = _start_postgres(state, ports["postgres"], logs, env, timeout, echo) if "postgres" in ports else None

        trainers: list[tuple[Component, subprocess.Popen[bytes]]] = []
        trainer_env = _service_env(s3, data_dir, DATABASE_URL_ENV, url, security)
        for index, name in enumerate(replica_names(TRAINER, shape.trainer_replicas), start=1):
            port = replica_port("trainer", index)
            args = ["--port", str(port), "--job-slots", str(job_slots), "--replica-id", name]
            trainers.append(_start_service(state, name, TRAINER, "trainer_service", args, port, logs, trainer_env))
            echo(f"starting {name} on {HOST}:{port} ...")
        _wait_serving(state, trainers, timeout)

        inferences: list[tuple[Component, subprocess.Popen[bytes]]] = []
        for index, name in enumerate(replica_names(INFERENCE, shape.inference_replicas), start=1):
            port, metrics, t_grpc, t_http, t_metrics = (
                replica_port(what, index)
                for what in ("inference", "metrics", "triton gRPC", "triton HTTP", "triton metrics")
            )
            replica_env = _service_env(
                s3, replica_data_dir(data_dir, INFERENCE, index), FEEDBACK_DATABASE_URL_ENV, url, security
            )
            args = [
                "--port",
                str(port),
                "--metrics-port",
                str(metrics),
                "--triton-grpc-port",
                str(t_grpc),
                "--triton-http-port",
                str(t_http),
                "--triton-metrics-port",
                str(t_metrics),
                # Each replica's Triton is its own child on this machine, mapping the same /dev/shm: batches of
                # 1 MiB or more (about 7 uint8 images at 224 px) skip the copies through gRPC.
                "--triton-shared-memory-min-bytes",
                str(TRITON_SHARED_MEMORY_MIN_BYTES),
            ]
            started = _start_service(state, name, INFERENCE, "inference_service", args, port, logs, replica_env)
            started[0].endpoints = {
                "metrics": f"http://{HOST}:{metrics}/metrics",
                "triton gRPC": f"{HOST}:{t_grpc}",
                "triton HTTP": f"http://{HOST}:{t_http}",
                "triton metrics": f"http://{HOST}:{t_metrics}/metrics",
            }
            _save_state(state)
            inferences.append(started)
            echo(f"starting {name} on {HOST}:{port} ...")
        _wait_serving(state, inferences, timeout)
    except BaseException:
        down(data_dir, echo=lambda _msg: None)
        raise
    return state


# What the caller's shell may export that would change the services' security behind the stack's back.
_SECURITY_ENV = (
    "VISIONTUNE_TLS_CERT",
    "VISIONTUNE_TLS_KEY",
    "VISIONTUNE_TLS_CLIENT_CA",
    "VISIONTUNE_AUTH_TOKEN",
    "VISIONTUNE_AUTH_TOKEN_FILE",
)


def _service_env(
    s3: S3Settings, data_dir: Path, url_env: str, url: str | None, security: StackSecurity | None = None
) -> dict[str, str]:
    """A service's environment: S3, its data directory, the stack's database in `url_env` when it runs
    PostgreSQL, and `security`'s TLS files and token file. Database URLs and TLS or token settings the caller's
    shell exports are dropped: the stack's choice is what its services use."""
    env = {**service_environment(s3, data_dir), "PYTHONUNBUFFERED": "1", "VISIONTUNE_HOST": HOST}
    for name in (DATABASE_URL_ENV, FEEDBACK_DATABASE_URL_ENV, *_SECURITY_ENV):
        env.pop(name, None)
    if url is not None:
        env[url_env] = url
    if security is not None:
        env.update(security.service_env())
    return env


def _start_postgres(
    state: StackState, port: int, logs: Path, env: dict[str, str], timeout: float, echo: Callable[[str], None]
) -> str:
    """Start the stack's PostgreSQL (initdb and the database on first use); its URL, for the services' environment."""
    data_dir = Path(state.data_dir)
    comp, proc = _spawn(
        "postgres",
        [
            sys.executable,
            "-m",
            "visiontune.devstack.postgres",
            "--data-dir",
            str(postgres_data_dir(data_dir)),
            "--host",
            HOST,
            "--port",
            str(port),
            "--database",
            POSTGRES_DATABASE,
            "--password-file",
            str(postgres_password_path(data_dir)),
        ],
        log=logs / "postgres.log",
        env=env,
        marker="visiontune.devstack.postgres",
        port=port,
    )
    comp.endpoints = {
        # Without the password: state and status show where it is, not what it is.
        "database": f"postgresql://{postgres.SUPERUSER}@{HOST}:{port}/{POSTGRES_DATABASE}",
        "password file": str(postgres_password_path(data_dir)),
    }
    state.components.append(comp)
    _save_state(state)
    fresh = _database_data(data_dir, "postgresql") is None
    echo(f"starting PostgreSQL on {HOST}:{port} ...{' (a new cluster: initdb)' if fresh else ''}")
    # Ready means the database exists and the password works, not only that the port answers.
    _wait_until(functools.partial(_postgres_ready, data_dir, port), comp, proc, timeout)
    return database_url(data_dir, port)


def _start_service(
    state: StackState,
    name: str,
    role: str,
    module: str,
    args: list[str],
    port: int,
    logs: Path,
    env: dict[str, str],
) -> tuple[Component, subprocess.Popen[bytes]]:
    comp, proc = _spawn(
        name, [sys.executable, "-m", module, *args], log=logs / f"{name}.log", env=env, marker=module, port=port
    )
    comp.role = role
    comp.grpc_service = TRAINING_SERVICE if role == TRAINER else INFERENCE_SERVICE
    state.components.append(comp)
    _save_state(state)
    return comp, proc


def _wait_serving(
    state: StackState, started: Sequence[tuple[Component, subprocess.Popen[bytes]]], timeout: float
) -> None:
    """Replicas start together (each waits on its own imports and Triton); wait for every one to serve."""
    for comp, proc in started:
        _wait_until(functools.partial(state.serving, comp, 1.0), comp, proc, timeout)


def stop_components(components: Sequence[Component], grace: float = 15.0, sig: int = signal.SIGTERM) -> list[Component]:
    """`sig` to each running one at once, wait for their graceful exits, then SIGKILL. The ones that were running."""
    running = [c for c in components if is_alive(c)]
    for comp in running:
        os.kill(comp.pid, sig)
    pending = list(running)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        pending = [c for c in pending if is_alive(c) and not _reap(c.pid)]
        if pending:
            time.sleep(0.1)
    for comp in pending:
        os.kill(comp.pid, signal.SIGKILL)
    return running


def stop_component(component: Component, grace: float = 15.0) -> bool:
    """SIGTERM, wait for a graceful exit, then SIGKILL. True if it was running."""
    return bool(stop_components([component], grace))


def _reap(pid: int) -> bool:
    # A zombie child of this very process still has a cmdline-less /proc entry; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _by_role(components: Sequence[Component]) -> list[list[Component]]:
    """Consecutive components of one role, grouped (the replicas of a service stop together)."""
    groups: list[list[Component]] = []
    for comp in components:
        if groups and groups[-1][0].role == comp.role:
            groups[-1].append(comp)
        else:
            groups.append([comp])
    return groups


def down(data_dir: Path, *, echo: Callable[[str], None] = print) -> bool:
    """Stop every component (inference replicas, trainers, PostgreSQL, S3: the reverse of the start), then any S3
    or PostgreSQL server still on the data directory. False if there was neither a recorded stack nor such a
    server."""
    data_dir = data_dir.resolve()
    state = load_state(data_dir)
    if state is not None:
        for group in _by_role(list(reversed(state.components))):
            for comp in stop_components(group):
                echo(f"stopped {comp.name} (pid {comp.pid})")
    # The server of a wrapper killed with -9 stops by itself, but may still be shutting down; one of an earlier
    # stack whose record is gone would run on and hold the data directory's lock.
    root = s3_data_dir(data_dir)
    leftovers = s3server.servers_using(root)
    for pid, name in leftovers:
        if stop_component(Component(name=name, pid=pid, port=0, log="", marker=str(root))):
            echo(f"stopped the S3 server {name} (pid {pid}) left on {root}")
    cluster = postgres_data_dir(data_dir) / postgres.CLUSTER_DIR
    left_postgres = postgres.postmaster_pid(postgres_data_dir(data_dir))
    if left_postgres is not None:
        # SIGINT: PostgreSQL's fast shutdown (SIGTERM would wait for every client to leave).
        leftover = Component(name="postgres", pid=left_postgres, port=0, log="", marker=str(cluster))
        if stop_components([leftover], sig=signal.SIGINT):
            echo(f"stopped the PostgreSQL server (pid {left_postgres}) left on {cluster}")
    if state is not None:
        state_path(data_dir).unlink(missing_ok=True)
    return state is not None or bool(leftovers) or left_postgres is not None


@dataclass
class ComponentStatus:
    name: str
    endpoint: str
    running: bool
    healthy: bool
    log: str


def status(data_dir: Path) -> tuple[StackState, list[ComponentStatus]]:
    data_dir = data_dir.resolve()
    state = load_state(data_dir)
    if state is None:
        raise StackError(f"no stack recorded under {data_dir}; start one with `visiontune up`")
    rows = []
    for comp in state.components:
        running = is_alive(comp)
        healthy = False
        if running and comp.grpc_service:
            healthy = state.serving(comp, timeout=2.0)
        elif running and comp.role == "postgres":
            healthy = _postgres_ready(data_dir, comp.port)
        elif running:
            try:
                ArtifactStore.connect(state.s3_settings).check()
                healthy = True
            except StoreError:
                healthy = False
        rows.append(ComponentStatus(comp.name, comp.address, running, healthy, comp.log))
    return state, rows
