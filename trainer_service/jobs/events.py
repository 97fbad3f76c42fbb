"""A job's event log: what WatchJob streams, recorded in the job store by the executor and the worker.

Each event is stored as the name of its `JobEvent.event` oneof field (the kind) and that message as JSON,
so the log stays readable with sqlite3 and any process can append to it (the worker runs in its own).
"""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.message import Message
from visiontune import names
from visiontune.v1 import job_pb2

from trainer_service.jobs.store import EventRecord, JobState, JobStore
from trainer_service.resources import JOB_STATES

_KINDS = {field.name for field in job_pb2.JobEvent.DESCRIPTOR.oneofs_by_name["event"].fields}


def record(jobs: JobStore, job_id: str, kind: str, message: Message) -> EventRecord:
    """Append one event; `kind` is the JobEvent oneof field the message goes into."""
    if kind not in _KINDS:
        raise ValueError(f"unknown job event kind {kind!r}; one of {sorted(_KINDS)}")
    return jobs.append_event(job_id, kind, json_format.MessageToJson(message, indent=None))


def record_state(jobs: JobStore, job_id: str, state: JobState, message: str = "") -> EventRecord:
    return record(jobs, job_id, "state_changed", job_pb2.StateChanged(state=JOB_STATES[state], message=message))


def record_warning(jobs: JobStore, job_id: str, code: str, message: str) -> EventRecord:
    return record(jobs, job_id, "warning", job_pb2.JobWarning(code=code, message=message))


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
