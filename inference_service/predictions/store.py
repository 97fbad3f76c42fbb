"""The prediction store: what every Classify predicted and every feedback report scored, in one SQL database.

One setting chooses the database (`--feedback-database-url`, `visiontune.database`): an embedded SQLite file under
the service's data directory, the default (one replica, which keeps its predictions across restarts), or
PostgreSQL, shared by every inference replica (docs/architecture.md §6). A report reaches whichever replica the
load balancer picks; the store makes it count once:

- Classify writes one row per request (one INSERT, the request id its primary key): the model version and each
  image's top-1 label and unknown verdict. A version's labels are written once per version, not per request.
- ReportFeedback judges the image against that row and inserts its outcome under the key (request id, image
  index) with ``ON CONFLICT DO NOTHING``: the one transaction that inserts it scored the image, and its replica
  counts it in its metrics; every later report, on any replica, inserts nothing, reads the first outcome back and
  is a duplicate.
- A janitor (`Janitor`, on every replica; safe at once) deletes predictions older than the retention and the
  oldest beyond the capacity, their feedback with them, in small batches (`SKIP LOCKED` on PostgreSQL, so
  janitors share the work instead of queueing).

The store waits only briefly for a database that does not answer (`OUTAGE_WINDOW_S`), then raises
`PredictionsUnavailable`: a Classify is answered without its record rather than held through an outage.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from visiontune.database import Database, DatabaseClosed, DatabaseUnavailable
from visiontune.outages import OutagePolicy

from inference_service.feedback import (
    FeedbackError,
    FeedbackResult,
    ImagePrediction,
    Outcome,
    PredictionsUnavailable,
    RequestRecord,
    outcome,
)
from inference_service.predictions.schema import FEEDBACK, PREDICTIONS, VERSIONS, migrate, schema_version, to_us

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_RETENTION_HOURS",
    "JANITOR_INTERVAL_S",
    "OUTAGE_WINDOW_S",
    "Janitor",
    "SqlPredictionStore",
    "database_url_for",
]

log = logging.getLogger(__name__)

DEFAULT_CAPACITY: Final = 1_000_000  # requests, fleet-wide: a few hundred MB of database at most
DEFAULT_RETENTION_HOURS: Final = 168.0  # a week: feedback from people arrives hours or days later
JANITOR_INTERVAL_S: Final = 60.0
# How long a call waits for a database that does not answer (or, SQLite, for another writer's lock), give or take
# one more try: Classify sits on the hot path, and ReportFeedback's clients retry UNAVAILABLE (a repeated report is
# a duplicate, never counted twice).
OUTAGE_WINDOW_S: Final = 2.0
_DELETE_BATCH: Final = 1000  # rows per janitor transaction: a short write lock, Classify's inserts barely wait

_R = TypeVar("_R")
_P = PREDICTIONS.c
_V = VERSIONS.c
_F = FEEDBACK.c


def database_url_for(path: Path) -> str:
    """The SQLite URL of a prediction store file (absolute, so the working directory does not matter)."""
    return "sqlite:///" + str(Path(path).absolute())


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _images_json(images: tuple[ImagePrediction, ...]) -> str:
    return json.dumps([[p.label, p.unknown] for p in images], separators=(",", ":"))


def _images_from_json(text: str) -> list[ImagePrediction]:
    return [ImagePrediction(str(label), bool(unknown)) for label, unknown in json.loads(text)]


class SqlPredictionStore:
    """The `PredictionStore` on a SQL database (`visiontune.database`). Thread-safe and multi-process safe.

    `database` is a URL (`sqlite:///…`, `postgresql://…`) or an open `Database` (which the store then closes
    with itself). `capacity` (requests) and `retention` bound what the janitor keeps.
    """

    def __init__(
        self,
        database: str | Database,
        *,
        capacity: int = DEFAULT_CAPACITY,
        retention: timedelta = timedelta(hours=DEFAULT_RETENTION_HOURS),
        clock: Callable[[], datetime] = _utc_now,
        outage_policy: OutagePolicy | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if retention <= timedelta(0):
            raise ValueError(f"retention must be positive, got {retention}")
        self.capacity = capacity
        self.retention = retention
        self._clock = clock
        if isinstance(database, Database):
            self._db = database
        else:
            if outage_policy is None:
                # The shared window (VISIONTUNE_OUTAGE_WINDOW_S) when shorter, e.g. 0 in tests.
                outage_policy = OutagePolicy(window_s=min(OutagePolicy.from_env().window_s, OUTAGE_WINDOW_S))
            # SQLite's busy timeout bounds a wait for another writer's lock the same way.
            self._db = Database(
                database,
                policy=outage_policy,
                service="the prediction database",
                sqlite_busy_timeout_s=OUTAGE_WINDOW_S,
            )
        try:
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise
        # Versions whose labels this process has written (or found written): their row exists for good.
        self._versions: set[tuple[str, str]] = set()
        self._versions_lock = threading.Lock()

    # -- lifecycle

    @property
    def database(self) -> Database:
        return self._db

    @property
    def endpoint(self) -> str:
        """host:port/db or the file: for messages (never the password)."""
        return self._db.endpoint

    def close(self) -> None:
        """Close the pool; later calls raise PredictionsUnavailable. Idempotent."""
        self._db.close()

    def schema_version(self) -> int:
        return schema_version(self._db)

    def _now_us(self) -> int:
        return to_us(self._clock())

    def _run(self, fn: Callable[[Connection], _R], *, write: bool) -> _R:
        try:
            return self._db.write(fn) if write else self._db.read(fn)
        except (DatabaseUnavailable, DatabaseClosed) as err:
            raise PredictionsUnavailable(str(err)) from err

    def _insert(self, table: sa.Table) -> Any:
        """INSERT with the dialect's ON CONFLICT support (`.on_conflict_do_nothing`)."""
        return postgresql.insert(table) if self._db.dialect == "postgresql" else sqlite.insert(table)

    # -- Classify

    def record(self, request_id: str, record: RequestRecord) -> bool:
        """Record a request's predictions (one INSERT); False (nothing recorded) when the id is already taken."""
        key = (record.model, record.version)
        with self._versions_lock:
            new_version = key not in self._versions
        now = self._now_us()
        images = _images_json(record.images)
        mine = (record.model, record.version, images, now)

        def run(conn: Connection) -> bool:
            if self._db.dialect == "postgresql":
                # The commit does not wait for the WAL flush (the tail latency of Classify halves): a crash of the
                # database server may lose the last moment of predictions, whose feedback is then NOT_FOUND, but
                # never corrupts anything. Reports stay synchronous: a scored image is never scored again.
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            if new_version:
                conn.execute(
                    self._insert(VERSIONS)
                    .values(
                        model=record.model,
                        version=record.version,
                        labels_json=json.dumps(list(record.labels)),
                        create_time=now,
                    )
                    .on_conflict_do_nothing(index_elements=["model", "version"])
                )
            inserted = conn.execute(
                self._insert(PREDICTIONS)
                .values(
                    request_id=request_id,
                    model=record.model,
                    version=record.version,
                    images_json=images,
                    create_time=now,
                )
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(_P.request_id)  # a row when inserted (rowcount is -1 on psycopg for DO NOTHING)
            ).first()
            if inserted is not None:
                return True
            # Taken. By this very write when a retry follows a commit whose acknowledgement was lost: then the row
            # is ours, and the request is recorded.
            row = conn.execute(
                sa.select(_P.model, _P.version, _P.images_json, _P.create_time).where(_P.request_id == request_id)
            ).first()
            return row is not None and tuple(row) == mine

        recorded = self._run(run, write=True)
        if new_version:
            with self._versions_lock:
                self._versions.add(key)
        return recorded

    # -- ReportFeedback

    def _kept(self) -> str:
        hours = self.retention / timedelta(hours=1)
        return f"older than the {hours:g} h the prediction store keeps, or beyond its newest {self.capacity} requests"

    def report(self, request_id: str, index: int, true_label: str | None) -> FeedbackResult:
        """Judge image `index` of request `request_id` against the truth, once across every replica."""

        def run(conn: Connection) -> FeedbackResult:
            query = (
                sa.select(_P.model, _P.version, _P.images_json, _V.labels_json)
                .join(VERSIONS, sa.and_(_V.model == _P.model, _V.version == _P.version))
                .where(_P.request_id == request_id)
            )
            if self._db.dialect == "postgresql":
                # The janitor cannot delete the prediction between this read and the feedback insert below.
                query = query.with_for_update(read=True, key_share=True, of=PREDICTIONS)
            row = conn.execute(query).first()
            if row is None:
                raise FeedbackError(
                    f"no prediction with request id {request_id!r}: unknown to every replica, or {self._kept()}",
                    "request",
                )
            images = _images_from_json(row.images_json)
            if not 0 <= index < len(images):
                raise FeedbackError(
                    f"request {request_id!r} classified {len(images)} image(s); index {index} is out of range",
                    "index",
                )
            labels: list[str] = json.loads(row.labels_json)
            if true_label is not None and true_label not in labels:
                raise FeedbackError(
                    f"true_label {true_label!r} is not a label of models/{row.model}/versions/{row.version} "
                    f"(labels: {', '.join(sorted(labels))}); report an image of another class as unknown",
                    "label",
                )
            predicted = images[index]
            result = outcome(
                predicted_label=predicted.label, predicted_unknown=predicted.unknown, true_label=true_label
            )
            inserted = conn.execute(
                self._insert(FEEDBACK)
                .values(
                    request_id=request_id,
                    image_index=index,
                    outcome=result.value,
                    true_label=true_label,
                    report_time=self._now_us(),
                )
                .on_conflict_do_nothing(index_elements=["request_id", "image_index"])
                .returning(_F.outcome)
            ).first()
            if inserted is not None:
                return FeedbackResult(result, False, row.model, row.version)
            # Scored before (here or on another replica; PostgreSQL's INSERT waited for that transaction, and this
            # statement sees its row): the first report's outcome stands.
            first = conn.execute(
                sa.select(_F.outcome).where(_F.request_id == request_id, _F.image_index == index)
            ).scalar_one()
            return FeedbackResult(Outcome(first), True, row.model, row.version)

        return self._run(run, write=True)

    # -- retention

    def expire(self) -> int:
        """Delete the predictions older than the retention and the oldest beyond the capacity, with their feedback;
        returns how many. Safe on every replica at once."""
        cutoff = self._now_us() - self.retention // timedelta(microseconds=1)
        deleted = self._delete_while(_P.create_time < cutoff)

        def boundary(conn: Connection) -> tuple[int, str] | None:
            # The newest row past the capacity: it and everything older go.
            row = conn.execute(
                sa.select(_P.create_time, _P.request_id)
                .order_by(_P.create_time.desc(), _P.request_id.desc())
                .offset(self.capacity)
                .limit(1)
            ).first()
            return None if row is None else (int(row.create_time), str(row.request_id))

        edge = self._run(boundary, write=False)
        if edge is not None:
            edge_time, edge_id = edge
            deleted += self._delete_while(
                sa.or_(_P.create_time < edge_time, sa.and_(_P.create_time == edge_time, _P.request_id <= edge_id))
            )
        return deleted

    def _delete_while(self, where: sa.ColumnElement[bool]) -> int:
        """Delete the rows matching `where`, oldest first, one batch per transaction."""

        def batch(conn: Connection) -> int:
            query = sa.select(_P.request_id).where(where).order_by(_P.create_time, _P.request_id).limit(_DELETE_BATCH)
            if self._db.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)  # another janitor's batch, or a report's row
            ids = [r.request_id for r in conn.execute(query)]
            if ids:
                # Their feedback goes with them (ON DELETE CASCADE).
                conn.execute(sa.delete(PREDICTIONS).where(_P.request_id.in_(ids)))
            return len(ids)

        total = 0
        while True:
            n = self._run(batch, write=True)
            total += n
            if n < _DELETE_BATCH:
                return total


class Janitor:
    """Runs `store.expire()` at start and every `interval_s` on a daemon thread, until `stop()`."""

    def __init__(self, store: SqlPredictionStore, interval_s: float = JANITOR_INTERVAL_S) -> None:
        self._store = store
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prediction-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                deleted = self._store.expire()
            except PredictionsUnavailable as err:
                # Next round: nothing is lost by deleting later.
                log.warning("prediction janitor: %s", err)
            except sqlalchemy.exc.DBAPIError as err:
                log.error("prediction janitor: %s", err)
            else:
                if deleted:
                    log.info("prediction janitor deleted %d expired prediction(s)", deleted)
            self._stop.wait(self._interval_s)
