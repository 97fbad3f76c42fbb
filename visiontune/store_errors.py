"""What can go wrong talking to S3: the artifact store's errors, what each SDK failure becomes, and the one
retry policy every call goes through (exponential backoff with jitter, transient errors only).

Two kinds of "try again": a transient error (a reset connection, a 500) gets the short RetryPolicy; an
unreachable server (`is_unreachable`: refused, timed out, 502/503/504) is an outage, which the store waits through
for up to the outage window of `visiontune.outages` before it raises StoreOutageTooLong.

The errors are `visiontune.errors` classes, so a servicer that lets one through answers with its status
code (docs/architecture.md §3); the services usually say first what the failure means to them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import urllib3
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from visiontune import errors
from visiontune.outages import OutageTooLong

__all__ = [
    "CLIENT_ERRORS",
    "DEFAULT_RETRY",
    "ModelVersionExists",
    "ObjectNotFound",
    "RetryPolicy",
    "StoreConfigError",
    "StoreError",
    "StoreOutageTooLong",
    "StoreUnavailable",
    "StoreUnreachable",
    "describe_error",
    "is_transient",
    "is_unreachable",
    "retry_call",
    "translate",
]

log = logging.getLogger("visiontune.store")  # the retries are the artifact store's

T = TypeVar("T")

# What the minio SDK and the urllib3 pool under it raise for a failed request.
CLIENT_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError)
_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})
# A server that is restarting, or a proxy in front of one that is down, answers with these.
_UNREACHABLE_STATUS = frozenset({502, 503, 504})
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
    }
)


# -- errors -----------------------------------------------------------------------------------------------


class StoreError(errors.VisionTuneError):
    """An artifact-store operation failed; the message names the endpoint, the key and the cause."""

    def __init__(self, message: str, *, endpoint: str, key: str | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.key = key
        self.cause = cause


class StoreConfigError(StoreError, errors.FailedPrecondition):
    """Wrong credentials, a missing bucket or an endpoint that does not answer: fix the configuration."""


class ObjectNotFound(StoreError, errors.NotFound):
    """The key (or the committed model version) does not exist."""


class StoreUnavailable(StoreError, errors.Unavailable):
    """The server did not answer, or answered with transient errors, on every attempt."""


class StoreUnreachable(StoreConfigError, StoreUnavailable):
    """`check()` found nobody answering at the endpoint: a wrong address, or a server that is down."""

    # Not FAILED_PRECONDITION, which it would inherit first: the server may just not be up yet.
    code: ClassVar[errors.Code] = "UNAVAILABLE"


class StoreOutageTooLong(StoreUnavailable, OutageTooLong):
    """The server stayed unreachable for longer than the outage window; `cause` is the last error seen.

    Both a StoreUnavailable (what callers of the store catch) and an OutageTooLong (what code that handles any
    backing service's outage catches); `endpoint` is the store's URL, as in every StoreError.
    """

    def __init__(self, message: str, *, endpoint: str, key: str | None, cause: str, waited_s: float) -> None:
        # The two bases' constructors take different keywords: set what each promises, once.
        errors.Unavailable.__init__(self, message)
        self.endpoint = endpoint
        self.key = key
        self.cause = cause
        self.service = "S3"
        self.waited_s = waited_s


class ModelVersionExists(StoreError, errors.AlreadyExists):
    """The model version is already committed; committed versions are immutable."""


# -- retries ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures."""

    attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy backoffs must be >= 0 and the multiplier >= 1")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1-based): exponential, capped, half of it jittered."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        # "Equal jitter": never less than half the base, so a retry storm still backs off.
        return base / 2 + rng.uniform(0, base / 2)


DEFAULT_RETRY = RetryPolicy()


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, S3Error):
        response = getattr(exc, "response", None)
        status = getattr(response, "status", None)
        return status if isinstance(status, int) else None
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        code = getattr(exc, "_code", None)  # the SDK keeps the HTTP status only in this attribute
        return code if isinstance(code, int) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection failed or broke, or the server said "try again later"."""
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES or _status_of(exc) in _TRANSIENT_STATUS
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return _status_of(exc) in _TRANSIENT_STATUS
    return isinstance(
        exc,
        (
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError,
            urllib3.exceptions.IncompleteRead,
            ConnectionError,
            TimeoutError,
        ),
    )


def is_unreachable(exc: BaseException) -> bool:
    """Nobody answers at the endpoint, or only "unavailable" does: an outage to wait through, not a bad request.

    A name that does not resolve is not one: that is a wrong endpoint, a configuration error.
    """
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return is_unreachable(exc.reason)
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return False
    if isinstance(exc, (S3Error, ServerError, InvalidResponseError)):
        return _status_of(exc) in _UNREACHABLE_STATUS
    return isinstance(
        exc,
        (
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ProtocolError,  # reset or closed mid-request: the server went away
            urllib3.exceptions.TimeoutError,
            urllib3.exceptions.IncompleteRead,
            ConnectionError,
            TimeoutError,
        ),
    )


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call `fn` until it succeeds, retrying transient client errors; the last error propagates."""
    rng = rng if rng is not None else random.Random()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except CLIENT_ERRORS as exc:
            if attempt >= policy.attempts or not is_transient(exc):
                raise
            delay = policy.backoff(attempt, rng)
            log.debug("transient S3 error (attempt %d/%d), retrying in %.2fs: %s", attempt, policy.attempts, delay, exc)
            sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_error(exc: BaseException) -> str:
    """A short, one-line cause for an SDK or connection error."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return describe_error(exc.reason)
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}" if exc.message else str(exc.code)
    if isinstance(exc, ServerError):
        return f"HTTP {exc.status_code} from the server"
    if isinstance(exc, InvalidResponseError):
        return f"not an S3 response (HTTP {_status_of(exc)})"
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        host = getattr(getattr(exc, "conn", None), "host", None)
        return f"cannot resolve host {host!r}" if host else "cannot resolve host"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        text = str(exc)
        if "refused" in text.lower():
            return "connection refused"
        return _one_line(text.split(": ", 1)[-1])
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "read timed out"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        inner = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], BaseException) else None
        detail = f"{type(inner).__name__}: {inner}" if inner is not None else str(exc)
        return _one_line(f"connection broken ({detail})")
    return _one_line(f"{type(exc).__name__}: {exc}")


def translate(
    exc: BaseException,
    *,
    op: str,
    endpoint: str,
    bucket: str,
    key: str | None,
    attempts: int,
    access_key: str | None,
) -> StoreError:
    """The StoreError for an SDK or connection error of operation `op` on `key` (None: the bucket itself)."""
    cause = describe_error(exc)
    ep = endpoint
    where = f"'{bucket}/{key}'" if key else f"bucket '{bucket}'"
    code = exc.code if isinstance(exc, S3Error) else None
    if code in ("NoSuchKey", "NoSuchObject"):
        return ObjectNotFound(f"S3 at {ep}: object {where} does not exist", endpoint=ep, key=key, cause=cause)
    if code == "NoSuchBucket":
        during = f" ({op} '{key}')" if key else ""
        return StoreConfigError(
            f"S3 at {ep}: bucket '{bucket}' does not exist{during}", endpoint=ep, key=key, cause=cause
        )
    if code in _CREDENTIAL_CODES:
        who = f" (access key '{access_key}')" if access_key else ""
        if code == "AccessDenied":
            msg = f"S3 at {ep} denied {op} of {where} to these credentials{who}: {code}"
        else:
            msg = f"S3 at {ep} rejected the credentials{who}: {code}"
        return StoreConfigError(msg, endpoint=ep, key=key, cause=cause)
    if is_transient(exc):
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        return StoreUnavailable(
            f"S3 at {ep} unavailable: {op} {where} failed{tries}: {cause}", endpoint=ep, key=key, cause=cause
        )
    return StoreError(f"S3 at {ep}: {op} {where} failed: {cause}", endpoint=ep, key=key, cause=cause)
