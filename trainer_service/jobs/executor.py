"""Claims queued jobs and runs each attempt in a worker, then looks after it: the one place retry rules live.

Where workers run is a `WorkerRuntime` (`runtime.py`): subprocesses of this trainer (`local_workers`, the default) or
Kubernetes Jobs on the cluster's nodes (`kubernetes/`). Why a worker of its own per job: a crash, an OOM kill or a
CUDA fault in training must not take the gRPC server down, and CancelJob must be able to stop a job at once.

The worker records its own progress, result and final state in the job store (SUCCEEDED, FAILED, CANCELLED, or PRUNED
for a tuning trial its study's pruner stopped); the executor steps in only when a worker ends without doing so:
- killed (a signal, the OOM killer, an eviction), interrupted, or lost → the job is queued again and resumes from its
  last checkpoint, up to `RunSpec.max_retries` times, then FAILED;
- a worker that can never run (an image that cannot be pulled, a GPU request no node meets) → FAILED at once;
- CancelJob → the worker is asked to stop (SIGTERM; its Kubernetes Job deleted), stops within a batch and cleans up;
  CANCELLED. A cancel made on another replica reaches the worker through the job store.
Each claimed job is owned by this replica (`trainer_service.jobs.replica`). On start, jobs this replica left RUNNING
(a restart with the same replica id) are resumed; a dead replica's jobs are queued again by whichever replica expires
it. A worker whose attempt was taken over exits without writing anything (EXIT_SUPERSEDED).

Workers that outlive their trainer (Kubernetes Jobs) are handed over rather than restarted: each holds a worker row
(`JobStore.workers`) from its claim until its Job is gone, which also bounds the Jobs in the cluster across replicas
(`cluster_cap`). A clean stop releases this replica's rows, an expired replica's rows are released by whoever expires
it, and any replica's next sweep adopts released rows, watching the same Job to its end: never a second Job for one
attempt.

A database outage (docs/architecture.md §6) is waited through by every call, here as in the workers; one that
outlasts the outage window fails this pass of the loop, which tries again on the next. A worker that ended while the
database was away is kept until its end can be read and handled; a worker that exited because the database stayed
away (EXIT_DATABASE_UNAVAILABLE) is a dead worker with a known cause: its job resumes from its last checkpoint, or
ends FAILED with the database's one line once its retries are spent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy.exc
from google.protobuf import json_format
from visiontune.errors import ResourceExhausted, VisionTuneError
from visiontune.settings import DEFAULT_BUCKET

from trainer_service.jobs import events
from trainer_service.jobs.gpus import devices_of, slots_taken
from trainer_service.jobs.runtime import (
    EXIT_DATABASE_UNAVAILABLE,
    EXIT_SUPERSEDED,
    Worker,
    WorkerExit,
    WorkerRuntime,
)
from trainer_service.jobs.store import (
    ACTIVE_JOB_STATES,
    Conflict,
    JobRecord,
    JobState,
    JobStore,
    NotFound,
    Takeover,
    WorkerClaim,
    WorkerRecord,
)
from trainer_service.spec.convert import load_stored_spec
from trainer_service.spec.validate import SpecInvalid

log = logging.getLogger(__name__)

# How often the executor looks for jobs it owns but runs no worker for, and for released workers to adopt.
ORPHAN_SWEEP_S = 30.0
ADOPT_SWEEP_S = 5.0


@dataclass
class _Running:
    worker: Worker
    key: str  # the worker's name (one per job attempt)
    cancel_requested: bool = False
    # Set once the worker's end is handled (recorded or left to its new attempt); it stays here until cleaned up.
    handled: bool = False
    worker_row: str | None = None  # the worker row it holds (runtimes with a cluster cap)
    slots: int = 1  # of this replica's job slots (`gpus.slots_taken`: a job on several local GPUs takes that many)

    @property
    def job_id(self) -> str:
        return self.worker.job_id

    @property
    def attempt(self) -> int:
        return self.worker.attempt


def max_retries_of(record: JobRecord, default_bucket: str = DEFAULT_BUCKET) -> int:
    """RunSpec.max_retries of the job's stored spec, read as the worker reads it; 0 for a spec this trainer cannot
    read, since its worker fails on that spec too and a retry would only fail again."""
    try:
        return load_stored_spec(record.spec_json, default_bucket=default_bucket).config.run.max_retries
    except (json_format.ParseError, SpecInvalid):
        return 0


class SlotsBusy(ResourceExhausted):
    """Every job slot of this replica stayed busy for as long as the caller would wait."""

    def __init__(self, slots: int, waited_s: float) -> None:
        super().__init__(
            f"all {slots} job slot{'s' if slots != 1 else ''} of this trainer stayed busy for {waited_s:.0f} s; "
            "retry when a job has ended (or raise --job-slots)"
        )


class JobExecutor:
    """Claims QUEUED jobs and runs each in a worker of `workers`, `slots` at a time on this replica."""

    def __init__(
        self,
        jobs: JobStore,
        workers: WorkerRuntime,
        *,
        replica_id: str,
        default_bucket: str = DEFAULT_BUCKET,
        slots: int = 1,
        poll_interval_s: float = 0.5,
    ) -> None:
        self._jobs = jobs
        self._workers = workers
        self.replica_id = replica_id
        self._default_bucket = default_bucket
        self._slots = slots
        self._poll_interval_s = poll_interval_s
        self._running: dict[str, _Running] = {}  # by worker name
        self._borrowed = 0  # slots lent to work that is not a job (`borrow_slot`)
        self._borrowers_waiting = 0  # their callers wait; the next free slot is theirs, not a queued job's
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept_at = time.monotonic()
        self._adopted_at = 0.0

    # -- lifecycle

    def start(self) -> None:
        self._workers.start()
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="job-executor", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 10.0, *, requeue: bool = True) -> None:
        """Stop claiming. Workers that outlive the trainer keep running and, with `requeue`, are released for another
        replica to adopt; other workers are stopped and, with `requeue`, their jobs queued again at once, to resume
        from their checkpoints on any replica. Without `requeue` jobs stay this replica's: resumed when it starts
        again, or taken over with it by another."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s)
        try:
            if self._workers.workers_outlive_trainer:
                with self._lock:
                    self._running.clear()
                if requeue:
                    self._release_workers()
                return
            running = self._kill_all()
            if not requeue:
                return
            for run in running:
                try:
                    self._requeue(run.job_id, run.attempt, f"the trainer replica {self.replica_id} stopped")
                except VisionTuneError as err:
                    # The database is away: the job stays RUNNING, resumed when this replica starts again or expired
                    # with it by another.
                    log.warning("could not queue the job again: %s", err, extra={"job": run.job_id})
        finally:
            self._workers.close()

    def _release_workers(self) -> None:
        try:
            released = self._jobs.release_workers(self.replica_id)
        except VisionTuneError as err:
            log.warning("could not hand the running jobs over: %s", err, extra={"replica": self.replica_id})
            return
        for row in released:
            log.info("job handed over, still running", extra={"job": row.job_id, "worker": row.name})

    def lease_lost(self) -> None:
        """This replica was expired by another (it stalled past its lease): its jobs are queued, released or running
        elsewhere already, so it lets go of its workers at once and records nothing (workers of its own it stops)."""
        if self._workers.workers_outlive_trainer:
            with self._lock:
                dropped = list(self._running.values())
                self._running.clear()
        else:
            dropped = self._kill_all()
        for run in dropped:
            log.warning("let go of a worker whose job was taken over", extra={"job": run.job_id})

    def took_over(self, takeover: Takeover) -> None:
        """Record, in their logs, what expiring a dead replica did to its jobs, and look for the work it left."""
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
        if takeover.released_jobs:
            self._adopted_at = 0.0  # adopt the released workers on the next pass
        self._wake.set()

    def _kill_all(self) -> list[_Running]:
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for run in running:
            run.worker.kill()  # no cleanup wanted: the job resumes from its last checkpoint
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

    @property
    def gpu_count(self) -> int | None:
        """The GPUs a job's worker can get here (`WorkerRuntime.gpu_count`)."""
        return self._workers.gpu_count

    @contextlib.contextmanager
    def borrow_slot(self, timeout_s: float) -> Iterator[str | None]:
        """One of this replica's slots, and its GPU (a `CUDA_VISIBLE_DEVICES` entry; None on the CPU), for work that
        is not a job (the LR range test) while the block runs. It goes before queued jobs: no claim is made while the
        slot is lent. Raises SlotsBusy when no slot frees up within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._borrowers_waiting += 1
            try:
                while self._slots_used() >= self._slots:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise SlotsBusy(self._slots, timeout_s)
                    self._slot_freed.wait(min(remaining, self._poll_interval_s))
            finally:
                self._borrowers_waiting -= 1
            self._borrowed += 1
        try:
            with self._workers.borrow_gpu() as gpu:
                yield gpu
        finally:
            with self._lock:
                self._borrowed -= 1
                self._slot_freed.notify_all()
            self.wake()

    def _slots_used(self) -> int:
        """Slots taken by workers (until their runs are dropped) and by borrowers (the caller holds the lock)."""
        return sum(run.slots for run in self._running.values()) + self._borrowed

    def running_jobs(self) -> list[str]:
        """Jobs whose worker this replica looks after and whose end is not handled yet."""
        with self._lock:
            return [run.job_id for run in self._running.values() if not run.handled]

    def worker_of(self, job_id: str) -> Worker | None:
        with self._lock:
            run = self._current_run(job_id)
            return run.worker if run else None

    def _current_run(self, job_id: str) -> _Running | None:
        """The run of `job_id` whose end is not handled yet (the caller holds the lock)."""
        return next((r for r in self._running.values() if r.job_id == job_id and not r.handled), None)

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
            run = self._current_run(job_id)
            if run is not None:
                run.cancel_requested = True
        if run is not None:
            run.worker.terminate()
        self._wake.set()
        return record

    # -- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                now = time.monotonic()
                if self._workers.workers_outlive_trainer and now - self._adopted_at >= ADOPT_SWEEP_S:
                    self.adopt_released()
                if now - self._swept_at >= ORPHAN_SWEEP_S:
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
        cap = self._workers.cluster_cap
        claim = None if cap is None else WorkerClaim(self._workers.worker_name, cap)
        while not self._stop.is_set():
            with self._lock:
                free = self._slots - self._slots_used() - self._borrowers_waiting
            if free <= 0:
                return
            # A job on more GPUs than are free waits for them; an idle replica takes any job (it runs alone).
            fits = free if free < self._slots and self._workers.gpu_count else None
            # The claim counts the attempt in its own transaction: no job is left RUNNING on its previous attempt.
            record = self._jobs.claim_next_queued(
                owner=self.replica_id, start_attempt=True, worker=claim, max_devices=fits
            )
            if record is None:
                return
            self._launch(record)

    def _launch(self, record: JobRecord) -> None:
        message = "started" if record.attempt == 1 else f"resumed (attempt {record.attempt})"
        try:
            events.record_state(self._jobs, record.job_id, JobState.RUNNING, message)
        except VisionTuneError as err:
            # The job is claimed: it must get its worker, which records the rest (or exits if the database is still
            # away, and is reaped like any other).
            log.warning("the job's start was not recorded: %s", err, extra={"job": record.job_id})
        worker = self._workers.launch(record)
        name = self._workers.worker_name(record.job_id, record.attempt)
        row = None if self._workers.cluster_cap is None else name
        slots = slots_taken(devices_of(record.spec_json), self._workers.gpu_count, self._slots)
        with self._lock:
            self._running[name] = _Running(worker, name, worker_row=row, slots=slots)

    def _reap(self) -> None:
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            if not run.handled:
                ended = run.worker.exited()
                if ended is None:
                    continue
                # Handled once: if the database is away now, the next pass handles it (handling twice is harmless:
                # every step is a compare-and-set).
                self._after_exit(run, ended)
                run.handled = True
            if not run.worker.cleaned_up():
                continue  # its Kubernetes Job is still being deleted: it keeps its place under the cap
            if run.worker_row is not None:
                self._jobs.release_worker(run.worker_row)
            with self._lock:
                if self._running.get(run.key) is run:
                    del self._running[run.key]
                    self._slot_freed.notify_all()
            self._wake.set()  # a place is free

    def _after_exit(self, run: _Running, ended: WorkerExit) -> None:
        record = self._jobs.get_job(run.job_id)
        if record.state.is_terminal:
            log.info("job ended", extra={"job": run.job_id, "state": record.state.value, "exit_code": ended.exit_code})
            return
        if record.attempt != run.attempt or ended.exit_code == EXIT_SUPERSEDED:
            log.warning("job taken over by another attempt", extra={"job": run.job_id, "cause": ended.cause})
            return
        # The worker ended without recording an end: a signal, an OOM kill, an eviction, or an exit we did not expect.
        if record.state == JobState.CANCELLING or run.cancel_requested:
            self._finish(run.job_id, JobState.CANCELLED, "cancelled (the worker was stopped)")
            return
        if not ended.retryable:
            self._finish(run.job_id, JobState.FAILED, ended.cause, attempt=run.attempt)
            return
        retries = max_retries_of(record, self._default_bucket)
        # A worker the database's outage stopped said why in one line (the database, the wait, the cause).
        database_gone = ended.exit_code == EXIT_DATABASE_UNAVAILABLE
        if record.attempt <= retries:
            why = ended.last_words if database_gone else ended.cause
            log.warning("worker died; job queued to resume", extra={"job": run.job_id, "cause": why})
            try:
                self._jobs.update_state(run.job_id, JobState.QUEUED, expected={JobState.RUNNING}, attempt=run.attempt)
            except Conflict:
                return  # cancelled or taken over meanwhile: the next pass (or another replica) handles it
            why = f"the worker stopped: {ended.last_words}" if database_gone else f"worker died ({ended.cause})"
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
                ended.last_words
                if database_gone
                else f"the worker died ({ended.cause}) on each of {record.attempt} attempts; "
                f"its last words: {ended.last_words}",
                attempt=run.attempt,
            )

    # -- adopting workers, orphans

    def adopt_released(self) -> None:
        """Take over released workers (of a replica that stopped or died) and watch them to their end, and pick up
        worker rows of this replica it does not track (after a restart under the same replica id)."""
        self._adopted_at = time.monotonic()
        self._jobs.adopt_workers(self.replica_id)
        for row in self._jobs.workers(owner=self.replica_id):
            self._track(row)

    def _track(self, row: WorkerRecord) -> None:
        with self._lock:
            if row.name in self._running:
                return
        worker = self._workers.adopt(row)
        try:
            record: JobRecord | None = self._jobs.get_job(row.job_id)
        except NotFound:
            record = None  # deleted since: its worker is only to be cleaned up
        current = record is not None and record.attempt == row.attempt and record.state in ACTIVE_JOB_STATES
        run = _Running(worker, row.name, worker_row=row.name, handled=not current)
        if not current:
            worker.kill()  # a stale attempt, or its job ended: nothing to wait for
        elif record is not None and record.state == JobState.CANCELLING:
            run.cancel_requested = True
            worker.terminate()
        with self._lock:
            self._running[row.name] = run
        log.info("adopted a running worker", extra={"job": row.job_id, "worker": row.name, "current": current})

    def sweep_orphans(self) -> None:
        """Jobs this replica owns, RUNNING or CANCELLING, with no worker here: resume or cancel them.

        Nothing should leave one, but a database outage can: a claim whose COMMIT the server applied while the
        connection died before its answer came is run again (and claims the next job), so the first stays RUNNING
        here with no worker; so does a cancel that lands between a dead worker's reaping steps. Only this thread
        launches workers, so a job of ours that is not tracked and holds no worker row has none.
        """
        self._swept_at = time.monotonic()
        owned = self._jobs.jobs_in_states(ACTIVE_JOB_STATES, owner=self.replica_id)
        held = {row.job_id for row in self._jobs.workers()} if self._workers.cluster_cap is not None else set()
        with self._lock:
            tracked = {run.job_id for run in self._running.values()}
            orphans = [r for r in owned if r.job_id not in tracked and r.job_id not in held]
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
        """What this replica left when it last ran (same replica id): workers that outlived it are adopted; jobs left
        RUNNING or CANCELLING without one (or that a store from before replicas left without an owner) have their
        stray workers stopped, then resume or are cancelled."""
        held: set[str] = set()
        if self._workers.workers_outlive_trainer:
            self.adopt_released()
            held = {row.job_id for row in self._jobs.workers()}
        active = set(ACTIVE_JOB_STATES)
        left = self._jobs.jobs_in_states(active, owner=self.replica_id)
        left += [r for r in self._jobs.jobs_in_states(active) if r.owner is None]
        for record in left:
            if record.job_id in held:
                continue
            self._workers.stop_strays(record.job_id)
            if record.state == JobState.CANCELLING:
                self._finish(record.job_id, JobState.CANCELLED, "cancelled (the trainer restarted)")
                continue
            self._requeue(record.job_id, record.attempt, "the trainer restarted")
