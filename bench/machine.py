"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import contextlib
import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none): how quiet the machine was."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def format_load(value: float | None) -> str:
    """A `load_average` as the reports show it."""
    return "n/a" if value is None else f"{value:.2f}"
