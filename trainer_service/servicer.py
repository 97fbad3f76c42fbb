"""The gRPC TrainingService: a thin layer from protobuf requests to the job store, the executor and the studies.

Each method parses the request's names and fields (every bad field in one InvalidArgument), calls the domain
and builds the response. Errors are raised, never aborted here: the server runtime maps every
`visiontune.errors` class to its status code in one place (docs/architecture.md §3). CreateJob validates the
whole spec at the edge, stores the resolved spec and wakes the executor; the engine runs in the executor's
worker processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from google.protobuf import json_format
from visiontune import names, pagination
from visiontune.auth import TokenRegistry, caller_name
from visiontune.errors import FailedPrecondition, FieldViolation, InvalidArgument, parse_field, reraise_as
from visiontune.store import ArtifactStore, StoreError
from visiontune.uris import parse_location
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_service_pb2_grpc

from trainer_service import resources
from trainer_service.advice.lr_worker import LrFinderProcess
from trainer_service.advice.recommend import recommend_for_dataset
from trainer_service.datasets.listing import dataset_fingerprint
from trainer_service.jobs import events
from trainer_service.jobs.executor import JobExecutor
from trainer_service.jobs.gpus import device_violations
from trainer_service.jobs.store import JobState, JobStore
from trainer_service.policy import TrainerPolicy
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.lr_sweep import validate_lr_request
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.tuning.studies import Studies

# GetJob derives progress and warnings from the event log (about one event per epoch).
MAX_EVENTS_READ = 10_000
# How long one WatchJob wait lasts before it re-checks that the client is still there.
WATCH_POLL_S = 1.0
WATCH_FINAL_GRACE_S = 0.5
# The longest a FindLearningRate call waits for a job slot and its sweep together, whatever its own deadline.
LR_FINDER_TIMEOUT_S = 600.0


class TrainingServicer(training_service_pb2_grpc.TrainingServiceServicer):
    def __init__(
        self,
        jobs: JobStore,
        executor: JobExecutor,
        store: ArtifactStore,
        lr_finder: LrFinderProcess,
        studies: Studies,
        *,
        policy: TrainerPolicy | None = None,
        registry: TokenRegistry | None = None,
    ) -> None:
        self._jobs = jobs
        # Who calls (`caller_name`): quotas count by it. None: authentication is off, every caller is anonymous.
        self._registry = registry
        self._studies = studies
        self._executor = executor
        self._store = store
        self._lr_finder = lr_finder
        self._default_bucket = store.bucket
        self._policy = policy or TrainerPolicy.default(store.bucket)
        # Where a client's spec may read from (datasets/ of the artifact bucket unless configured).
        self._inputs = self._policy.inputs
        self._job_quota = self._policy.quotas.job_quota()
        self._study_quota = self._policy.quotas.study_quota()

    # --- jobs -------------------------------------------------------------------------------------

    def GetJob(self, request: training_service_pb2.GetJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        job_id = parse_field("name", names.parse_job_name, request.name)
        job = resources.job_to_proto(self._jobs.get_job(job_id))
        log = self._jobs.events_after(job_id, 0, limit=MAX_EVENTS_READ)
        progress, warnings = events.progress(job, log)
        job.progress.CopyFrom(progress)
        job.warnings.extend(warnings)
        return job

    def ListJobs(
        self, request: training_service_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.ListJobsResponse:
        violations = pagination.page_size_violations(request.page_size)
        study_id = None
        if request.study:
            try:
                study_id = names.parse_study_name(request.study)
            except names.InvalidName as err:
                violations.append(FieldViolation("study", str(err)))
        states = set()
        for i, state in enumerate(request.states):
            if state not in resources.JOB_STATE_FROM_PROTO:
                violations.append(FieldViolation(f"states[{i}]", "must be a concrete JobState"))
            else:
                states.add(resources.JOB_STATE_FROM_PROTO[state])
        if violations:
            raise InvalidArgument(violations)
        # A bad page_token is the store's to find: only it knows the filter the token must match.
        records, token = self._jobs.list_jobs(
            states=states or None,
            study_id=study_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return training_service_pb2.ListJobsResponse(
            jobs=[resources.job_to_proto(r) for r in records], next_page_token=token
        )

    def CreateJob(self, request: training_service_pb2.CreateJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        violations: list[FieldViolation] = []
        job_id = request.job_id or names.new_id("job")
        try:
            names.check_id("job_id", job_id)
        except names.InvalidName as err:
            violations.append(FieldViolation("job_id", str(err)))
        if not request.job.HasField("spec"):
            violations.append(FieldViolation("job.spec", "required"))
        else:
            try:
                config = validate_spec(request.job.spec, default_bucket=self._default_bucket, inputs=self._inputs)
            except SpecInvalid as err:
                violations += [FieldViolation(f"job.spec.{v.field}", v.description) for v in err.violations]
            violations += device_violations(request.job.spec, "job.spec", gpus=self._executor.gpu_count)
        if violations:
            raise InvalidArgument(violations)
        resolved = config_to_spec(config)
        if request.validate_only:
            return job_pb2.Job(
                name=names.job_name(job_id),
                display_name=request.job.display_name,
                spec=resolved,
                state=job_pb2.JOB_STATE_QUEUED,
                labels=request.job.labels,
            )
        record, created = self._jobs.create_job(
            job_id,
            json_format.MessageToJson(resolved, indent=None),
            display_name=request.job.display_name,
            request_id=request.request_id or None,
            labels=dict(request.job.labels),
            creator=caller_name(context, self._registry),
            quota=self._job_quota,
        )
        if created:
            events.record_state(self._jobs, record.job_id, JobState.QUEUED, "queued")
            self._executor.wake()
        return resources.job_to_proto(record)

    def CancelJob(self, request: training_service_pb2.CancelJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        job_id = parse_field("name", names.parse_job_name, request.name)
        record = self._executor.cancel(job_id)
        if record.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.PRUNED):
            raise FailedPrecondition(f"{request.name} already ended ({record.state.value}); there is nothing to cancel")
        return resources.job_to_proto(record)

    def WatchJob(
        self, request: training_service_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.JobEvent]:
        job_id = parse_field("name", names.parse_job_name, request.name)
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "must be >= 0")])
        self._jobs.get_job(job_id)  # NotFound before the stream starts
        return self._watch(job_id, request.after_sequence, context)

    def _watch(self, job_id: str, after: int, context: grpc.ServicerContext) -> Iterator[job_pb2.JobEvent]:
        while context.is_active():
            # Read the state before the events: events appended before a terminal state are then seen.
            ended = self._jobs.get_job(job_id).state.is_terminal
            batch = self._jobs.wait_for_events(job_id, after, 0.0 if ended else WATCH_POLL_S)
            for event in batch:
                after = event.sequence
                yield events.to_proto(event)
            if ended and not batch:
                # The executor records a terminal state just before its event: give that event a moment.
                for event in self._jobs.wait_for_events(job_id, after, WATCH_FINAL_GRACE_S):
                    after = event.sequence
                    yield events.to_proto(event)
                return

    def FindLearningRate(
        self, request: training_service_pb2.FindLearningRateRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.FindLearningRateResponse:
        violations = []
        try:
            validate_lr_request(request, default_bucket=self._default_bucket, inputs=self._inputs)
        except SpecInvalid as err:
            violations += err.violations
        violations += device_violations(request.spec, "spec", gpus=self._executor.gpu_count)
        if violations:
            raise InvalidArgument(violations)
        # In a job slot and a process of its own (`lr_worker`): the slot's GPU, no CUDA context or RNG state left in
        # the server. Waits for a slot as long as the caller waits, at most LR_FINDER_TIMEOUT_S.
        remaining = context.time_remaining()
        timeout_s = LR_FINDER_TIMEOUT_S if remaining is None else min(LR_FINDER_TIMEOUT_S, remaining)
        started = time.monotonic()
        with self._executor.borrow_slot(timeout_s) as gpu:
            return self._lr_finder.run(request, gpu, max(1.0, timeout_s - (time.monotonic() - started)))

    def RecommendSpec(
        self, request: training_service_pb2.RecommendSpecRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.RecommendSpecResponse:
        if not request.dataset_uri:
            raise InvalidArgument([FieldViolation("dataset_uri", "required")])
        try:
            problem = self._inputs.problem(parse_location(request.dataset_uri, default_bucket=self._default_bucket))
        except ValueError as err:
            problem = str(err)
        if problem is not None:
            raise InvalidArgument([FieldViolation("dataset_uri", problem)])
        # As in FindLearningRate; a ValueError is a dataset the rules cannot recommend for.
        with reraise_as(FailedPrecondition, StoreError, ValueError):
            recommendation, listing = recommend_for_dataset(
                self._store, request.dataset_uri, gpu_available=request.gpu_available
            )
        counts = listing.label_counts()
        return training_service_pb2.RecommendSpecResponse(
            spec=config_to_spec(recommendation.config),
            reasons=[
                training_service_pb2.SpecReason(field=r.field, value=r.value, reason=r.reason)
                for r in recommendation.reasons
            ],
            dataset=job_pb2.DatasetSummary(
                uri=request.dataset_uri,
                total_images=len(listing.items),
                labels=[job_pb2.LabelCount(label=label, train_images=count) for label, count in counts.items()],
                skipped_files=len(listing.skipped),
                skipped_examples=list(listing.skipped_examples),
                fingerprint=dataset_fingerprint(listing),
            ),
            warnings=recommendation.warnings,
        )

    # --- studies ----------------------------------------------------------------------------------

    def GetStudy(self, request: training_service_pb2.GetStudyRequest, context: grpc.ServicerContext) -> study_pb2.Study:
        return self._studies.get(parse_field("name", names.parse_study_name, request.name))

    def ListStudies(
        self, request: training_service_pb2.ListStudiesRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.ListStudiesResponse:
        violations = pagination.page_size_violations(request.page_size)
        states = set()
        for i, state in enumerate(request.states):
            if state not in resources.STUDY_STATE_FROM_PROTO:
                violations.append(FieldViolation(f"states[{i}]", "must be a concrete StudyState"))
            else:
                states.add(resources.STUDY_STATE_FROM_PROTO[state])
        if violations:
            raise InvalidArgument(violations)
        records, token = self._jobs.list_studies(
            states=states or None, page_size=request.page_size, page_token=request.page_token
        )
        return training_service_pb2.ListStudiesResponse(
            studies=[resources.study_to_proto(r) for r in records], next_page_token=token
        )

    def CreateStudy(
        self, request: training_service_pb2.CreateStudyRequest, context: grpc.ServicerContext
    ) -> study_pb2.Study:
        return self._studies.create(
            request.study,
            study_id=request.study_id or names.new_id("study"),
            request_id=request.request_id,
            validate_only=request.validate_only,
            creator=caller_name(context, self._registry),
            quota=self._study_quota,
        )

    def CancelStudy(
        self, request: training_service_pb2.CancelStudyRequest, context: grpc.ServicerContext
    ) -> study_pb2.Study:
        return self._studies.cancel(parse_field("name", names.parse_study_name, request.name))

    def WatchStudy(
        self, request: training_service_pb2.WatchStudyRequest, context: grpc.ServicerContext
    ) -> Iterator[study_pb2.StudyEvent]:
        study_id = parse_field("name", names.parse_study_name, request.name)
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "must be >= 0")])
        self._jobs.get_study(study_id)  # NotFound before the stream starts
        return self._studies.watch(study_id, request.after_sequence, context.is_active)

    def PromoteTrial(
        self, request: training_service_pb2.PromoteTrialRequest, context: grpc.ServicerContext
    ) -> job_pb2.Job:
        study_id = parse_field("study", names.parse_study_name, request.study)
        record = self._studies.promote(
            study_id,
            request.trial_number if request.HasField("trial_number") else None,
            job_id=request.job_id or names.new_id("job"),
            request_id=request.request_id,
        )
        return resources.job_to_proto(record)
