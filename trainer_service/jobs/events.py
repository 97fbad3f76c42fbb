"""A job's event log: what WatchJob streams, recorded in the job store by the executor and the worker.

Each event is stored as the name of its `JobEvent.event` oneof field (the kind) and that message as JSON,
so the log stays readable with sqlite3 and any process can append to it (the worker runs in its own).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading

import sqlalchemy.exc
from google.protobuf import json_format
from google.protobuf.message import Message
from visiontune import errors, names
from visiontune.outages import Outage
from visiontune.v1 import job_pb2

from trainer_service.jobs.store import MAX_EVENTS_PER_CALL, EventRecord, JobState, JobStore
from trainer_service.resources import JOB_STATES

log = logging.getLogger(__name__)

_KINDS = {field.name for field in job_pb2.JobEvent.DESCRIPTOR.oneofs_by_name["event"].fields}

# The warning code of a wait for S3 (its start, and its end).
S3_UNAVAILABLE = "s3_unavailable"
# The warning code of an outage of the job database the worker waited through (recorded when it is back).
DATABASE_UNAVAILABLE = "database_unavailable"


def record(jobs: JobStore, job_id: str, kind: str, message: Message) -> EventRecord:
    """Append one event; `kind` is the JobEvent oneof field the message goes into."""
    if kind not in _KINDS:
        raise ValueError(f"unknown job event kind {kind!r}; one of {sorted(_KINDS)}")
    return jobs.append_event(job_id, kind, json_format.MessageToJson(message, indent=None))


def record_state(jobs: JobStore, job_id: str, state: JobState, message: str = "") -> EventRecord:
    return record(jobs, job_id, "state_changed", job_pb2.StateChanged(state=JOB_STATES[state], message=message))


def record_warning(jobs: JobStore, job_id: str, code: str, message: str, *, once: bool = True) -> EventRecord:
    """Append a warning; with `once`, not if the log already holds one with this code and message (that one is
    returned). A resumed attempt runs the data checks of the first again: the job has each warning once, not once
    per attempt. Warnings that are news each time they happen (an outage starting) pass `once=False`."""
    if once:
        earlier = _find_warning(jobs, job_id, code, message)
        if earlier is not None:
            return earlier
    return record(jobs, job_id, "warning", job_pb2.JobWarning(code=code, message=message))


def _find_warning(jobs: JobStore, job_id: str, code: str, message: str) -> EventRecord | None:
    after = 0
    while batch := jobs.events_after(job_id, after, limit=MAX_EVENTS_PER_CALL):
        for event in batch:
            if event.kind == "warning":
                payload = json.loads(event.payload_json)
                if payload.get("code", "") == code and payload.get("message", "") == message:
                    return event
        after = batch[-1].sequence
    return None


class OutageEvents:
    """An OutageListener for a job's artifact store: a `s3_unavailable` warning when a wait for S3 starts ("waiting
    for S3 at host:port since 12:01:02 UTC (connection refused)") and one when S3 is back.

    The image downloads run in threads that wait side by side: the job sees one wait, from the first thread's
    start to the first thread's success. If the job store cannot take the event, it goes to the log instead.
    """

    code = S3_UNAVAILABLE

    def __init__(self, jobs: JobStore | None, job_id: str) -> None:
        self._jobs = jobs
        self._job_id = job_id
        self._lock = threading.Lock()
        self._current: Outage | None = None

    def bind(self, jobs: JobStore) -> None:
        """The job store to record in, when it is opened after the listener (the job database's own listener)."""
        self._jobs = jobs

    def outage_started(self, outage: Outage) -> None:
        with self._lock:
            if self._current is not None:
                return
            self._current = outage
        message = self.started_message(outage)
        if message is not None:
            self._record(message)

    def outage_ended(self, outage: Outage, waited_s: float) -> None:
        with self._lock:
            first, self._current = self._current, None
        if first is not None:
            # From the first wait's start: another thread's wait may have begun later than the one that ended it.
            waited_s += max(0.0, (outage.since - first.since).total_seconds())
            self._record(self.ended_message(first, waited_s))

    def started_message(self, outage: Outage) -> str | None:
        return outage.waiting_message()

    def ended_message(self, outage: Outage, waited_s: float) -> str:
        return f"{outage.service} at {outage.endpoint} is back after {waited_s:.0f} s"

    def _record(self, message: str) -> None:
        try:
            if self._jobs is None:
                raise errors.FailedPrecondition("no job store yet")
            record_warning(self._jobs, self._job_id, self.code, message, once=False)
        except (errors.VisionTuneError, sqlite3.Error, sqlalchemy.exc.SQLAlchemyError) as err:
            # The job store being down too must not end the wait; the worker's log keeps the news.
            log.warning("%s (not recorded as a job event: %s)", message, err, extra={"job": self._job_id})


class DatabaseOutageEvents(OutageEvents):
    """An OutageListener for a job worker's job store: when the job database is back after an outage, one
    `database_unavailable` warning says how long it was away ("the job database at 127.0.0.1:5432/jobs was
    unreachable from 12:01:02 UTC for 31 s (Connection refused); the job carried on").

    Nothing when the wait starts: the database cannot take an event during its own outage. The event is recorded
    by the call that found the database back (inside its retry loop, once that call's transaction is done), so it
    follows the events the job recorded before the outage and precedes those it records after.
    """

    code = DATABASE_UNAVAILABLE

    def started_message(self, outage: Outage) -> str | None:
        return None

    def ended_message(self, outage: Outage, waited_s: float) -> str:
        return (
            f"{outage.service} at {outage.endpoint} was unreachable from {outage.since:%H:%M:%S} UTC for "
            f"{waited_s:.0f} s ({outage.cause}); the job carried on"
        )


def to_proto(event: EventRecord) -> job_pb2.JobEvent:
    out = job_pb2.JobEvent(job=names.job_name(event.resource_id), sequence=event.sequence)
    out.time.FromDatetime(event.time)
    json_format.Parse(event.payload_json, getattr(out, event.kind))
    return out


def progress(job: job_pb2.Job, log: list[EventRecord]) -> tuple[job_pb2.JobProgress, list[str]]:
    """Where a job is (its latest stage and epoch) and its warnings, read from its event log."""
    spec = job.spec
    per_repeat = spec.classifier.epochs + (spec.fine_tuning.stage.epochs if spec.fine_tuning.enabled else 0)
    planned = max(1, per_repeat * max(1, spec.run.repeats))
    out = job_pb2.JobProgress()
    warnings: list[str] = []
    done = 0
    for event in log:
        if event.kind == "stage_started":
            started = to_proto(event).stage_started
            out.stage, out.repeat, out.total_epochs, out.epoch = (
                started.stage,
                started.repeat,
                started.total_epochs,
                0,
            )
        elif event.kind == "epoch_ended":
            ended = to_proto(event).epoch_ended
            out.epoch = ended.epoch
            done += 1
        elif event.kind == "warning":
            warnings.append(to_proto(event).warning.message)
    out.fraction_done = 1.0 if job.state == job_pb2.JOB_STATE_SUCCEEDED else min(1.0, done / planned)
    return out, warnings
