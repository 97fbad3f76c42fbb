"""The trainer's job store: jobs, tuning studies, their event logs and the trainer replicas, in one SQL database.

One setting chooses the database (`--database-url`, `visiontune.database`): an embedded SQLite file, the local
stack's default, or PostgreSQL, shared by several trainer replicas (docs/architecture.md §6). The operations
here are written once in SQLAlchemy Core; what differs per database is in `visiontune.database` (connections,
locking, retries through outages) and in the migrations (`trainer_service.jobs.schema`).

Several processes use one store at once: the trainer replicas (their servicers, executors and study runners)
and the job workers. What keeps them apart:
- claiming a queued job, a study to drive, or a dead replica to expire is one transaction that locks the rows
  it takes (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's write lock serialises writers), so two claimers
  never get the same one;
- a job's attempt number fences its worker: state changes a worker makes carry the attempt it runs, and fail
  with Conflict once another attempt has begun (`update_state(..., attempt=)`);
- event sequences are the resource's previous highest plus one, computed under the resource's row lock.

One module, one class: every operation (jobs, studies, replicas, worker rows, events) goes through the same
transaction helpers and the one compare-and-set `_set_state`, and claims, expiry and adoption touch several of those
tables in one transaction; the tables, migrations and row mappers already live in `schema.py`. (Splitting the class
by resource over a shared base is the next step if it grows further.)

No protobuf, no gRPC: the servicer converts records to messages, and the errors are `visiontune.errors`
classes that the server runtime turns into status codes.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.engine import Connection
from visiontune import pagination
from visiontune.database import Database, DatabaseClosed, DatabaseConfigError
from visiontune.outages import OutageListener, OutagePolicy

from trainer_service.jobs.gpus import devices_of
from trainer_service.jobs.records import (
    AlreadyExists,
    Conflict,
    CreatorQuota,
    EventRecord,
    JobRecord,
    JobState,
    JobStoreError,
    NotFound,
    QuotaExceeded,
    ReplicaRecord,
    ResourceType,
    SchemaError,
    StudyRecord,
    StudyState,
    Takeover,
    WorkerRecord,
    utc_now,
)
from trainer_service.jobs.schema import (
    EVENTS,
    JOBS,
    REPLICAS,
    SCHEMA_VERSION,
    STUDIES,
    WORKERS,
    Resource,
    event_from_row,
    from_us,
    job_from_row,
    migrate,
    replica_from_row,
    schema_version,
    study_from_row,
    to_us,
    worker_from_row,
)

__all__ = [
    "ACTIVE_JOB_STATES",
    "ACTIVE_STUDY_STATES",
    "SCHEMA_VERSION",
    "AlreadyExists",
    "Conflict",
    "CreatorQuota",
    "EventRecord",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobStoreError",
    "NotFound",
    "QuotaExceeded",
    "ReplicaRecord",
    "ResourceType",
    "SchemaError",
    "StudyRecord",
    "StudyState",
    "Takeover",
    "WorkerClaim",
    "WorkerRecord",
    "database_url_for",
    "default_database_path",
    "utc_now",
]

MAX_EVENTS_PER_CALL: Final = 10_000
# The states in which a job has a worker (and an owner replica).
ACTIVE_JOB_STATES: Final = frozenset({JobState.RUNNING, JobState.CANCELLING})
ACTIVE_STUDY_STATES: Final = frozenset({StudyState.RUNNING, StudyState.CANCELLING})

_R = TypeVar("_R")

_J = JOBS.table.c
_S = STUDIES.table.c
_E = EVENTS.c
_P = REPLICAS.c
_W = WORKERS.c
# Any constant: the advisory lock capped claims take turns on, on PostgreSQL ("vt" + "slots" in ASCII).
_WORKER_CAP_LOCK: Final = 0x7674736C6F7473


@dataclass(frozen=True, slots=True)
class WorkerClaim:
    """A claim that also takes a worker row: its name (from the job and the new attempt) and the cap on rows."""

    name_for: Callable[[str, int], str]
    cap: int


def default_database_path(data_dir: Path) -> Path:
    """The embedded default: a SQLite file in the trainer's data directory."""
    return Path(data_dir) / "trainer" / "jobs.sqlite3"


def database_url_for(path: Path) -> str:
    """The SQLite URL of a job store file (absolute, so a process's working directory does not matter)."""
    return "sqlite:///" + str(Path(path).absolute())


def _require_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _values(states: Iterable[JobState | StudyState]) -> list[str]:
    return sorted({s.value for s in states})


# ------------------------------------------------------------------------------------------ the store


class JobStore:
    """Jobs, studies, events and replicas in a SQL database. Thread-safe and multi-process safe.

    `database` is a URL (`sqlite:///…`, `postgresql://…`), a path (a SQLite file), or an open `Database`
    (which the store then closes with itself).
    """

    def __init__(
        self,
        database: str | Path | Database,
        *,
        clock: Callable[[], datetime] = utc_now,
        poll_interval_s: float = 0.2,
        outage_policy: OutagePolicy | None = None,
        outage_listener: OutageListener | None = None,
    ) -> None:
        # In-process appends bump the generation and notify, so waiters wake at once.
        self._events_changed = threading.Condition()
        self._events_generation = 0
        self._clock = clock
        # How often wait_for_events re-reads to notice appends made by other processes.
        self._poll_interval_s = poll_interval_s
        if isinstance(database, Database):
            self._db = database
        else:
            url = database_url_for(database) if isinstance(database, Path) else database
            try:
                self._db = Database(url, policy=outage_policy, listener=outage_listener, service="the job database")
            except DatabaseConfigError as err:
                if isinstance(database, Path) or url.startswith("sqlite"):
                    # A file that exists but is not SQLite: not a connection problem, the wrong file.
                    raise SchemaError(f"{database} is not a usable job store database: {err}") from err
                raise
        try:
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    # -- lifecycle

    @property
    def database(self) -> Database:
        return self._db

    @property
    def url(self) -> str:
        """The database URL with its password: for this trainer's own workers and Optuna, never for logs."""
        return self._db.url.render_as_string(hide_password=False)

    @property
    def path(self) -> Path:
        """The SQLite file (a PostgreSQL store has none: JobStoreError)."""
        path = self._db.sqlite_path
        if path is None:
            raise JobStoreError(f"the job store at {self._db.endpoint} is not a file")
        return path

    def with_outage(self, policy: OutagePolicy) -> JobStore:
        """This store (the same pool and in-process event notifications) waiting `policy`'s window for a database
        that does not answer: the servicer's requests use a short one. Close the original, not the copy."""
        clone = copy.copy(self)
        clone._db = self._db.with_outage(policy)
        return clone

    def close(self) -> None:
        """Close the pool and wake all waiters. Idempotent."""
        self._db.close()
        with self._events_changed:
            self._events_changed.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        return schema_version(self._db)

    def _now_us(self) -> int:
        return to_us(self._clock())

    def _read(self, fn: Callable[[Connection], _R]) -> _R:
        try:
            return self._db.read(fn)
        except DatabaseClosed as err:
            raise JobStoreError(f"the job store at {self._db.endpoint} is closed") from err

    def _write(self, fn: Callable[[Connection], _R]) -> _R:
        try:
            return self._db.write(fn)
        except DatabaseClosed as err:
            raise JobStoreError(f"the job store at {self._db.endpoint} is closed") from err

    def _locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """`query` with a row lock on PostgreSQL (SQLite's write transaction already holds the database lock)."""
        return query.with_for_update() if self._db.dialect == "postgresql" else query

    def _skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """`query` taking only rows no other transaction has locked: claimers never queue behind each other."""
        return query.with_for_update(skip_locked=True) if self._db.dialect == "postgresql" else query

    # -- shared resource code

    def _insert_idempotent(
        self,
        resource: Resource,
        resource_id: str,
        request_id: str | None,
        values: dict[str, Any],
        from_row: Callable[[Any], _R],
        quota: tuple[str, CreatorQuota, Iterable[str]] | None = None,
    ) -> tuple[_R, bool]:
        """Insert a row unless `request_id` made it before. `quota`: the creator's cap and the states it counts,
        checked in the insert's transaction (a replay of a request is never refused by it)."""
        _require_id(resource_id, resource.id_column)
        if request_id == "":
            request_id = None  # proto3's empty string means "no request id"
        table = resource.table

        def run(conn: Connection) -> tuple[_R, bool]:
            if request_id is not None:
                row = conn.execute(sa.select(table).where(table.c.request_id == request_id)).mappings().first()
                if row is not None:
                    return from_row(row), False
            if conn.execute(sa.select(resource.id).where(resource.id == resource_id)).first() is not None:
                raise AlreadyExists(f"{resource.noun} {resource_id!r} already exists")
            if quota is not None:
                self._check_quota(conn, resource, *quota)
            now = self._now_us()
            columns = {
                resource.id_column: resource_id,
                "request_id": request_id,
                "create_time": now,
                "update_time": now,
                **values,
            }
            conn.execute(sa.insert(table).values(**columns))
            return from_row(self._fetch_row(conn, resource, resource_id)), True

        try:
            return self._write(run)
        except sqlalchemy.exc.IntegrityError:
            # A concurrent create with the same request id or resource id committed first (PostgreSQL; SQLite's
            # write lock serialises them): run again, and see its row.
            return self._write(run)

    def _check_quota(
        self, conn: Connection, resource: Resource, creator: str, quota: CreatorQuota, states: Iterable[str]
    ) -> None:
        if quota.limit <= 0:
            return
        table = resource.table
        held = conn.execute(
            sa.select(sa.func.count())
            .select_from(table)
            .where(table.c.creator == creator, table.c.state.in_(list(states)))
        ).scalar_one()
        if held >= quota.limit:
            who = f"caller {creator!r}" if creator else "all callers together (no authentication)"
            noun, nouns, doing = ("job", "jobs", "queued") if resource is JOBS else ("study", "studies", "running")
            raise QuotaExceeded(
                f"{who} already has {held} {noun if held == 1 else nouns} {doing}, the limit is {quota.limit}"
                + (f" ({quota.setting})" if quota.setting else "")
                + "; wait for some to finish or cancel them"
            )

    def _fetch_row(self, conn: Connection, resource: Resource, resource_id: str, *, lock: bool = False) -> Any:
        query = sa.select(resource.table).where(resource.id == resource_id)
        row = conn.execute(self._locked(query) if lock else query).mappings().first()
        if row is None:
            # The API's words: the servicer passes this message on to the client as it is.
            raise NotFound(f"{resource.resource_name(resource_id)} does not exist")
        return row

    def _get(self, resource: Resource, resource_id: str, from_row: Callable[[Any], _R]) -> _R:
        return self._read(lambda conn: from_row(self._fetch_row(conn, resource, resource_id)))

    def _list_page(
        self,
        resource: Resource,
        where: list[sa.ColumnElement[bool]],
        fingerprint_parts: Sequence[object],
        page_size: int,
        page_token: str,
        from_row: Callable[[Any], _R],
    ) -> tuple[list[_R], str]:
        size = pagination.page_size(page_size)
        table = resource.table
        fingerprint = pagination.filter_fingerprint([table.name, *fingerprint_parts])
        where = list(where)
        if page_token:
            after_us, after_id = pagination.decode_page_token(page_token, fingerprint, (int, str))
            # Keyset pagination, newest first: rows strictly "older" than the last one handed out.
            # Stable under concurrent inserts (new rows are newer), unlike OFFSET.
            where.append(
                sa.or_(
                    table.c.create_time < after_us,
                    sa.and_(table.c.create_time == after_us, resource.id < after_id),
                )
            )
        query = (
            sa.select(table)
            .where(*where)
            .order_by(table.c.create_time.desc(), resource.id.desc())
            .limit(size + 1)  # one extra row tells whether there is a next page
        )
        rows = self._read(lambda conn: list(conn.execute(query).mappings()))
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            next_token = pagination.encode_page_token((last["create_time"], last[resource.id_column]), fingerprint)
        return [from_row(r) for r in rows], next_token

    def _set_state(
        self,
        conn: Connection,
        resource: Resource,
        resource_id: str,
        new_state: JobState | StudyState,
        *,
        expected: Iterable[JobState | StudyState] | None = None,
        error: str | None = None,
        result_json: str | None = None,
        extra: dict[str, Any] | None = None,
        attempt: int | None = None,
    ) -> Any:
        """The compare-and-set every state change goes through, inside the caller's transaction."""
        row = self._fetch_row(conn, resource, resource_id, lock=True)
        current = row["state"]
        if expected is not None:
            allowed = _values(expected)
            if current not in allowed:
                raise Conflict(f"{resource.noun} {resource_id!r} is {current}, expected one of {allowed}")
        if attempt is not None and row["attempt"] != attempt:
            raise Conflict(f"{resource.noun} {resource_id!r} is on attempt {row['attempt']}, not {attempt}")
        now = self._now_us()
        values: dict[str, Any] = {
            "state": new_state.value,
            "update_time": now,
            "end_time": now if new_state.is_terminal else None,
        }
        if resource is JOBS:
            if new_state == JobState.RUNNING:
                # Keep the first start: a retried job still started when it first ran.
                values["start_time"] = sa.func.coalesce(_J.start_time, now)
            if new_state == JobState.QUEUED or new_state.is_terminal:
                values["owner"] = None  # no worker any more: nobody's to resume
        if error is not None:
            values["error"] = error
        if result_json is not None:
            values["result_json"] = result_json
        values.update(extra or {})
        conn.execute(sa.update(resource.table).where(resource.id == resource_id).values(**values))
        return self._fetch_row(conn, resource, resource_id)

    # -- jobs

    def create_job(
        self,
        job_id: str,
        spec_json: str,
        *,
        display_name: str = "",
        request_id: str | None = None,
        labels: dict[str, str] | None = None,
        study_id: str | None = None,
        trial_number: int | None = None,
        creator: str = "",
        quota: CreatorQuota | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create a QUEUED job. Returns (job, created).

        Idempotent on ``request_id``: a retry with the same request id returns the job the first call
        made and ``created=False``. A different request for an existing ``job_id`` raises AlreadyExists;
        an unknown ``study_id`` raises NotFound; QuotaExceeded when ``creator`` already has `quota`'s limit of
        jobs queued.
        """
        if study_id is not None:
            # Checked here for a clear message; the foreign key still guards it inside the transaction.
            try:
                self.get_study(study_id)
            except NotFound as err:
                raise NotFound(f"cannot add job {job_id!r} to study {study_id!r}: {err}") from err
        return self._insert_idempotent(
            JOBS,
            job_id,
            request_id,
            {
                "state": JobState.QUEUED.value,
                "spec_json": spec_json,
                "display_name": display_name,
                "attempt": 0,
                "labels_json": json.dumps(dict(labels or {}), sort_keys=True),
                "study_id": study_id,
                "trial_number": trial_number,
                "creator": creator,
            },
            job_from_row,
            None if quota is None else (creator, quota, [JobState.QUEUED.value]),
        )

    def get_job(self, job_id: str) -> JobRecord:
        return self._get(JOBS, job_id, job_from_row)

    def list_jobs(
        self,
        *,
        states: set[JobState] | None = None,
        study_id: str | None = None,
        page_size: int = pagination.DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """One page of jobs, newest first, and the token of the next page ("" on the last page).

        An empty or None ``states`` means no state filter. ``page_size`` and ``page_token`` follow
        `visiontune.pagination`: 0 means the default size, a larger one than the maximum is clamped; a
        negative size, a malformed token or one issued for a different filter raise InvalidPage.
        """
        where: list[sa.ColumnElement[bool]] = []
        state_values = _values(JobState(s) for s in states or ())
        if state_values:
            where.append(_J.state.in_(state_values))
        if study_id is not None:
            where.append(_J.study_id == study_id)
        return self._list_page(JOBS, where, [state_values, study_id], page_size, page_token, job_from_row)

    def update_state(
        self,
        job_id: str,
        new_state: JobState,
        *,
        error: str | None = None,
        result_json: str | None = None,
        expected: set[JobState] | None = None,
        attempt: int | None = None,
    ) -> JobRecord:
        """Move a job to ``new_state``; with ``expected``, only if its current state is one of them, and with
        ``attempt`` only if that is still the job's attempt (a worker's fence).

        Raises Conflict when the compare-and-set fails. Entering RUNNING sets start_time (the first
        time only); a terminal state sets end_time, a non-terminal one clears it; QUEUED and terminal states
        clear the owner. ``error`` and ``result_json`` are written when given and otherwise kept.
        """
        state = JobState(new_state)
        return self._write(
            lambda conn: job_from_row(
                self._set_state(
                    conn, JOBS, job_id, state, expected=expected, error=error, result_json=result_json, attempt=attempt
                )
            )
        )

    def increment_attempt(self, job_id: str) -> JobRecord:
        """Add one to the job's attempt counter (the executor calls it when it starts an attempt)."""

        def run(conn: Connection) -> JobRecord:
            self._fetch_row(conn, JOBS, job_id, lock=True)
            conn.execute(
                sa.update(JOBS.table)
                .where(_J.job_id == job_id)
                .values(attempt=_J.attempt + 1, update_time=self._now_us())
            )
            return job_from_row(self._fetch_row(conn, JOBS, job_id))

        return self._write(run)

    def commit_checkpoint(self, job_id: str, attempt: int, sha256: str | None) -> str | None:
        """Make `sha256` the job's checkpoint (None: it has none), if `attempt` is still the job's current one.
        Returns the digest it replaced (None when there was none). Raises Conflict when another attempt has taken
        the job over: its checkpoint is the one that counts."""

        def run(conn: Connection) -> str | None:
            row = self._fetch_row(conn, JOBS, job_id, lock=True)
            if row["attempt"] != attempt:
                raise Conflict(f"job {job_id!r} is on attempt {row['attempt']}, not {attempt}: checkpoint not kept")
            conn.execute(
                sa.update(JOBS.table)
                .where(_J.job_id == job_id)
                .values(checkpoint_sha256=sha256, update_time=self._now_us())
            )
            previous: str | None = row["checkpoint_sha256"]
            return previous

        return self._write(run)

    def claim_next_queued(
        self,
        owner: str | None = None,
        *,
        start_attempt: bool = False,
        worker: WorkerClaim | None = None,
        max_devices: int | None = None,
    ) -> JobRecord | None:
        """Atomically move the oldest QUEUED job to RUNNING, owned by replica ``owner``; None when none is queued.

        The select and the update share one transaction and the row is locked (skipping rows another claimer
        holds), so two claimers (threads, processes or replicas) never get the same job. With ``start_attempt`` the
        attempt counter goes up by one in the same transaction (the executor's claim: a database lost between the
        claim and the count cannot leave a job RUNNING on its previous attempt); otherwise it is left to
        increment_attempt. With ``worker`` (the Kubernetes executor), the claim also takes a worker row for the new
        attempt, and claims nothing while ``worker.cap`` rows exist (all replicas' Jobs together). With
        ``max_devices``, the oldest job is claimed only if its ``run.devices`` fit in that many; otherwise nothing is
        (queue order holds: a job on several GPUs waits for them rather than being overtaken forever).
        """

        def run(conn: Connection) -> JobRecord | None:
            if worker is not None and self._workers_at_cap(conn, worker.cap):
                return None
            query = (
                sa.select(_J.job_id, _J.spec_json)
                .where(_J.state == JobState.QUEUED.value)
                .order_by(_J.create_time, _J.job_id)
                .limit(1)
            )
            row = conn.execute(self._skip_locked(query)).first()
            if row is None or (max_devices is not None and devices_of(row.spec_json) > max_devices):
                return None
            extra: dict[str, Any] = {"owner": owner}
            if start_attempt:
                extra["attempt"] = _J.attempt + 1
            record = job_from_row(self._set_state(conn, JOBS, row.job_id, JobState.RUNNING, extra=extra))
            if worker is not None:
                conn.execute(
                    sa.insert(WORKERS).values(
                        name=worker.name_for(record.job_id, record.attempt),
                        job_id=record.job_id,
                        attempt=record.attempt,
                        owner=owner,
                        create_time=self._now_us(),
                    )
                )
            return record

        return self._write(run)

    # -- workers outside the trainer (Kubernetes Jobs)

    def _workers_at_cap(self, conn: Connection, cap: int) -> bool:
        if self._db.dialect == "postgresql":
            # Claims with a cap take turns: two replicas counting at once would both see room for one more.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_WORKER_CAP_LOCK)))
        count = conn.execute(sa.select(sa.func.count()).select_from(WORKERS)).scalar_one()
        return int(count) >= cap

    def workers(self, *, owner: str | None = None) -> list[WorkerRecord]:
        """Every worker row (given ``owner``, that replica's), oldest first."""
        query = sa.select(WORKERS).order_by(_W.create_time, _W.name)
        if owner is not None:
            query = query.where(_W.owner == owner)
        return self._read(lambda conn: [worker_from_row(r) for r in conn.execute(query).mappings()])

    def release_worker(self, name: str) -> None:
        """The worker is gone (its Job deleted): drop its row, freeing its place under the cap."""
        self._write(lambda conn: conn.execute(sa.delete(WORKERS).where(_W.name == name)))

    def release_workers(self, owner: str) -> list[WorkerRecord]:
        """A clean stop of replica ``owner`` whose workers keep running (Kubernetes Jobs): hand them, and their
        RUNNING jobs, to whichever replica adopts them next (`adopt_workers`)."""

        def run(conn: Connection) -> list[WorkerRecord]:
            rows = [
                worker_from_row(r)
                for r in conn.execute(self._locked(sa.select(WORKERS).where(_W.owner == owner))).mappings()
            ]
            self._release(conn, rows)
            return rows

        return self._write(run)

    def _release(self, conn: Connection, rows: Sequence[WorkerRecord]) -> list[str]:
        """Workers and the active jobs they run, ownerless, inside the caller's transaction; the jobs' IDs."""
        if not rows:
            return []
        conn.execute(sa.update(WORKERS).where(_W.name.in_([w.name for w in rows])).values(owner=None))
        released = []
        for w in rows:
            result = conn.execute(
                sa.update(JOBS.table)
                .where(_J.job_id == w.job_id, _J.attempt == w.attempt, _J.state.in_(_values(ACTIVE_JOB_STATES)))
                .values(owner=None, update_time=self._now_us())
            )
            if result.rowcount:
                released.append(w.job_id)
        return released

    def adopt_workers(self, owner: str) -> list[WorkerRecord]:
        """Take every released worker (and its job, if the job is still on that attempt) for replica ``owner``."""

        def run(conn: Connection) -> list[WorkerRecord]:
            query = self._skip_locked(sa.select(WORKERS).where(_W.owner.is_(None)).order_by(_W.create_time))
            rows = [worker_from_row(r) for r in conn.execute(query).mappings()]
            if not rows:
                return []
            conn.execute(sa.update(WORKERS).where(_W.name.in_([w.name for w in rows])).values(owner=owner))
            for w in rows:
                conn.execute(
                    sa.update(JOBS.table)
                    .where(_J.job_id == w.job_id, _J.attempt == w.attempt, _J.owner.is_(None))
                    .where(_J.state.in_(_values(ACTIVE_JOB_STATES)))
                    .values(owner=owner, update_time=self._now_us())
                )
            return [WorkerRecord(w.name, w.job_id, w.attempt, owner, w.create_time) for w in rows]

        return self._write(run)

    def jobs_in_states(self, states: Iterable[JobState], *, owner: str | None = None) -> list[JobRecord]:
        """All jobs in any of ``states`` (and, given ``owner``, run by that replica), oldest first."""
        values = _values(JobState(s) for s in states)
        if not values:
            return []
        query = sa.select(JOBS.table).where(_J.state.in_(values)).order_by(_J.create_time, _J.job_id)
        if owner is not None:
            query = query.where(_J.owner == owner)
        return self._read(lambda conn: [job_from_row(r) for r in conn.execute(query).mappings()])

    def delete_job(self, job_id: str, *, expected: set[JobState] | None = None) -> None:
        """Delete a job and its events; with ``expected``, only if it is in one of those states."""

        def run(conn: Connection) -> None:
            row = self._fetch_row(conn, JOBS, job_id, lock=True)
            if expected is not None and row["state"] not in _values(expected):
                raise Conflict(f"job {job_id!r} is {row['state']}, expected one of {_values(expected)}")
            conn.execute(sa.delete(EVENTS).where(_E.resource_type == ResourceType.JOB.value, _E.resource_id == job_id))
            conn.execute(sa.delete(JOBS.table).where(_J.job_id == job_id))

        self._write(run)

    # -- studies

    def create_study(
        self,
        study_id: str,
        spec_json: str,
        *,
        display_name: str = "",
        request_id: str | None = None,
        owner: str | None = None,
        creator: str = "",
        quota: CreatorQuota | None = None,
    ) -> tuple[StudyRecord, bool]:
        """Create a RUNNING study, driven by replica ``owner`` (None: by whichever runner claims it first).
        Idempotent on ``request_id`` exactly like create_job; `quota` caps the creator's running studies."""
        return self._insert_idempotent(
            STUDIES,
            study_id,
            request_id,
            {
                "state": StudyState.RUNNING.value,
                "spec_json": spec_json,
                "display_name": display_name,
                "owner": owner,
                "creator": creator,
            },
            study_from_row,
            None if quota is None else (creator, quota, [StudyState.RUNNING.value]),
        )

    def get_study(self, study_id: str) -> StudyRecord:
        return self._get(STUDIES, study_id, study_from_row)

    def list_studies(
        self,
        *,
        states: set[StudyState] | None = None,
        page_size: int = pagination.DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[StudyRecord], str]:
        """One page of studies, newest first; same rules as list_jobs."""
        where: list[sa.ColumnElement[bool]] = []
        state_values = _values(StudyState(s) for s in states or ())
        if state_values:
            where.append(_S.state.in_(state_values))
        return self._list_page(STUDIES, where, [state_values], page_size, page_token, study_from_row)

    def update_study_state(
        self,
        study_id: str,
        new_state: StudyState,
        *,
        error: str | None = None,
        result_json: str | None = None,
        expected: set[StudyState] | None = None,
    ) -> StudyRecord:
        """Compare-and-set a study's state; same rules as update_state (a study has no start_time)."""
        state = StudyState(new_state)
        return self._write(
            lambda conn: study_from_row(
                self._set_state(conn, STUDIES, study_id, state, expected=expected, error=error, result_json=result_json)
            )
        )

    def claim_studies(self, owner: str) -> list[StudyRecord]:
        """Take every active study nobody drives (new, or released from a dead replica) for replica ``owner``,
        plus those it already owns (after its own restart). One runner per study: the rows are locked."""

        def run(conn: Connection) -> list[StudyRecord]:
            query = (
                sa.select(_S.study_id)
                .where(_S.state.in_(_values(ACTIVE_STUDY_STATES)), sa.or_(_S.owner.is_(None), _S.owner == owner))
                .order_by(_S.create_time, _S.study_id)
            )
            ids = [r.study_id for r in conn.execute(self._skip_locked(query))]
            if not ids:
                return []
            conn.execute(
                sa.update(STUDIES.table).where(_S.study_id.in_(ids)).values(owner=owner, update_time=self._now_us())
            )
            rows = conn.execute(
                sa.select(STUDIES.table).where(_S.study_id.in_(ids)).order_by(_S.create_time, _S.study_id)
            )
            return [study_from_row(r) for r in rows.mappings()]

        return self._write(run)

    # -- replicas

    def register_replica(self, replica_id: str, *, host: str, pid: int) -> ReplicaRecord:
        """Record (or refresh, after a restart with the same id) a live trainer replica."""
        _require_id(replica_id, "replica_id")

        def run(conn: Connection) -> ReplicaRecord:
            now = self._now_us()
            conn.execute(sa.delete(REPLICAS).where(_P.replica_id == replica_id))
            conn.execute(
                sa.insert(REPLICAS).values(
                    replica_id=replica_id, host=host, pid=pid, start_time=now, heartbeat_time=now
                )
            )
            return replica_from_row(
                conn.execute(sa.select(REPLICAS).where(_P.replica_id == replica_id)).mappings().one()
            )

        return self._write(run)

    def heartbeat(self, replica_id: str) -> bool:
        """Renew the replica's lease. False when its row is gone: another replica expired it and took its work."""

        def run(conn: Connection) -> bool:
            result = conn.execute(
                sa.update(REPLICAS).where(_P.replica_id == replica_id).values(heartbeat_time=self._now_us())
            )
            return bool(result.rowcount)

        return self._write(run)

    def deregister_replica(self, replica_id: str) -> None:
        self._write(lambda conn: conn.execute(sa.delete(REPLICAS).where(_P.replica_id == replica_id)))

    def replicas(self) -> list[ReplicaRecord]:
        query = sa.select(REPLICAS).order_by(_P.replica_id)
        return self._read(lambda conn: [replica_from_row(r) for r in conn.execute(query).mappings()])

    def expire_replicas(self, lease_ttl: timedelta, *, keep: str | None = None) -> Takeover:
        """Replicas whose heartbeat is older than ``lease_ttl`` are dead: their running jobs are queued again (to
        resume from their checkpoints on any replica) unless their worker outlives them (a Kubernetes Job: released,
        still RUNNING, for another replica to adopt), their cancelling jobs end CANCELLED, their studies are
        released, and their rows are deleted. One transaction; each dead replica is expired by one caller only.
        ``keep`` (the caller itself) is never expired."""

        def run(conn: Connection) -> Takeover:
            now = self._now_us()
            cutoff = now - lease_ttl // timedelta(microseconds=1)
            query = sa.select(_P.replica_id).where(_P.heartbeat_time < cutoff)
            if keep is not None:
                query = query.where(_P.replica_id != keep)
            dead = [r.replica_id for r in conn.execute(self._skip_locked(query))]
            if not dead:
                return Takeover((), (), (), ())
            jobs = list(
                conn.execute(
                    self._locked(
                        sa.select(_J.job_id, _J.state)
                        .where(_J.owner.in_(dead), _J.state.in_(_values(ACTIVE_JOB_STATES)))
                        .order_by(_J.create_time, _J.job_id)
                    )
                )
            )
            # Workers that outlive their replica (Kubernetes Jobs) keep running: released for another to adopt.
            orphaned = [
                worker_from_row(r)
                for r in conn.execute(self._locked(sa.select(WORKERS).where(_W.owner.in_(dead)))).mappings()
            ]
            released = set(self._release(conn, orphaned))
            jobs = [j for j in jobs if j.job_id not in released]
            requeued = [j.job_id for j in jobs if j.state == JobState.RUNNING.value]
            cancelled = [j.job_id for j in jobs if j.state == JobState.CANCELLING.value]
            for job_id in requeued:
                self._set_state(conn, JOBS, job_id, JobState.QUEUED)
            for job_id in cancelled:
                self._set_state(conn, JOBS, job_id, JobState.CANCELLED)
            studies = [
                r.study_id
                for r in conn.execute(
                    self._locked(sa.select(_S.study_id).where(_S.owner.in_(dead)).order_by(_S.study_id))
                )
            ]
            if studies:
                conn.execute(sa.update(STUDIES.table).where(_S.study_id.in_(studies)).values(owner=None))
            conn.execute(sa.delete(REPLICAS).where(_P.replica_id.in_(dead)))
            return Takeover(tuple(dead), tuple(requeued), tuple(cancelled), tuple(studies), tuple(sorted(released)))

        return self._write(run)

    # -- events (shared by jobs and studies)

    def _append_event(self, resource: Resource, resource_id: str, kind: str, payload_json: str) -> EventRecord:
        def run(conn: Connection) -> EventRecord:
            # The resource's row lock serialises appenders to one log across threads, processes and replicas
            # (SQLite: the write lock), so MAX+1 never collides and sequences have no gaps.
            self._fetch_row(conn, resource, resource_id, lock=True)
            sequence = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(_E.sequence), 0) + 1).where(
                    _E.resource_type == resource.resource_type.value, _E.resource_id == resource_id
                )
            ).scalar_one()
            now = self._now_us()
            conn.execute(
                sa.insert(EVENTS).values(
                    resource_type=resource.resource_type.value,
                    resource_id=resource_id,
                    sequence=sequence,
                    time=now,
                    kind=kind,
                    payload_json=payload_json,
                )
            )
            return EventRecord(resource.resource_type, resource_id, int(sequence), from_us(now), kind, payload_json)

        event = self._write(run)
        # After COMMIT, so a woken waiter can already read the row.
        with self._events_changed:
            self._events_generation += 1
            self._events_changed.notify_all()
        return event

    def _events_after(self, resource: Resource, resource_id: str, after_sequence: int, limit: int) -> list[EventRecord]:
        limit = max(1, min(limit, MAX_EVENTS_PER_CALL))
        query = (
            sa.select(EVENTS)
            .where(
                _E.resource_type == resource.resource_type.value,
                _E.resource_id == resource_id,
                _E.sequence > after_sequence,
            )
            .order_by(_E.sequence)
            .limit(limit)
        )

        def run(conn: Connection) -> list[EventRecord]:
            rows = list(conn.execute(query).mappings())
            if not rows:
                self._fetch_row(conn, resource, resource_id)  # no events vs. no such resource
            return [event_from_row(r) for r in rows]

        return self._read(run)

    def _wait_for_events(
        self, resource: Resource, resource_id: str, after_sequence: int, timeout_s: float, limit: int
    ) -> list[EventRecord]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._events_changed:
                generation = self._events_generation
            events = self._events_after(resource, resource_id, after_sequence, limit)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return events
            with self._events_changed:
                if self._db.closed:
                    raise JobStoreError(f"the job store at {self._db.endpoint} is closed")
                # Skip the wait if an in-process append landed since we read; otherwise sleep until
                # notified, or one poll interval to catch appends made by other processes.
                if self._events_generation == generation:
                    self._events_changed.wait(min(self._poll_interval_s, remaining))

    def append_event(self, job_id: str, kind: str, payload_json: str) -> EventRecord:
        """Append an event to a job's log; its sequence is the job's previous highest plus one."""
        return self._append_event(JOBS, job_id, kind, payload_json)

    def events_after(self, job_id: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        """A job's events with sequence > ``after_sequence``, in order, at most ``limit`` of them."""
        return self._events_after(JOBS, job_id, after_sequence, limit)

    def wait_for_events(
        self, job_id: str, after_sequence: int, timeout_s: float, *, limit: int = 1000
    ) -> list[EventRecord]:
        """Block until the job has events after ``after_sequence`` or ``timeout_s`` passes ([] then).

        Appends in this process wake the waiter at once; appends from other processes are noticed
        within one poll interval. Raises NotFound if the job does not exist (or is deleted while
        waiting) and JobStoreError if the store is closed while waiting.
        """
        return self._wait_for_events(JOBS, job_id, after_sequence, timeout_s, limit)

    def append_study_event(self, study_id: str, kind: str, payload_json: str) -> EventRecord:
        return self._append_event(STUDIES, study_id, kind, payload_json)

    def study_events_after(self, study_id: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        return self._events_after(STUDIES, study_id, after_sequence, limit)

    def wait_for_study_events(
        self, study_id: str, after_sequence: int, timeout_s: float, *, limit: int = 1000
    ) -> list[EventRecord]:
        return self._wait_for_events(STUDIES, study_id, after_sequence, timeout_s, limit)
