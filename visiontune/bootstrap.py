"""The start-up sequence both services share: settings, logs, the service's own checks, artifact store, gRPC server.

A misconfiguration (bad S3 credentials, unreachable endpoint, a database URL that cannot work, taken port) ends the
process with exit code 2 and one line on stderr naming the cause: an operator reads it in `kubectl logs` or the
stack's log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from visiontune.auth import TokenFileError, TokenRegistry
from visiontune.logs import configure_logging
from visiontune.server import GrpcServer, ServiceBinding
from visiontune.settings import ServerSettings, add_server_arguments, server_settings_from_args
from visiontune.store import ArtifactStore, StoreError, StoreUnavailable

EXIT_CONFIG_ERROR = 2


class StartupError(Exception):
    """A service's own start-up failed (e.g. its Triton server would not start); the message is one line."""


# Builds a service's bindings from its settings, a checked store, its own parsed flags and the token registry
# (None: authentication off; the servicers ask it who calls); returns them and a close hook.
ServiceFactory = Callable[
    [ServerSettings, ArtifactStore, argparse.Namespace, TokenRegistry | None],
    tuple[list[ServiceBinding], Callable[[], None]],
]


def wait_for_store(store: ArtifactStore, wait_seconds: float, log: logging.Logger) -> None:
    """Create/check the bucket, waiting up to `wait_seconds` while S3 is down or still starting.

    Services and their S3 often start together (a pod beside MinIO, the local stack), so an unreachable or
    erroring endpoint is waited for; an answer that rejects the credentials or the bucket fails at once. This is
    the only wait at start-up: `ensure_bucket` and `check` never wait out an outage themselves (the outage window
    is for a service that was serving), so a wrong endpoint is reported after `wait_seconds`.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            store.ensure_bucket()
            store.check()
            return
        except StoreUnavailable as err:
            if time.monotonic() >= deadline:
                raise
            log.warning("S3 not ready, retrying", extra={"endpoint": store.endpoint, "cause": err.cause})
            time.sleep(1.0)


def run_service(
    *,
    service: str,
    description: str,
    default_port: int,
    port_env: str,
    factory: ServiceFactory,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    before_store: Callable[[ServerSettings, argparse.Namespace], None] | None = None,
) -> int:
    """Parse the flags, then `before_store` (what the service checks without S3: the trainer opens its job database
    there, so a wrong URL fails before a bucket is created or S3 is waited for), the store, `factory`, the server.
    A StartupError from `before_store` or `factory` is the one line on stderr."""
    parser = argparse.ArgumentParser(prog=f"python -m {service}", description=description)
    add_server_arguments(parser, default_port=default_port, port_env=port_env)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    settings = server_settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format, service=service)
    log = logging.getLogger(service)
    try:
        # Before anything else: a token file that does not parse must not leave a server up that nobody can use.
        registry = TokenRegistry.from_settings(settings.auth_token_file, settings.auth_token)
    except TokenFileError as err:
        print(f"{service}: cannot start: {err} (--auth-token-file)", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    if before_store is not None:
        try:
            before_store(settings, args)
        except StartupError as err:
            print(f"{service}: cannot start: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    try:
        store = ArtifactStore.connect(settings.s3)  # its outage window from VISIONTUNE_OUTAGE_WINDOW_S
        wait_for_store(store, settings.s3_wait_seconds, log)
    except (StoreError, ValueError) as err:  # ValueError: an outage window that is not a number of seconds
        print(f"{service}: cannot start: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        bindings, close = factory(settings, store, args, registry)
    except StartupError as err:
        print(f"{service}: cannot start: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    server = GrpcServer(settings, bindings, service_label=service, on_stop=close, registry=registry)
    try:
        server.run_forever()
    except OSError as err:  # the port is taken or cannot be bound
        close()
        print(f"{service}: cannot start: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    log.info("stopped")
    return 0
