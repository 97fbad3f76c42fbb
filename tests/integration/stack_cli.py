"""`python -m visiontune.cli` as a newcomer runs it, for the tests that drive the local stack through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def cli_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any VISIONTUNE_* setting of the test run's own, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("VISIONTUNE_")}, **(extra or {})}


def run_cli(
    *args: str,
    data_dir: Path | None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (`--data-dir` appended when given); with `check`, fail the test unless it exits 0."""
    where = [] if data_dir is None else ["--data-dir", str(data_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", *args, *where],
        capture_output=True,
        text=True,
        env=cli_environment(env),
        timeout=timeout,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result
