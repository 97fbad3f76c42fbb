"""Runs tuning studies: Optuna proposes configurations, each runs as an ordinary training job.

One thread drives every active study, one step at a time:

1. reconcile: each RUNNING Optuna trial has a job (created with the request id `{study}-trial-{n}`, so
   creating it twice is impossible); a job that ended is told to Optuna — COMPLETE with the objective
   from its result, PRUNED when the study's pruner stopped it (the worker asks the pruner after every
   epoch), FAIL otherwise;
2. ask: while fewer than `parallelism` trials run and the budget (trials, wall time) allows, ask Optuna
   for a configuration and queue its job;
3. when the search is over: re-run the top-k configurations with fresh seeds (repeats), then write the
   results (best trial and spec, parameter importances, plots in the bucket) and end the study.

Everything lives in the job store's database (the study record and its events, the trial jobs) and in
Optuna's tables beside them, and the runner keeps no state of its own. One runner drives a study at a time: the
study record names the replica that owns it, a runner claims only studies nobody owns (new ones, or those released
when their replica died: `trainer_service.jobs.replica`), and drops a study whose owner is no longer its replica.
So a restarted trainer, or another replica after this one died, picks every RUNNING study up where it was, and
the executors resume the trial jobs from their checkpoints. No trial is lost (a trial asked for but not yet given
a job gets it on the next step) or run twice (request ids).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import statistics
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import optuna
import sqlalchemy.exc
from google.protobuf import json_format
from optuna.trial import FrozenTrial, TrialState
from visiontune import names
from visiontune.database import DatabaseError
from visiontune.store import ArtifactStore, StoreError
from visiontune.v1 import study_pb2, training_spec_pb2

from trainer_service.jobs import artifacts
from trainer_service.jobs.store import JobRecord, JobState, JobStore, StudyRecord, StudyState, utc_now
from trainer_service.resources import STUDY_STATES
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.validate import validate_spec
from trainer_service.tuning import study_proto
from trainer_service.tuning.optuna_setup import create_study, load_study, open_storage
from trainer_service.tuning.space import ParamValue, apply_params, distributions
from trainer_service.tuning.study_config import StudyConfig, validate_study

log = logging.getLogger(__name__)

REPEAT_LABEL: Final = "visiontune.repeat_of_trial"
TRIAL_LABEL: Final = "visiontune.trial"
_SEED_STRIDE: Final = 1_000_003  # fresh seeds for repeats: far from the base seed and from each other


def trial_request_id(study_id: str, number: int) -> str:
    return f"{study_id}-trial-{number}"


def repeat_request_id(study_id: str, number: int, index: int) -> str:
    return f"{study_id}-repeat-{number}-{index}"


class StudyFailed(Exception):
    """The study cannot go on (every trial failed, results cannot be written); the message says why."""


@dataclass
class _Active:
    config: StudyConfig
    study: optuna.Study


class StudyRunner:
    def __init__(
        self,
        jobs: JobStore,
        store: ArtifactStore,
        *,
        default_bucket: str,
        wake_executor: Callable[[], None],
        cancel_job: Callable[[str], object],
        poll_interval: float = 1.0,
        replica_id: str = "local",
    ) -> None:
        self._jobs = jobs
        self.replica_id = replica_id
        self._stop = threading.Event()
        # Writing a study's plots waits through an S3 outage (the next step would only try again); stopping the
        # trainer ends that wait.
        self._store = store.with_outage(stop=self._stop)
        self._default_bucket = default_bucket
        self._wake_executor = wake_executor
        self._cancel_job = cancel_job
        self._poll_interval = poll_interval
        self._storage = open_storage(jobs.url)
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="study-runner", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume every study a previous trainer left running, then drive new ones."""
        # Optuna's messages go through the service's logging (JSON lines), not Optuna's own stderr handler.
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        self._claim()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def lease_lost(self) -> None:
        """This replica was expired by another: its studies are released (or driven elsewhere already)."""
        with self._lock:
            dropped = list(self._active)
            self._active.clear()
        if dropped:
            log.warning("dropped studies after losing the replica lease: %s", ", ".join(dropped))
        self.wake()

    def _claim(self) -> None:
        """Take the studies nobody drives (and this replica's own, after a restart) and start driving them."""
        for record in self._jobs.claim_studies(self.replica_id):
            with self._lock:
                known = record.study_id in self._active
            if not known:
                self._activate(record)

    def create(self, study_id: str, config: StudyConfig) -> None:
        """Start driving a study whose record the caller has just created (state RUNNING)."""
        study = create_study(self._storage, study_id, config)
        with self._lock:
            self._active[study_id] = _Active(config, study)
        self._event(study_id, "state_changed", study_pb2.StudyEvent(state_changed=study_pb2.STUDY_STATE_RUNNING))
        self.wake()

    def optuna_study(self, study_id: str, config: StudyConfig) -> optuna.Study:
        with self._lock:
            active = self._active.get(study_id)
        return active.study if active is not None else load_study(self._storage, study_id, config)

    def _activate(self, record: StudyRecord) -> None:
        spec = json_format.Parse(record.spec_json, study_pb2.StudySpec())
        config = validate_study(spec, default_bucket=self._default_bucket)
        study = create_study(self._storage, record.study_id, config)  # load_if_exists
        with self._lock:
            self._active[record.study_id] = _Active(config, study)
        log.info("resuming study %s", record.study_id)

    # -- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll_interval)
            self._wake.clear()
            try:
                self.run_once()
            except Exception:
                # What run_once does not expect (ending a failed study while the database is away, say): the studies
                # are in the database, so the next pass picks them up where they are.
                log.exception("study runner pass failed; trying again")

    def run_once(self) -> None:
        """Claim unowned studies, then one step of every active study (the loop's body; tests drive it directly)."""
        try:
            self._claim()
        except (optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError, DatabaseError) as err:
            log.warning("could not claim studies: %s; retrying", err)
        with self._lock:
            active = dict(self._active)
        for study_id, state in active.items():
            if self._stop.is_set():
                return
            try:
                done = self._step(study_id, state)
            except StudyFailed as err:
                log.error("study %s failed: %s", study_id, err)
                self._end(study_id, StudyState.FAILED, error=str(err))
                done = True
            except (
                optuna.exceptions.OptunaError,
                sqlalchemy.exc.OperationalError,
                sqlite3.Error,
                DatabaseError,
                StoreError,
                OSError,
            ) as err:
                # Transient (a locked database, a database or S3 outage past its window): the next step tries again.
                log.warning("study %s: %s: %s; retrying", study_id, type(err).__name__, err)
                done = False
            if done:
                with self._lock:
                    self._active.pop(study_id, None)

    def _step(self, study_id: str, active: _Active) -> bool:
        """One pass over a study; True once it has ended."""
        record = self._jobs.get_study(study_id)
        if record.state.is_terminal:
            return True
        if record.owner not in (None, self.replica_id):
            log.warning("study %s is driven by replica %s now; dropping it here", study_id, record.owner)
            return True
        config, study = active.config, active.study
        jobs = study_jobs(self._jobs, study_id)
        trial_jobs = {j.trial_number: j for j in jobs if j.trial_number is not None}
        running = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            job = trial_jobs.get(trial.number)
            if job is None:
                job = self._create_trial_job(study_id, config, trial.number, trial.params)
            if job.state.is_terminal:
                self._tell(study_id, config, study, trial, job)
            else:
                running.append(job)

        if record.state == StudyState.CANCELLING:
            for job in running:
                if job.state not in (JobState.CANCELLING, JobState.CANCELLED):
                    self._cancel_job(job.job_id)
            repeats_running = [j for j in jobs if j.trial_number is None and not j.state.is_terminal]
            for job in repeats_running:
                self._cancel_job(job.job_id)
            if not running and not repeats_running:
                self._end(study_id, StudyState.CANCELLED)
                return True
            return False

        if self._may_ask(record, config, study):
            while len(running) < config.parallelism and self._may_ask(record, config, study):
                asked = study.ask(fixed_distributions=distributions(config))
                running.append(self._create_trial_job(study_id, config, asked.number, asked.params))
            return False
        if running:
            return False
        return self._after_search(study_id, config, study, jobs)

    def _may_ask(self, record: StudyRecord, config: StudyConfig, study: optuna.Study) -> bool:
        if config.max_trials and len(study.get_trials(deepcopy=False)) >= config.max_trials:
            return False
        if config.max_duration_s is not None:
            elapsed = (utc_now() - record.create_time).total_seconds()
            if elapsed >= config.max_duration_s:
                return False
        return True

    # -- trials ---------------------------------------------------------------------------------------

    def _trial_spec(
        self, config: StudyConfig, params: Mapping[str, ParamValue], seed: int | None = None
    ) -> training_spec_pb2.TrainingSpec:
        spec = apply_params(config.base_spec, params)
        if seed is not None:
            spec.run.seed = seed
        # Validated already as part of the search space; resolving fills in defaults like CreateJob does.
        return config_to_spec(validate_spec(spec, default_bucket=self._default_bucket))

    def _create_trial_job(
        self, study_id: str, config: StudyConfig, number: int, params: Mapping[str, ParamValue]
    ) -> JobRecord:
        spec = self._trial_spec(config, params)
        record, created = self._jobs.create_job(
            names.new_id("job"),
            json_format.MessageToJson(spec, indent=None),
            display_name=f"{study_id} trial {number}",
            request_id=trial_request_id(study_id, number),
            labels={TRIAL_LABEL: str(number)},
            study_id=study_id,
            trial_number=number,
        )
        if created:
            log.info("study %s: trial %d queued as job %s", study_id, number, record.job_id)
            self._wake_executor()
            self._event(
                study_id,
                "trial_updated",
                study_pb2.StudyEvent(trial_updated=study_proto.trial_proto_running(number, params, record.job_id)),
            )
        return record

    def _tell(
        self, study_id: str, config: StudyConfig, study: optuna.Study, trial: FrozenTrial, job: JobRecord
    ) -> None:
        best_before = _best_number(study)
        if job.state == JobState.SUCCEEDED:
            value = study_proto.objective_value(job, config.metric)
            if value is None or not math.isfinite(value):
                study.tell(trial.number, state=TrialState.FAIL)
            else:
                study.tell(trial.number, value)
        elif job.state == JobState.PRUNED:
            study.tell(trial.number, state=TrialState.PRUNED)
        else:
            study.tell(trial.number, state=TrialState.FAIL)
        finished = study.get_trials(deepcopy=False)[trial.number]
        proto = study_proto.trial_proto(finished, job.job_id)
        log.info("study %s: trial %d %s", study_id, trial.number, finished.state.name.lower())
        self._event(study_id, "trial_updated", study_pb2.StudyEvent(trial_updated=proto))
        best_after = _best_number(study)
        if best_after is not None and best_after != best_before:
            self._event(study_id, "new_best", study_pb2.StudyEvent(new_best=proto))

    # -- repeats and results --------------------------------------------------------------------------

    def _after_search(self, study_id: str, config: StudyConfig, study: optuna.Study, jobs: list[JobRecord]) -> bool:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            failed = [j for j in jobs if j.state == JobState.FAILED]
            detail = f"; first failure: {failed[0].error}" if failed and failed[0].error else ""
            raise StudyFailed(f"no trial completed ({len(study.trials)} trials){detail}")
        if config.repeat_top_k:
            repeat_jobs = [j for j in jobs if j.trial_number is None and REPEAT_LABEL in j.labels]
            if not repeat_jobs:
                self._queue_repeats(study_id, config, study)
                return False
            if any(not j.state.is_terminal for j in repeat_jobs):
                return False
            repeats = _repeat_summaries(repeat_jobs, config)
        else:
            repeats = []
        result = study_proto.study_result(
            study_id,
            config,
            study,
            repeats,
            plots=self._write_plots(study_id, study),
            base_spec_resolver=lambda params: self._trial_spec(config, params),
        )
        self._end(study_id, StudyState.SUCCEEDED, result_json=json_format.MessageToJson(result, indent=None))
        return True

    def _queue_repeats(self, study_id: str, config: StudyConfig, study: optuna.Study) -> None:
        for trial in study_proto.top_trials(study, config.repeat_top_k):
            for i in range(config.repeat_count):
                seed = (config.base.run.seed + _SEED_STRIDE * (trial.number + 1) + i) % (2**63)
                spec = self._trial_spec(config, dict(trial.params), seed=seed)
                self._jobs.create_job(
                    names.new_id("job"),
                    json_format.MessageToJson(spec, indent=None),
                    display_name=f"{study_id} trial {trial.number} repeat {i + 1}",
                    request_id=repeat_request_id(study_id, trial.number, i),
                    labels={REPEAT_LABEL: str(trial.number)},
                    study_id=study_id,
                )
        log.info(
            "study %s: re-running the top %d configuration(s) %d times",
            study_id,
            config.repeat_top_k,
            config.repeat_count,
        )
        self._wake_executor()

    def _write_plots(self, study_id: str, study: optuna.Study) -> list[str]:
        uris = []
        for name, png in study_proto.plots(study).items():
            key = artifacts.study_plot_key(study_id, name)
            self._store.put_bytes(key, png, content_type="image/png")
            uris.append(artifacts.object_uri(self._store, key))
        return uris

    def _end(
        self, study_id: str, state: StudyState, *, error: str | None = None, result_json: str | None = None
    ) -> None:
        self._jobs.update_study_state(study_id, state, error=error, result_json=result_json)
        self._event(study_id, "state_changed", study_pb2.StudyEvent(state_changed=STUDY_STATES[state]))
        log.info("study %s %s", study_id, state.value.lower())

    def _event(self, study_id: str, kind: str, event: study_pb2.StudyEvent) -> None:
        self._jobs.append_study_event(study_id, kind, json_format.MessageToJson(event, indent=None))


def study_jobs(jobs: JobStore, study_id: str) -> list[JobRecord]:
    """Every job of a study: its trials, their repeats."""
    found: list[JobRecord] = []
    token = ""
    while True:
        page, token = jobs.list_jobs(study_id=study_id, page_size=1000, page_token=token)
        found += page
        if not token:
            return found


def _best_number(study: optuna.Study) -> int | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return study.best_trial.number


def _repeat_summaries(jobs: Sequence[JobRecord], config: StudyConfig) -> list[study_pb2.RepeatedConfiguration]:
    by_trial: dict[int, list[JobRecord]] = {}
    for job in jobs:
        by_trial.setdefault(int(job.labels[REPEAT_LABEL]), []).append(job)
    out = []
    for number, group in sorted(by_trial.items()):
        values = [v for v in (study_proto.objective_value(j, config.metric) for j in group) if v is not None]
        out.append(
            study_pb2.RepeatedConfiguration(
                trial_number=number,
                values=values,
                mean=statistics.fmean(values) if values else math.nan,
                std=statistics.stdev(values) if len(values) > 1 else 0.0,
                jobs=[names.job_name(j.job_id) for j in group],
            )
        )
    return out
