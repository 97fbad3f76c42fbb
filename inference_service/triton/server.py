"""The Triton Inference Server process the inference service runs, and a typed client for it.

`TritonServer` finds a `tritonserver` binary (an explicit path, one on PATH as in NVIDIA's containers, or
the one PyPI's `nvidia-pytriton` ships), starts it on loopback ports in explicit model-control mode over
a model repository the service writes, waits until it is ready, and stops it. Triton's KServe v2 gRPC
and HTTP endpoints and its metrics endpoint stay reachable, so `tritonclient` and `perf_analyzer` work
against the models the service deploys.

Models run in Triton's Python backend (the only backend nvidia-pytriton ships): a stub process per
model instance imports torch from this service's environment and runs the TorchScript weights
(`triton/model.py`). The child dies with the service (PR_SET_PDEATHSIG), so a kill -9 of the service
leaves no orphaned server holding the ports.
"""

from __future__ import annotations

import ctypes
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as system_shm

from inference_service.triton.shared_memory import (
    DEFAULT_REGION_PAIRS,
    RegionPair,
    RegionPool,
    SharedMemoryUnavailable,
    output_byte_size,
    region_prefix,
    uses_shared_memory,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1
_LOG_TAIL_LINES: Final = 20


# The input dtypes the service sends, by their KServe v2 datatype names (config.pbtxt's are "TYPE_" + these).
TRITON_DATATYPES: Final = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}


class TritonError(Exception):
    """Triton could not be found, started, or asked to do something; the message says which and why."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where a Triton server's pieces are: the binary, its shared libraries, the Python backend."""

    binary: Path
    library_dirs: tuple[Path, ...]
    python_backend: Path  # directory with libtriton_python.so and triton_python_backend_utils.py
    python_stub: Path  # triton_python_backend_stub built for this interpreter's Python version


def find_triton(explicit: str | None = None) -> TritonDistribution:
    """The Triton to run: `explicit` (a path to `tritonserver`), else `tritonserver` on PATH, else the
    binary inside the `nvidia-pytriton` package. Raises TritonError naming what was tried."""
    tried: list[str] = []
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    else:
        on_path = shutil.which("tritonserver")
        if on_path:
            candidates.append(Path(on_path))
        tried.append("tritonserver on PATH")
        # Located, not imported: only the package's files are used (importing it needs its own deps).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            tried.append("the nvidia-pytriton package (not installed)")
        else:
            package = Path(next(iter(spec.submodule_search_locations)))
            candidates.append(package / "tritonserver" / "bin" / "tritonserver")
    for binary in candidates:
        found = _distribution_at(binary)
        if found is not None:
            return found
        tried.append(str(binary))
    raise TritonError(
        "no usable Triton Inference Server: tried "
        + ", ".join(tried)
        + "; install nvidia-pytriton (make setup) or pass --triton-binary"
    )


def _distribution_at(binary: Path) -> TritonDistribution | None:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None
    root = binary.parent.parent  # .../tritonserver/{bin,backends}
    backend = root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # nvidia-pytriton keeps one stub per Python version; NVIDIA's containers ship one in the backend dir.
    stubs = [
        root / "python_backend_stubs" / version / "triton_python_backend_stub",
        backend / "triton_python_backend_stub",
    ]
    stub = next((s for s in stubs if s.is_file()), None)
    if not (backend / "libtriton_python.so").is_file() or stub is None:
        return None
    libs = tuple(p for p in (root.parent.parent / "nvidia_pytriton.libs", root / "lib") if p.is_dir())
    return TritonDistribution(binary=binary, library_dirs=libs, python_backend=backend, python_stub=stub)


def is_loopback(address: str) -> bool:
    """Whether `address` (an IP or `localhost`) can only be reached from this host (this pod)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TritonPorts:
    """Triton's endpoints. gRPC and HTTP carry its model-control API (load, unload, any model repository path):
    they stay on loopback, where only the inference service in the same pod reaches them. Its metrics may be
    published (`metrics_address`) for Prometheus."""

    grpc: int
    http: int
    metrics: int
    address: str = "127.0.0.1"
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not is_loopback(self.address):
            raise ValueError(
                f"Triton's gRPC and HTTP endpoints must listen on loopback, not {self.address!r}: they carry its "
                "model-control API, which would let anyone who reaches them load and unload models"
            )

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http}"

    @property
    def metrics_url(self) -> str:
        # Scraped from inside the pod: a wildcard bind is reached over loopback too.
        host = self.address if self.metrics_address in ("0.0.0.0", "::") else self.metrics_address
        return f"http://{host}:{self.metrics}/metrics"


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """One tritonserver child process over `workdir/models` (the model repository)."""

    def __init__(
        self,
        distribution: TritonDistribution,
        ports: TritonPorts,
        workdir: Path,
        *,
        startup_timeout: float = 120.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.distribution = distribution
        self.ports = ports
        self.workdir = workdir
        self.model_repository = workdir / "models"
        self.log_path = workdir / "tritonserver.log"
        self._startup_timeout = startup_timeout
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def _backend_directory(self) -> Path:
        """A backends/ dir holding the Python backend with the stub for this interpreter (links, no copies)."""
        backends = self.workdir / "backends"
        python = backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": self.distribution.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": self.distribution.python_backend / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.distribution.python_stub,
        }
        for name, target in links.items():
            link = python / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        return backends

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(p) for p in self.distribution.library_dirs]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        # The Python backend's stub runs `python3` from PATH's environment: ours, which has torch.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(self.distribution.binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self._backend_directory()}",
            f"--grpc-address={p.address}",
            f"--grpc-port={p.grpc}",
            f"--http-address={p.address}",
            f"--http-port={p.http}",
            f"--metrics-address={p.metrics_address}",
            f"--metrics-port={p.metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=true",
            "--allow-cpu-metrics=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
            *self._extra_args,
        ]

    def start(self) -> None:
        if self._proc is not None:
            raise TritonError("Triton is already running")
        self.model_repository.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        command = self.command()
        log.info("starting Triton: %s", " ".join(command))
        self._proc = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._environment(),
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready()
        except TritonError:
            self.stop()
            raise
        log.info(
            "Triton ready: gRPC %s, HTTP %s, metrics %s",
            self.ports.grpc_url,
            self.ports.http_url,
            self.ports.metrics_url,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        client = triton_grpc.InferenceServerClient(self.ports.grpc_url)
        try:
            while time.monotonic() < deadline:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise TritonError(f"tritonserver exited with code {code} while starting:\n{self.log_tail()}")
                try:
                    if client.is_server_ready():
                        return
                except InferenceServerException:
                    pass  # not listening yet
                time.sleep(0.2)
        finally:
            client.close()
        raise TritonError(f"tritonserver not ready after {self._startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The child's exit status once it has died on its own (None while running or never started)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Triton unloads its models and drains), then SIGKILL after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Triton did not stop within %.0f s; killing it", timeout)
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class TritonModels:
    """What the service asks of Triton: load, unload and run models. Safe to call from many threads.

    With `shared_memory_min_bytes` set, a batch of at least that many input bytes goes through Triton's system
    shared memory (`triton/shared_memory.py`) rather than inline in the gRPC messages: only for a Triton that
    maps this host's /dev/shm (its child process, a sidecar in the pod). If Triton cannot use the regions (it
    runs elsewhere, /dev/shm is full), one warning says why and every batch goes inline from then on: a request
    never fails because of shared memory. `shared_memory_infers` and `inline_infers` count the calls each way.
    """

    def __init__(
        self,
        grpc_url: str,
        shared_memory_min_bytes: int | None = None,
        *,
        shared_memory_regions: int = DEFAULT_REGION_PAIRS,
    ) -> None:
        if shared_memory_min_bytes is not None and shared_memory_min_bytes < 0:
            raise ValueError(f"shared_memory_min_bytes must be 0 (off) or more, got {shared_memory_min_bytes}")
        self.grpc_url = grpc_url
        self.shared_memory_min_bytes = shared_memory_min_bytes or None
        self._local = threading.local()
        self._clients: list[triton_grpc.InferenceServerClient] = []
        self._lock = threading.Lock()
        self._pool: RegionPool | None = None
        # What this client's region names start with (kept after shared memory is turned off or closed).
        self.shared_memory_prefix: str | None = None
        if self.shared_memory_min_bytes is not None:
            self.shared_memory_prefix = region_prefix()
            self._pool = RegionPool(self.shared_memory_prefix, shared_memory_regions)
        self.shared_memory_off: str | None = None  # why shared memory was turned off, once it was
        self._lost_registrations = False  # since the last call through shared memory that worked
        self._outputs: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}  # (model, output): shape, datatype
        self.shared_memory_infers = 0
        self.inline_infers = 0

    def _client(self) -> triton_grpc.InferenceServerClient:
        # tritonclient documents its client objects as not thread-safe: one per thread.
        client: triton_grpc.InferenceServerClient | None = getattr(self._local, "client", None)
        if client is None:
            client = triton_grpc.InferenceServerClient(self.grpc_url)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def load(self, name: str) -> None:
        """Load (or reload) model `name` from the repository; returns once it is ready."""
        self._forget_outputs(name)  # a reload may bring another config
        try:
            self._client().load_model(name)
        except InferenceServerException as err:
            raise TritonError(f"Triton could not load {name}: {err.message()}") from err

    def unload(self, name: str) -> None:
        self._forget_outputs(name)
        try:
            self._client().unload_model(name)
        except InferenceServerException as err:
            raise TritonError(f"Triton could not unload {name}: {err.message()}") from err

    def is_ready(self, name: str) -> bool:
        try:
            return bool(self._client().is_model_ready(name))
        except InferenceServerException:
            return False

    def infer(self, name: str, input_name: str, output_name: str, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Run `batch` ([N, ...], float32 or uint8 as TRITON_DATATYPES) through model `name`; returns its output."""
        batch = np.ascontiguousarray(batch)
        pool = self._pool
        if pool is not None and uses_shared_memory(batch.nbytes, self.shared_memory_min_bytes):
            output = self._infer_shared(pool, name, input_name, output_name, batch)
            if output is not None:
                return output
        return self._infer_inline(name, input_name, output_name, batch)

    def _infer_inline(
        self, name: str, input_name: str, output_name: str, batch: np.ndarray[Any, Any]
    ) -> np.ndarray[Any, Any]:
        tensor = triton_grpc.InferInput(input_name, list(batch.shape), TRITON_DATATYPES[batch.dtype])
        tensor.set_data_from_numpy(batch)
        try:
            result = self._client().infer(name, [tensor], outputs=[triton_grpc.InferRequestedOutput(output_name)])
        except InferenceServerException as err:
            raise TritonError(f"Triton inference on {name} failed: {err.message()}") from err
        output = result.as_numpy(output_name)
        if output is None:
            raise TritonError(f"Triton's answer from {name} has no output {output_name!r}")
        with self._lock:
            self.inline_infers += 1
        return np.asarray(output)

    def _infer_shared(
        self, pool: RegionPool, name: str, input_name: str, output_name: str, batch: np.ndarray[Any, Any]
    ) -> np.ndarray[Any, Any] | None:
        """The output of `batch` through shared memory, or None when it goes inline: the output's size is not
        known in advance, every region pair is lent, or shared memory has just been turned off."""
        output_bytes = self._output_bytes(name, output_name, len(batch))
        if output_bytes is None:
            return None
        pair = pool.acquire()
        if pair is None:
            return None
        client = self._client()
        try:
            pool.fit(pair, client, batch.nbytes, output_bytes)
        except SharedMemoryUnavailable as err:
            pool.discard(pair, client)
            self._turn_off(str(err))
            return None
        try:
            output = self._run_shared(client, pair, name, input_name, output_name, batch, output_bytes)
        except (InferenceServerException, system_shm.SharedMemoryException) as err:
            # Asked again inline: an error of the model (or of Triton) fails that call as well, and is the
            # request's; one of shared memory does not, and turns shared memory off.
            try:
                output = self._infer_inline(name, input_name, output_name, batch)
            except TritonError:
                pool.release(pair, client)
                raise
            self._shared_call_failed(pool, pair, client, name, err)
            return output
        except BaseException:
            pool.release(pair, client)
            raise
        pool.release(pair, client)
        with self._lock:
            self.shared_memory_infers += 1
            self._lost_registrations = False
        return output

    def _run_shared(
        self,
        client: triton_grpc.InferenceServerClient,
        pair: RegionPair,
        name: str,
        input_name: str,
        output_name: str,
        batch: np.ndarray[Any, Any],
        output_bytes: int,
    ) -> np.ndarray[Any, Any]:
        assert pair.input is not None  # fitted
        assert pair.output is not None
        pair.input.write(batch)
        tensor = triton_grpc.InferInput(input_name, list(batch.shape), TRITON_DATATYPES[batch.dtype])
        tensor.set_shared_memory(pair.input.name, batch.nbytes)
        requested = triton_grpc.InferRequestedOutput(output_name)
        requested.set_shared_memory(pair.output.name, output_bytes)
        result = client.infer(name, [tensor], outputs=[requested])
        written = result.get_output(output_name)  # the data is in the region; the answer says its shape
        if written is None:
            raise TritonError(f"Triton's answer from {name} has no output {output_name!r}")
        return pair.output.read(written.datatype, [int(d) for d in written.shape])

    def _shared_call_failed(
        self,
        pool: RegionPool,
        pair: RegionPair,
        client: triton_grpc.InferenceServerClient,
        name: str,
        err: InferenceServerException | system_shm.SharedMemoryException,
    ) -> None:
        """A call through shared memory failed where the same call inline did not: why decides what follows."""
        message = err.message() if isinstance(err, InferenceServerException) else str(err)
        if not self._registered(client, pair):
            with self._lock:
                again, self._lost_registrations = self._lost_registrations, True
            if not again:
                # Triton no longer knows the regions: the supervisor restarted it. New ones are registered next.
                log.info("Triton lost its shared memory registrations (restarted?); registering them again")
                pool.discard(pair, None)
                pool.discard_free()
                return
        pool.discard(pair, client)
        self._turn_off(f"Triton could not run {name} on shared memory: {message}")

    def _registered(self, client: triton_grpc.InferenceServerClient, pair: RegionPair) -> bool:
        try:
            status = client.get_system_shared_memory_status()
        except InferenceServerException:
            return False
        return all(region.name in status.regions for region in pair.regions())

    def _turn_off(self, reason: str) -> None:
        """Send every batch inline from now on, saying why once; free the regions."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return  # another thread turned it off first
            self.shared_memory_off = reason
        log.warning("Triton system shared memory is off, batches go inline over gRPC: %s", reason)
        pool.close(self._client())

    def _output_bytes(self, name: str, output_name: str, batch: int) -> int | None:
        """The bytes of model `name`'s output for `batch` items, from its metadata (asked once per model)."""
        key = (name, output_name)
        with self._lock:
            known = self._outputs.get(key)
        if known is None:
            try:
                metadata = self._client().get_model_metadata(name)
            except InferenceServerException:
                return None  # not loaded, say: the inline call gets (and reports) the same error
            found = next((o for o in metadata.outputs if o.name == output_name), None)
            if found is None:
                return None
            known = (tuple(int(d) for d in found.shape), str(found.datatype))
            with self._lock:
                self._outputs[key] = known
        return output_byte_size(known[0], known[1], batch)

    def _forget_outputs(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._outputs if k[0] == name]:
                del self._outputs[key]

    def close(self) -> None:
        """Unregister and destroy the shared memory regions, then close the clients."""
        with self._lock:
            clients, self._clients = self._clients, []
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(clients[0] if clients else None)  # registrations are server-wide: any client unregisters
        for client in clients:
            client.close()
