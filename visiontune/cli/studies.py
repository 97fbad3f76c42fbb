"""`visiontune study ...`: tuning studies, whose trials are training jobs (CreateStudy, WatchStudy, PromoteTrial).

`study create` and `study watch` print one line per trial as the study's events arrive, then the best trial,
parameter importances and repeats; `study best` writes the best spec as a file for `visiontune train`.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import click
import grpc
from google.protobuf import json_format

from visiontune import names
from visiontune.cli.common import SpecError, cli, count, data_dir_option, enum_word, rpc_failed, trainer
from visiontune.cli.jobs import error_text, follow_job, planned_epochs
from visiontune.specfile import SpecFileError, dump_spec_yaml, load_study_file, parse_spec
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_service_pb2_grpc, training_spec_pb2

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
watch_option = click.option(
    "--watch/--no-watch",
    default=True,
    show_default=True,
    help="Follow it to its end (Ctrl-C stops following, not the work).",
)


def _study_state_word(state: int) -> str:
    return enum_word(study_pb2.StudyState.DESCRIPTOR, state)


def _trial_state_word(state: int) -> str:
    return enum_word(study_pb2.TrialState.DESCRIPTOR, state)


def _objective(spec: study_pb2.StudySpec) -> tuple[str, bool]:
    """The objective's metric key (`val_loss`) and whether it is maximised, the study's defaults applied
    (validation accuracy; maximise accuracies, minimise losses)."""
    metric = spec.objective.metric or training_spec_pb2.METRIC_VALIDATION_ACCURACY
    key = _OBJECTIVE_KEYS.get(metric, enum_word(training_spec_pb2.Metric.DESCRIPTOR, metric))
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
    parts = [count(spec.budget.max_trials, "trial")] if spec.budget.max_trials else []
    if spec.budget.HasField("max_duration"):
        parts.append(f"{json_format.MessageToDict(spec.budget.max_duration)} of wall time")
    return ", ".join(parts) or "-"


def _search_text(spec: study_pb2.StudySpec) -> str:
    sampler = enum_word(study_pb2.Sampler.DESCRIPTOR, spec.sampler or study_pb2.SAMPLER_TPE)
    pruner = enum_word(study_pb2.PrunerType.DESCRIPTOR, spec.pruner.type or study_pb2.PRUNER_TYPE_NONE)
    parallelism = spec.parallelism if spec.HasField("parallelism") else 1
    return f"{count(len(spec.parameters), 'parameter')}, sampler {sampler}, pruner {pruner}, parallelism {parallelism}"


def _elapsed(study: study_pb2.Study) -> str:
    if not (study.HasField("create_time") and study.HasField("end_time")):
        return ""
    seconds = (study.end_time.ToNanoseconds() - study.create_time.ToNanoseconds()) / 1e9
    return f" in {seconds:.1f}s"


def _trials_text(study: study_pb2.Study) -> str:
    counts = Counter(_trial_state_word(t.state) for t in study.trials)
    words = ("complete", "pruned", "failed", "running")
    detail = ", ".join(f"{counts[w]} {w}" for w in words if counts[w])
    return count(len(study.trials), "trial") + (f" ({detail})" if detail else "")


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
    return error_text(job) if job.state == job_pb2.JOB_STATE_FAILED else ""


def _trial_line(trial: study_pb2.Trial, order: Sequence[str], error: str = "") -> str:
    params = _params_text(trial.parameters, order)
    epochs = len(trial.intermediate_values)
    job = f" ({trial.job})" if trial.job else ""
    if trial.state == study_pb2.TRIAL_STATE_RUNNING:
        return f"trial {trial.number} queued: {params}{job}"
    if trial.state == study_pb2.TRIAL_STATE_COMPLETE:
        value = f"value {trial.value:.4f}" if trial.HasField("value") else "no value"
        return f"trial {trial.number} complete: {value} after {count(epochs, 'epoch')}; {params}{job}"
    if trial.state == study_pb2.TRIAL_STATE_PRUNED:
        last = f" (last value {trial.intermediate_values[-1]:.4f})" if epochs else ""
        return f"trial {trial.number} pruned after {count(epochs, 'epoch')}{last}; {params}{job}"
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
        click.echo(
            f"best trial{so_far}: {best.number}, value {value} ({'maximize' if maximize else 'minimize'} "
            f"{key}, {count(len(best.intermediate_values), 'epoch')}, {best.job})"
        )
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
            click.echo(f"  trial {r.trial_number}: {r.mean:.4f} ± {r.std:.4f} over {count(len(r.values), 'run')}")
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
        click.echo(
            f"{study.name} is {_study_state_word(study.state)}; re-attach with: visiontune study watch {study.name}",
            err=True,
        )
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
        raise rpc_failed(target, err) from err


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
        click.echo(
            f"\nstopped following {study.name}; it keeps running on the trainer.\n"
            f"re-attach with: visiontune study watch {study.name}\n"
            f"stop it with:   visiontune study cancel {study.name}",
            err=True,
        )
        return 130
    except grpc.RpcError as err:
        raise click.ClickException(
            f"{target}: {err.code().name}: {err.details()} (re-attach with: visiontune study watch {study.name})"
        ) from err
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
@click.option(
    "--dry-run", is_flag=True, help="Have the trainer validate the study and the search space; create nothing."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATH=VALUE",
    help="Override a StudySpec field: budget.max_trials=3, base_spec.classifier.epochs=2 (repeatable).",
)
@watch_option
@data_dir_option
def study_create(
    space_file: Path,
    study_id: str,
    display_name: str | None,
    dry_run: bool,
    overrides: tuple[str, ...],
    watch: bool,
    data_dir: Path,
) -> None:
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
        study_id=study_id,
        validate_only=dry_run,
    )
    with trainer(data_dir) as (target, stub):
        try:
            created = stub.CreateStudy(request, timeout=60)
        except grpc.RpcError as err:
            raise rpc_failed(target, err, str(space_file), field_name=_study_field(spec)) from err
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
    with trainer(data_dir) as (target, stub):
        sys.exit(_follow_study(stub, target, _get_study(stub, target, name)))


@study.command("get")
@study_name_argument
@click.option("--json", "as_json", is_flag=True, help="Print the Study message as JSON.")
@data_dir_option
def study_get(name: str, as_json: bool, data_dir: Path) -> None:
    """Show a study (NAME: studies/ID or ID): its search, state and every trial."""
    with trainer(data_dir) as (target, stub):
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
    rows = [
        (
            str(t.number),
            _trial_state_word(t.state),
            f"{t.value:.4f}" if t.HasField("value") else "-",
            str(len(t.intermediate_values)),
            t.job or "-",
            _params_text(t.parameters, _order(spec)),
        )
        for t in sorted(found.trials, key=lambda t: t.number)
    ]
    job_width = max(3, *(len(r[4]) for r in rows))
    click.echo(f"\n{'#':>3}  {'state':<8}  {'value':>8}  {'epochs':>6}  {'job':<{job_width}}  parameters")
    for number, state, value, epochs, job, params in rows:
        mark = " *" if best is not None and number == str(best.number) else ""
        click.echo(f"{number:>3}  {state:<8}  {value:>8}  {epochs:>6}  {job:<{job_width}}  {params}{mark}")
    if best is not None:
        click.echo("(* the best trial)")


@study.command("best")
@study_name_argument
@click.option(
    "--spec-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the best spec here as YAML, ready for `visiontune train`, instead of printing it.",
)
@data_dir_option
def study_best(name: str, spec_out: Path | None, data_dir: Path) -> None:
    """The best trial of a study (NAME: studies/ID or ID): its value and parameters, parameter importances,
    repeats, plots, and the best spec as YAML. Exit 1 while no trial has completed."""
    with trainer(data_dir) as (target, stub):
        found = _get_study(stub, target, name)
    best = _best_trial(found)
    if best is None:
        raise click.ClickException(
            f"{found.name} has no completed trial yet ({_study_state_word(found.state)}, {_trials_text(found)})"
        )
    _print_study_result(found)
    spec = _best_spec(found, best)
    value = f"{best.value:.4f}" if best.HasField("value") else "-"
    header = (
        f"The best spec of {found.name}: trial {best.number}, {_objective(found.spec)[0]} {value}"
        f"{'' if found.state in _STUDY_TERMINAL else ' (best so far: the study is still running)'}.\n"
        f"Train it with `visiontune train FILE`, or `visiontune study promote {found.name}`."
    )
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
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["running", "succeeded", "failed", "cancelling", "cancelled"]),
    help="Only studies in this state (repeatable).",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@data_dir_option
def study_list(states: tuple[str, ...], limit: int, data_dir: Path) -> None:
    """List studies, newest first."""
    request = training_service_pb2.ListStudiesRequest(
        page_size=limit, states=[study_pb2.StudyState.Value(f"STUDY_STATE_{s.upper()}") for s in states]
    )
    with trainer(data_dir) as (target, stub):
        try:
            response = stub.ListStudies(request, timeout=30)
        except grpc.RpcError as err:
            raise rpc_failed(target, err) from err
    if not response.studies:
        click.echo(f"no studies yet on the trainer at {target}; start one with: visiontune study create SPACE.yaml")
        return
    width = max(4, *(len(s.name) for s in response.studies))
    click.echo(f"{'name':<{width}}  {'state':<10}  {'created (UTC)':<19}  {'objective':<21}  {'best':<8}  display name")
    for s in response.studies:
        created = s.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        best = f"trial {s.best_trial}" if s.HasField("best_trial") else "-"
        click.echo(
            f"{s.name:<{width}}  {_study_state_word(s.state):<10}  {created:<19}  "
            f"{_objective_text(s.spec):<21}  {best:<8}  {s.display_name}"
        )
    if response.next_page_token:
        click.echo(f"(more than {limit} studies; use --limit)")


@study.command("cancel")
@study_name_argument
@data_dir_option
def study_cancel(name: str, data_dir: Path) -> None:
    """Cancel a running study (NAME: studies/ID or ID): no new trials; its running trials are cancelled."""
    with trainer(data_dir) as (target, stub):
        try:
            found = stub.CancelStudy(training_service_pb2.CancelStudyRequest(name=name), timeout=30)
        except grpc.RpcError as err:
            raise rpc_failed(target, err) from err
    click.echo(f"{found.name}: {_study_state_word(found.state)} ({_trials_text(found)})")
    if found.state not in _STUDY_TERMINAL:
        click.echo(f"follow it to its end with: visiontune study watch {found.name}")


@study.command("promote")
@study_name_argument
@click.option(
    "--trial",
    "trial_number",
    type=click.IntRange(min=0),
    default=None,
    help="The trial to promote [default: the best].",
)
@click.option("--job-id", default="", help="ID of the new job (jobs/ID); generated when not given.")
@watch_option
@data_dir_option
def study_promote(name: str, trial_number: int | None, job_id: str, watch: bool, data_dir: Path) -> None:
    """Train a study's trial (default: the best) as a full job that publishes a deployable model version.

    Exit 0 when the job succeeds, 1 when it fails, 130 on Ctrl-C (the job keeps running)."""
    request = training_service_pb2.PromoteTrialRequest(study=name, job_id=job_id)
    if trial_number is not None:
        request.trial_number = trial_number
    with trainer(data_dir) as (target, stub):
        try:
            job = stub.PromoteTrial(request, timeout=60)
        except grpc.RpcError as err:
            fields = {"job_id": "--job-id", "trial_number": "--trial", "study": "NAME"}
            raise rpc_failed(target, err, field_name=lambda f: fields.get(f, f)) from err
        source = job.labels.get(_PROMOTED_LABEL, "").rpartition("/trials/")[2]
        which = f"trial {source} of {name}" if source else name
        click.echo(f"created {job.name} on {target} from {which} ({count(planned_epochs(job.spec), 'epoch')} planned)")
        if not watch:
            click.echo(f"follow it with: visiontune jobs watch {job.name}")
            return
        code, final = follow_job(stub, target, job)
    if code == 0 and final.result.model_version:
        click.echo(f"deploy it with: visiontune deploy {final.result.model_version}")
    sys.exit(code)
