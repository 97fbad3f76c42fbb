"""Typed settings for the services and the CLI, read from flags with environment-variable defaults.

Every setting has one flag and one `VISIONTUNE_*` variable; the flag wins. The README's configuration
table lists them all. The S3 settings travel to child processes (job workers, the local stack's services)
as `VISIONTUNE_S3_*` variables: `S3Settings.to_env` writes them and `S3Settings.from_env` reads them back,
the one codec every writer and reader uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TRAINER_PORT = 50051
DEFAULT_INFERENCE_PORT = 50052
DEFAULT_S3_ENDPOINT = "127.0.0.1:9000"
DEFAULT_BUCKET = "visiontune"
DEFAULT_S3_REGION = "us-east-1"
# The largest gRPC message, servers and client channels alike: batches of encoded images are large.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The databases' URLs travel in the environment, not argv, so their passwords are not in `ps`: the trainer's job
# database (the trainer's `--database-url` and its workers) and the inference service's prediction store.
DATABASE_URL_ENV = "VISIONTUNE_DATABASE_URL"
FEEDBACK_DATABASE_URL_ENV = "VISIONTUNE_FEEDBACK_DATABASE_URL"
# Where a job worker writes its last error for Kubernetes (the container's terminationMessagePath).
TERMINATION_MESSAGE_ENV = "VISIONTUNE_TERMINATION_MESSAGE_PATH"

_TRUE_WORDS = ("1", "true", "yes", "on")


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"VISIONTUNE_{name}")
    return value if value not in (None, "") else default


def _parse_bool(value: str) -> bool:
    return value.strip().lower() in _TRUE_WORDS


def default_data_dir() -> Path:
    return Path(_env("DATA_DIR") or Path.cwd() / ".visiontune")


@dataclass(frozen=True)
class S3Settings:
    """Where the artifact bucket lives and how to authenticate to it."""

    endpoint: str = DEFAULT_S3_ENDPOINT  # host:port, no scheme
    access_key: str = ""
    secret_key: str = ""
    bucket: str = DEFAULT_BUCKET
    secure: bool = False  # https when true
    region: str = DEFAULT_S3_REGION

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    @staticmethod
    def env_name(field: str) -> str:
        """The variable that carries a field: `endpoint` -> `VISIONTUNE_S3_ENDPOINT`."""
        return f"VISIONTUNE_S3_{field.upper()}"

    def to_env(self) -> dict[str, str]:
        """Every field as its `VISIONTUNE_S3_*` variable (booleans as `true`/`false`), for a child's environment."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            env[self.env_name(f.name)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """The settings `to_env` wrote (`environ` defaults to this process's environment). A variable that is
        unset or empty takes the field's default; a boolean is true for 1/true/yes/on (any case)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(f.name), "")
            if raw:
                values[f.name] = _parse_bool(raw) if isinstance(f.default, bool) else raw
        return cls(**values)


@dataclass(frozen=True)
class ServerSettings:
    """Everything one gRPC server process needs to start."""

    host: str
    port: int
    data_dir: Path
    s3: S3Settings
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM bundle of the CA that signs client certificates: mutual TLS
    auth_token: str | None = None  # bearer token of the `default` admin principal
    auth_token_file: Path | None = None  # principals with scopes (docs/security.md); with auth_token: both count
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 10.0  # how long SIGTERM waits for in-flight calls
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    s3_wait_seconds: float = 30.0  # how long start-up waits for an S3 that is down or not ready yet
    rpc_threads: int = 64  # calls handled at once; more wait in gRPC's queue

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--s3-FIELD` flag per `S3Settings` field, its default read from the environment by `from_env`."""
    env = S3Settings.from_env()
    name = S3Settings.env_name
    group = parser.add_argument_group("S3 artifact store")
    group.add_argument("--s3-endpoint", default=env.endpoint, help=f"S3 endpoint host:port [{name('endpoint')}]")
    group.add_argument("--s3-access-key", default=env.access_key, help=f"S3 access key [{name('access_key')}]")
    group.add_argument(
        "--s3-secret-key",
        default=env.secret_key,
        help=f"S3 secret key [{name('secret_key')}]; prefer the variable: `ps` shows a flag's value to every user",
    )
    group.add_argument("--s3-bucket", default=env.bucket, help=f"artifact bucket [{name('bucket')}]")
    group.add_argument(
        "--s3-secure", action=argparse.BooleanOptionalAction, default=env.secure, help=f"use https [{name('secure')}]"
    )
    group.add_argument("--s3-region", default=env.region, help=f"S3 region [{name('region')}]")


def add_server_arguments(parser: argparse.ArgumentParser, *, default_port: int, port_env: str) -> None:
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on [VISIONTUNE_HOST]")
    parser.add_argument(
        "--port",
        type=int,
        default=int(_env(port_env, str(default_port)) or default_port),
        help=f"port to listen on [VISIONTUNE_{port_env}]",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="local state directory [VISIONTUNE_DATA_DIR]"
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("TLS_CERT"),
        help="PEM certificate chain; enables TLS with --tls-key [VISIONTUNE_TLS_CERT]",
    )
    parser.add_argument("--tls-key", type=Path, default=_env("TLS_KEY"), help="PEM private key [VISIONTUNE_TLS_KEY]")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_env("TLS_CLIENT_CA"),
        help="PEM CA bundle; requires client certificates it signed (mutual TLS) [VISIONTUNE_TLS_CLIENT_CA]",
    )
    parser.add_argument(
        "--auth-token",
        default=_env("AUTH_TOKEN"),
        help="require 'authorization: Bearer TOKEN' on every call; an admin principal [VISIONTUNE_AUTH_TOKEN]; "
        "prefer the variable: `ps` shows a flag's value to every user",
    )
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        default=_env("AUTH_TOKEN_FILE"),
        help="JSON file of principals, their scopes and token digests; re-read when it changes "
        "[VISIONTUNE_AUTH_TOKEN_FILE]",
    )
    default_mb = DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024)
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=int(_env("MAX_MESSAGE_MB") or default_mb),
        help="largest request/response message in MiB [VISIONTUNE_MAX_MESSAGE_MB]",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=float(_env("GRACE_SECONDS", "10") or 10),
        help="drain time for in-flight calls on SIGTERM [VISIONTUNE_GRACE_SECONDS]",
    )
    parser.add_argument(
        "--s3-wait-seconds",
        type=float,
        default=float(_env("S3_WAIT_SECONDS", "30") or 30),
        help="at start-up, wait this long for an unreachable or not-ready S3; bad credentials "
        "fail at once [VISIONTUNE_S3_WAIT_SECONDS]",
    )
    parser.add_argument(
        "--rpc-threads",
        type=int,
        default=int(_env("RPC_THREADS", "64") or 64),
        help="gRPC calls handled at once; more wait in a queue [VISIONTUNE_RPC_THREADS]",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="[VISIONTUNE_LOG_LEVEL]")
    parser.add_argument(
        "--log-format", choices=("json", "text"), default=_env("LOG_FORMAT", "json"), help="[VISIONTUNE_LOG_FORMAT]"
    )
    add_s3_arguments(parser)


def s3_settings_from_args(ns: argparse.Namespace) -> S3Settings:
    """The settings `add_s3_arguments`' flags parsed into (`--s3-FIELD` for every field)."""
    return S3Settings(**{f.name: getattr(ns, f"s3_{f.name}") for f in dataclasses.fields(S3Settings)})


def server_settings_from_args(ns: argparse.Namespace) -> ServerSettings:
    if (ns.tls_cert is None) != (ns.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key must be given together")
    if ns.tls_client_ca is not None and ns.tls_cert is None:
        raise SystemExit("error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    return ServerSettings(
        host=ns.host,
        port=ns.port,
        data_dir=ns.data_dir,
        s3=s3_settings_from_args(ns),
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        auth_token=ns.auth_token,
        auth_token_file=ns.auth_token_file,
        max_message_bytes=ns.max_message_mb * 1024 * 1024,
        grace_seconds=ns.grace_seconds,
        log_level=ns.log_level.upper(),
        log_format=ns.log_format,
        s3_wait_seconds=max(0.0, ns.s3_wait_seconds),
        rpc_threads=max(1, ns.rpc_threads),
    )
