"""Waiting through an outage of a backing service (S3, the database) instead of failing at once.

A 30-second restart of the S3 server or of PostgreSQL must not cost a user the job that was running. Every
call to a backing service that fails because the service is unreachable is retried here with capped
exponential backoff, up to one window (`OutagePolicy.window_s`, default 5 minutes, `VISIONTUNE_OUTAGE_WINDOW_S`);
a listener hears when the wait starts and ends, so a job can show "waiting for S3 at host:port since …". Past the
window the call raises `OutageTooLong`, whose message is one line naming the service, the endpoint, how long it
waited and the last cause.

Which errors mean "unreachable" is the caller's to say (`is_outage`); everything else propagates at once.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol, TypeVar

from visiontune import errors

__all__ = [
    "BRIEF_WAIT",
    "DEFAULT_OUTAGE_WINDOW_S",
    "NO_WAIT",
    "OUTAGE_WINDOW_ENV",
    "Outage",
    "OutageListener",
    "OutagePolicy",
    "OutageTooLong",
    "ride_out",
]

log = logging.getLogger("visiontune.outages")

T = TypeVar("T")

OUTAGE_WINDOW_ENV: Final = "VISIONTUNE_OUTAGE_WINDOW_S"
DEFAULT_OUTAGE_WINDOW_S: Final = 300.0


class OutageTooLong(errors.Unavailable):
    """A backing service stayed unreachable for longer than the outage window."""

    def __init__(self, message: str, *, service: str, endpoint: str, waited_s: float) -> None:
        super().__init__(message)
        self.service = service
        self.endpoint = endpoint
        self.waited_s = waited_s


@dataclass(frozen=True, slots=True)
class OutagePolicy:
    """How long to wait for a backing service to come back, and how often to try it meanwhile."""

    window_s: float = DEFAULT_OUTAGE_WINDOW_S
    first_delay_s: float = 0.25
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.window_s < 0 or self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError(f"invalid OutagePolicy {self}: delays and the window must be >= 0, max >= first")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OutagePolicy:
        """The default policy with the window from `VISIONTUNE_OUTAGE_WINDOW_S` when set (seconds, 0 = fail at once)."""
        raw = (os.environ if environ is None else environ).get(OUTAGE_WINDOW_ENV, "").strip()
        if not raw:
            return cls()
        try:
            return cls(window_s=float(raw))
        except ValueError as err:
            raise ValueError(f"{OUTAGE_WINDOW_ENV}={raw!r}: expected a number of seconds >= 0") from err

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds before retry number `retry` (1-based): doubling from first_delay_s, capped, half jittered."""
        base: float = min(self.max_delay_s, self.first_delay_s * 2.0 ** (retry - 1))
        return base / 2 + rng.uniform(0, base / 2)


# For calls that must answer now (a gRPC request, a start-up check): an unreachable service fails them at once.
NO_WAIT: Final = OutagePolicy(window_s=0.0)
# For a request a client waits on that a blip should not fail (a dropped pooled connection, a database failover):
# a few seconds, then UNAVAILABLE.
BRIEF_WAIT: Final = OutagePolicy(window_s=5.0, max_delay_s=1.0)


@dataclass(frozen=True, slots=True)
class Outage:
    """One wait for a backing service: which, where, since when, and the cause seen first."""

    service: str  # "S3", "the job database"
    endpoint: str  # host:port
    since: datetime
    cause: str

    def waiting_message(self) -> str:
        return f"waiting for {self.service} at {self.endpoint} since {self.since:%H:%M:%S} UTC ({self.cause})"


class OutageListener(Protocol):
    """Told when a call starts waiting for a service and when the service answers again."""

    def outage_started(self, outage: Outage) -> None: ...

    def outage_ended(self, outage: Outage, waited_s: float) -> None: ...


def ride_out(
    fn: Callable[[], T],
    *,
    service: str,
    endpoint: str,
    is_outage: Callable[[BaseException], bool],
    describe: Callable[[BaseException], str],
    policy: OutagePolicy,
    listener: OutageListener | None = None,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
) -> T:
    """Call `fn`; while it raises an error `is_outage` accepts, retry with backoff until `policy.window_s` passes.

    Other errors propagate unchanged. After the window, or when `stop` is set, raises OutageTooLong (chained to the
    last error). The listener hears of a wait once, when it starts, and once when a call succeeds after it.
    """
    rng = random.Random()
    started: float | None = None
    outage: Outage | None = None
    retry = 0
    while True:
        try:
            result = fn()
        except BaseException as exc:
            if not is_outage(exc):
                raise
            now = time.monotonic()
            if outage is None:
                started = now
                outage = Outage(service, endpoint, datetime.now(UTC), describe(exc))
                log.warning("%s", outage.waiting_message(), extra={"service": service, "endpoint": endpoint})
                if listener is not None:
                    listener.outage_started(outage)
            assert started is not None
            waited = now - started
            retry += 1
            delay = policy.delay(retry, rng)
            if waited + delay > policy.window_s or (stop is not None and stop.is_set()):
                raise OutageTooLong(
                    f"{service} at {endpoint} was unreachable for {waited:.0f} s "
                    f"(outage window {policy.window_s:.0f} s): {describe(exc)}",
                    service=service,
                    endpoint=endpoint,
                    waited_s=waited,
                ) from exc
            if stop is not None:
                stop.wait(delay)
            else:
                sleep(delay)
            continue
        if outage is not None and started is not None:
            waited = time.monotonic() - started
            log.warning("%s at %s is back after %.0f s", service, endpoint, waited, extra={"service": service})
            if listener is not None:
                listener.outage_ended(outage, waited)
        return result
