"""Where job workers run, as the executor sees it: a worker subprocess on this machine (`local_workers`) or a
Kubernetes Job on a cluster node (`kubernetes.workers`).

The executor (`executor.py`) owns claims, retries and the job's state; a runtime only starts a worker for a claimed
attempt, says how it ended, stops it, and cleans up after it. How a worker ended is one `WorkerExit`, whatever ran it,
so the retry rules are written once.

The exit codes the worker itself uses (`python -m trainer_service.jobs.worker`) are here, shared by both runtimes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Final, Protocol

from trainer_service.jobs.records import JobRecord, WorkerRecord

EXIT_CANCELLED: Final = 3  # the worker stopped because it was asked to
EXIT_PARENT_GONE: Final = 75  # the trainer that started the worker is gone; the job resumes on its next start
EXIT_SUPERSEDED: Final = 76  # another attempt of the job began elsewhere (this replica was taken for dead)
EXIT_DATABASE_UNAVAILABLE: Final = 77  # the job database stayed unreachable past the outage window: nothing recorded
# Stopped from outside without a cancel (SIGTERM from a node drain, an eviction, its Kubernetes Job deleted by
# someone): nothing recorded, checkpoints kept, so the job resumes.
EXIT_INTERRUPTED: Final = 78


@dataclass(frozen=True, slots=True)
class WorkerExit:
    """How a worker ended, for the executor's rules: the worker's own exit code when it exited by itself (None when
    it was killed, never started, or vanished), the cause in a few words ("exit code 1", "signal SIGKILL",
    "OOMKilled", "unschedulable for 900 s: …"), and its last words (one line: its last error)."""

    exit_code: int | None
    cause: str
    last_words: str
    # False when another attempt would end the same way (an image that cannot be pulled, a GPU request no node can
    # meet): the job fails at once instead of spending its retries.
    retryable: bool = True


class Worker(Protocol):
    """One attempt's worker."""

    @property
    def job_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    def exited(self) -> WorkerExit | None:
        """How it ended; None while it runs (or is still being started)."""
        ...

    def terminate(self) -> None:
        """CancelJob: ask it to stop now (it records CANCELLED itself)."""
        ...

    def kill(self) -> None:
        """Stop it at once, without cleanup: its job resumes from the last checkpoint elsewhere."""
        ...

    def cleaned_up(self) -> bool:
        """After its end: remove what is left of it (a Kubernetes Job and its pod); True once nothing is."""
        ...


class WorkerRuntime(Protocol):
    """Starts and finds workers."""

    @property
    def cluster_cap(self) -> int | None:
        """Workers in the cluster at once, across replicas (claims take a worker row, `JobStore.workers`); None: the
        executor's own slots are the only bound (workers are this process's children)."""
        ...

    @property
    def workers_outlive_trainer(self) -> bool:
        """True when a worker keeps running after its trainer stops or dies (a Kubernetes Job): a stop then hands it
        over instead of killing it."""
        ...

    @property
    def gpu_count(self) -> int | None:
        """GPUs a job's worker may be given: 0 where it can only train on the CPU (local slots on a machine without
        a GPU), None where no fixed number bounds it (Kubernetes: the scheduler finds GPU nodes). CreateJob refuses
        what could only fail here (`gpus.device_violations`)."""
        ...

    def borrow_gpu(self) -> contextlib.AbstractContextManager[str | None]:
        """A GPU for a helper process of the trainer's (the LR range test) while the block runs: a
        `CUDA_VISIBLE_DEVICES` entry, or None where the trainer's own processes have none (the CPU; on Kubernetes the
        trainer's pod, whose GPUs are the device plugin's to give, has none)."""
        ...

    def worker_name(self, job_id: str, attempt: int) -> str: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def launch(self, record: JobRecord) -> Worker:
        """Start the worker of `record`'s current attempt (claimed by this replica)."""
        ...

    def adopt(self, row: WorkerRecord) -> Worker:
        """A handle on a worker started earlier (by this replica before a restart, or by one that stopped or died);
        if it no longer exists, the handle's `exited()` says so."""
        ...

    def stop_strays(self, job_id: str) -> None:
        """Before a job left RUNNING by a previous trainer process is resumed: stop a worker of it still running."""
        ...


_TRACEBACK = "Traceback (most recent call last):"
_LAST_LINE_MAX = 500


def last_words(text: str) -> str:
    """What a worker said last, as one line for the job's error: the exception line of its last traceback (plain on
    stderr, or the `exc` of a JSON log record), else the message of its last log record, else its last line; ""
    when it said nothing. A job's error is read by people and by UIs that show one line."""
    lines = text.splitlines()
    line = _exception_line(lines)
    if line is None:
        records = [t.strip() for t in lines if t.strip()]
        if not records:
            return ""
        line = records[-1]
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and "msg" in entry:
            exc = entry.get("exc")
            found = _exception_line(exc.splitlines()) if isinstance(exc, str) else None
            line = f"{entry['msg']}: {found}" if found else str(entry["msg"])
    line = " ".join(line.split())
    return line if len(line) <= _LAST_LINE_MAX else line[: _LAST_LINE_MAX - 1] + "…"


def _exception_line(lines: list[str]) -> str | None:
    """The `Type: message` line ending the last traceback in `lines` (its first unindented line after the frames)."""
    starts = [i for i, text in enumerate(lines) if text.startswith(_TRACEBACK)]
    if not starts:
        return None
    for text in lines[starts[-1] + 1 :]:
        if text.strip() and not text[0].isspace():
            return text.strip()
    return None
