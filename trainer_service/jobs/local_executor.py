"""Runs queued jobs in worker subprocesses, one at a time per slot, and looks after them.

Why a subprocess per job: a crash, an OOM kill or a CUDA fault in training must not take the gRPC server
down, and CancelJob must be able to stop a job at once. The worker records its own progress, result and
final state in the job store (SUCCEEDED, FAILED, CANCELLED, or PRUNED for a tuning trial its study's pruner
stopped); the executor steps in only when a worker dies without doing so:
- killed (a signal, e.g. kill -9 or the OOM killer) or lost → the job is queued again and resumes from its
  last checkpoint, up to `RunSpec.max_retries` times, then FAILED;
- CancelJob → SIGTERM to the worker, which stops within a batch and cleans up; CANCELLED. A cancel made on
  another replica reaches the worker through the job store (it checks its job's state every few seconds).
Each claimed job is owned by this replica (`trainer_service.jobs.replica`). On start, jobs this replica left
RUNNING (a restart with the same replica id) are queued again (their stray workers are stopped); on a clean stop
its running jobs are queued again for any replica; a dead replica's jobs are queued again by whichever replica
expires it. A worker whose attempt was taken over exits without writing anything (EXIT_SUPERSEDED).

A database outage (docs/architecture.md §6) is waited through by every call, here as in the workers; one that
outlasts the outage window fails this pass of the loop, which tries again on the next. A worker that ended while the
database was away is kept until its end can be read and handled; a worker that exited because the database stayed
away (EXIT_DATABASE_UNAVAILABLE) is a dead worker with a known cause: its job resumes from its last checkpoint, or
ends FAILED with the database's one line once its retries are spent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy.exc
from google.protobuf import json_format
from visiontune.errors import VisionTuneError
from visiontune.settings import DATABASE_URL_ENV, DEFAULT_BUCKET, S3Settings

from trainer_service.jobs import events
from trainer_service.jobs.store import ACTIVE_JOB_STATES, Conflict, JobRecord, JobState, JobStore, Takeover
from trainer_service.spec.convert import load_stored_spec
from trainer_service.spec.validate import SpecInvalid

log = logging.getLogger(__name__)

WORKER_MODULE = "trainer_service.jobs.worker"
EXIT_CANCELLED = 3  # the worker stopped because it was asked to
EXIT_PARENT_GONE = 75  # the trainer that started the worker is gone; the job resumes on its next start
EXIT_SUPERSEDED = 76  # another attempt of the job began elsewhere (this replica was taken for dead)
EXIT_DATABASE_UNAVAILABLE = 77  # the job database stayed unreachable past the outage window: nothing was recorded
# How often the executor looks for jobs it owns but runs no worker for (`sweep_orphans`).
ORPHAN_SWEEP_S = 30.0


@dataclass
class _Running:
    job_id: str
    attempt: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    cancel_requested: bool = False


def worker_environment(
    s3: S3Settings, base: Mapping[str, str] | None = None, *, database_url: str | None = None
) -> dict[str, str]:
    """`base` (this process's environment by default) plus the S3 settings and the job database the worker's flags
    default to. The database URL travels in the environment, not argv, so its password is not in `ps`."""
    env = {**(os.environ if base is None else base), **s3.to_env(), "PYTHONUNBUFFERED": "1"}
    if database_url is not None:
        env[DATABASE_URL_ENV] = database_url
    return env


def max_retries_of(record: JobRecord, default_bucket: str = DEFAULT_BUCKET) -> int:
    """RunSpec.max_retries of the job's stored spec, read as the worker reads it; 0 for a spec this trainer cannot
    read, since its worker fails on that spec too and a retry would only fail again."""
    try:
        return load_stored_spec(record.spec_json, default_bucket=default_bucket).config.run.max_retries
    except (json_format.ParseError, SpecInvalid):
        return 0


class JobExecutor:
    """Claims QUEUED jobs and runs each in `python -m trainer_service.jobs.worker`."""

    def __init__(
        self,
        jobs: JobStore,
        s3: S3Settings,
        data_dir: Path,
        *,
        replica_id: str,
        slots: int = 1,
        poll_interval_s: float = 0.5,
        python: str = sys.executable,
    ) -> None:
        self._jobs = jobs
        self.replica_id = replica_id
        self._s3 = s3
        self._data_dir = data_dir
        self._slots = slots
        self._poll_interval_s = poll_interval_s
        self._python = python
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept_at = time.monotonic()

    # -- lifecycle

    def start(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="job-executor", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 10.0, *, requeue: bool = True) -> None:
        """Stop claiming and stop the running workers; with `requeue`, their jobs are queued again at once, to
        resume from their checkpoints on any replica (otherwise they stay RUNNING, resumed when this replica
        starts again or expired with it)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s)
        running = self._kill_all()
        if not requeue:
            return
        for run in running:
            try:
                self._requeue(run.job_id, run.attempt, f"the trainer replica {self.replica_id} stopped")
            except VisionTuneError as err:
                # The database is away: the job stays RUNNING, resumed when this replica starts again or expired with
                # it by another.
                log.warning("could not queue the job again: %s", err, extra={"job": run.job_id})

    def lease_lost(self) -> None:
        """This replica was expired by another (it stalled past its lease): its jobs are queued or running
        elsewhere already, so its workers stop at once and nothing is recorded."""
        for run in self._kill_all():
            log.warning("stopped a worker whose job was taken over", extra={"job": run.job_id})

    def took_over(self, takeover: Takeover) -> None:
        """Record, in their logs, what expiring a dead replica did to its jobs, and look for the queued work."""
        dead = ", ".join(takeover.replicas)
        for job_id in takeover.requeued:
            events.record_state(
                self._jobs,
                job_id,
                JobState.QUEUED,
                f"the trainer replica running it ({dead}) stopped heartbeating; resuming from the last checkpoint",
            )
        for job_id in takeover.cancelled:
            events.record_state(self._jobs, job_id, JobState.CANCELLED, f"cancelled (its replica {dead} is gone)")
        self._wake.set()

    def _kill_all(self) -> list[_Running]:
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for run in running:
            if run.proc.poll() is None:
                run.proc.kill()  # no cleanup wanted: the job resumes from its last checkpoint
                run.proc.wait()
        return running

    def _requeue(self, job_id: str, attempt: int, why: str) -> None:
        try:
            self._jobs.update_state(job_id, JobState.QUEUED, expected={JobState.RUNNING}, attempt=attempt)
        except Conflict:
            # Ended meanwhile, cancelling, or taken over: finish a cancel, otherwise someone else has it.
            record = self._jobs.get_job(job_id)
            if record.state == JobState.CANCELLING and record.attempt == attempt:
                self._finish(job_id, JobState.CANCELLED, f"cancelled ({why})")
            return
        events.record_state(self._jobs, job_id, JobState.QUEUED, f"{why}; resuming from the last checkpoint")

    def wake(self) -> None:
        """Look for queued work now (CreateJob calls it)."""
        self._wake.set()

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def worker_pid(self, job_id: str) -> int | None:
        with self._lock:
            run = self._running.get(job_id)
            return run.proc.pid if run else None

    # -- cancel

    def cancel(self, job_id: str) -> JobRecord:
        """CancelJob: a queued job is cancelled at once; a running one is asked to stop."""
        try:
            record = self._jobs.update_state(job_id, JobState.CANCELLED, expected={JobState.QUEUED})
            events.record_state(self._jobs, job_id, JobState.CANCELLED, "cancelled before it started")
            return record
        except Conflict:
            pass
        try:
            record = self._jobs.update_state(job_id, JobState.CANCELLING, expected={JobState.RUNNING})
        except Conflict:
            return self._jobs.get_job(job_id)  # already cancelling or finished: CancelJob is idempotent
        events.record_state(self._jobs, job_id, JobState.CANCELLING, "cancel requested")
        with self._lock:
            run = self._running.get(job_id)
            if run is not None:
                run.cancel_requested = True
                if run.proc.poll() is None:
                    run.proc.send_signal(signal.SIGTERM)
        self._wake.set()
        return record

    # -- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                if time.monotonic() - self._swept_at >= ORPHAN_SWEEP_S:
                    self.sweep_orphans()
                self._claim()
            except (VisionTuneError, sqlalchemy.exc.SQLAlchemyError) as err:
                # The job database past its outage window, most likely: nothing is lost (claims are transactions, a
                # worker that ended is reaped on a later pass), and the next pass tries again.
                log.warning("the executor's pass failed: %s; trying again", err, extra={"replica": self.replica_id})
            except Exception:
                log.exception("the executor's pass failed; trying again", extra={"replica": self.replica_id})
            self._wake.wait(self._poll_interval_s)
            self._wake.clear()

    def _claim(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if len(self._running) >= self._slots:
                    return
            # The claim counts the attempt in its own transaction: no job is left RUNNING on its previous attempt.
            record = self._jobs.claim_next_queued(owner=self.replica_id, start_attempt=True)
            if record is None:
                return
            self._launch(record)

    def _launch(self, record: JobRecord) -> None:
        log_dir = self._data_dir / "trainer" / "jobs" / record.job_id
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"worker-{record.attempt}.log"
        message = "started" if record.attempt == 1 else f"resumed (attempt {record.attempt})"
        try:
            events.record_state(self._jobs, record.job_id, JobState.RUNNING, message)
        except VisionTuneError as err:
            # The job is claimed: it must get its worker, which records the rest (or exits if the database is still
            # away, and is reaped like any other).
            log.warning("the job's start was not recorded: %s", err, extra={"job": record.job_id})
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [self._python, "-m", WORKER_MODULE, "--job", record.job_id, "--data-dir", str(self._data_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=worker_environment(self._s3, database_url=self._jobs.url),
            )
        log.info(
            "job started",
            extra={"job": record.job_id, "attempt": record.attempt, "pid": proc.pid, "log": str(log_path)},
        )
        with self._lock:
            self._running[record.job_id] = _Running(record.job_id, record.attempt, proc, log_path)

    def _reap(self) -> None:
        with self._lock:
            finished = [run for run in self._running.values() if run.proc.poll() is not None]
        for run in finished:
            # A run leaves `_running` only once its end is handled: if the database is away now, the next pass
            # handles it (handling twice is harmless: every step is a compare-and-set).
            self._after_exit(run)
            with self._lock:
                if self._running.get(run.job_id) is run:
                    del self._running[run.job_id]

    def _after_exit(self, run: _Running) -> None:
        code = run.proc.returncode
        record = self._jobs.get_job(run.job_id)
        if record.state.is_terminal:
            log.info("job ended", extra={"job": run.job_id, "state": record.state.value, "exit_code": code})
            return
        if record.attempt != run.attempt or code == EXIT_SUPERSEDED:
            log.warning("job taken over by another attempt", extra={"job": run.job_id, "exit_code": code})
            return
        # The worker died without recording an end: a signal, an OOM kill, or an exit we did not expect.
        if record.state == JobState.CANCELLING or run.cancel_requested:
            self._finish(run.job_id, JobState.CANCELLED, "cancelled (the worker was stopped)")
            return
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = last_log_line(run.log_path)
        retries = max_retries_of(record, self._s3.bucket)
        # A worker the database's outage stopped said why in one line (the database, the wait, the cause).
        database_gone = code == EXIT_DATABASE_UNAVAILABLE
        if record.attempt <= retries:
            why = last if database_gone else cause
            log.warning("worker died; job queued to resume", extra={"job": run.job_id, "cause": why})
            try:
                self._jobs.update_state(run.job_id, JobState.QUEUED, expected={JobState.RUNNING}, attempt=run.attempt)
            except Conflict:
                return  # cancelled or taken over meanwhile: the next pass (or another replica) handles it
            why = f"the worker stopped: {last}" if database_gone else f"worker died ({cause})"
            events.record_state(
                self._jobs,
                run.job_id,
                JobState.QUEUED,
                f"{why}; resuming from the last checkpoint (retry {record.attempt} of {retries})",
            )
            self._wake.set()
        else:
            self._finish(
                run.job_id,
                JobState.FAILED,
                last
                if database_gone
                else f"the worker died ({cause}) on each of {record.attempt} attempts; its last words: {last}",
                attempt=run.attempt,
            )

    def sweep_orphans(self) -> None:
        """Jobs this replica owns, RUNNING or CANCELLING, with no worker here: resume or cancel them.

        Nothing should leave one, but a database outage can: a claim whose COMMIT the server applied while the
        connection died before its answer came is run again (and claims the next job), so the first stays RUNNING
        here with no worker; so does a cancel that lands between a dead worker's reaping steps. Only this thread
        launches workers, so a job of ours that is not in `_running` has none.
        """
        self._swept_at = time.monotonic()
        owned = self._jobs.jobs_in_states(ACTIVE_JOB_STATES, owner=self.replica_id)
        with self._lock:
            orphans = [record for record in owned if record.job_id not in self._running]
        for record in orphans:
            log.warning(
                "a job of this replica had no worker", extra={"job": record.job_id, "state": record.state.value}
            )
            if record.state == JobState.CANCELLING:
                self._finish(record.job_id, JobState.CANCELLED, "cancelled (its worker was gone)")
            else:
                self._requeue(record.job_id, record.attempt, "the trainer found the job without its worker")
        if orphans:
            self._wake.set()

    def _finish(self, job_id: str, state: JobState, message: str, *, attempt: int | None = None) -> None:
        try:
            self._jobs.update_state(
                job_id,
                state,
                error=message if state == JobState.FAILED else None,
                expected=set(ACTIVE_JOB_STATES),
                attempt=attempt,
            )
        except Conflict:
            return
        events.record_state(self._jobs, job_id, state, message)

    def _recover(self) -> None:
        """Jobs this replica left RUNNING or CANCELLING when it last ran (same replica id), or that a store from
        before replicas left without an owner: stop stray workers, then resume or cancel."""
        active = set(ACTIVE_JOB_STATES)
        left = self._jobs.jobs_in_states(active, owner=self.replica_id)
        left += [r for r in self._jobs.jobs_in_states(active) if r.owner is None]
        for record in left:
            _kill_stray_worker(record.job_id)
            if record.state == JobState.CANCELLING:
                self._finish(record.job_id, JobState.CANCELLED, "cancelled (the trainer restarted)")
                continue
            self._requeue(record.job_id, record.attempt, "the trainer restarted")


def _kill_stray_worker(job_id: str) -> None:
    """A worker of this job still running from a previous trainer process (found through /proc)."""
    marker = f"{WORKER_MODULE}\0--job\0{job_id}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                continue
            log.warning("stopped a stray worker", extra={"job": job_id, "pid": int(entry.name)})
            time.sleep(0.1)


_TRACEBACK = "Traceback (most recent call last):"
_LAST_LINE_MAX = 500


def last_log_line(path: Path, max_bytes: int = 64 * 1024) -> str:
    """What a dead worker said last, as one line for the job's error: the exception line of its last traceback
    (plain on stderr, or the `exc` of a JSON log record), else the message of its last log record.

    A job's error is read by people and by UIs that show one line; the whole log stays in the worker's log file.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no worker log)"
    line = _exception_line(lines)
    if line is None:
        records = [text.strip() for text in lines if text.strip()]
        if not records:
            return "(the worker log is empty)"
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
    found = None
    for text in lines[starts[-1] + 1 :]:
        if text.strip() and not text[0].isspace():
            found = text.strip()
            break
    return found
