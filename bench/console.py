"""What the benchmarks' command lines share: progress lines on stderr, the report on stdout and in its file."""

from __future__ import annotations

import sys
from pathlib import Path


def progress(message: str) -> None:
    """One progress line on stderr, flushed: stdout carries the report."""
    print(message, file=sys.stderr, flush=True)


def write_report(report: str, path: Path) -> None:
    """Print the Markdown report and write it to `path` (its folder created if needed)."""
    print(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report, encoding="utf-8")
    progress(f"written to {path}")
