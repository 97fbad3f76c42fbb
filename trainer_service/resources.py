"""Conversions between the job store's plain records and the v1 API's resources."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2
from visiontune import names
from visiontune.v1 import job_pb2, study_pb2, training_spec_pb2

from trainer_service.jobs.store import JobRecord, JobState, StudyRecord, StudyState

JOB_STATES: dict[JobState, job_pb2.JobState.ValueType] = {
    JobState.QUEUED: job_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: job_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: job_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: job_pb2.JOB_STATE_FAILED,
    JobState.CANCELLING: job_pb2.JOB_STATE_CANCELLING,
    JobState.CANCELLED: job_pb2.JOB_STATE_CANCELLED,
    JobState.PRUNED: job_pb2.JOB_STATE_PRUNED,
}
STUDY_STATES: dict[StudyState, study_pb2.StudyState.ValueType] = {
    StudyState.RUNNING: study_pb2.STUDY_STATE_RUNNING,
    StudyState.SUCCEEDED: study_pb2.STUDY_STATE_SUCCEEDED,
    StudyState.FAILED: study_pb2.STUDY_STATE_FAILED,
    StudyState.CANCELLING: study_pb2.STUDY_STATE_CANCELLING,
    StudyState.CANCELLED: study_pb2.STUDY_STATE_CANCELLED,
}
JOB_STATE_FROM_PROTO = {v: k for k, v in JOB_STATES.items()}
STUDY_STATE_FROM_PROTO = {v: k for k, v in STUDY_STATES.items()}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _error_status(error: str | None) -> status_pb2.Status | None:
    return status_pb2.Status(code=code_pb2.INTERNAL, message=error) if error else None


def job_to_proto(record: JobRecord) -> job_pb2.Job:
    job = job_pb2.Job(
        name=names.job_name(record.job_id),
        display_name=record.display_name,
        spec=json_format.Parse(record.spec_json, training_spec_pb2.TrainingSpec()),
        state=JOB_STATES[record.state],
        create_time=timestamp(record.create_time),
        start_time=timestamp(record.start_time),
        end_time=timestamp(record.end_time),
        error=_error_status(record.error),
        attempt=record.attempt,
        labels=record.labels,
        study=names.study_name(record.study_id) if record.study_id else "",
        trial_number=record.trial_number or 0,
    )
    if record.result_json:
        json_format.Parse(record.result_json, job.result)
    return job


def study_to_proto(record: StudyRecord) -> study_pb2.Study:
    study = study_pb2.Study(
        name=names.study_name(record.study_id),
        display_name=record.display_name,
        spec=json_format.Parse(record.spec_json, study_pb2.StudySpec()),
        state=STUDY_STATES[record.state],
        create_time=timestamp(record.create_time),
        end_time=timestamp(record.end_time),
        error=_error_status(record.error),
    )
    if record.result_json:
        # The study's results (trials, best, importances) are stored as a partial Study message.
        json_format.Parse(record.result_json, study, ignore_unknown_fields=False)
    return study
