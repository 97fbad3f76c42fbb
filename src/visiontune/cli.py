"""The `visiontune` command: run the local stack and work with datasets (more commands land per issue)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click
import grpc
from tqdm import tqdm

from visiontune import stack
from visiontune.client import list_services, make_channel
from visiontune.dataset_upload import plan_upload, upload
from visiontune.sample_data import SHAPES, write_shapes_dataset
from visiontune.settings import S3Settings, default_data_dir
from visiontune.store import ArtifactStore, StoreError
from visiontune.uris import parse_location
from visiontune.v1 import job_pb2, training_service_pb2, training_service_pb2_grpc

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=default_data_dir,
    show_default="./.visiontune or $VISIONTUNE_DATA_DIR",
    help="Where the local stack keeps its state, data and logs.",
)


def s3_settings(data_dir: Path) -> S3Settings:
    """S3 settings from VISIONTUNE_S3_* when set, else from the running local stack."""
    endpoint = os.environ.get("VISIONTUNE_S3_ENDPOINT")
    if endpoint:
        return S3Settings(
            endpoint=endpoint,
            access_key=os.environ.get("VISIONTUNE_S3_ACCESS_KEY", ""),
            secret_key=os.environ.get("VISIONTUNE_S3_SECRET_KEY", ""),
            bucket=os.environ.get("VISIONTUNE_S3_BUCKET", "visiontune"),
            secure=os.environ.get("VISIONTUNE_S3_SECURE", "").lower() in ("1", "true", "yes"),
        )
    state = stack.load_state(data_dir.resolve())
    if state is None:
        raise click.ClickException(
            "no S3 endpoint: set VISIONTUNE_S3_ENDPOINT (and credentials) or start the local stack with `visiontune up`"
        )
    return state.s3_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """VisionTune: train, tune and serve image classifiers over gRPC."""


@cli.command()
@data_dir_option
@click.option("--s3-port", type=int, default=9000, show_default=True, help="0 picks a free port.")
@click.option("--trainer-port", type=int, default=50051, show_default=True, help="0 picks a free port.")
@click.option("--inference-port", type=int, default=50052, show_default=True, help="0 picks a free port.")
@click.option("--timeout", type=float, default=90.0, show_default=True, help="Seconds to wait for each part.")
def up(data_dir: Path, s3_port: int, trainer_port: int, inference_port: int, timeout: float) -> None:
    """Start the local stack: S3 server, trainer and inference service."""
    try:
        state = stack.up(data_dir, s3_port=s3_port, trainer_port=trainer_port, inference_port=inference_port,
                         timeout=timeout, echo=click.echo)
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
    s3 = s3_settings(data_dir)
    for key, value in dataclasses.asdict(s3).items():
        click.echo(f"export VISIONTUNE_S3_{key.upper()}={str(value).lower() if isinstance(value, bool) else value}")


@cli.group()
def dataset() -> None:
    """Upload and generate ImageFolder datasets."""


@dataset.command("push")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("uri")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True, help="Parallel uploads.")
@data_dir_option
def dataset_push(directory: Path, uri: str, workers: int, data_dir: Path) -> None:
    """Upload DIRECTORY/{label}/{image} to URI (s3://bucket/prefix, or a prefix such as datasets/NAME)."""
    settings = s3_settings(data_dir)
    try:
        location = parse_location(uri, default_bucket=settings.bucket)
        plan = plan_upload(directory, location.prefix)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    store = ArtifactStore.connect(dataclasses.replace(settings, bucket=location.bucket))
    try:
        store.ensure_bucket()
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc=f"upload to {location}") as bar:
            def advance(nbytes: int) -> None:
                bar.update(nbytes)

            count = upload(store, plan, workers=workers, on_file=advance)
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    labels = ", ".join(f"{k} ({v})" for k, v in sorted(plan.labels.items()))
    click.echo(f"uploaded {count} images in {len(plan.labels)} labels to {location}: {labels}")
    if plan.skipped:
        click.echo(f"skipped {len(plan.skipped)} files that are not images in label folders, e.g. {plan.skipped[0]}")


@dataset.command("sample")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--labels", type=click.IntRange(2, len(SHAPES)), default=3, show_default=True)
@click.option("--per-label", type=click.IntRange(1, 10000), default=40, show_default=True)
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def dataset_sample(directory: Path, labels: int, per_label: int, size: int, seed: int) -> None:
    """Write a synthetic ImageFolder of shapes (circle, square, …) to DIRECTORY."""
    files = write_shapes_dataset(directory, labels=SHAPES[:labels], per_label=per_label, size=size, seed=seed)
    click.echo(f"wrote {len(files)} images in {labels} labels to {directory}")


def trainer_target(data_dir: Path) -> str:
    """The trainer's address: $VISIONTUNE_TRAINER, else the running local stack's trainer."""
    target = os.environ.get("VISIONTUNE_TRAINER")
    if target:
        return target
    state = stack.load_state(data_dir.resolve())
    if state is None:
        raise click.ClickException("no trainer: set VISIONTUNE_TRAINER=host:port or start the local stack")
    return f"{stack.HOST}:{state.component('trainer').port}"


def _job_state_word(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


@cli.group()
def jobs() -> None:
    """Inspect training jobs."""


@jobs.command("list")
@data_dir_option
@click.option("--state", "states", multiple=True,
              type=click.Choice(["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]),
              help="Only jobs in this state (repeatable).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def jobs_list(data_dir: Path, states: tuple[str, ...], limit: int) -> None:
    """List jobs, newest first."""
    target = trainer_target(data_dir)
    request = training_service_pb2.ListJobsRequest(
        page_size=limit, states=[job_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states]
    )
    with make_channel(target, token=os.environ.get("VISIONTUNE_AUTH_TOKEN")) as channel:
        try:
            response = training_service_pb2_grpc.TrainingServiceStub(channel).ListJobs(request, timeout=30)
        except grpc.RpcError as err:
            raise click.ClickException(f"{target}: {err.code().name}: {err.details()}") from err
    if not response.jobs:
        click.echo(f"no jobs yet on the trainer at {target}")
        return
    click.echo(f"{'name':<32} {'state':<11} {'created (UTC)':<20} display name")
    for job in response.jobs:
        created = job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{job.name:<32} {_job_state_word(job.state):<11} {created:<20} {job.display_name}")
    if response.next_page_token:
        click.echo(f"(more than {limit} jobs; use --limit)")


def main() -> None:
    cli(prog_name="visiontune")


if __name__ == "__main__":
    main()
