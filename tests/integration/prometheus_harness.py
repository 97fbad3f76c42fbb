"""A real Prometheus server for tests: scrapes loopback targets, answers PromQL over its HTTP API.

    with running_prometheus(["127.0.0.1:9464"], tmp_path) as prom:
        prom.wait_for('up{job="visiontune-inference"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")

The binary comes from Debian's `prometheus` package (`make prometheus`); `find_prometheus()` says whether it is
installed. The server listens on 127.0.0.1 only, keeps its TSDB under the given working directory, and is
stopped (terminated, then killed) when the context exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from visiontune.devstack.ports import free_port

__all__ = ["Prometheus", "PrometheusError", "find_prometheus", "running_prometheus"]

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.2
_START_ATTEMPTS = 3  # the free port can be taken between choosing it and Prometheus binding it


class PrometheusError(RuntimeError):
    """The server did not start, or the HTTP API answered an error."""


def find_prometheus() -> str | None:
    """The `prometheus` server binary: $PROMETHEUS_BIN, else on PATH, else Debian's /usr/bin; None if absent."""
    candidates = [os.environ.get("PROMETHEUS_BIN"), shutil.which("prometheus"), "/usr/bin/prometheus"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Prometheus:
    """A running server: its base URL, its process, and its log file."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path

    def api(self, path: str, params: dict[str, str] | None = None, *, timeout: float = 10.0) -> Any:
        """GET /api/v1/<path>; the `data` member of a successful answer, PrometheusError otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400/422/503 carry an error document
            detail = err.read().decode("utf-8", "replace")
            raise PrometheusError(f"GET {url}: HTTP {err.code}: {detail}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query now. A vector answers its samples ({"metric": {...}, "value": [ts, "v"]}); a scalar
        or string answers one such sample with no labels."""
        data = self.api("query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health, last error and last scrape time."""
        active: list[dict[str, Any]] = self.api("targets", {"state": "active"})["activeTargets"]
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups, each rule with its health, last error and last evaluation."""
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll `promql` until `predicate(result)` holds and return that result; AssertionError (with the last
        result and the scrape targets' health) if it does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] | str = "(no answer yet)"
        while True:
            try:
                result = self.query(promql)
            except PrometheusError as err:
                last = str(err)
            else:
                if predicate(result):
                    return result
                last = result
            if time.monotonic() >= deadline or self.process.poll() is not None:
                break
            time.sleep(POLL_INTERVAL_S)
        raise AssertionError(
            f"PromQL {promql!r} did not satisfy the predicate within {timeout:g}s.\n"
            f"last result: {json.dumps(last, indent=1)}\n"
            f"targets: {self._target_health()}\n"
            f"prometheus: {self._process_state()}"
        )

    def _target_health(self) -> str:
        try:
            return json.dumps(
                [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")} for t in self.targets()],
                indent=1,
            )
        except (PrometheusError, OSError) as err:
            return f"(unavailable: {err})"

    def _process_state(self) -> str:
        code = self.process.poll()
        state = "running" if code is None else f"exited with {code}"
        return f"{state}; log tail:\n{log_tail(self.log_path)}"


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_config(
    path: Path,
    targets: Sequence[str],
    *,
    scrape_interval: str,
    job: str,
    rule_files: Sequence[Path],
) -> None:
    """A Prometheus config with one static scrape job; rules are evaluated as often as targets are scraped."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(rule).resolve()) for rule in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except OSError:  # refused while starting, 503 while not ready (HTTPError is an OSError)
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


class _PortTaken(PrometheusError):
    pass


def _start(binary: str, config_path: Path, workdir: Path) -> Prometheus:
    port = free_port()
    log_path = workdir / f"prometheus-{port}.log"
    args = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=info",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log_path, config_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_tail(log_path)
                error = _PortTaken if "address already in use" in tail else PrometheusError
                raise error(f"prometheus exited with {process.returncode}:\n{tail}")
            if _get_ok(f"{prom.url}/-/ready"):
                return prom
            time.sleep(POLL_INTERVAL_S)
        raise PrometheusError(f"prometheus not ready after {READY_TIMEOUT_S:g}s:\n{log_tail(log_path)}")
    except BaseException:
        _stop(process)
        raise


@contextlib.contextmanager
def running_prometheus(
    targets: list[str],
    workdir: Path,
    *,
    scrape_interval: str = "1s",
    job: str = "visiontune-inference",
    rule_files: Sequence[Path] = (),
) -> Iterator[Prometheus]:
    """Start Prometheus scraping `targets` (host:port) as `job` on a free loopback port; yield it once it is
    ready; stop it on exit. PrometheusError if the binary is missing or the server does not come up."""
    binary = find_prometheus()
    if binary is None:
        raise PrometheusError("no prometheus binary (install Debian's `prometheus` package: `make prometheus`)")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    write_config(config_path, targets, scrape_interval=scrape_interval, job=job, rule_files=rule_files)
    attempt = 1
    while True:
        try:
            prom = _start(binary, config_path, workdir)
            break
        except _PortTaken:
            if attempt == _START_ATTEMPTS:
                raise
            attempt += 1
    try:
        yield prom
    finally:
        _stop(prom.process)
