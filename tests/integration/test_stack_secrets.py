"""The local stack's secrets are on no command line and in no log.

`visiontune up` on PostgreSQL, with an auth token exported, then one training job (its worker is a process of its
own). While the job runs, every process descended from the stack's components is read from /proc; afterwards every
file under the stack's data directory. The S3 secret key, the database password and the auth token must appear in
no command line and in no file but the private (0600) files that exist to hold them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.integration.stack_cli import cli_environment, run_cli
from tests.integration.trainer_helpers import tiny_spec
from visiontune.devstack import stack
from visiontune.specfile import dump_spec_yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

WORKER_MARKER = b"trainer_service.jobs.worker"


def _cli(env: dict[str, str], data_dir: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, data_dir=data_dir, env=env)


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc/PID/stat (the field after the parenthesised command)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _descendants(roots: set[int]) -> set[int]:
    parents = _parents()
    family = set(roots)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return family


def _cmdlines(pids: set[int]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    return out


def test_no_secret_on_a_command_line_or_in_a_log(tmp_path: Path) -> None:
    # As root PostgreSQL runs as the `postgres` user, which cannot enter pytest's private temp root.
    root = Path(tempfile.mkdtemp(prefix="visiontune-secrets-"))
    root.chmod(0o755)
    data_dir = root / "state"
    token = "tok-" + secrets.token_urlsafe(24)
    env = cli_environment({"VISIONTUNE_AUTH_TOKEN": token})
    state = None
    try:
        _cli(env, data_dir, "up", "--any-ports", "--database", "postgresql")
        state = stack.load_state(data_dir)
        assert state is not None
        s3_secret = state.s3_settings.secret_key
        password = stack.postgres_password_path(data_dir).read_text().strip()
        needles = {
            "S3 secret key": s3_secret.encode(),
            "database password": password.encode(),
            "auth token": token.encode(),
        }
        assert all(len(v) >= 16 for v in needles.values())

        shapes = tmp_path / "shapes"
        _cli(env, None, "dataset", "sample", str(shapes), "--labels", "3", "--per-label", "8", "--size", "32")
        _cli(env, data_dir, "dataset", "push", str(shapes), "datasets/shapes")
        spec = tmp_path / "spec.yaml"
        spec.write_text(dump_spec_yaml(tiny_spec(epochs=1)))

        # The job's worker lives while `train` follows it: read every command line of the stack's tree meanwhile.
        roots = {c.pid for c in state.components}
        seen: dict[int, bytes] = {}
        train = subprocess.Popen(
            [sys.executable, "-m", "visiontune.cli", "train", str(spec), "--data-dir", str(data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while train.poll() is None and time.monotonic() < deadline:
                seen.update(_cmdlines(_descendants(roots)))
                time.sleep(0.05)
        finally:
            if train.poll() is None:
                train.kill()
            out = train.communicate(timeout=30)[0].decode(errors="replace")
        assert train.returncode == 0, out
        assert "state: succeeded" in out, out
        assert any(WORKER_MARKER in c for c in seen.values()), "no job worker was seen"
        assert any(b"tritonserver" in c for c in seen.values()), "Triton was not seen"
        for what, needle in needles.items():
            leaked = [c.replace(b"\0", b" ").decode(errors="replace") for c in seen.values() if needle in c]
            assert not leaked, f"the {what} is on a command line: {leaked}"

        # Only the private files that exist to hold a secret may hold one (the state file and the identity file
        # hold the S3 keys, the password file the password).
        holders: list[Path] = []
        for path in sorted(p for p in data_dir.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                content = path.read_bytes()
            except PermissionError:  # PostgreSQL's cluster, owned by the postgres user when run as root
                continue
            for what, needle in needles.items():
                if needle in content:
                    assert (path.stat().st_mode & 0o077) == 0, f"{path} holds the {what} and is not private"
                    holders.append(path)
        logs = [p for p in holders if p.suffix == ".log" or "log" in p.parts[-2]]
        assert not logs, f"secrets in logs: {logs}"
        allowed = {stack.state_path(data_dir), stack.postgres_password_path(data_dir)}
        unexpected = [p for p in holders if p not in allowed and p.name != "s3-identities.json"]
        assert not unexpected, f"secrets in files that are not the credential files: {unexpected}"
    finally:
        if state is not None:
            subprocess.run(
                [sys.executable, "-m", "visiontune.cli", "down", "--data-dir", str(data_dir)],
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)
