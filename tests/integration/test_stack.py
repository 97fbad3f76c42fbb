"""`visiontune up / status / dataset push / down` as a newcomer runs them, on free loopback ports; and a stack of
PostgreSQL with two trainers and two inference replicas, used through the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.integration.stack_cli import run_cli
from tests.integration.trainer_helpers import tiny_spec
from visiontune.devstack import postgres, s3server, stack
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.specfile import dump_spec_yaml
from visiontune.store import ArtifactStore

pytestmark = pytest.mark.integration


def _cli(
    *args: str, data_dir: Path | None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, data_dir=data_dir, check=check, env=env, timeout=180)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_stack_up_push_status_down(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    images = tmp_path / "images"
    state = None
    try:
        up = _cli("up", "--any-ports", data_dir=data_dir)
        assert "visiontune.v1.TrainingService" in up.stdout
        assert "visiontune.v1.InferenceService" in up.stdout
        state = stack.load_state(data_dir)
        assert state is not None
        assert {c.name for c in state.components} == {"s3", "trainer", "inference"}
        assert (stack.state_path(data_dir).stat().st_mode & 0o077) == 0  # the secret is private

        _cli("dataset", "sample", str(images), "--labels", "2", "--per-label", "5", data_dir=None)
        (images / "circle" / "notes.txt").write_text("not an image")
        pushed = _cli("dataset", "push", str(images), "datasets/tiny", data_dir=data_dir)
        assert "uploaded 10 images in 2 labels" in pushed.stdout
        assert "skipped 1 files" in pushed.stdout

        store = ArtifactStore.connect(state.s3_settings)
        keys = sorted(o.key for o in store.list("datasets/tiny/"))
        assert len(keys) == 10
        assert keys[0] == "datasets/tiny/circle/circle-0000.png"

        assert "no jobs yet" in _cli("jobs", "list", data_dir=data_dir).stdout
        assert "serving" in _cli("status", data_dir=data_dir).stdout
        # A second `up` finds the running stack instead of starting another.
        assert "already running" in _cli("up", data_dir=data_dir).stdout

        # The recorded S3 pid is the wrapper; the real server dies with it, even of a kill -9, so that no server
        # is left holding the data directory's lock.
        servers = s3server.servers_using(stack.s3_data_dir(data_dir))
        assert len(servers) == 1
        assert servers[0][1].startswith(("weed", "minio"))
        os.kill(state.component("s3").pid, signal.SIGKILL)
        _wait_for(lambda: not s3server.servers_using(stack.s3_data_dir(data_dir)), "the S3 server to stop")
        assert "stopped" in _cli("status", data_dir=data_dir, check=False).stdout
    finally:
        _cli("down", data_dir=data_dir, check=False)

    assert state is not None
    assert not any(stack.is_alive(c) for c in state.components)
    assert _cli("status", data_dir=data_dir, check=False).returncode != 0


def test_an_s3_server_left_on_the_data_directory_is_reported_with_its_pid(tmp_path: Path) -> None:
    data_dir = (tmp_path / "state").resolve()
    # A server of an earlier stack whose record is gone, still running on the stack's S3 data directory.
    leftover = S3ServerProcess(stack.s3_data_dir(data_dir), access_key="old-stack", secret_key="old-stack-secret")
    leftover.start(timeout=60)
    try:
        up = _cli("up", "--any-ports", data_dir=data_dir, check=False)
        assert up.returncode == 1
        pid, name = leftover.pid, leftover.binary.name
        assert up.stderr == (
            f"Error: the S3 data directory {stack.s3_data_dir(data_dir)} is locked by pid {pid} ({name}), left "
            f"from an earlier stack: stop it with `kill {pid}` or `visiontune down`\n"
        )
        assert stack.load_state(data_dir) is None  # nothing was started

        down = _cli("down", data_dir=data_dir)
        assert f"stopped the S3 server {name} (pid {pid})" in down.stdout
        _wait_for(lambda: not leftover.running, "the leftover server to exit")
    finally:
        leftover.kill()


def _processes_naming(path: Path) -> list[str]:
    """The command lines of running processes that name `path` (the stack's workers, Tritons, PostgreSQL, S3)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _per_replica(metrics_out: str, series: str) -> dict[str, float]:
    """{replica: value} of one series in `visiontune metrics` output with several replicas."""
    found = {}
    for line in metrics_out.splitlines():
        match = re.fullmatch(rf"(\S+)  {re.escape(series)} +(\S+)", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def test_a_postgresql_stack_of_two_trainers_and_two_inference_replicas(tmp_path: Path) -> None:
    # As root PostgreSQL runs as the `postgres` user, which cannot enter pytest's private temp root.
    root = Path(tempfile.mkdtemp(prefix="visiontune-stack-"))
    root.chmod(0o755)
    data_dir = root / "state"
    state = second = None
    try:
        up = _cli(
            "up",
            "--any-ports",
            "--database",
            "postgresql",
            "--trainer-replicas",
            "2",
            "--inference-replicas",
            "2",
            data_dir=data_dir,
        )
        state = stack.load_state(data_dir)
        assert state is not None
        names = ["s3", "postgres", "trainer-1", "trainer-2", "inference-1", "inference-2"]
        assert [c.name for c in state.components] == names
        assert state.database == "postgresql"
        assert len({c.port for c in state.components}) == len(names)
        # The password: in its own 0600 file, never printed, recorded or on a command line.
        password_file = stack.postgres_password_path(data_dir)
        assert (password_file.stat().st_mode & 0o077) == 0
        password = password_file.read_text().strip()
        assert password not in up.stdout + up.stderr
        assert password not in stack.state_path(data_dir).read_text()
        assert not [c for c in _processes_naming(root) if password in c]

        shown = _cli("status", data_dir=data_dir).stdout
        for name in names:
            assert re.search(rf"^{name} +127\.0\.0\.1:\d+ +serving ", shown, re.MULTILINE), shown
        assert "database: postgresql\n" in shown

        # A job through the round-robin trainer channel: created on one replica, run and followed on any.
        shapes = tmp_path / "shapes"
        _cli("dataset", "sample", str(shapes), "--labels", "3", "--per-label", "16", "--size", "32", data_dir=None)
        _cli("dataset", "push", str(shapes), "datasets/shapes", data_dir=data_dir)
        spec = tmp_path / "spec.yaml"
        spec.write_text(dump_spec_yaml(tiny_spec(epochs=1)))
        trained = _cli("train", str(spec), "--job-id", "replicas-1", data_dir=data_dir).stdout
        assert "state: succeeded\n" in trained
        assert "model version: models/shapes/versions/replicas-1\n" in trained

        deployed = _cli("deploy", "models/shapes", data_dir=data_dir).stdout
        for replica in state.replicas(stack.INFERENCE):
            assert f"deploying models/shapes/versions/replicas-1 on {replica.address} ..." in deployed
        assert "models/shapes/versions/replicas-1: ready on 2 replicas\n" in deployed

        # 132 images: three Classify requests on one round-robin channel, so both replicas answer some.
        images = tmp_path / "images"
        _cli("dataset", "sample", str(images), "--labels", "3", "--per-label", "44", "--size", "32", data_dir=None)
        rows = json.loads(_cli("classify", str(images), "--model", "models/shapes", "--json", data_dir=data_dir).stdout)
        assert len({r["request_id"] for r in rows}) == 3
        answered = _per_replica(
            _cli("metrics", "--grep", "requests_total", data_dir=data_dir).stdout,
            'visiontune_inference_requests_total{code="OK",model="shapes",version="replicas-1"}',
        )
        assert sorted(answered) == ["inference-1", "inference-2"], answered
        assert sum(answered.values()) == 3

        # A report reaches whichever replica; it is scored once, and every replica then knows it (one of them
        # did not answer the Classify).
        first = rows[0]
        label = Path(first["file"]).parent.name
        reported = _cli("feedback", first["request_id"], "0", "--label", label, data_dir=data_dir).stdout
        outcome = reported.splitlines()[0]
        assert outcome.startswith(f"{first['request_id']} #0 (models/shapes/versions/replicas-1): ")
        for replica in state.replicas(stack.INFERENCE):
            direct = {"VISIONTUNE_INFERENCE": replica.address}
            report = ("feedback", first["request_id"], "0", "--label", label)
            again = _cli(*report, data_dir=data_dir, env=direct).stdout
            assert again.splitlines() == [outcome, again.splitlines()[1]]
            assert again.splitlines()[1].startswith("duplicate: ")
        scored = _per_replica(
            _cli("metrics", "--grep", "feedback_total", data_dir=data_dir).stdout,
            f'visiontune_inference_feedback_total{{model="shapes",outcome="{_outcome_word(outcome)}",'
            'version="replicas-1"}',
        )
        assert sum(scored.values()) == 1, scored

        stopped = _cli("down", data_dir=data_dir).stdout
        assert [line.split()[1] for line in stopped.splitlines()] == list(reversed(names))
        assert not any(stack.is_alive(c) for c in state.components)
        assert _processes_naming(data_dir) == []  # no worker, Triton, PostgreSQL or S3 server left

        # A later `up` remembers PostgreSQL and reuses its cluster: the job is still there.
        again_up = _cli("up", "--any-ports", data_dir=data_dir).stdout
        assert again_up.startswith("database: postgresql, as the last `visiontune up` (--database sqlite switches)\n")
        second = stack.load_state(data_dir)
        assert second is not None
        assert [c.name for c in second.components] == ["s3", "postgres", "trainer", "inference"]
        assert "jobs/replicas-1" in _cli("jobs", "list", data_dir=data_dir).stdout
        refused = _cli("up", "--database", "sqlite", data_dir=data_dir, check=False)
        assert refused.returncode == 1
        assert refused.stderr == (
            "Error: the stack is running with --database postgresql --trainer-replicas 1 --inference-replicas 1; "
            "stop it with `visiontune down` before starting it with --database sqlite\n"
        )
    finally:
        _cli("down", data_dir=data_dir, check=False)
        leftover = postgres.postmaster_pid(stack.postgres_data_dir(data_dir))
        shutil.rmtree(root, ignore_errors=True)
    assert leftover is None
    for recorded in (state, second):
        assert recorded is None or not any(stack.is_alive(c) for c in recorded.components)


def _outcome_word(line: str) -> str:
    """`... : correct (a known ...)` -> `correct`, as the metrics label it."""
    return line.split("): ", 1)[1].split(" (", 1)[0].replace(" ", "_")
