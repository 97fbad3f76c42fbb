"""The artifact store both services share: an S3 bucket reached through the `minio` SDK.

Every call goes through one retry policy (exponential backoff with jitter, transient errors only) and
every failure surfaces as a `StoreError` whose one-line message names the endpoint, the key and the cause
(both in `visiontune.store_errors`, re-exported here). The urllib3 pool under the client has its own retries
switched off, so that policy is the only short one.

A server that does not answer at all (refused, timed out, 503: `is_unreachable`) is an outage: the call waits for
it through `visiontune.outages.ride_out`, up to the store's outage window (`VISIONTUNE_OUTAGE_WINDOW_S`, 5 minutes
by default), telling its listener when the wait starts and ends, and then carries on; past the window it raises
StoreOutageTooLong. Once a wait has run out, later calls fail fast until the server answers again, so the
clean-up after a failure does not wait a second window. Calls that must answer now use a copy with
`with_outage(NO_WAIT)`; `check()` and `ensure_bucket()` never wait (their callers poll with their own deadline).

Model versions follow docs/architecture.md §5: files under `models/{model}/versions/{version}/`, committed by
writing `manifest.json` last (`visiontune.model_versions.ModelVersionWriter`). Readers see only versions that have
a manifest, so a crash or a kill in the middle of an upload never exposes a torn model.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import hashlib
import io
import itertools
import logging
import mimetypes
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import minio
import urllib3
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from visiontune.model_versions import ModelVersionWriter

# MANIFEST is re-exported: the store commits model versions with it, and its callers read it here.
from visiontune.names import MANIFEST as MANIFEST
from visiontune.names import model_version_prefix, model_versions_prefix
from visiontune.outages import NO_WAIT, OUTAGE_WINDOW_ENV, OutageListener, OutagePolicy, OutageTooLong, ride_out
from visiontune.settings import S3Settings
from visiontune.store_errors import (
    CLIENT_ERRORS,
    DEFAULT_RETRY,
    ModelVersionExists,
    ObjectNotFound,
    RetryPolicy,
    StoreConfigError,
    StoreError,
    StoreOutageTooLong,
    StoreUnavailable,
    StoreUnreachable,
    describe_error,
    is_transient,
    is_unreachable,
    retry_call,
    translate,
)

__all__ = [
    "MANIFEST",
    "PART_SIZE",
    "ArtifactStore",
    "ModelVersionExists",
    "ModelVersionWriter",
    "ObjectInfo",
    "ObjectNotFound",
    "ReadableStream",
    "RetryPolicy",
    "StoreConfigError",
    "StoreError",
    "StoreOutageTooLong",
    "StoreUnavailable",
    "StoreUnreachable",
    "describe_error",
    "is_transient",
    "is_unreachable",
    "make_http_client",
    "model_version_prefix",
    "retry_call",
    "sha256_file",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

PART_SIZE = 16 * 1024 * 1024  # multipart part size for uploads of unknown or large size
_CHUNK = 1024 * 1024

_LIST_BATCH = 1000  # keys per listing step, each one call that is retried as a whole (one S3 page)
_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# A prefix nothing is stored under: listing it checks credentials and bucket access without reading data.
_PROBE_PREFIX = ".visiontune-probe/"


# -- values -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime | None
    is_dir: bool = False  # a common prefix from a non-recursive listing


class ReadableStream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def make_http_client(
    *, connect_timeout_s: float = 2.0, read_timeout_s: float = 60.0, maxsize: int = 16
) -> urllib3.PoolManager:
    """The urllib3 pool for the minio client: short connect timeout, no retries of its own."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=maxsize,
        # Our RetryPolicy governs; urllib3's retries would multiply attempts and hide the real cause.
        retries=False,
        cert_reqs="CERT_REQUIRED",
    )


# -- the store --------------------------------------------------------------------------------------------


class _ObjectReader(io.RawIOBase):
    """A GET response as a raw stream; read errors become StoreErrors."""

    def __init__(self, response: Any, on_error: Callable[[BaseException], StoreError]) -> None:
        super().__init__()
        self._response = response
        self._on_error = on_error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self._response.readinto(buffer))
        except CLIENT_ERRORS as exc:
            raise self._on_error(exc) from exc

    def close(self) -> None:
        if not self.closed:
            # Close and hand the connection back to the pool even when the body was not read to the end.
            self._response.close()
            self._response.release_conn()
        super().close()


@dataclass
class _GaveUp:
    """Shared by a store and its copies: whether the last wait for the server ran out its window."""

    value: bool = False


class ArtifactStore:
    """One bucket on one S3 endpoint. Thread-safe: the minio client and its pool are."""

    def __init__(
        self,
        client: minio.Minio,
        bucket: str,
        *,
        endpoint: str,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        access_key: str | None = None,
        outage: OutagePolicy | None = None,
        listener: OutageListener | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """`outage`: how long calls wait for an unreachable server (default: `OutagePolicy.from_env()`);
        `listener` hears when such a wait starts and ends; `stop`, once set, ends every wait at once."""
        self._client = client
        self.bucket = bucket
        self.endpoint = endpoint  # for messages: "http://host:port"
        self.address = urlsplit(endpoint).netloc or endpoint  # "host:port", as outage events name it
        self.retry = retry
        self.outage = outage if outage is not None else OutagePolicy.from_env()
        self._listener = listener
        self._stop = stop
        self._sleep = sleep
        self._access_key = access_key
        self._rng = random.Random()
        self._gave_up = _GaveUp()

    @classmethod
    def connect(
        cls,
        settings: S3Settings,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 60.0,
        outage: OutagePolicy | None = None,
        listener: OutageListener | None = None,
    ) -> ArtifactStore:
        client = minio.Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            # A known region spares the SDK a GetBucketLocation round trip before the first request.
            region=settings.region or None,
            http_client=make_http_client(connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s),
        )
        return cls(
            client,
            settings.bucket,
            endpoint=settings.url,
            retry=retry,
            sleep=sleep,
            access_key=settings.access_key,
            outage=outage,
            listener=listener,
        )

    def for_bucket(self, bucket: str) -> ArtifactStore:
        """This endpoint, credentials, retry and outage policy on another bucket (sharing the connection pool)."""
        if bucket == self.bucket:
            return self
        other = copy.copy(self)
        other.bucket = bucket
        return other

    def with_outage(
        self,
        policy: OutagePolicy | None = None,
        *,
        listener: OutageListener | None = None,
        stop: threading.Event | None = None,
    ) -> ArtifactStore:
        """This store (same bucket, pool and retry policy) with another outage policy, listener or stop event;
        what is not given stays as it is. `with_outage(NO_WAIT)` is the store for calls that must answer now."""
        other = copy.copy(self)
        if policy is not None:
            other.outage = policy
        if listener is not None:
            other._listener = listener
        if stop is not None:
            other._stop = stop
        return other

    def __repr__(self) -> str:
        return f"ArtifactStore({self.endpoint}, bucket={self.bucket!r})"

    # -- plumbing -----------------------------------------------------------------------------------------

    def _translate(self, exc: BaseException, op: str, key: str | None, attempts: int) -> StoreError:
        return translate(
            exc,
            op=op,
            endpoint=self.endpoint,
            bucket=self.bucket,
            key=key,
            attempts=attempts,
            access_key=self._access_key,
        )

    def _run(
        self, op: str, key: str | None, fn: Callable[[], T], *, retry: RetryPolicy | None = None, wait: bool = True
    ) -> T:
        """`fn` under the retry policy and, unless `wait` is False, through an outage of up to the window."""
        attempts = 0

        def counted() -> T:
            nonlocal attempts
            attempts += 1
            return fn()

        def attempt() -> T:
            return retry_call(counted, retry or self.retry, sleep=self._sleep, rng=self._rng)

        policy = NO_WAIT if not wait or self._gave_up.value else self.outage
        try:
            if policy.window_s <= 0:
                result = attempt()
            else:
                result = ride_out(
                    attempt,
                    service="S3",
                    endpoint=self.address,
                    is_outage=is_unreachable,
                    describe=describe_error,
                    policy=policy,
                    listener=self._listener,
                    sleep=self._sleep,
                    stop=self._stop,
                )
        except OutageTooLong as err:
            self._gave_up.value = True
            raise self._too_long(err, op, key) from err
        except CLIENT_ERRORS as exc:
            if not is_unreachable(exc):
                self._gave_up.value = False  # it answered, if only with an error
            raise self._translate(exc, op, key, attempts) from exc
        self._gave_up.value = False
        return result

    def _too_long(self, err: OutageTooLong, op: str, key: str | None) -> StoreOutageTooLong:
        cause = describe_error(err.__cause__) if err.__cause__ is not None else "no answer"
        where = f"'{self.bucket}/{key}'" if key else f"bucket '{self.bucket}'"
        return StoreOutageTooLong(
            f"S3 at {self.endpoint} was unreachable for {err.waited_s:.0f} s, longer than the outage window "
            f"({self.outage.window_s:.0f} s, {OUTAGE_WINDOW_ENV}): {op} {where} failed: {cause}",
            endpoint=self.endpoint,
            key=key,
            cause=cause,
            waited_s=err.waited_s,
        )

    @staticmethod
    def _info(obj: Any) -> ObjectInfo:
        return ObjectInfo(
            key=str(obj.object_name),
            size=int(obj.size or 0),
            etag=str(obj.etag or ""),
            last_modified=obj.last_modified,
            is_dir=bool(obj.is_dir),
        )

    def _bucket_exists(self) -> bool:
        """Probe the bucket with a GET listing (unlike HEAD, its errors carry the S3 error code).

        Never waits through an outage: its callers are start-up checks, where nobody answering at the endpoint is
        most often a wrong address, and they poll with their own deadline (bootstrap's --s3-wait-seconds)."""

        def probe() -> bool:
            try:
                next(iter(self._client.list_objects(self.bucket, prefix=_PROBE_PREFIX)), None)
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return False
                raise
            return True

        return self._run("list", None, probe, wait=False)

    # -- bucket -------------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing. Idempotent, and safe against a concurrent creator.

        A set-up step, like `check()`: it fails at once when nobody answers, instead of waiting out an outage."""
        if self._bucket_exists():
            return

        def create() -> None:
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in _BUCKET_EXISTS_CODES:
                    raise

        try:
            self._run("create bucket", None, create, wait=False)
        except StoreConfigError as err:
            raise StoreConfigError(
                f"S3 at {self.endpoint}: bucket '{self.bucket}' does not exist and cannot be created with "
                f"these credentials: {err.cause}",
                endpoint=self.endpoint,
                cause=err.cause,
            ) from err
        log.info("created bucket %s at %s", self.bucket, self.endpoint)

    def check(self) -> None:
        """Verify the endpoint answers, the credentials are accepted and the bucket is readable.

        Raises StoreConfigError with a one-line explanation; StoreUnreachable (also a StoreUnavailable)
        when nobody answers at the endpoint, after the short retry policy only: a wrong endpoint at start-up is a
        configuration error to report now, not an outage to wait for.
        """
        try:
            exists = self._bucket_exists()
        except StoreUnavailable as err:
            cause = err.cause or "no answer"
            raise StoreUnreachable(
                f"S3 at {self.endpoint} is unreachable: {cause}", endpoint=self.endpoint, cause=cause
            ) from err
        except StoreConfigError:
            raise
        except StoreError as err:
            raise StoreConfigError(
                f"S3 at {self.endpoint} did not accept a listing of bucket '{self.bucket}': {err.cause}",
                endpoint=self.endpoint,
                cause=err.cause,
            ) from err
        if not exists:
            raise StoreConfigError(
                f"S3 at {self.endpoint}: bucket '{self.bucket}' does not exist (create it, or let the "
                "service create it with credentials that may)",
                endpoint=self.endpoint,
            )

    # -- objects ------------------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Upload `data` to `key`; returns the ETag."""

        def put() -> str:
            result = self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
            return str(result.etag)

        return self._run("put", key, put)

    def put_file(self, key: str, path: Path | str, content_type: str | None = None) -> str:
        """Upload a local file (multipart above 16 MiB); returns the ETag."""
        ctype = content_type or mimetypes.guess_type(str(path))[0] or "application/octet-stream"

        def put() -> str:
            result = self._client.fput_object(self.bucket, key, str(path), content_type=ctype, part_size=PART_SIZE)
            return str(result.etag)

        return self._run("put", key, put)

    def put_stream(
        self,
        key: str,
        stream: ReadableStream,
        length: int = -1,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Upload from a stream; `length=-1` when unknown (multipart, 16 MiB parts). Returns the ETag.

        A seekable stream is rewound and retried on transient errors and through an outage; any other one gets one
        attempt: what the failed attempt read from it is gone, and a retry would upload a truncated object.
        """
        rewindable = isinstance(stream, io.IOBase) and stream.seekable()
        start = stream.tell() if isinstance(stream, io.IOBase) and rewindable else 0
        first = True

        def put() -> str:
            nonlocal first
            if not first and isinstance(stream, io.IOBase):
                stream.seek(start)
            first = False
            # The SDK only calls read(); BinaryIO is its annotation, not a requirement.
            result = self._client.put_object(
                self.bucket, key, cast(BinaryIO, stream), length, content_type=content_type, part_size=PART_SIZE
            )
            return str(result.etag)

        policy = self.retry if rewindable else RetryPolicy(attempts=1)
        return self._run("put", key, put, retry=policy, wait=rewindable)

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._run("get", key, get)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        """`with store.open(key) as f: f.read(n)`: a streaming read; the connection is released on exit."""
        response = self._run("get", key, lambda: self._client.get_object(self.bucket, key))

        def on_error(exc: BaseException) -> StoreError:
            return self._translate(exc, "read", key, 1)

        reader = io.BufferedReader(_ObjectReader(response, on_error), buffer_size=_CHUNK)
        try:
            yield reader
        finally:
            reader.close()

    def download_file(self, key: str, path: Path | str) -> Path:
        """Download to `path` atomically: a temporary file beside it, renamed once complete."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        done = False
        try:
            with os.fdopen(fd, "wb") as out:

                def download() -> None:
                    out.seek(0)
                    out.truncate()
                    response = self._client.get_object(self.bucket, key)
                    try:
                        for chunk in response.stream(_CHUNK):
                            out.write(chunk)
                    finally:
                        response.close()
                        response.release_conn()

                self._run("download", key, download)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
            done = True
        finally:
            if not done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
        return target

    def stat(self, key: str) -> ObjectInfo:
        return self._info(self._run("stat", key, lambda: self._client.stat_object(self.bucket, key)))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects under `prefix` in key order.

        Read in steps of one S3 page, each retried (and waited through an outage) as one call; a step that failed
        resumes after the last key yielded, so no key is yielded twice.
        """
        last: str | None = None
        pages: Iterator[Any] | None = None  # the SDK's lazy listing, kept across steps while it works

        def step() -> builtins.list[Any]:
            nonlocal pages
            if pages is None:
                # Only a recursive listing can start after a key: with a delimiter a common prefix would come back.
                pages = iter(
                    self._client.list_objects(
                        self.bucket,
                        prefix=prefix or None,
                        recursive=recursive,
                        start_after=last if recursive else None,
                    )
                )
            try:
                return builtins.list(itertools.islice(pages, _LIST_BATCH))
            except BaseException:
                pages = None  # a broken listing starts again after `last`
                raise

        while True:
            batch = self._run("list", prefix, step)
            for obj in batch:
                info = self._info(obj)
                if last is not None and info.key <= last:
                    continue  # already yielded before a retry
                yield info
                last = info.key
            if len(batch) < _LIST_BATCH:
                return

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (as in S3)."""
        self._run("delete", key, lambda: self._client.remove_object(self.bucket, key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many. An empty prefix is refused."""
        if not prefix:
            raise ValueError("refusing to delete the whole bucket: give a non-empty prefix")
        keys = [info.key for info in self.list(prefix, recursive=True)]
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]

            def remove(batch: builtins.list[str] = batch) -> builtins.list[Any]:
                # The SDK returns a lazy iterator of per-key errors; the request runs when it is consumed.
                objects = [DeleteObject(k) for k in batch]
                return builtins.list(self._client.remove_objects(self.bucket, objects))

            errors = self._run("delete", prefix, remove)
            if errors:
                first = errors[0]
                raise StoreError(
                    f"S3 at {self.endpoint}: deleting {len(errors)} of {len(batch)} objects under "
                    f"'{self.bucket}/{prefix}' failed, e.g. {first.name}: {first.code}",
                    endpoint=self.endpoint,
                    key=first.name,
                    cause=str(first.code),
                )
        return len(keys)

    # -- model versions (docs/architecture.md §5) ----------------------------------------------------------------

    def begin_model_version(self, model: str, version: str) -> ModelVersionWriter:
        """Start writing a model version. Leftovers of an earlier, uncommitted attempt are removed."""
        prefix = model_version_prefix(model, version)
        if self.exists(prefix + MANIFEST):
            raise ModelVersionExists(
                f"S3 at {self.endpoint}: model version models/{model}/versions/{version} is already "
                f"committed in bucket '{self.bucket}'",
                endpoint=self.endpoint,
                key=prefix + MANIFEST,
            )
        leftovers = self.delete_prefix(prefix)
        if leftovers:
            log.info("removed %d files of an uncommitted attempt at %s", leftovers, prefix)
        return ModelVersionWriter(self, model, version)

    def list_model_versions(self, model: str) -> builtins.list[str]:
        """The committed versions of `model` (those with a manifest), sorted."""
        root = model_versions_prefix(model)
        versions = []
        for info in self.list(root, recursive=True):
            rest = info.key[len(root) :].split("/")
            if len(rest) == 2 and rest[1] == MANIFEST:
                versions.append(rest[0])
        return sorted(versions)

    def get_manifest(self, model: str, version: str) -> bytes:
        key = model_version_prefix(model, version) + MANIFEST
        try:
            return self.get_bytes(key)
        except ObjectNotFound as err:
            raise ObjectNotFound(
                f"S3 at {self.endpoint}: model version models/{model}/versions/{version} does not exist "
                f"(no committed manifest in bucket '{self.bucket}')",
                endpoint=self.endpoint,
                key=key,
                cause=err.cause,
            ) from err

    def model_version_exists(self, model: str, version: str) -> bool:
        return self.exists(model_version_prefix(model, version) + MANIFEST)
