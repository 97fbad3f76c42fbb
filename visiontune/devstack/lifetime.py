"""Server child processes of the local stack (its S3 server and PostgreSQL): they do not outlive the wrapper that
starts them, and their logs are read from the end."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["die_with_parent", "log_tail"]

_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that started it dies, however it dies (PR_SET_PDEATHSIG).

    Python's subprocess runs a preexec_fn after switching to `user=`/`group=`, so the setting survives a child that
    runs as another user (the kernel clears it on a credential change, not on exec of a plain binary)."""

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes the call

    def arm() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig)) != 0:
            os._exit(126)  # a server that would outlive its parent is what this is for: do not start one
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def log_tail(path: Path, max_bytes: int = 4000) -> str:
    """The last `max_bytes` of a server's log ("" when there is none yet), for a start-up error."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            return log.read().decode(errors="replace")
    except OSError:
        return ""
