"""Start a VisionTune inference service as a child process on free loopback ports (tests, benchmarks).

The local stack (`stack.py`) does the same for `visiontune up` with fixed, recorded ports; this is the
throwaway variant: every port free, the service's endpoints returned, the process stopped by its owner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.client import is_serving
from visiontune.devstack.ports import free_port
from visiontune.settings import S3Settings

INFERENCE_SERVICE = "visiontune.v1.InferenceService"
HOST = "127.0.0.1"


def service_environment(s3: S3Settings, data_dir: Path) -> dict[str, str]:
    """This process's environment plus what points a service at `s3` and `data_dir`."""
    return {**os.environ, **s3.to_env(), "VISIONTUNE_DATA_DIR": str(data_dir)}


@dataclass
class InferenceProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    triton_grpc_port: int
    triton_http_port: int
    triton_metrics_port: int
    log: Path
    data_dir: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def triton_grpc(self) -> str:
        return f"{HOST}:{self.triton_grpc_port}"

    @property
    def triton_http(self) -> str:
        return f"{HOST}:{self.triton_http_port}"

    @property
    def triton_metrics_url(self) -> str:
        return f"http://{HOST}:{self.triton_metrics_port}/metrics"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the service drains its calls and stops its Triton), SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch_inference(s3: S3Settings, data_dir: Path, *args: str, timeout: float = 180.0) -> InferenceProcess:
    """`python -m inference_service` (and so its Triton) on free loopback ports, once it serves.

    Raises RuntimeError with the end of its log when it exits or does not serve within `timeout`."""
    port, metrics, t_grpc, t_http, t_metrics = (free_port(HOST) for _ in range(5))
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"inference-{port}.log"
    command = [
        sys.executable,
        "-m",
        "inference_service",
        "--port",
        str(port),
        "--log-format",
        "text",
        "--metrics-port",
        str(metrics),
        "--triton-grpc-port",
        str(t_grpc),
        "--triton-http-port",
        str(t_http),
        "--triton-metrics-port",
        str(t_metrics),
        *args,
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=service_environment(s3, data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    launched = InferenceProcess(proc, port, metrics, t_grpc, t_http, t_metrics, log_path, data_dir, list(args))
    deadline = time.monotonic() + timeout
    while not is_serving(launched.target, INFERENCE_SERVICE, 1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            launched.stop(timeout=10)
            raise RuntimeError(f"the inference service did not start; its log ends:\n{launched.log_tail()}")
        time.sleep(0.2)
    return launched
