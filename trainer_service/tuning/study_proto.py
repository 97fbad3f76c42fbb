"""A study's trials and results as the API shows them: Optuna trials -> `Trial`, results -> a partial `Study`.

The objective of a trial is read from its job's result (`JobResult.metrics[metric].mean`), so a trial's
value is exactly what GetJob shows for its job. Plots are Optuna's own (matplotlib backend) as PNG.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Final

import matplotlib
import optuna
from google.protobuf import json_format, timestamp_pb2
from optuna.trial import FrozenTrial, TrialState
from visiontune import names
from visiontune.v1 import job_pb2, study_pb2, training_spec_pb2

from trainer_service.jobs.store import JobRecord
from trainer_service.spec.config import Metric
from trainer_service.tuning.space import ParamValue, param_string
from trainer_service.tuning.study_config import StudyConfig

log = logging.getLogger(__name__)

_TRIAL_STATES: Final = {
    TrialState.RUNNING: study_pb2.TRIAL_STATE_RUNNING,
    TrialState.WAITING: study_pb2.TRIAL_STATE_RUNNING,
    TrialState.COMPLETE: study_pb2.TRIAL_STATE_COMPLETE,
    TrialState.PRUNED: study_pb2.TRIAL_STATE_PRUNED,
    TrialState.FAIL: study_pb2.TRIAL_STATE_FAILED,
}


def objective_value(job: JobRecord, metric: Metric) -> float | None:
    """The trial's objective: the mean over repeats of `metric` in its job's result; None without one."""
    if not job.result_json:
        return None
    result = json_format.Parse(job.result_json, job_pb2.JobResult(), ignore_unknown_fields=True)
    summary = result.metrics.get(metric.value)
    return None if summary is None else float(summary.mean)


def _timestamp(value: object) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


def trial_proto_running(number: int, params: Mapping[str, ParamValue], job_id: str) -> study_pb2.Trial:
    return study_pb2.Trial(
        number=number,
        state=study_pb2.TRIAL_STATE_RUNNING,
        parameters={k: param_string(v) for k, v in params.items()},
        job=names.job_name(job_id),
    )


def trial_proto(trial: FrozenTrial, job_id: str | None) -> study_pb2.Trial:
    out = study_pb2.Trial(
        number=trial.number,
        state=_TRIAL_STATES.get(trial.state, study_pb2.TRIAL_STATE_UNSPECIFIED),
        parameters={k: param_string(v) for k, v in trial.params.items()},
        intermediate_values=[trial.intermediate_values[step] for step in sorted(trial.intermediate_values)],
        job=names.job_name(job_id) if job_id else "",
    )
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        out.value = float(trial.value)
    start, end = _timestamp(trial.datetime_start), _timestamp(trial.datetime_complete)
    if start is not None:
        out.start_time.CopyFrom(start)
    if end is not None:
        out.end_time.CopyFrom(end)
    return out


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k best COMPLETE trials, best first."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: float(t.value or 0.0), reverse=maximize)[:k]


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importance of each searched parameter (sums to 1); empty when there is too little to judge."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as err:  # e.g. every trial had the same parameters
        log.info("no parameter importances: %s", err)
        return {}


def plots(study: optuna.Study) -> dict[str, bytes]:
    """Optimisation history, parallel coordinates, importances and intermediate values, as PNG bytes.

    A plot Optuna cannot draw for this study (too few trials, no intermediate values) is left out."""
    # Optuna draws through pyplot; the Agg backend renders to bytes and never looks for a display.
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # after the backend choice
    from optuna.visualization import matplotlib as optuna_plots

    makers: dict[str, Callable[[optuna.Study], object]] = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
        "param_importances": optuna_plots.plot_param_importances,
        "intermediate_values": optuna_plots.plot_intermediate_values,
    }
    out: dict[str, bytes] = {}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                axes = make(study)
            figure = getattr(axes, "figure", None) or plt.gcf()
            figure.set_size_inches(8, 5)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            out[name] = buffer.getvalue()
        except (ValueError, RuntimeError) as err:
            log.info("no %s plot: %s", name, err)
        finally:
            plt.close("all")
    return out


def study_result(
    study_id: str,
    config: StudyConfig,
    study: optuna.Study,
    repeats: list[study_pb2.RepeatedConfiguration],
    *,
    plots: list[str],
    base_spec_resolver: Callable[[dict[str, ParamValue]], training_spec_pb2.TrainingSpec],
) -> study_pb2.Study:
    """The fields a finished study stores in its record (a partial Study)."""
    result = study_pb2.Study(repeats=repeats, plots=plots)
    best = top_trials(study, 1)
    if best:
        result.best_trial = best[0].number
        result.best_spec.CopyFrom(base_spec_resolver(dict(best[0].params)))
    for key, value in importances(study).items():
        result.parameter_importances[key] = value
    return result


def with_trials(study: study_pb2.Study, optuna_study: optuna.Study | None, jobs: list[JobRecord]) -> study_pb2.Study:
    """`study` with its trials, live from Optuna, each linked to its job."""
    del study.trials[:]
    if optuna_study is None:
        return study
    job_of = {j.trial_number: j.job_id for j in jobs if j.trial_number is not None}
    for trial in optuna_study.get_trials(deepcopy=False):
        study.trials.append(trial_proto(trial, job_of.get(trial.number)))
    if not study.HasField("best_trial"):
        best = top_trials(optuna_study, 1)
        if best:
            study.best_trial = best[0].number
    return study
