"""The local stack: an S3 server, the trainer and the inference service as child processes on loopback.

`up` starts them detached (they outlive the CLI), waits until each is healthy and records pids, ports,
credentials and log paths in `{data_dir}/stack/stack.json` (mode 0600). `status` and `down` read it.
Other CLI commands read it too, so `visiontune dataset push` talks to the stack with no flags.

The S3 component's pid is its wrapper (`python -m visiontune.devstack.s3server`); the real server (`weed`,
`minio`) dies with the wrapper, and `down` also stops any S3 server still running on the stack's data directory,
which `up` reports, with its pid, instead of failing on the server's lock.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from visiontune.client import is_serving
from visiontune.devstack import s3server
from visiontune.devstack.launch import service_environment
from visiontune.devstack.ports import free_port, port_is_free
from visiontune.settings import S3Settings
from visiontune.store import ArtifactStore, StoreError

HOST = "127.0.0.1"


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


@dataclass
class StackState:
    data_dir: str
    s3: dict[str, object]
    components: list[Component] = field(default_factory=list)

    @property
    def s3_settings(self) -> S3Settings:
        return S3Settings(**self.s3)  # type: ignore[arg-type]

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise StackError(f"no component {name!r} in the stack")


def state_path(data_dir: Path) -> Path:
    return data_dir / "stack" / "stack.json"


def s3_data_dir(data_dir: Path) -> Path:
    return data_dir / "s3"


def load_state(data_dir: Path) -> StackState | None:
    path = state_path(data_dir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return StackState(data_dir=raw["data_dir"], s3=raw["s3"], components=[Component(**c) for c in raw["components"]])


def _save_state(state: StackState) -> None:
    path = state_path(Path(state.data_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # The file holds the S3 secret: readable by its owner only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=2)
    tmp.replace(path)


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
    name: str, args: list[str], *, log: Path, env: dict[str, str], marker: str, port: int
) -> tuple[Component, subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: the children outlive `visiontune up` and do not get the terminal's Ctrl-C.
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return Component(name=name, pid=proc.pid, port=port, log=str(log), marker=marker), proc


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


def up(
    data_dir: Path,
    *,
    s3_port: int = 9000,
    trainer_port: int = 50051,
    inference_port: int = 50052,
    metrics_port: int = 9464,
    triton_ports: tuple[int, int, int] = (8001, 8000, 8002),
    job_slots: int = 0,
    timeout: float = 90.0,
    echo: Callable[[str], None] = print,
) -> StackState:
    """Start the stack, or return the running one. A port of 0 picks a free one.

    `metrics_port` is the inference service's Prometheus endpoint, `triton_ports` its Triton's gRPC,
    HTTP and metrics ports; `job_slots` the trainer's jobs at once (0: one per GPU, or 1 on a CPU)."""
    data_dir = data_dir.resolve()
    existing = load_state(data_dir)
    if existing and all(is_alive(c) for c in existing.components):
        echo("the stack is already running")
        return existing
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

    wanted = {
        "s3": s3_port,
        "trainer": trainer_port,
        "inference": inference_port,
        "metrics": metrics_port,
        "triton gRPC": triton_ports[0],
        "triton HTTP": triton_ports[1],
        "triton metrics": triton_ports[2],
    }
    ports = {what: port or free_port(HOST) for what, port in wanted.items()}
    for what, port in ports.items():
        _check_port_free(port, what)
    s3 = S3Settings(
        endpoint=f"{HOST}:{ports['s3']}",
        access_key="vt-" + secrets.token_hex(6),
        secret_key=secrets.token_urlsafe(24),
        bucket="visiontune",
    )
    state = StackState(data_dir=str(data_dir), s3=asdict(s3))
    logs = data_dir / "stack" / "logs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    try:
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
                "--access-key",
                s3.access_key,
                "--secret-key",
                s3.secret_key,
            ],
            log=logs / "s3.log",
            env=env,
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

        service_env = {**service_environment(s3, data_dir), "PYTHONUNBUFFERED": "1", "VISIONTUNE_HOST": HOST}
        inference_args = [
            "--metrics-port",
            str(ports["metrics"]),
            "--triton-grpc-port",
            str(ports["triton gRPC"]),
            "--triton-http-port",
            str(ports["triton HTTP"]),
            "--triton-metrics-port",
            str(ports["triton metrics"]),
        ]
        inference_endpoints = {
            "metrics": f"http://{HOST}:{ports['metrics']}/metrics",
            "triton gRPC": f"{HOST}:{ports['triton gRPC']}",
            "triton HTTP": f"http://{HOST}:{ports['triton HTTP']}",
            "triton metrics": f"http://{HOST}:{ports['triton metrics']}/metrics",
        }
        for name, module, port, service, extra, endpoints in (
            (
                "trainer",
                "trainer_service",
                ports["trainer"],
                "visiontune.v1.TrainingService",
                ["--job-slots", str(job_slots)],
                {},
            ),
            (
                "inference",
                "inference_service",
                ports["inference"],
                "visiontune.v1.InferenceService",
                inference_args,
                inference_endpoints,
            ),
        ):
            comp, proc = _spawn(
                name,
                [py, "-m", module, "--port", str(port), *extra],
                log=logs / f"{name}.log",
                env=service_env,
                marker=module,
                port=port,
            )
            comp.grpc_service = service
            comp.endpoints = endpoints
            state.components.append(comp)
            _save_state(state)
            echo(f"starting {name} on {HOST}:{port} ...")
            target = f"{HOST}:{port}"
            _wait_until(functools.partial(is_serving, target, service, 1.0), comp, proc, timeout)
    except BaseException:
        down(data_dir, echo=lambda _msg: None)
        raise
    return state


def stop_component(component: Component, grace: float = 15.0) -> bool:
    """SIGTERM, wait for a graceful exit, then SIGKILL. True if it was running."""
    if not is_alive(component):
        return False
    os.kill(component.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_alive(component) or _reap(component.pid):
            return True
        time.sleep(0.1)
    os.kill(component.pid, signal.SIGKILL)
    return True


def _reap(pid: int) -> bool:
    # A zombie child of this very process still has a cmdline-less /proc entry; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def down(data_dir: Path, *, echo: Callable[[str], None] = print) -> bool:
    """Stop every component (services first, S3 last), then any S3 server still on the data directory. False if
    there was neither a recorded stack nor such a server."""
    data_dir = data_dir.resolve()
    state = load_state(data_dir)
    if state is not None:
        for comp in reversed(state.components):
            if stop_component(comp):
                echo(f"stopped {comp.name} (pid {comp.pid})")
    # The server of a wrapper killed with -9 stops by itself, but may still be shutting down; one of an earlier
    # stack whose record is gone would run on and hold the data directory's lock.
    root = s3_data_dir(data_dir)
    leftovers = s3server.servers_using(root)
    for pid, name in leftovers:
        if stop_component(Component(name=name, pid=pid, port=0, log="", marker=str(root))):
            echo(f"stopped the S3 server {name} (pid {pid}) left on {root}")
    if state is not None:
        state_path(data_dir).unlink(missing_ok=True)
    return state is not None or bool(leftovers)


@dataclass
class ComponentStatus:
    name: str
    endpoint: str
    running: bool
    healthy: bool
    log: str


def status(data_dir: Path) -> tuple[StackState, list[ComponentStatus]]:
    state = load_state(data_dir.resolve())
    if state is None:
        raise StackError(f"no stack recorded under {data_dir}; start one with `visiontune up`")
    rows = []
    for comp in state.components:
        running = is_alive(comp)
        endpoint = f"{HOST}:{comp.port}"
        healthy = False
        if running and comp.grpc_service:
            healthy = is_serving(endpoint, service=comp.grpc_service, timeout=2.0)
        elif running:
            try:
                ArtifactStore.connect(state.s3_settings).check()
                healthy = True
            except StoreError:
                healthy = False
        rows.append(ComponentStatus(comp.name, endpoint, running, healthy, comp.log))
    return state, rows
