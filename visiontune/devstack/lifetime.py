"""Children that do not outlive the wrapper that starts them (the local stack's S3 server and PostgreSQL)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from typing import Final

__all__ = ["die_with_parent"]

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
