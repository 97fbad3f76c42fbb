"""The job store's vocabulary: jobs, studies and their events as plain records, their states, and the errors
the store raises.

Plain Python, no SQL: every job store backend returns and raises these, and the servicer converts records to
messages (`trainer_service.resources`). The errors are `visiontune.errors` classes, so the server runtime
turns them into status codes (docs/architecture.md §3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from visiontune import errors

__all__ = [
    "AlreadyExists",
    "Conflict",
    "EventRecord",
    "JobRecord",
    "JobState",
    "JobStoreError",
    "NotFound",
    "ReplicaRecord",
    "ResourceType",
    "SchemaError",
    "StudyRecord",
    "StudyState",
    "Takeover",
    "utc_now",
]


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------- errors


class JobStoreError(errors.VisionTuneError):
    """Base class of every error the job store raises on purpose (the store is closed, for one)."""


class NotFound(JobStoreError, errors.NotFound):
    """The job or study does not exist."""


class AlreadyExists(JobStoreError, errors.AlreadyExists):
    """A job or study with this id exists and was not created by the same request."""


class Conflict(JobStoreError, errors.Aborted):
    """A compare-and-set failed: the resource is not in one of the expected states."""


class QuotaExceeded(JobStoreError, errors.ResourceExhausted):
    """The creator already holds as many queued jobs (running studies) as a `CreatorQuota` allows."""


@dataclass(frozen=True, slots=True)
class CreatorQuota:
    """At most `limit` queued jobs (running studies) of one creator at once (0: no limit); `setting` names the
    flag that raises it, for the error."""

    limit: int
    setting: str = ""


class SchemaError(JobStoreError, errors.FailedPrecondition):
    """The database file has a schema this code cannot use (newer, or not a job store at all)."""


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    # A tuning trial stopped early by its study's pruner (the worker records it; terminal).
    PRUNED = "PRUNED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_JOB_STATES


class StudyState(enum.StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_STUDY_STATES


_TERMINAL_JOB_STATES: Final = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PRUNED})
_TERMINAL_STUDY_STATES: Final = frozenset({StudyState.SUCCEEDED, StudyState.FAILED, StudyState.CANCELLED})


class ResourceType(enum.StrEnum):
    """What an event belongs to: one events table serves jobs and studies."""

    JOB = "job"
    STUDY = "study"


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    state: JobState
    spec_json: str
    display_name: str
    request_id: str | None
    create_time: datetime
    update_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    # How many times increment_attempt was called: 0 until the executor starts the first attempt.
    attempt: int
    error: str | None
    result_json: str | None
    labels: dict[str, str]
    study_id: str | None
    trial_number: int | None
    # The trainer replica running the current attempt (None while queued, after the end, or on a store that
    # predates replicas).
    owner: str | None = None
    # The authenticated principal that created the job ('' without authentication).
    creator: str = ""
    # sha256 of the checkpoint the last finished epoch committed (None before the first one).
    checkpoint_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class StudyRecord:
    study_id: str
    state: StudyState
    spec_json: str
    display_name: str
    request_id: str | None
    create_time: datetime
    update_time: datetime
    end_time: datetime | None
    error: str | None
    result_json: str | None
    # The trainer replica whose study runner drives the study (None while nobody does).
    owner: str | None = None
    creator: str = ""  # the authenticated principal that created the study ('' without authentication)


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """A trainer process sharing the database: alive while its heartbeat is fresher than the lease."""

    replica_id: str
    host: str
    pid: int
    start_time: datetime
    heartbeat_time: datetime


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker outside the trainer's process tree (a Kubernetes Job), from its claim until it is gone."""

    name: str
    job_id: str
    attempt: int
    owner: str | None  # None: released by its replica; any replica adopts it
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Takeover:
    """What expiring dead replicas did: jobs queued again (to resume from their checkpoints), cancels finished,
    studies released for another runner, and jobs whose worker outlives its replica (a Kubernetes Job) released,
    still RUNNING, for another replica to adopt."""

    replicas: tuple[str, ...]
    requeued: tuple[str, ...]
    cancelled: tuple[str, ...]
    released_studies: tuple[str, ...]
    released_jobs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EventRecord:
    resource_type: ResourceType
    resource_id: str
    sequence: int  # 1, 2, 3, ... per resource, no gaps
    time: datetime
    kind: str
    payload_json: str
