"""`visiontune up`, `status`, `down`, `env`: the local stack (visiontune.devstack.stack) from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from visiontune.cli.common import cli, data_dir_option, s3_settings
from visiontune.client import list_services
from visiontune.devstack import stack


@cli.command()
@data_dir_option
@click.option("--s3-port", type=int, default=9000, show_default=True, help="0 picks a free port.")
@click.option("--trainer-port", type=int, default=50051, show_default=True, help="0 picks a free port.")
@click.option("--inference-port", type=int, default=50052, show_default=True, help="0 picks a free port.")
@click.option(
    "--metrics-port",
    type=int,
    default=9464,
    show_default=True,
    help="The inference service's Prometheus endpoint; 0 picks a free port.",
)
@click.option(
    "--triton-ports",
    default="8001,8000,8002",
    show_default=True,
    help="Triton's gRPC,HTTP,metrics ports; 0 picks a free port.",
)
@click.option("--any-ports", is_flag=True, help="Pick free ports for everything (overrides the port options).")
@click.option(
    "--job-slots",
    type=int,
    default=0,
    show_default=True,
    help="Training jobs (and study trials) the trainer runs at once; 0 = one per GPU, 1 on a CPU.",
)
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each part.")
def up(
    data_dir: Path,
    s3_port: int,
    trainer_port: int,
    inference_port: int,
    metrics_port: int,
    triton_ports: str,
    any_ports: bool,
    job_slots: int,
    timeout: float,
) -> None:
    """Start the local stack: S3 server, trainer, and inference service with its Triton server."""
    try:
        grpc_port, http_port, triton_metrics_port = (int(p) for p in triton_ports.split(","))
    except ValueError as err:
        raise click.BadParameter("three ports: gRPC,HTTP,metrics", param_hint="--triton-ports") from err
    if any_ports:
        s3_port = trainer_port = inference_port = metrics_port = grpc_port = http_port = triton_metrics_port = 0
    try:
        state = stack.up(
            data_dir,
            s3_port=s3_port,
            trainer_port=trainer_port,
            inference_port=inference_port,
            metrics_port=metrics_port,
            triton_ports=(grpc_port, http_port, triton_metrics_port),
            job_slots=job_slots,
            timeout=timeout,
            echo=click.echo,
        )
    except stack.StackError as err:
        raise click.ClickException(str(err)) from err
    _print_status(data_dir)
    click.echo(f"\nS3 credentials and endpoints: {stack.state_path(Path(state.data_dir))}")
    click.echo("stop everything with: visiontune down")


def _print_status(data_dir: Path) -> bool:
    state, rows = stack.status(data_dir)
    click.echo(f"{'component':<10} {'endpoint':<22} {'state':<10} log")
    for row in rows:
        word = "serving" if row.healthy else ("unhealthy" if row.running else "stopped")
        click.echo(f"{row.name:<10} {row.endpoint:<22} {word:<10} {row.log}")
    for comp in state.components:
        if comp.grpc_service and stack.is_alive(comp):
            services = list_services(f"{stack.HOST}:{comp.port}", timeout=5.0)
            click.echo(f"{comp.name} services (reflection): {', '.join(services)}")
        for what, endpoint in comp.endpoints.items():
            click.echo(f"{comp.name} {what}: {endpoint}")
    click.echo(f"bucket: s3://{state.s3_settings.bucket} at {state.s3_settings.url}")
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
