"""Who may call what: scoped bearer tokens, the method -> scope table, the token file and its reload, and the
interceptors that enforce scopes and write the audit log (docs/security.md).

A principal is a name, a set of scopes and one token. The token file lists principals; the server keeps only the
sha256 digest of each token, and a file that gives `sha256` instead of `token` holds no usable secret at all. The
legacy `--auth-token` is one more principal, `default`, with the `admin` scope. Servicers learn who calls through
`TokenRegistry.principal(context)` / `caller_name(context, registry)`; the registry is passed in, never global.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import string
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from visiontune.calls import Continuation, Handler, ServerInterceptor, behavior, handler_like, observed

__all__ = [
    "DEFAULT_PRINCIPAL",
    "METHOD_SCOPES",
    "MUTATING_METHODS",
    "AuditInterceptor",
    "Principal",
    "Scope",
    "ScopeInterceptor",
    "TokenFileError",
    "TokenRegistry",
    "caller_name",
    "parse_token_file",
    "token_digest",
    "token_sha256",
]

log = logging.getLogger(__name__)
audit_log = logging.getLogger("visiontune.audit")


class Scope(enum.StrEnum):
    TRAIN = "train"
    TUNE = "tune"
    DEPLOY = "deploy"
    CLASSIFY = "classify"
    FEEDBACK = "feedback"
    READ = "read"
    ADMIN = "admin"  # implies every other scope, and is the only one that opens a method missing from the table


_TRAINING = "/visiontune.v1.TrainingService/"
_INFERENCE = "/visiontune.v1.InferenceService/"

# The one table of what each RPC needs. Listed explicitly (not derived from names) so a reviewer sees every
# decision; a unit test checks it against the services' descriptors, so a new RPC cannot go unlisted.
METHOD_SCOPES: Mapping[str, Scope] = {
    _TRAINING + "CreateJob": Scope.TRAIN,
    _TRAINING + "CancelJob": Scope.TRAIN,
    _TRAINING + "FindLearningRate": Scope.TRAIN,
    _TRAINING + "RecommendSpec": Scope.TRAIN,
    _TRAINING + "GetJob": Scope.READ,
    _TRAINING + "ListJobs": Scope.READ,
    _TRAINING + "WatchJob": Scope.READ,
    _TRAINING + "CreateStudy": Scope.TUNE,
    _TRAINING + "CancelStudy": Scope.TUNE,
    _TRAINING + "PromoteTrial": Scope.TUNE,
    _TRAINING + "GetStudy": Scope.READ,
    _TRAINING + "ListStudies": Scope.READ,
    _TRAINING + "WatchStudy": Scope.READ,
    _INFERENCE + "Classify": Scope.CLASSIFY,
    _INFERENCE + "DeployModel": Scope.DEPLOY,
    _INFERENCE + "UndeployModel": Scope.DEPLOY,
    _INFERENCE + "ListDeployments": Scope.READ,
    _INFERENCE + "ReportFeedback": Scope.FEEDBACK,
}

# Calls that change state: each one is audited, whatever its outcome (denied calls of any method are too).
MUTATING_METHODS: frozenset[str] = frozenset(
    _TRAINING + m for m in ("CreateJob", "CancelJob", "CreateStudy", "CancelStudy", "PromoteTrial")
) | frozenset(_INFERENCE + m for m in ("DeployModel", "UndeployModel", "ReportFeedback"))

DEFAULT_PRINCIPAL = "default"  # the name `--auth-token` gets
RELOAD_CHECK_S = 1.0  # how often the call path looks at the token file's mtime/size

_HEX = frozenset(string.hexdigits)
_DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes

    @property
    def admin(self) -> bool:
        return Scope.ADMIN in self.scopes


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and what is wrong in it."""


def token_digest(token: str) -> bytes:
    """The sha256 of a token, what the registry stores and compares."""
    return hashlib.sha256(token.encode()).digest()


# ------------------------------------------------------------------------------------------------ token file


def _parse_principal(entry: object, where: str) -> tuple[Principal, bytes]:
    if not isinstance(entry, dict):
        raise TokenFileError(f"{where}: must be an object with name, scopes and sha256 (or token)")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TokenFileError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name})"
    unknown = set(entry) - {"name", "scopes", "sha256", "token"}
    if unknown:
        raise TokenFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise TokenFileError(f"{where}: 'scopes' must be a non-empty list of scope names")
    known = [s.value for s in Scope]
    bad = [s for s in scopes if s not in known]
    if bad:
        raise TokenFileError(f"{where}: unknown scope(s) {', '.join(bad)}; known: {', '.join(known)}")
    digest_hex, token = entry.get("sha256"), entry.get("token")
    if (digest_hex is None) == (token is None):
        raise TokenFileError(f"{where}: give exactly one of 'sha256' (preferred) or 'token'")
    if token is not None:
        if not isinstance(token, str) or not token:
            raise TokenFileError(f"{where}: 'token' must be a non-empty string")
        digest = token_digest(token)
    else:
        if not isinstance(digest_hex, str) or len(digest_hex) != 64 or not set(digest_hex) <= _HEX:
            raise TokenFileError(f"{where}: 'sha256' must be 64 hex digits (sha256sum of the token)")
        digest = bytes.fromhex(digest_hex)
    return Principal(name, frozenset(Scope(s) for s in scopes)), digest


def parse_token_file(text: str, source: str = "token file") -> list[tuple[Principal, bytes]]:
    """The principals of a token file's text with their token digests; TokenFileError naming `source` and the
    entry at fault. Format: `{"principals": [{"name": ..., "scopes": [...], "sha256": ...}, ...]}`."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise TokenFileError(f"{source}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("principals"), list):
        raise TokenFileError(f"{source}: must be a JSON object with a 'principals' list")
    entries = [_parse_principal(e, f"{source}: principals[{i}]") for i, e in enumerate(raw["principals"])]
    names: set[str] = set()
    digests: set[bytes] = set()
    for principal, digest in entries:
        if principal.name in names:
            raise TokenFileError(f"{source}: principal {principal.name!r} is listed twice")
        if digest in digests:
            # One token for two principals would make the caller's identity depend on the order of the file.
            raise TokenFileError(f"{source}: principal {principal.name!r} has the same token as another one")
        names.add(principal.name)
        digests.add(digest)
    return entries


# -------------------------------------------------------------------------------------------------- registry


def _bearer_tokens(metadata: Iterable[tuple[str, str | bytes]] | None) -> Iterable[str]:
    for key, value in metadata or ():
        if key != "authorization":  # gRPC lower-cases metadata keys on the wire
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, presented = text.strip().partition(" ")
        if scheme.lower() == "bearer" and presented.strip():
            yield presented.strip()


_FileKey = tuple[int, int, int]  # (mtime_ns, size, inode): Kubernetes swaps a Secret's file by a symlink


class TokenRegistry:
    """The known principals: from the token file (re-read when it changes) and the legacy single token.

    The file is looked at on the call path at most every `check_interval_s`: no thread to stop, and a server
    that gets no calls does no work. A changed file that does not parse keeps the old principals and logs an
    error; the registry never falls open. A file that is broken at start is a start-up error (`TokenFileError`).
    """

    def __init__(
        self,
        *,
        token_file: Path | None = None,
        default_token: str | None = None,
        check_interval_s: float = RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if token_file is None and not default_token:
            raise ValueError("a token registry needs a token file or a token")
        self._path = token_file
        self._fixed: list[tuple[Principal, bytes]] = []
        if default_token:
            self._fixed.append((Principal(DEFAULT_PRINCIPAL, frozenset({Scope.ADMIN})), token_digest(default_token)))
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()  # one caller re-reads the file; the others go on with what is loaded
        self._entries: list[tuple[Principal, bytes]] = list(self._fixed)
        self._key: _FileKey | None = None
        self._checked = clock()
        if token_file is not None:
            key = self._file_key()
            if key is None:
                raise TokenFileError(f"{token_file}: cannot read the token file")
            self._load(key)  # raises TokenFileError: a broken file at start is a configuration error

    @classmethod
    def from_settings(cls, token_file: Path | None, token: str | None) -> TokenRegistry | None:
        """The registry for a server's settings; None when neither is set (authentication off)."""
        if token_file is None and not token:
            return None
        return cls(token_file=token_file, default_token=token)

    @property
    def principals(self) -> list[Principal]:
        self._maybe_reload()
        return [p for p, _ in self._entries]

    def _file_key(self) -> _FileKey | None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, key: _FileKey) -> None:
        assert self._path is not None
        try:
            text = self._path.read_text(encoding="utf-8")
        except OSError as err:
            raise TokenFileError(f"{self._path}: cannot read the token file: {err.strerror or err}") from err
        except UnicodeDecodeError as err:
            raise TokenFileError(f"{self._path}: not UTF-8 text: {err.reason} at byte {err.start}") from err
        entries = parse_token_file(text, str(self._path))
        self._entries = [*self._fixed, *entries]
        self._key = key

    def _maybe_reload(self) -> None:
        if self._path is None or self._clock() - self._checked < self._interval:
            return
        if not self._lock.acquire(blocking=False):
            return  # another call is checking right now
        try:
            self._checked = self._clock()
            key = self._file_key()
            if key is None:
                if self._key is not None:  # said once; the file coming back is a change like any other
                    gone = "token file is gone; keeping the principals loaded before"
                    log.error(gone, extra={"path": str(self._path)})
                self._key = None
                return
            if key == self._key:
                return
            try:
                self._load(key)
            except TokenFileError as err:
                self._key = key  # report a broken version once, not every second
                log.error("token file not reloaded; keeping the principals loaded before", extra={"error": str(err)})
                return
            log.info("token file reloaded", extra={"path": str(self._path), "principals": len(self._entries)})
        finally:
            self._lock.release()

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose token this is, or None."""
        self._maybe_reload()
        digest = token_digest(token)
        found = None
        # Every entry is compared, in constant time each: the time taken tells nothing about which matched.
        for principal, known in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = principal
        return found

    def principal(self, source: grpc.ServicerContext | Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        """Who makes a call: from a servicer's context or a call's invocation metadata; None when no known token."""
        # Duck-typed: any context with invocation_metadata() (grpc's own, a test's) will do.
        reader = getattr(source, "invocation_metadata", None)
        metadata: Sequence[tuple[str, str | bytes]] | None = reader() if callable(reader) else source  # type: ignore[assignment]
        for token in _bearer_tokens(metadata):
            found = self.authenticate(token)
            if found is not None:
                return found
        return None


def caller_name(context: grpc.ServicerContext, registry: TokenRegistry | None = None) -> str:
    """The calling principal's name; "" when authentication is off (`registry` None) or the caller is unknown."""
    if registry is None:
        return ""
    found = registry.principal(context)
    return found.name if found is not None else ""


# ---------------------------------------------------------------------------------------------- interceptors


def _exempt(method: str, prefixes: Sequence[str]) -> bool:
    return method.startswith(tuple(prefixes))


class ScopeInterceptor(ServerInterceptor):
    """No or an unknown token: UNAUTHENTICATED. A known token without the method's scope: PERMISSION_DENIED
    naming the scope and the principal. A method missing from METHOD_SCOPES is closed to all but admins.

    The rejection is a handler of the same kind as the real one without deserializers: a rejected request is
    never parsed, and unary and streaming methods fail the same clean way. Health and reflection stay open.
    """

    def __init__(
        self, registry: TokenRegistry, *, exempt_prefixes: Sequence[str], scopes: Mapping[str, Scope] = METHOD_SCOPES
    ) -> None:
        self._registry = registry
        self._exempt = tuple(exempt_prefixes)
        self._scopes = scopes

    def refusal(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """Why a call is refused (code, message), or None when it may go on."""
        principal = self._registry.principal(metadata)
        if principal is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        scope = self._scopes.get(method)
        if scope is None:
            if principal.admin:
                return None
            return grpc.StatusCode.PERMISSION_DENIED, f"{method} is open to admin tokens only ({principal.name!r})"
        if principal.allows(scope):
            return None
        needs = f"principal {principal.name!r} lacks the {scope!s} scope that {method} needs"
        return grpc.StatusCode.PERMISSION_DENIED, needs

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _exempt(method, self._exempt):
            return handler  # an unknown method stays UNIMPLEMENTED
        refused = self.refusal(method, handler_call_details.invocation_metadata)
        if refused is None:
            return handler
        code, message = refused

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        return handler_like(handler, deny, keep_serializers=False)


# Request fields that name what a call acts on; only these reach the audit log (never tokens or image bytes).
_RESOURCE_FIELDS = ("name", "model", "model_version", "study", "job_id", "study_id", "request_id", "dataset_uri")


def _resources(request: object) -> dict[str, str]:
    if not isinstance(request, Message):  # a rejected call's request stays raw bytes
        return {}
    fields = request.DESCRIPTOR.fields_by_name
    found = {}
    for name in _RESOURCE_FIELDS:
        field = fields.get(name)
        if field is not None and field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            value = getattr(request, name)
            if value:
                found[name] = value
    return found


class AuditInterceptor(ServerInterceptor):
    """One `visiontune.audit` line per mutating call and per denied call, written when the call ends so the
    outcome is the final status code: principal, method, outcome, time, duration_ms, peer, resources."""

    def __init__(
        self,
        registry: TokenRegistry | None,
        *,
        exempt_prefixes: Sequence[str],
        mutating: frozenset[str] = MUTATING_METHODS,
        logger: logging.Logger = audit_log,
    ) -> None:
        self._registry = registry
        self._exempt = tuple(exempt_prefixes)
        self._mutating = mutating
        self._log = logger

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _exempt(method, self._exempt) or not self._log.isEnabledFor(logging.INFO):
            return handler
        # Without auth nothing is denied here: only mutating calls are worth a line.
        if self._registry is None and method not in self._mutating:
            return handler
        metadata = handler_call_details.invocation_metadata
        started_at = datetime.now(tz=UTC)
        calls: dict[str, object] = {}

        def before(request: Any, _context: grpc.ServicerContext) -> None:
            calls["request"] = request

        def done(context: grpc.ServicerContext, code: grpc.StatusCode, duration_ms: float) -> None:
            if method not in self._mutating and code not in _DENIED:
                return
            principal = self._registry.principal(metadata) if self._registry is not None else None
            self._log.info(
                "audit",
                extra={
                    "principal": principal.name if principal is not None else "",
                    "method": method,
                    "outcome": code.name,
                    "time": started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "duration_ms": duration_ms,
                    "peer": context.peer(),
                    "resources": _resources(calls.get("request")),
                },
            )

        wrapped = observed(behavior(handler), handler.response_streaming, done, before=before)
        return handler_like(handler, wrapped, keep_serializers=True)


def token_sha256(token: str) -> str:
    """What a token file's `sha256` holds for `token` (the same as `printf %s TOKEN | sha256sum`)."""
    return hashlib.sha256(token.encode()).hexdigest()
