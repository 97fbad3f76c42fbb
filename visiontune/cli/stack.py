"""`visiontune up`, `status`, `down`, `env`: the local stack (visiontune.devstack.stack) from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from visiontune.cli.common import cli, data_dir_option, s3_settings
from visiontune.client import list_services, make_channel
from visiontune.devstack import stack
from visiontune.settings import DEFAULT_INFERENCE_PORT, DEFAULT_TRAINER_PORT


def _triton_ports_default() -> str:
    return ",".join(str(p) for p in stack.DEFAULT_TRITON_PORTS)


@cli.command()
@data_dir_option
@click.option("--s3-port", type=int, default=stack.DEFAULT_S3_PORT, show_default=True, help="0 picks a free port.")
@click.option(
    "--trainer-port",
    type=int,
    default=DEFAULT_TRAINER_PORT,
    show_default=True,
    help="The first trainer's; other replicas get free ports. 0 picks a free port.",
)
@click.option(
    "--inference-port",
    type=int,
    default=DEFAULT_INFERENCE_PORT,
    show_default=True,
    help="The first inference replica's; others get free ports. 0 picks a free port.",
)
@click.option(
    "--metrics-port",
    type=int,
    default=stack.DEFAULT_METRICS_PORT,
    show_default=True,
    help="The first inference replica's Prometheus endpoint; 0 picks a free port.",
)
@click.option(
    "--triton-ports",
    default=_triton_ports_default(),
    show_default=True,
    help="The first inference replica's Triton gRPC,HTTP,metrics ports; 0 picks a free port.",
)
@click.option(
    "--postgres-port",
    type=int,
    default=stack.DEFAULT_POSTGRES_PORT,
    show_default=True,
    help="PostgreSQL's port with --database postgresql; 0 picks a free port.",
)
@click.option("--any-ports", is_flag=True, help="Pick free ports for everything (overrides the port options).")
@click.option(
    "--database",
    type=click.Choice(stack.DATABASES),
    default=None,
    help=f"Where jobs, studies and feedback are kept: SQLite files, or a PostgreSQL the stack runs under the data "
    f"directory. [default: what the stack last ran on, else {stack.DEFAULT_DATABASE}; postgresql with several "
    "replicas]",
)
@click.option(
    "--trainer-replicas",
    type=click.IntRange(min=1),
    default=None,
    help=f"Trainer processes, sharing the job database (more than 1 needs PostgreSQL). "
    f"[default: {stack.DEFAULT_REPLICAS}, or the running stack's]",
)
@click.option(
    "--inference-replicas",
    type=click.IntRange(min=1),
    default=None,
    help=f"Inference processes, each with its own Triton, sharing the prediction store (more than 1 needs "
    f"PostgreSQL). [default: {stack.DEFAULT_REPLICAS}, or the running stack's]",
)
@click.option(
    "--job-slots",
    type=int,
    default=0,
    show_default=True,
    help="Training jobs (and study trials) each trainer runs at once; 0 = one per GPU, 1 on a CPU.",
)
@click.option(
    "--tls-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Run the trainers and inference replicas with mutual TLS: ca.pem, server.pem, server.key, client.pem and "
    "client.key in this directory (docs/security.md). [default: plaintext on loopback]",
)
@click.option(
    "--auth-token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="The services' token file of principals and scopes (docs/security.md); needs --tls-dir.",
)
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each part.")
def up(
    data_dir: Path,
    s3_port: int,
    trainer_port: int,
    inference_port: int,
    metrics_port: int,
    triton_ports: str,
    postgres_port: int,
    any_ports: bool,
    database: str | None,
    trainer_replicas: int | None,
    inference_replicas: int | None,
    job_slots: int,
    tls_dir: Path | None,
    auth_token_file: Path | None,
    timeout: float,
) -> None:
    """Start the local stack: S3 server, trainer, and inference service with its Triton server (and PostgreSQL
    with --database postgresql). Several replicas of a service are reached round-robin by the other commands."""
    try:
        grpc_port, http_port, triton_metrics_port = (int(p) for p in triton_ports.split(","))
    except ValueError as err:
        raise click.BadParameter("three ports: gRPC,HTTP,metrics", param_hint="--triton-ports") from err
    if any_ports:
        s3_port = trainer_port = inference_port = metrics_port = grpc_port = http_port = triton_metrics_port = 0
        postgres_port = 0
    if auth_token_file is not None and tls_dir is None:
        # A token sent in plaintext can be read off the wire; the stack only runs tokens over TLS.
        raise click.BadParameter("needs --tls-dir: tokens travel over TLS only", param_hint="--auth-token-file")
    try:
        security = stack.StackSecurity.from_dir(tls_dir, auth_token_file) if tls_dir is not None else None
        state = stack.up(
            data_dir,
            s3_port=s3_port,
            trainer_port=trainer_port,
            inference_port=inference_port,
            metrics_port=metrics_port,
            triton_ports=(grpc_port, http_port, triton_metrics_port),
            postgres_port=postgres_port,
            database=database,
            trainer_replicas=trainer_replicas,
            inference_replicas=inference_replicas,
            job_slots=job_slots,
            security=security,
            timeout=timeout,
            echo=click.echo,
        )
    except stack.StackError as err:
        raise click.ClickException(str(err)) from err
    _print_status(data_dir)
    click.echo(f"\nS3 credentials and endpoints: {stack.state_path(Path(state.data_dir))}")
    if state.database == "postgresql":
        click.echo(f"PostgreSQL password: {stack.postgres_password_path(Path(state.data_dir))} (mode 0600)")
    click.echo("stop everything with: visiontune down")


def _print_status(data_dir: Path) -> bool:
    state, rows = stack.status(data_dir)
    width = max(10, *(len(row.name) for row in rows))
    click.echo(f"{'component':<{width}} {'endpoint':<22} {'state':<10} log")
    for row in rows:
        word = "serving" if row.healthy else ("unhealthy" if row.running else "stopped")
        click.echo(f"{row.name:<{width}} {row.endpoint:<22} {word:<10} {row.log}")
    security = state.stack_security
    for comp in state.components:
        if comp.grpc_service and stack.is_alive(comp):
            if security is None:
                services = list_services(comp.address, timeout=5.0)
            else:
                with make_channel(
                    comp.address,
                    tls_ca=security.ca,
                    tls_client_cert=security.client_cert,
                    tls_client_key=security.client_key,
                ) as channel:
                    services = list_services(channel, timeout=5.0)
            click.echo(f"{comp.name} services (reflection): {', '.join(services)}")
        for what, endpoint in comp.endpoints.items():
            click.echo(f"{comp.name} {what}: {endpoint}")
    click.echo(f"bucket: s3://{state.s3_settings.bucket} at {state.s3_settings.url}")
    click.echo(f"database: {state.database}")
    if security is not None:
        click.echo(
            f"mutual TLS: export VISIONTUNE_TLS_CA={security.ca} VISIONTUNE_TLS_CLIENT_CERT={security.client_cert} "
            f"VISIONTUNE_TLS_CLIENT_KEY={security.client_key}"
        )
    return all(row.healthy for row in rows)


@cli.command()
@data_dir_option
def status(data_dir: Path) -> None:
    """Show each part of the local stack, its endpoint, health and log. Exit 1 if any is down."""
    try:
        healthy = _print_status(data_dir)
    except stack.StackError as err:
        raise click.ClickException(str(err)) from err
    if not healthy:
        sys.exit(1)


@cli.command()
@data_dir_option
def down(data_dir: Path) -> None:
    """Stop the local stack (services drain in-flight calls first)."""
    if not stack.down(data_dir, echo=click.echo):
        click.echo("no stack is running")


@cli.command()
@data_dir_option
def env(data_dir: Path) -> None:
    """Print `export VISIONTUNE_S3_*=…` lines for the running stack (eval "$(visiontune env)")."""
    for name, value in s3_settings(data_dir).to_env().items():
        click.echo(f"export {name}={value}")
