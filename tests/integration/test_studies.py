"""Tuning studies end to end on a real trainer: trials are real training jobs, Optuna decides, the pruner stops
weak trials early, and a trainer killed mid-study picks the study up with no trial lost or run twice.

The task is the tiny shapes set with MobileNetV3-small from scratch (seconds per trial on a CPU). The learning
rate is searched over a range whose low end cannot learn in a few epochs, so the median pruner has weak
trials to stop.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tests.integration.trainer_helpers import Trainer, start_trainer, tiny_spec
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.status import field_violations
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_spec_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EPOCHS = 4


@pytest.fixture
def trainer(shapes: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path) -> Iterator[Trainer]:
    """Two job slots: the study's parallelism of 2 really runs two trials at once."""
    running = start_trainer(shapes, s3_server, tmp_path / "data", "--job-slots", "2")
    try:
        yield running
    finally:
        running.stop()


def _spec(max_trials: int, parallelism: int) -> study_pb2.StudySpec:
    base = tiny_spec(epochs=EPOCHS)
    return study_pb2.StudySpec(
        base_spec=base,
        parameters=[
            study_pb2.SearchParameter(
                path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-6, max=0.05, log=True)
            ),
            study_pb2.SearchParameter(
                path="model.classifier_dim", categorical=study_pb2.Categorical(values=["16", "32"])
            ),
        ],
        # Validation loss, not accuracy: on 12 validation images accuracies tie, losses do not, so the
        # median pruner always has a median to compare with.
        objective=study_pb2.Objective(metric=training_spec_pb2.METRIC_VALIDATION_LOSS),
        budget=study_pb2.StudyBudget(max_trials=max_trials),
        parallelism=parallelism,
        sampler=study_pb2.SAMPLER_TPE,
        pruner=study_pb2.PrunerSpec(type=study_pb2.PRUNER_TYPE_MEDIAN, min_resource=1, startup_trials=2),
        seed=7,
    )


def _create(trainer: Trainer, spec: study_pb2.StudySpec, study_id: str) -> study_pb2.Study:
    request = training_service_pb2.CreateStudyRequest(
        study=study_pb2.Study(display_name="lr search", spec=spec), study_id=study_id, request_id=f"create-{study_id}"
    )
    study: study_pb2.Study = trainer.stub.CreateStudy(request, timeout=30)
    return study


def _wait(trainer: Trainer, name: str, timeout: float = 600) -> study_pb2.Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study: study_pb2.Study = trainer.stub.GetStudy(training_service_pb2.GetStudyRequest(name=name), timeout=30)
        if study.state in (
            study_pb2.STUDY_STATE_SUCCEEDED,
            study_pb2.STUDY_STATE_FAILED,
            study_pb2.STUDY_STATE_CANCELLED,
        ):
            return study
        time.sleep(1)
    pytest.fail(f"{name} did not finish in {timeout} s")


def _check_finished(trainer: Trainer, store: ArtifactStore, study: study_pb2.Study, max_trials: int) -> None:
    assert study.state == study_pb2.STUDY_STATE_SUCCEEDED, study.error
    assert len(study.trials) == max_trials
    assert sorted(t.number for t in study.trials) == list(range(max_trials))
    states = Counter(study_pb2.TrialState.Name(t.state) for t in study.trials)
    assert states["TRIAL_STATE_COMPLETE"] >= 1
    assert states["TRIAL_STATE_FAILED"] == 0, states
    for trial in study.trials:
        job = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=trial.job), timeout=30)
        assert job.study == study.name
        if trial.state == study_pb2.TRIAL_STATE_PRUNED:
            assert job.state == job_pb2.JOB_STATE_PRUNED
            assert len(trial.intermediate_values) < EPOCHS  # stopped early
        else:
            assert job.state == job_pb2.JOB_STATE_SUCCEEDED
            assert len(trial.intermediate_values) == EPOCHS
            assert trial.value == pytest.approx(job.result.metrics["val_loss"].mean)
    # One job per trial: none lost, none run twice.
    jobs = trainer.stub.ListJobs(training_service_pb2.ListJobsRequest(study=study.name, page_size=100), timeout=30)
    assert sorted(trial.job for trial in study.trials) == sorted(j.name for j in jobs.jobs)
    best = min((t for t in study.trials if t.HasField("value")), key=lambda t: t.value)  # a loss
    assert study.best_trial == best.number
    assert study.best_spec.classifier.learning_rate == pytest.approx(
        float(best.parameters["classifier.learning_rate"]), rel=1e-6
    )
    assert set(study.parameter_importances) <= {"classifier.learning_rate", "model.classifier_dim"}
    for uri in study.plots:
        key = uri.split(f"s3://{store.bucket}/", 1)[1]
        assert store.get_bytes(key)[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("optimization_history" in uri for uri in study.plots)


@pytest.mark.slow  # about 3 minutes on 2 cores: `make test-slow`; the resume test below covers the same path
def test_a_study_of_12_trials_with_parallelism_2_completes_and_prunes(trainer: Trainer, shapes: ArtifactStore) -> None:
    study = _create(trainer, _spec(max_trials=12, parallelism=2), "lr-search")
    assert study.name == "studies/lr-search"
    again = _create(trainer, _spec(max_trials=12, parallelism=2), "lr-search")  # idempotent on request_id
    assert again.name == study.name
    events = []
    for event in trainer.stub.WatchStudy(training_service_pb2.WatchStudyRequest(name=study.name), timeout=900):
        events.append(event)
    finished = _wait(trainer, study.name)
    _check_finished(trainer, shapes, finished, 12)
    pruned = [t for t in finished.trials if t.state == study_pb2.TRIAL_STATE_PRUNED]
    assert pruned, "the median pruner stopped no trial"
    kinds = Counter(e.WhichOneof("event") for e in events)
    assert kinds["trial_updated"] >= 12
    assert kinds["new_best"] >= 1
    assert events[-1].state_changed == study_pb2.STUDY_STATE_SUCCEEDED

    promoted = trainer.stub.PromoteTrial(training_service_pb2.PromoteTrialRequest(study=study.name), timeout=30)
    assert promoted.spec.classifier.learning_rate == pytest.approx(finished.best_spec.classifier.learning_rate)


def test_invalid_search_spaces_are_refused_before_any_trial(trainer: Trainer) -> None:
    spec = _spec(max_trials=4, parallelism=1)
    spec.parameters.add(path="classifier.no_such_field", float_range=study_pb2.FloatRange(min=0, max=1))
    spec.parameters[0].float_range.max = 100.0  # outside (0, 10]
    with pytest.raises(grpc.RpcError) as refused:
        _create(trainer, spec, "bad-space")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field: v.description for v in field_violations(refused.value)}
    assert set(fields) == {"study.spec.parameters[0].float_range.max", "study.spec.parameters[2].path"}
    assert "no_such_field" in fields["study.spec.parameters[2].path"]
    with pytest.raises(grpc.RpcError) as missing:
        trainer.stub.GetStudy(training_service_pb2.GetStudyRequest(name="studies/bad-space"), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_trainer_killed_mid_study_resumes_it_without_losing_or_repeating_a_trial(
    shapes: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    trainer = start_trainer(shapes, s3_server, data_dir, "--job-slots", "2")
    try:
        study = _create(trainer, _spec(max_trials=6, parallelism=2), "resumed")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # kill it once some trials are done and others are running
            current = trainer.stub.GetStudy(training_service_pb2.GetStudyRequest(name=study.name), timeout=30)
            done = [t for t in current.trials if t.state != study_pb2.TRIAL_STATE_RUNNING]
            if len(done) >= 3 and any(t.state == study_pb2.TRIAL_STATE_RUNNING for t in current.trials):
                break
            time.sleep(0.5)
        os.kill(trainer.proc.pid, signal.SIGKILL)
        trainer.proc.wait()
        trainer.channel.close()
        trainer = start_trainer(shapes, s3_server, data_dir, "--job-slots", "2")
        finished = _wait(trainer, study.name)
        _check_finished(trainer, shapes, finished, 6)
    finally:
        trainer.stop()
