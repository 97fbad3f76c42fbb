"""The study RPCs as plain functions over the job store and the runner; the servicer only translates.

CreateStudy validates the whole StudySpec (every bad field named) before anything is stored; the
record keeps the spec as given, the Optuna study and the trial jobs are the runner's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from google.protobuf import json_format
from visiontune import names
from visiontune.errors import FailedPrecondition, FieldViolation, InvalidArgument
from visiontune.uris import InputLocations
from visiontune.v1 import study_pb2

from trainer_service.jobs import events
from trainer_service.jobs.gpus import device_violations
from trainer_service.jobs.store import Conflict, CreatorQuota, JobRecord, JobState, JobStore, StudyState
from trainer_service.resources import study_to_proto
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.tuning import study_proto
from trainer_service.tuning.runner import StudyRunner, study_jobs
from trainer_service.tuning.space import apply_params
from trainer_service.tuning.study_config import StudyConfig, validate_study

PROMOTED_LABEL: Final = "visiontune.promoted_from"
WATCH_POLL_S: Final = 1.0
WATCH_FINAL_GRACE_S: Final = 0.5


class StudyPreconditionFailed(FailedPrecondition):
    """The study is not in a state that allows the call (cancel a finished study, promote with no result)."""


class Studies:
    def __init__(
        self,
        jobs: JobStore,
        runner: StudyRunner,
        *,
        default_bucket: str,
        wake_executor: Callable[[], None],
        inputs: InputLocations | None = None,
        gpus: int | None = None,
    ) -> None:
        self._jobs = jobs
        self._gpus = gpus  # the GPUs a trial can get (`WorkerRuntime.gpu_count`): a base spec needing more is refused
        self._runner = runner
        self._default_bucket = default_bucket
        self._wake_executor = wake_executor
        self._inputs = inputs or InputLocations.default(default_bucket)

    def _config(self, spec: study_pb2.StudySpec, *, from_client: bool = False) -> StudyConfig:
        """The spec's config. A client's spec is confined to the allowed input locations; a stored one was when it
        was accepted (a later change of the setting must not break reading it)."""
        inputs = self._inputs if from_client else None
        return validate_study(spec, default_bucket=self._default_bucket, inputs=inputs)

    def create(
        self,
        study: study_pb2.Study,
        *,
        study_id: str,
        request_id: str,
        validate_only: bool,
        creator: str = "",
        quota: CreatorQuota | None = None,
    ) -> study_pb2.Study:
        """Validate and start a study for `creator`. Raises InvalidArgument naming every bad field (`study_id`, and
        the spec's fields prefixed `study.`), or the job store's AlreadyExists, or QuotaExceeded when the creator
        already runs `quota`'s limit of studies."""
        violations: list[FieldViolation] = []
        try:
            names.check_id("study_id", study_id)
        except names.InvalidName as err:
            violations.append(FieldViolation("study_id", str(err)))
        config = None
        if not study.HasField("spec"):
            violations.append(FieldViolation("study.spec", "required"))
        else:
            try:
                config = self._config(study.spec, from_client=True)
            except SpecInvalid as err:
                violations += [FieldViolation(f"study.{v.field}", v.description) for v in err.violations]
            violations += device_violations(study.spec.base_spec, "study.spec.base_spec", gpus=self._gpus)
        if violations or config is None:
            raise InvalidArgument(violations)
        if validate_only:
            return study_pb2.Study(
                name=names.study_name(study_id),
                display_name=study.display_name,
                spec=study.spec,
                state=study_pb2.STUDY_STATE_RUNNING,
            )
        record, created = self._jobs.create_study(
            study_id,
            json_format.MessageToJson(study.spec, indent=None),
            display_name=study.display_name,
            request_id=request_id or None,
            owner=self._runner.replica_id,
            creator=creator,
            quota=quota,
        )
        if created:
            self._runner.create(record.study_id, config)
        return self.get(record.study_id)

    def get(self, study_id: str) -> study_pb2.Study:
        """The study with its trials (live from Optuna) and, once finished, its results. Raises NotFound."""
        record = self._jobs.get_study(study_id)
        out = study_to_proto(record)
        config = self._config(out.spec)
        jobs = study_jobs(self._jobs, study_id)
        return study_proto.with_trials(out, self._runner.optuna_study(study_id, config), jobs)

    def cancel(self, study_id: str) -> study_pb2.Study:
        record = self._jobs.get_study(study_id)
        if record.state == StudyState.RUNNING:
            try:
                self._jobs.update_study_state(study_id, StudyState.CANCELLING, expected={StudyState.RUNNING})
                self._runner.wake()
            except Conflict:
                # It ended (or another cancel came) between the read and the update: answer from its state now.
                record = self._jobs.get_study(study_id)
        if record.state.is_terminal:
            raise StudyPreconditionFailed(
                f"studies/{study_id} already ended ({record.state.value}); there is nothing to cancel"
            )
        return self.get(study_id)

    def watch(self, study_id: str, after: int, is_active: Callable[[], bool]) -> Iterator[study_pb2.StudyEvent]:
        """The study's events after `after`, then live ones until it ends (or the caller goes away)."""
        self._jobs.get_study(study_id)  # NotFound before the stream starts
        while is_active():
            ended = self._jobs.get_study(study_id).state.is_terminal
            batch = self._jobs.wait_for_study_events(study_id, after, 0.0 if ended else WATCH_POLL_S)
            if ended and not batch:
                batch = self._jobs.wait_for_study_events(study_id, after, WATCH_FINAL_GRACE_S)
            for event in batch:
                after = event.sequence
                out = json_format.Parse(event.payload_json, study_pb2.StudyEvent())
                out.study = names.study_name(study_id)
                out.sequence = event.sequence
                out.time.FromDatetime(event.time)
                yield out
            if ended and not batch:
                return

    def promote(self, study_id: str, trial_number: int | None, *, job_id: str, request_id: str) -> JobRecord:
        """A full training job with a trial's configuration (default: the best), publishing a model version.
        Raises InvalidArgument for a bad `job_id`, NotFound, StudyPreconditionFailed, AlreadyExists."""
        try:
            names.check_id("job_id", job_id)
        except names.InvalidName as err:
            raise InvalidArgument([FieldViolation("job_id", str(err))]) from err
        study = self.get(study_id)
        if trial_number is None:
            if not study.HasField("best_trial"):
                raise StudyPreconditionFailed(f"studies/{study_id} has no completed trial yet")
            trial_number = study.best_trial
        trial = next((t for t in study.trials if t.number == trial_number), None)
        if trial is None:
            raise StudyPreconditionFailed(f"studies/{study_id} has no trial {trial_number}")
        if trial.state != study_pb2.TRIAL_STATE_COMPLETE:
            raise StudyPreconditionFailed(
                f"trial {trial_number} of studies/{study_id} did not complete "
                f"({study_pb2.TrialState.Name(trial.state)}); promote a completed one"
            )
        optuna_trial = self._runner.optuna_study(study_id, self._config(study.spec)).trials[trial_number]
        spec = apply_params(study.spec.base_spec, dict(optuna_trial.params))
        resolved = config_to_spec(validate_spec(spec, default_bucket=self._default_bucket))
        record, created = self._jobs.create_job(
            job_id,
            json_format.MessageToJson(resolved, indent=None),
            display_name=f"{study_id} trial {trial_number} (promoted)",
            request_id=request_id or None,
            labels={PROMOTED_LABEL: f"studies/{study_id}/trials/{trial_number}"},
        )
        if created:
            events.record_state(self._jobs, record.job_id, JobState.QUEUED, "queued (promoted from a study trial)")
            self._wake_executor()
        return record
