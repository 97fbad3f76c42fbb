"""The trial side of a tuning study: a trial job reports its objective after each epoch and asks the pruner.

A trial of a study is an ordinary training job whose record carries `study_id` and `trial_number`. Its
worker opens the study in Optuna's tables, which live in the job store's own SQLite file, and after every
epoch of the first repeat reports the objective metric at a step that counts epochs across the classifier
and fine-tuning stages (1, 2, 3…; a stage stopped early by early stopping does not leave a gap). The
study's pruner then says whether the trial should stop.

Optuna stores neither the sampler nor the pruner: the pruner is rebuilt from the study's StudySpec (in the
job store's study record) with the runner's own `validate_study` and `make_pruner`, so the worker prunes
as the study was configured. The objective metric comes from the study's user attribute `metric` (set by
`optuna_setup.create_study`), else from the StudySpec. The
worker only reports and asks; the runner tells Optuna how the trial ended (PRUNED, COMPLETE, FAIL) once
the job has ended.
"""

from __future__ import annotations

import logging

import optuna
from google.protobuf import json_format
from google.protobuf.json_format import ParseError
from optuna.samplers import RandomSampler
from visiontune.v1 import study_pb2

from trainer_service.engine.loop import EpochRecord
from trainer_service.jobs.store import JobStore, NotFound
from trainer_service.spec.config import Metric
from trainer_service.tuning.optuna_setup import METRIC_ATTR, make_pruner, open_storage
from trainer_service.tuning.study_config import validate_study

__all__ = ["TrialReporter", "TrialSetupError"]

log = logging.getLogger(__name__)


class TrialSetupError(RuntimeError):
    """The job says it is a trial, but its study or its trial cannot be found (the job fails with this)."""


class TrialReporter:
    """Reports one running trial's per-epoch objective to its Optuna study and asks the study's pruner."""

    def __init__(
        self, jobs: JobStore, study_id: str, trial_number: int, *, default_bucket: str, database: str | None = None
    ) -> None:
        """Open trial `trial_number` of study `study_id`; Optuna's storage is in `database` (a URL), by default the
        job store's own."""
        self.study_id = study_id
        self.trial_number = trial_number
        try:
            record = jobs.get_study(study_id)
        except NotFound as err:
            raise TrialSetupError(
                f"the job is trial {trial_number} of study {study_id!r}, which does not exist"
            ) from err
        try:
            spec = json_format.Parse(record.spec_json, study_pb2.StudySpec())
            # The same validation (and defaults) as the runner: the pruner it builds is the study's pruner.
            config = validate_study(spec, default_bucket=default_bucket)
        except (ParseError, ValueError) as err:
            raise TrialSetupError(f"study {study_id!r} has a spec this trainer cannot use: {err}") from err
        self._storage = open_storage(database if database is not None else jobs.url)
        try:
            # The study's pruner; no sampler of its own: a trial's parameters are already in its job's spec, and
            # the study's sampler (a grid of every point, a GP) would only cost time here.
            self.study: optuna.Study = optuna.load_study(
                study_name=study_id, storage=self._storage, sampler=RandomSampler(), pruner=make_pruner(config)
            )
            optuna_study_id = self._storage.get_study_id_from_name(study_id)
            self._trial_id = self._storage.get_trial_id_from_study_id_trial_number(optuna_study_id, trial_number)
        except KeyError as err:
            raise TrialSetupError(f"study {study_id!r} has no Optuna trial {trial_number}: {err}") from err
        attr = self.study.user_attrs.get(METRIC_ATTR)
        self.metric: Metric = Metric(attr) if isinstance(attr, str) else config.metric
        # Trial(...) reads the trial from storage; it samples nothing (the parameters are in the job's spec).
        self.trial = optuna.trial.Trial(self.study, self._trial_id)

    def report(self, step: int, record: EpochRecord) -> bool:
        """Report the objective of the epoch that ended at `step` (1-based); True when the trial should stop.

        A step already reported (a resumed job replays the epoch after its last checkpoint) keeps its first
        value, as Optuna does. A trial that Optuna already considers finished (its study was cancelled or
        ended) is never pruned from here: the runner stops such jobs itself.
        """
        frozen = self._storage.get_trial(self._trial_id)
        if frozen.state.is_finished():
            log.warning(
                "trial %d of study %s is already %s in Optuna; epoch %d not reported",
                self.trial_number,
                self.study_id,
                frozen.state.name,
                step,
            )
            return False
        if step not in frozen.intermediate_values:
            try:
                self.trial.report(record.metric(self.metric), step)
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning(
                    "trial %d of study %s ended in Optuna while reporting epoch %d",
                    self.trial_number,
                    self.study_id,
                    step,
                )
                return False
        return bool(self.trial.should_prune())  # MedianPruner answers with a numpy bool
