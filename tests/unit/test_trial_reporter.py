"""The trial side of a study: a TrialReporter on a real Optuna study in the job store's own SQLite file; the storage
opened by several replicas at once on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from google.protobuf import json_format
from optuna.trial import TrialState
from trainer_service.engine.loop import CLASSIFIER, FINE_TUNING, EpochRecord
from trainer_service.jobs.store import JobStore
from trainer_service.spec.config import Metric
from trainer_service.tuning.optuna_setup import create_study, open_storage
from trainer_service.tuning.study_config import validate_study
from trainer_service.tuning.trial_reporter import TrialReporter, TrialSetupError
from visiontune.v1 import study_pb2, training_spec_pb2

BUCKET = "bucket"
STUDY = "study-1"
MIN_RESOURCE = 2


def _study_spec(
    pruner: study_pb2.PrunerType.ValueType,
    metric: training_spec_pb2.Metric.ValueType = training_spec_pb2.METRIC_VALIDATION_ACCURACY,
) -> study_pb2.StudySpec:
    base = training_spec_pb2.TrainingSpec(
        dataset=training_spec_pb2.DatasetSpec(uri=f"s3://{BUCKET}/datasets/shapes", image_size=32),
        model=training_spec_pb2.ModelSpec(
            architecture=training_spec_pb2.ARCHITECTURE_MOBILENET_V3_SMALL,
            weights=training_spec_pb2.WEIGHTS_SOURCE_NONE,
        ),
        classifier=training_spec_pb2.StageSpec(epochs=4, batch_size=8, learning_rate=0.01),
        output_model="shapes",
    )
    return study_pb2.StudySpec(
        base_spec=base,
        parameters=[
            study_pb2.SearchParameter(
                path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-5, max=1e-1, log=True)
            )
        ],
        objective=study_pb2.Objective(metric=metric),
        budget=study_pb2.StudyBudget(max_trials=20),
        pruner=study_pb2.PrunerSpec(type=pruner, min_resource=MIN_RESOURCE, startup_trials=2),
    )


def _epoch(stage: str, epoch: int, val_accuracy: float, val_loss: float = 1.0) -> EpochRecord:
    return EpochRecord(
        stage=stage,
        epoch=epoch,
        epochs=4,
        train_loss=val_loss,
        train_accuracy=val_accuracy,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        learning_rate=0.01,
        images_per_second=100.0,
        epoch_seconds=1.0,
    )


class Study:
    """A study as the runner makes it: the record in the job store, the Optuna study beside it."""

    def __init__(self, jobs: JobStore, spec: study_pb2.StudySpec) -> None:
        self.jobs = jobs
        jobs.create_study(STUDY, json_format.MessageToJson(spec, indent=None))
        self.config = validate_study(spec, default_bucket=BUCKET)
        self.optuna = create_study(open_storage(jobs.path), STUDY, self.config)

    def finished_trial(self, values: list[float]) -> None:
        """A trial that ran every epoch, asking the pruner each time as a worker does (ASHA records its rungs
        then)."""
        trial = self.optuna.ask()
        for step, value in enumerate(values, start=1):
            trial.report(value, step)
            assert not trial.should_prune()
        self.optuna.tell(trial, values[-1])

    def running_trial(self) -> int:
        return self.optuna.ask().number

    def reporter(self, number: int) -> TrialReporter:
        return TrialReporter(self.jobs, STUDY, number, default_bucket=BUCKET)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    with JobStore(tmp_path / "trainer" / "jobs.sqlite3") as store:
        yield store


GOOD = [0.6, 0.8, 0.9, 0.95]


@pytest.mark.parametrize("pruner", [study_pb2.PRUNER_TYPE_MEDIAN, study_pb2.PRUNER_TYPE_SUCCESSIVE_HALVING])
def test_a_poor_trial_is_pruned_once_it_has_run_min_resource_epochs(
    jobs: JobStore, pruner: study_pb2.PrunerType.ValueType
) -> None:
    study = Study(jobs, _study_spec(pruner))
    for _ in range(3):
        study.finished_trial(GOOD)
    reporter = study.reporter(study.running_trial())
    assert reporter.metric == Metric.VALIDATION_ACCURACY

    # Below min_resource no pruner stops a trial, however poor.
    assert reporter.report(1, _epoch(CLASSIFIER, 1, 0.1)) is False
    assert reporter.report(2, _epoch(CLASSIFIER, 2, 0.1)) is True

    frozen = study.optuna.get_trials(deepcopy=False)[reporter.trial_number]
    assert frozen.state == TrialState.RUNNING  # the runner, not the worker, tells Optuna how it ended
    assert frozen.intermediate_values == {1: 0.1, 2: 0.1}


@pytest.mark.parametrize("pruner", [study_pb2.PRUNER_TYPE_MEDIAN, study_pb2.PRUNER_TYPE_SUCCESSIVE_HALVING])
def test_a_good_trial_is_not_pruned(jobs: JobStore, pruner: study_pb2.PrunerType.ValueType) -> None:
    study = Study(jobs, _study_spec(pruner))
    for _ in range(3):
        study.finished_trial(GOOD)
    reporter = study.reporter(study.running_trial())
    # Steps count epochs across the stages: the fine-tuning stage's first epoch here is step 3.
    records = [
        _epoch(CLASSIFIER, 1, 0.7),
        _epoch(CLASSIFIER, 2, 0.85),
        _epoch(FINE_TUNING, 1, 0.95),
        _epoch(FINE_TUNING, 2, 0.97),
    ]
    assert [reporter.report(step, r) for step, r in enumerate(records, start=1)] == [False] * 4
    frozen = study.optuna.get_trials(deepcopy=False)[reporter.trial_number]
    assert frozen.intermediate_values == {1: 0.7, 2: 0.85, 3: 0.95, 4: 0.97}


def test_a_loss_objective_is_minimised_and_read_from_the_study(jobs: JobStore) -> None:
    study = Study(jobs, _study_spec(study_pb2.PRUNER_TYPE_MEDIAN, training_spec_pb2.METRIC_VALIDATION_LOSS))
    for _ in range(3):
        study.finished_trial([1.0, 0.5, 0.3, 0.2])
    poor, good = study.reporter(study.running_trial()), study.reporter(study.running_trial())
    assert poor.metric == good.metric == Metric.VALIDATION_LOSS

    assert poor.report(2, _epoch(CLASSIFIER, 2, val_accuracy=0.99, val_loss=3.0)) is True
    assert good.report(2, _epoch(CLASSIFIER, 2, val_accuracy=0.01, val_loss=0.1)) is False


def test_a_replayed_epoch_keeps_its_first_value(jobs: JobStore) -> None:
    # A resumed job replays the epoch after its last checkpoint: the step was reported by the attempt
    # that died, and a new reporter (a new worker) must not fail or change it.
    study = Study(jobs, _study_spec(study_pb2.PRUNER_TYPE_MEDIAN))
    for _ in range(3):
        study.finished_trial(GOOD)
    number = study.running_trial()
    assert study.reporter(number).report(2, _epoch(CLASSIFIER, 2, 0.1)) is True
    again = study.reporter(number)
    assert again.report(2, _epoch(CLASSIFIER, 2, 0.99)) is True
    assert study.optuna.get_trials(deepcopy=False)[number].intermediate_values == {2: 0.1}


def test_no_pruner_never_prunes_but_still_records_the_values(jobs: JobStore) -> None:
    study = Study(jobs, _study_spec(study_pb2.PRUNER_TYPE_NONE))
    for _ in range(6):
        study.finished_trial(GOOD)
    reporter = study.reporter(study.running_trial())
    assert [reporter.report(s, _epoch(CLASSIFIER, s, 0.0)) for s in (1, 2, 3)] == [False] * 3
    assert study.optuna.get_trials(deepcopy=False)[reporter.trial_number].intermediate_values == {
        1: 0.0,
        2: 0.0,
        3: 0.0,
    }


def test_a_trial_already_finished_in_optuna_is_not_reported_or_pruned(jobs: JobStore) -> None:
    study = Study(jobs, _study_spec(study_pb2.PRUNER_TYPE_MEDIAN))
    for _ in range(3):
        study.finished_trial(GOOD)
    number = study.running_trial()
    reporter = study.reporter(number)
    study.optuna.tell(number, state=TrialState.FAIL)  # e.g. the study was cancelled
    assert reporter.report(2, _epoch(CLASSIFIER, 2, 0.0)) is False
    assert study.optuna.get_trials(deepcopy=False)[number].intermediate_values == {}


def test_a_missing_study_or_trial_is_a_setup_error(jobs: JobStore) -> None:
    with pytest.raises(TrialSetupError, match="does not exist"):
        TrialReporter(jobs, "no-such-study", 0, default_bucket=BUCKET)
    study = Study(jobs, _study_spec(study_pb2.PRUNER_TYPE_MEDIAN))
    study.running_trial()
    with pytest.raises(TrialSetupError, match="no Optuna trial 7"):
        study.reporter(7)


def test_optuna_shares_the_job_store_file(jobs: JobStore) -> None:
    study = Study(jobs, _study_spec(study_pb2.PRUNER_TYPE_MEDIAN))
    assert jobs.get_study(STUDY).study_id == STUDY  # the job store's tables still work beside Optuna's
    names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(jobs.path))]
    assert names == [STUDY]
    assert study.optuna.user_attrs["metric"] == Metric.VALIDATION_ACCURACY.value  # what the reporter reads


def test_replicas_opening_a_fresh_postgresql_at_once_all_get_the_storage(postgres_url: str) -> None:
    # Trainer replicas starting together each open the study storage; Optuna's own table creation is not safe
    # against a concurrent one (CREATE TYPE fails in the loser), so open_storage serialises it.
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            open_storage(postgres_url)
        except sqlalchemy.exc.SQLAlchemyError as err:  # the loser's CREATE TYPE: reported below
            failures.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert optuna.get_all_study_summaries(open_storage(postgres_url)) == []
