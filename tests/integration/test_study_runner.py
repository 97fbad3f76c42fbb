"""The study runner's bookkeeping, step by step, with the trial jobs finished by the test.

The test stands in for the executor and its workers (it moves each trial job to RUNNING and then to a
terminal state with the result a worker would write), so every path of the runner — repeats, cancel, the
wall-time budget, a crash between Optuna's ask and the job's creation, a study whose trials all fail —
runs in seconds. The job store (SQLite), Optuna's storage on it and the S3 bucket for the plots are real;
tests/integration/test_studies.py runs the same runner with real training jobs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from tests.integration.trainer_helpers import tiny_spec
from trainer_service.jobs.store import JobRecord, JobState, JobStore, StudyState
from trainer_service.tuning.runner import REPEAT_LABEL, StudyRunner, study_jobs, trial_request_id
from trainer_service.tuning.study_config import validate_study
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, study_pb2, training_spec_pb2

pytestmark = pytest.mark.integration


def _spec(**changes: object) -> study_pb2.StudySpec:
    spec = study_pb2.StudySpec(
        base_spec=tiny_spec(epochs=3),
        parameters=[
            study_pb2.SearchParameter(
                path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-4, max=0.1, log=True)
            )
        ],
        objective=study_pb2.Objective(metric=training_spec_pb2.METRIC_VALIDATION_LOSS),
        budget=study_pb2.StudyBudget(max_trials=3),
        parallelism=2,
        sampler=study_pb2.SAMPLER_RANDOM,
        seed=3,
    )
    for key, value in changes.items():
        field = getattr(spec, key)
        if isinstance(value, int) and not isinstance(field, int):
            raise TypeError(key)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(spec, key, value)
    return spec


class Harness:
    def __init__(self, tmp_path: Path, store: ArtifactStore) -> None:
        self.jobs = JobStore(tmp_path / "jobs.sqlite3")
        self.cancelled: list[str] = []
        self.runner = StudyRunner(
            self.jobs, store, default_bucket=store.bucket, wake_executor=lambda: None, cancel_job=self.cancelled.append
        )

    def create(self, study_id: str, spec: study_pb2.StudySpec) -> None:
        self.jobs.create_study(study_id, json_format.MessageToJson(spec))
        self.runner.create(study_id, validate_study(spec, default_bucket="b"))

    def open_jobs(self, study_id: str) -> list[JobRecord]:
        return [j for j in study_jobs(self.jobs, study_id) if not j.state.is_terminal]

    def finish(self, job: JobRecord, state: JobState = JobState.SUCCEEDED, loss: float = 1.0) -> None:
        """What the executor and a worker do with a job: run it, then end it with its result."""
        self.jobs.update_state(job.job_id, JobState.RUNNING)
        result = job_pb2.JobResult(metrics={"val_loss": job_pb2.MetricSummary(mean=loss, values=[loss])})
        self.jobs.update_state(
            job.job_id,
            state,
            result_json=json_format.MessageToJson(result),
            error="boom" if state == JobState.FAILED else None,
        )

    def study(self, study_id: str) -> study_pb2.Study:
        from trainer_service.tuning.studies import Studies

        return Studies(self.jobs, self.runner, default_bucket="b", wake_executor=lambda: None).get(study_id)


@pytest.fixture
def harness(tmp_path: Path, store: ArtifactStore) -> Harness:
    return Harness(tmp_path, store)


def test_parallelism_budget_and_top_k_repeats_with_fresh_seeds(harness: Harness, store: ArtifactStore) -> None:
    spec = _spec(repeat_top_k=1, repeat_count=3)
    harness.create("rep", spec)
    harness.runner.run_once()
    first = sorted(harness.open_jobs("rep"), key=lambda j: j.trial_number or 0)
    assert len(first) == 2  # parallelism
    assert sorted(j.trial_number for j in first) == [0, 1]
    harness.finish(first[0], loss=0.5)
    harness.runner.run_once()
    third = [j for j in harness.open_jobs("rep") if j.trial_number == 2]
    assert len(third) == 1  # one slot freed, one more trial; then the budget of 3 is spent
    harness.finish(first[1], loss=0.9)
    harness.finish(third[0], loss=0.7)
    harness.runner.run_once()
    repeats = harness.open_jobs("rep")
    assert len(repeats) == 3
    assert {j.labels[REPEAT_LABEL] for j in repeats} == {str(_best_trial(harness, "rep"))}
    seeds = {json_format.Parse(j.spec_json, training_spec_pb2.TrainingSpec()).run.seed for j in repeats}
    assert len(seeds) == 3  # fresh seeds
    assert all(j.trial_number is None for j in repeats)
    for job, loss in zip(repeats, (0.4, 0.5, 0.6), strict=True):
        harness.finish(job, loss=loss)
    harness.runner.run_once()

    study = harness.study("rep")
    assert study.state == study_pb2.STUDY_STATE_SUCCEEDED
    assert study.best_trial == _best_trial(harness, "rep")
    assert [t.value for t in sorted(study.trials, key=lambda t: t.number)] == [0.5, 0.9, 0.7]
    (repeat,) = study.repeats
    assert repeat.mean == pytest.approx(0.5)
    assert repeat.std == pytest.approx(0.1)
    assert len(repeat.jobs) == 3
    assert study.plots  # written to the bucket
    assert store.exists(study.plots[0].split(f"s3://{store.bucket}/", 1)[1])


def _best_trial(harness: Harness, study_id: str) -> int:
    trials = harness.runner.optuna_study(study_id, validate_study(_spec(), default_bucket="b")).trials
    return min((t for t in trials if t.value is not None), key=lambda t: float(t.value or 0)).number


def test_cancel_stops_asking_and_cancels_running_trials(harness: Harness) -> None:
    harness.create("cxl", _spec(budget=study_pb2.StudyBudget(max_trials=10)))
    harness.runner.run_once()
    running = harness.open_jobs("cxl")
    harness.jobs.update_study_state("cxl", StudyState.CANCELLING)
    harness.runner.run_once()
    assert sorted(harness.cancelled) == sorted(j.job_id for j in running)
    assert len(study_jobs(harness.jobs, "cxl")) == 2  # nothing new was asked for
    for job in running:
        harness.finish(job, JobState.CANCELLED)
    harness.runner.run_once()
    study = harness.study("cxl")
    assert study.state == study_pb2.STUDY_STATE_CANCELLED
    assert {t.state for t in study.trials} == {study_pb2.TRIAL_STATE_FAILED}


def test_a_trial_asked_for_but_never_given_a_job_gets_exactly_one(harness: Harness) -> None:
    spec = _spec(parallelism=1)
    harness.create("crash", spec)
    config = validate_study(spec, default_bucket="b")
    study = harness.runner.optuna_study("crash", config)
    from trainer_service.tuning.space import distributions

    asked = study.ask(fixed_distributions=distributions(config))  # the runner died right after this
    harness.runner.run_once()
    jobs = study_jobs(harness.jobs, "crash")
    assert [j.trial_number for j in jobs] == [asked.number]
    assert jobs[0].request_id == trial_request_id("crash", asked.number)
    harness.runner.run_once()
    assert len(study_jobs(harness.jobs, "crash")) == 1  # not created twice


def test_the_wall_time_budget_stops_new_trials(harness: Harness) -> None:
    budget = study_pb2.StudyBudget(max_trials=0)
    budget.max_duration.FromSeconds(1)
    harness.create("timed", _spec(budget=budget, parallelism=1))
    harness.runner.run_once()
    (first,) = harness.open_jobs("timed")
    time.sleep(1.2)
    harness.finish(first, loss=0.3)
    harness.runner.run_once()
    harness.runner.run_once()
    study = harness.study("timed")
    assert study.state == study_pb2.STUDY_STATE_SUCCEEDED
    assert len(study.trials) == 1


def test_a_study_whose_trials_all_fail_fails_with_the_reason(harness: Harness) -> None:
    harness.create("doomed", _spec(budget=study_pb2.StudyBudget(max_trials=2)))
    harness.runner.run_once()
    for job in harness.open_jobs("doomed"):
        harness.finish(job, JobState.FAILED)
    harness.runner.run_once()
    record = harness.jobs.get_study("doomed")
    assert record.state == StudyState.FAILED
    assert record.error is not None
    assert "no trial completed" in record.error
    assert "boom" in record.error


@pytest.mark.parametrize(
    "sampler", ["SAMPLER_TPE", "SAMPLER_GAUSSIAN_PROCESS", "SAMPLER_RANDOM", "SAMPLER_GRID", "SAMPLER_CMA_ES"]
)
def test_every_sampler_drives_a_study_to_its_end(harness: Harness, sampler: str) -> None:
    spec = _spec(sampler=study_pb2.Sampler.Value(sampler), parallelism=1, budget=study_pb2.StudyBudget(max_trials=4))
    spec.parameters[0].float_range.CopyFrom(study_pb2.FloatRange(min=0.01, max=0.04, step=0.01))  # grid-able
    spec.parameters.add(path="model.classifier_dim", int_range=study_pb2.IntRange(min=16, max=32, step=16))
    harness.create("s", spec)
    for _ in range(6):
        harness.runner.run_once()
        for job in harness.open_jobs("s"):
            params = json_format.Parse(job.spec_json, training_spec_pb2.TrainingSpec())
            harness.finish(job, loss=params.classifier.learning_rate * 10 + params.model.classifier_dim / 100)
    study = harness.study("s")
    assert study.state == study_pb2.STUDY_STATE_SUCCEEDED, study.error
    assert len(study.trials) == 4
    values = {(t.parameters["classifier.learning_rate"], t.parameters["model.classifier_dim"]) for t in study.trials}
    if sampler == "SAMPLER_GRID":
        assert len(values) == 4  # the 2 x 2 grid, each point once
    best = min(study.trials, key=lambda t: t.value)
    assert study.best_trial == best.number
    assert study.best_spec.classifier.learning_rate == pytest.approx(float(best.parameters["classifier.learning_rate"]))


def test_hyperband_prunes_through_the_workers_reporter(harness: Harness) -> None:
    from trainer_service.engine.loop import EpochRecord
    from trainer_service.tuning.trial_reporter import TrialReporter

    spec = _spec(
        parallelism=1,
        budget=study_pb2.StudyBudget(max_trials=8),
        pruner=study_pb2.PrunerSpec(type=study_pb2.PRUNER_TYPE_HYPERBAND, min_resource=1, reduction_factor=3),
    )
    spec.base_spec.classifier.epochs = 9
    harness.create("hb", spec)
    pruned_at = []
    for _ in range(8):
        harness.runner.run_once()
        (job,) = harness.open_jobs("hb")
        assert job.trial_number is not None
        reporter = TrialReporter(harness.jobs, "hb", job.trial_number, default_bucket="b")
        loss = 1.0 - 0.1 * (job.trial_number % 3)  # some configurations are plainly worse than others
        stopped = None
        for epoch in range(1, 10):
            record = EpochRecord(
                stage="classifier",
                epoch=epoch,
                epochs=9,
                train_loss=loss,
                train_accuracy=0.5,
                val_loss=loss / epoch**0.1,
                val_accuracy=0.5,
                learning_rate=0.01,
                images_per_second=1.0,
                epoch_seconds=0.1,
            )
            if reporter.report(epoch, record):
                stopped = epoch
                break
        if stopped is not None:
            pruned_at.append(stopped)
            harness.jobs.update_state(job.job_id, JobState.RUNNING)
            harness.jobs.update_state(job.job_id, JobState.PRUNED)
        else:
            harness.finish(job, loss=loss / 9**0.1)
    harness.runner.run_once()
    study = harness.study("hb")
    assert study.state == study_pb2.STUDY_STATE_SUCCEEDED
    pruned = [t for t in study.trials if t.state == study_pb2.TRIAL_STATE_PRUNED]
    assert pruned, "Hyperband stopped no trial"
    assert len(pruned) == len(pruned_at)
    assert sorted(len(t.intermediate_values) for t in pruned) == sorted(pruned_at)
    assert min(pruned_at) < 9, pruned_at  # stopped early, not only judged at the end
