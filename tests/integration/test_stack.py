"""`visiontune up / status / dataset push / down` as a newcomer runs them, on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from visiontune.devstack import s3server, stack
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore

pytestmark = pytest.mark.integration


def _cli(*args: str, data_dir: Path | None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONTUNE_")}
    where = [] if data_dir is None else ["--data-dir", str(data_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", *args, *where],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


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
