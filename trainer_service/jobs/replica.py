"""This trainer replica's lease in the job store: who it is, its heartbeat, and taking over dead replicas' work.

Several trainer replicas share one database (docs/architecture.md §6). Each has an id (`--replica-id`; the host
name and port by default, so a restarted process on the same host and port is the same replica and resumes its
own jobs at once) and a row in `vt_replicas` whose heartbeat it renews every few seconds. A replica whose
heartbeat is older than the lease (`--lease-ttl-s`, 30 s by default) is dead (SIGKILL, node loss, a network
partition): the first live replica to notice expires it in one transaction — its running jobs are queued again
and resume from their checkpoints on whichever replica claims them, its cancelling jobs end CANCELLED, its
studies are released for another study runner — and tells the executor and the runner what it took over.

Two guards keep a live replica from being taken for dead:
- a replica expires others only after its own heartbeats have succeeded for a whole lease: after a database
  outage every replica's heartbeat is stale, and each must first see the others renew theirs;
- a replica that finds its row gone (it was expired while stalled) has lost its work: it stops its workers at once
  (`on_lost`) and registers again. Its workers' writes are fenced by attempt number meanwhile (`JobStore`).

A database outage holds each heartbeat for as long as the outage lasts (up to the outage window); past it the pass
fails and the next one tries again: the lease thread never ends on a database error.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import sqlalchemy.exc
from visiontune.errors import VisionTuneError

from trainer_service.jobs.store import JobStore, Takeover

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S: Final = 30.0
# Heartbeats per lease: a replica survives a few lost heartbeats (a slow database) before it is taken for dead.
_HEARTBEATS_PER_LEASE: Final = 6


def default_replica_id(port: int) -> str:
    """`{host}-{port}`: unique per process on one machine, stable across a restart on the same host and port, and the
    pod's name on Kubernetes (its host name)."""
    return f"{socket.gethostname()}-{port}"


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    replica_id: str
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("the replica id must not be empty")
        if self.lease_ttl_s <= 0:
            raise ValueError(f"the lease must be positive, got {self.lease_ttl_s} s")

    @property
    def heartbeat_interval_s(self) -> float:
        return self.lease_ttl_s / _HEARTBEATS_PER_LEASE


class ReplicaLease:
    """Registers this replica, renews its heartbeat, and expires dead replicas, in a thread of its own."""

    def __init__(
        self,
        jobs: JobStore,
        settings: ReplicaSettings,
        *,
        on_takeover: Callable[[Takeover], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._jobs = jobs
        self.settings = settings
        self._on_takeover: list[Callable[[Takeover], None]] = [on_takeover] if on_takeover else []
        self._on_lost: list[Callable[[], None]] = [on_lost] if on_lost else []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replica-lease", daemon=True)
        self._healthy_since: float | None = None

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id

    def subscribe(
        self, *, on_takeover: Callable[[Takeover], None] | None = None, on_lost: Callable[[], None] | None = None
    ) -> None:
        """Add a listener (the executor and the study runner each have one); before start()."""
        if on_takeover is not None:
            self._on_takeover.append(on_takeover)
        if on_lost is not None:
            self._on_lost.append(on_lost)

    def register(self) -> None:
        self._jobs.register_replica(self.replica_id, host=socket.gethostname(), pid=os.getpid())
        self._healthy_since = time.monotonic()
        log.info(
            "trainer replica registered",
            extra={"replica": self.replica_id, "lease_ttl_s": self.settings.lease_ttl_s},
        )

    def start(self) -> None:
        """Register (if not yet) and renew the lease until stop()."""
        if self._healthy_since is None:
            self.register()
        self._thread.start()

    def stop(self, *, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if deregister:
            try:
                self._jobs.deregister_replica(self.replica_id)
            except VisionTuneError as err:  # the database is gone too: the lease simply expires
                log.warning("could not deregister the replica: %s", err, extra={"replica": self.replica_id})

    def tick(self) -> None:
        """One heartbeat and, when this replica has been healthy for a whole lease, one expiry pass."""
        started = time.monotonic()
        try:
            alive = self._jobs.heartbeat(self.replica_id)
        except VisionTuneError as err:
            log.warning("heartbeat failed: %s", err, extra={"replica": self.replica_id})
            self._healthy_since = None
            return
        now = time.monotonic()
        if not alive:
            log.error(
                "this replica's lease was taken over by another replica (it stalled for longer than the lease); "
                "stopping its workers and registering again",
                extra={"replica": self.replica_id},
            )
            for callback in self._on_lost:
                callback()
            self.register()
            return
        if now - started > self.settings.lease_ttl_s / 2:
            # The heartbeat itself was slow (a database outage): others may look dead to us for the same reason.
            self._healthy_since = now
            return
        if self._healthy_since is None:
            self._healthy_since = now
            return
        if now - self._healthy_since < self.settings.lease_ttl_s:
            return
        takeover = self._jobs.expire_replicas(timedelta(seconds=self.settings.lease_ttl_s), keep=self.replica_id)
        if takeover.replicas:
            log.warning(
                "took over the work of dead replicas",
                extra={
                    "replica": self.replica_id,
                    "dead": list(takeover.replicas),
                    "requeued": list(takeover.requeued),
                    "cancelled": list(takeover.cancelled),
                    "studies": list(takeover.released_studies),
                },
            )
            for handler in self._on_takeover:
                handler(takeover)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.tick()
            except (VisionTuneError, sqlalchemy.exc.SQLAlchemyError) as err:
                # An expiry pass or a takeover's records meeting a database outage past its window (a heartbeat's own
                # failure is handled in tick): the lease goes on, and counts as unhealthy until heartbeats succeed.
                self._healthy_since = None
                log.warning("lease pass failed: %s", err, extra={"replica": self.replica_id})
            except Exception:
                self._healthy_since = None
                log.exception("lease pass failed", extra={"replica": self.replica_id})
