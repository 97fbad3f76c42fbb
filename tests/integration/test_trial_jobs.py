"""Trials of a tuning study as training jobs: a real trainer, real workers, a real Optuna study in its SQLite file.

The study is set up here as the study runner sets it up (the study record, the Optuna study beside it, finished
trials, a trial job per running trial); what is checked is the trial side: the worker reports each epoch's
objective, a weak trial is pruned at once and ends PRUNED, and no trial publishes a model version.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import grpc
import optuna
import pytest
from google.protobuf import json_format
from optuna.trial import TrialState
from tests.integration.trainer_helpers import Trainer, tiny_spec, worker_pid
from trainer_service.jobs import events
from trainer_service.jobs.store import JobState, JobStore, default_database_path
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.validate import validate_spec
from trainer_service.tuning.optuna_setup import create_study, open_storage
from trainer_service.tuning.study_config import validate_study
from visiontune import names
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_spec_pb2

pytestmark = pytest.mark.integration

MIN_RESOURCE = 2


@pytest.fixture
def jobs(trainer: Trainer) -> Iterator[JobStore]:
    """The trainer's own job store, opened from this process as well (the runner's view of it)."""
    with JobStore(default_database_path(trainer.data_dir)) as store:
        yield store


class Study:
    """A study as the runner makes it: its record, the Optuna study in the same file, and trial jobs."""

    def __init__(
        self,
        jobs: JobStore,
        store: ArtifactStore,
        study_id: str,
        base: training_spec_pb2.TrainingSpec,
        reference: list[float],
    ) -> None:
        self.jobs, self.store, self.study_id = jobs, store, study_id
        spec = study_pb2.StudySpec(
            base_spec=base,
            parameters=[
                study_pb2.SearchParameter(
                    path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-6, max=0.1, log=True)
                )
            ],
            objective=study_pb2.Objective(metric=training_spec_pb2.METRIC_VALIDATION_ACCURACY),
            budget=study_pb2.StudyBudget(max_trials=10),
            pruner=study_pb2.PrunerSpec(type=study_pb2.PRUNER_TYPE_MEDIAN, min_resource=MIN_RESOURCE, startup_trials=2),
        )
        # Owned by this test, which plays the study runner: the trainer's own runner claims only unowned studies.
        jobs.create_study(study_id, json_format.MessageToJson(spec, indent=None), owner="test-study-runner")
        self.optuna = create_study(open_storage(jobs.url), study_id, validate_study(spec, default_bucket=store.bucket))
        # Finished trials whose every epoch scored `reference`: what the median pruner compares with.
        for _ in range(3):
            trial = self.optuna.ask()
            for step in range(1, 9):
                trial.report(reference[min(step, len(reference)) - 1], step)
                trial.should_prune()  # as a worker asks after each epoch
            self.optuna.tell(trial, reference[-1])

    def queue_trial(self, spec: training_spec_pb2.TrainingSpec) -> tuple[str, int]:
        """Ask Optuna for a trial and queue its job, as the runner does (CreateJob has no study field)."""
        number = self.optuna.ask().number
        resolved = config_to_spec(validate_spec(spec, default_bucket=self.store.bucket))
        record, _ = self.jobs.create_job(
            names.new_id("job"),
            json_format.MessageToJson(resolved, indent=None),
            display_name=f"{self.study_id} trial {number}",
            request_id=f"{self.study_id}-trial-{number}",
            study_id=self.study_id,
            trial_number=number,
        )
        events.record_state(self.jobs, record.job_id, JobState.QUEUED, "queued")
        return record.job_id, number

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.optuna.get_trials(deepcopy=False)[number]


def _watch(trainer: Trainer, job_id: str, timeout: float = 240) -> list[job_pb2.JobEvent]:
    request = training_service_pb2.WatchJobRequest(name=names.job_name(job_id))
    return list(trainer.stub.WatchJob(request, timeout=timeout))


def _get(trainer: Trainer, job_id: str) -> job_pb2.Job:
    return trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=names.job_name(job_id)), timeout=10)


def test_a_weak_trial_is_pruned_after_min_resource_epochs(
    trainer: Trainer, jobs: JobStore, shapes: ArtifactStore
) -> None:
    planned = 6
    study = Study(jobs, shapes, "strong-study", tiny_spec(epochs=planned), reference=[1.0])
    weak = tiny_spec(epochs=planned)
    weak.classifier.learning_rate = 1e-7  # learns nothing: far below the finished trials' accuracy of 1.0
    job_id, number = study.queue_trial(weak)

    stream = _watch(trainer, job_id)  # the stream ends by itself once the job is PRUNED

    assert stream[-1].state_changed.state == job_pb2.JOB_STATE_PRUNED
    assert stream[-1].state_changed.message.startswith(f"pruned by the study's pruner after {MIN_RESOURCE} epochs")
    epochs = [e.epoch_ended for e in stream if e.HasField("epoch_ended")]
    assert [m.epoch for m in epochs] == list(range(1, MIN_RESOURCE + 1))  # stopped at once, not after all 6
    assert [e.WhichOneof("event") for e in stream][-2:] == ["result", "state_changed"]

    job = _get(trainer, job_id)
    assert job.state == job_pb2.JOB_STATE_PRUNED
    assert job.study == names.study_name("strong-study")
    assert job.trial_number == number
    assert job.result.model_version == ""
    assert [m.epoch for m in job.result.history] == [1, 2]
    assert job.result.metrics["epochs_run"].mean == MIN_RESOURCE
    assert len(job.result.dataset.labels) == 3
    assert not job.HasField("error")

    # What the pruner saw, in Optuna; the trial stays RUNNING there until the runner tells how it ended.
    trial = study.trial(number)
    assert trial.state == TrialState.RUNNING
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.intermediate_values[2] == pytest.approx(epochs[-1].validation_accuracy)
    study.optuna.tell(number, state=TrialState.PRUNED)
    assert study.trial(number).value == pytest.approx(epochs[-1].validation_accuracy)

    assert list(shapes.list("models/")) == []
    assert list(shapes.list(f"jobs/{job_id}/checkpoints/")) == []
    assert shapes.get_bytes(f"jobs/{job_id}/events.jsonl")  # the event log is kept, as for any job
    with pytest.raises(grpc.RpcError) as err:  # a pruned job has ended: nothing to cancel
        trainer.stub.CancelJob(training_service_pb2.CancelJobRequest(name=names.job_name(job_id)), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = trainer.stub.ListJobs(training_service_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_PRUNED]), timeout=10)
    assert [j.name for j in listed.jobs] == [names.job_name(job_id)]


def test_a_trial_the_pruner_keeps_succeeds_with_metrics_and_no_model_version(
    trainer: Trainer, jobs: JobStore, shapes: ArtifactStore
) -> None:
    # Finished trials that scored 0 at every epoch: a trial can never fall below their median.
    base = tiny_spec(epochs=3, fine_tuning_epochs=1)
    study = Study(jobs, shapes, "weak-study", base, reference=[0.0])
    job_id, number = study.queue_trial(base)

    stream = _watch(trainer, job_id)

    assert stream[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    stages = [e.stage_started.stage for e in stream if e.HasField("stage_started")]
    assert job_pb2.STAGE_EXPORT not in stages
    epochs = [e.epoch_ended for e in stream if e.HasField("epoch_ended")]
    assert len(epochs) == 4
    job = _get(trainer, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.result.model_version == ""
    assert list(job.result.plots) == []
    assert {"val_accuracy", "val_loss", "epochs_run"} <= set(job.result.metrics)
    assert len(job.result.history) == 4

    # One step per epoch across both stages: the fine-tuning epoch is step 4.
    trial = study.trial(number)
    assert trial.state == TrialState.RUNNING
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4]
    assert [trial.intermediate_values[s] for s in (1, 2, 3, 4)] == pytest.approx(
        [m.validation_accuracy for m in epochs]
    )

    assert list(shapes.list("models/")) == []
    assert list(shapes.list(f"jobs/{job_id}/checkpoints/")) == []


def test_a_trial_resumed_after_kill_9_keeps_counting_steps_across_the_stages(
    trainer: Trainer, jobs: JobStore, shapes: ArtifactStore
) -> None:
    base = tiny_spec(epochs=2, fine_tuning_epochs=3)
    study = Study(jobs, shapes, "resumed-study", base, reference=[0.0])
    job_id, number = study.queue_trial(base)
    request = training_service_pb2.WatchJobRequest(name=names.job_name(job_id))
    for event in trainer.stub.WatchJob(request, timeout=120):
        if event.HasField("epoch_ended") and event.epoch_ended.stage == job_pb2.STAGE_FINE_TUNING:
            break
    pid = worker_pid(job_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # before or after that epoch's checkpoint: both resume to the same steps

    stream = _watch(trainer, job_id)

    assert stream[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    job = _get(trainer, job_id)
    assert job.attempt == 2
    trial = study.trial(number)
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4, 5]  # 2 classifier epochs, then fine-tuning 3, 4, 5
    final = {(m.stage, m.epoch): m.validation_accuracy for m in job.result.history}
    assert trial.intermediate_values[5] == pytest.approx(final[(job_pb2.STAGE_FINE_TUNING, 3)])
    assert list(shapes.list("models/")) == []
