"""What every command group of `visiontune` shares: the root group, the data-dir option, where the services
are and channels to them, how a failed call becomes a message and an exit code, and small output helpers.

Exit codes: 0 success, 1 a failure (`click.ClickException`), 2 a usage error or a request the service refuses
as invalid (`SpecError`, click's own usage errors), 130 Ctrl-C while following work that keeps running.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import grpc
from google.protobuf.descriptor import EnumDescriptor

from visiontune.client import make_channel, replica_addresses, replicas_target
from visiontune.devstack import stack
from visiontune.settings import S3Settings, default_data_dir
from visiontune.specfile import enum_short_name
from visiontune.status import field_violations
from visiontune.v1 import inference_service_pb2_grpc, training_service_pb2_grpc

_TRAINER_ENV = "VISIONTUNE_TRAINER"
_INFERENCE_ENV = "VISIONTUNE_INFERENCE"

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="./.visiontune or $VISIONTUNE_DATA_DIR",
    help="Where the local stack keeps its state, data and logs.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """VisionTune: train, tune and serve image classifiers over gRPC."""


# --- where the services are -----------------------------------------------------------------------------------


def stack_state(data_dir: Path, missing: str) -> stack.StackState:
    """The running local stack's state; a ClickException starting with `missing` when there is none."""
    state = stack.load_state(data_dir.resolve())
    if state is None:
        raise click.ClickException(f"{missing} or start the local stack with `visiontune up`")
    return state


def s3_settings(data_dir: Path) -> S3Settings:
    """S3 settings from VISIONTUNE_S3_* when an endpoint is set there, else from the running local stack."""
    if os.environ.get(S3Settings.env_name("endpoint")):
        return S3Settings.from_env()
    return stack_state(data_dir, "no S3 endpoint: set VISIONTUNE_S3_ENDPOINT (and credentials)").s3_settings


def _replica_addresses(data_dir: Path, variable: str, role: str, what: str) -> list[str]:
    """$variable (one address, or several comma-separated), else every replica of the running local stack."""
    value = os.environ.get(variable)
    if value:
        return replica_addresses(value)
    state = stack_state(data_dir, f"no {what}: set {variable}=host:port[,host:port...]")
    return [c.address for c in state.replicas(role)]


def _channel_target(addresses: list[str], variable: str) -> str:
    try:
        return replicas_target(addresses)
    except ValueError as err:
        raise click.ClickException(f"{variable}: {err}") from err


def trainer_target(data_dir: Path) -> str:
    """The trainer's gRPC target: $VISIONTUNE_TRAINER, else the running local stack's trainers (several: one
    round-robin target over them, any replica answers any call)."""
    return _channel_target(_replica_addresses(data_dir, _TRAINER_ENV, stack.TRAINER, "trainer"), _TRAINER_ENV)


def inference_targets(data_dir: Path) -> list[str]:
    """Every inference replica's address: $VISIONTUNE_INFERENCE (comma-separated), else the local stack's."""
    return _replica_addresses(data_dir, _INFERENCE_ENV, stack.INFERENCE, "inference service")


def inference_target(data_dir: Path) -> str:
    """The inference service's gRPC target: one replica, or a round-robin target over several (classify and
    feedback may reach different replicas: they share the prediction store)."""
    return _channel_target(inference_targets(data_dir), _INFERENCE_ENV)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def channel_to(target: str) -> grpc.Channel:
    """A channel to a service as the environment says: $VISIONTUNE_AUTH_TOKEN, TLS trusting $VISIONTUNE_TLS_CA,
    and the client certificate $VISIONTUNE_TLS_CLIENT_CERT / $VISIONTUNE_TLS_CLIENT_KEY for mutual TLS."""
    cert, key = _env_path("VISIONTUNE_TLS_CLIENT_CERT"), _env_path("VISIONTUNE_TLS_CLIENT_KEY")
    if (cert is None) != (key is None):
        raise click.ClickException("VISIONTUNE_TLS_CLIENT_CERT and VISIONTUNE_TLS_CLIENT_KEY must be set together")
    try:
        return make_channel(
            target,
            tls_ca=_env_path("VISIONTUNE_TLS_CA"),
            token=os.environ.get("VISIONTUNE_AUTH_TOKEN") or None,
            tls_client_cert=cert,
            tls_client_key=key,
        )
    except OSError as err:
        raise click.ClickException(f"cannot read TLS file {err.filename}: {err.strerror}") from err


@contextmanager
def trainer(data_dir: Path) -> Iterator[tuple[str, training_service_pb2_grpc.TrainingServiceStub]]:
    """The trainer's target and a stub on a channel to it (closed on exit), with the token and TLS files of the
    environment (`channel_to`)."""
    target = trainer_target(data_dir)
    with channel_to(target) as channel:
        yield target, training_service_pb2_grpc.TrainingServiceStub(channel)


@contextmanager
def inference(
    data_dir: Path, target: str | None = None
) -> Iterator[tuple[str, inference_service_pb2_grpc.InferenceServiceStub]]:
    """The inference service's target (`target`, else `inference_target`) and a stub on a channel to it, as
    `trainer` does."""
    target = target or inference_target(data_dir)
    with channel_to(target) as channel:
        yield target, inference_service_pb2_grpc.InferenceServiceStub(channel)


# --- failed calls -> messages and exit codes ------------------------------------------------------------------


class SpecError(click.ClickException):
    """A spec that the CLI or the trainer rejects; exit code 2, as for other usage errors."""

    exit_code = 2


def spec_field(field: str) -> str:
    """A violation's field path as the spec file writes it: `classifier.learning_rate`, not
    `job.spec.classifier.learning_rate`."""
    return field.removeprefix("job.").removeprefix("spec.")


def rpc_failed(
    target: str, err: grpc.RpcError, source: str = "", field_name: Callable[[str], str] = spec_field
) -> click.ClickException:
    """INVALID_ARGUMENT: every bad field, one per line (exit 2); any other failure: one line (exit 1).

    `field_name` turns a violation's field path into what the user wrote (a spec path, an option, a file)."""
    one_line = f"{target}: {err.code().name}: {err.details()}"
    if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return click.ClickException(one_line)
    violations = field_violations(err)
    if not violations:
        return SpecError(one_line)
    where = source or f"{target}: {err.code().name}"
    lines = [f"{where}: {count(len(violations), 'invalid field')}:"]
    lines += [f"  {field_name(v.field)}: {v.description}" for v in violations]
    return SpecError("\n".join(lines))


# --- output helpers -------------------------------------------------------------------------------------------


def count(n: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def enum_word(enum: EnumDescriptor, number: int) -> str:
    """An enum value as a word: `SAMPLER_TPE` -> `tpe`."""
    return enum_short_name(enum, number).lower()
