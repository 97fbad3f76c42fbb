"""The gRPC TrainingService: a thin layer from protobuf requests to the job store and (later) the engine.

Reads of jobs and studies are served from the job store. The RPCs that start work answer UNIMPLEMENTED,
naming the issue that delivers them, until that lands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from trainer_service import resources
from trainer_service.jobstore import JobStore, NotFound
from visiontune import names
from visiontune.rpc_errors import FieldViolation, abort_with, invalid_argument, not_implemented
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_service_pb2_grpc

TRAINING_ISSUE = "issue #3 (training engine)"
TUNING_ISSUE = "issue #5 (tuning studies)"
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


def _page_size(requested: int) -> int:
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def _name_or_abort(context: grpc.ServicerContext, field: str, parse: Callable[[str], str], value: str) -> str:
    try:
        return parse(value)
    except names.InvalidName as err:
        abort_with(context, invalid_argument([FieldViolation(field, str(err))]))


class TrainingServicer(training_service_pb2_grpc.TrainingServiceServicer):
    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    # --- jobs -------------------------------------------------------------------------------------

    def GetJob(self, request: training_service_pb2.GetJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        job_id = _name_or_abort(context, "name", names.parse_job_name, request.name)
        try:
            return resources.job_to_proto(self._jobs.get_job(job_id))
        except NotFound:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} does not exist")

    def ListJobs(
        self, request: training_service_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.ListJobsResponse:
        violations = []
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must be >= 0"))
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
            abort_with(context, invalid_argument(violations))
        try:
            records, token = self._jobs.list_jobs(
                states=states or None,
                study_id=study_id,
                page_size=_page_size(request.page_size),
                page_token=request.page_token,
            )
        except ValueError as err:
            abort_with(context, invalid_argument([FieldViolation("page_token", str(err))]))
        return training_service_pb2.ListJobsResponse(
            jobs=[resources.job_to_proto(r) for r in records], next_page_token=token
        )

    def CreateJob(self, request: training_service_pb2.CreateJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        not_implemented(context, "TrainingService.CreateJob", TRAINING_ISSUE)

    def CancelJob(self, request: training_service_pb2.CancelJobRequest, context: grpc.ServicerContext) -> job_pb2.Job:
        not_implemented(context, "TrainingService.CancelJob", TRAINING_ISSUE)

    def WatchJob(
        self, request: training_service_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.JobEvent]:
        not_implemented(context, "TrainingService.WatchJob", TRAINING_ISSUE)

    def FindLearningRate(
        self, request: training_service_pb2.FindLearningRateRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.FindLearningRateResponse:
        not_implemented(context, "TrainingService.FindLearningRate", TRAINING_ISSUE)

    def RecommendSpec(
        self, request: training_service_pb2.RecommendSpecRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.RecommendSpecResponse:
        not_implemented(context, "TrainingService.RecommendSpec", TRAINING_ISSUE)

    # --- studies ----------------------------------------------------------------------------------

    def GetStudy(
        self, request: training_service_pb2.GetStudyRequest, context: grpc.ServicerContext
    ) -> study_pb2.Study:
        study_id = _name_or_abort(context, "name", names.parse_study_name, request.name)
        try:
            return resources.study_to_proto(self._jobs.get_study(study_id))
        except NotFound:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} does not exist")

    def ListStudies(
        self, request: training_service_pb2.ListStudiesRequest, context: grpc.ServicerContext
    ) -> training_service_pb2.ListStudiesResponse:
        violations = []
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must be >= 0"))
        states = set()
        for i, state in enumerate(request.states):
            if state not in resources.STUDY_STATE_FROM_PROTO:
                violations.append(FieldViolation(f"states[{i}]", "must be a concrete StudyState"))
            else:
                states.add(resources.STUDY_STATE_FROM_PROTO[state])
        if violations:
            abort_with(context, invalid_argument(violations))
        try:
            records, token = self._jobs.list_studies(
                states=states or None, page_size=_page_size(request.page_size), page_token=request.page_token
            )
        except ValueError as err:
            abort_with(context, invalid_argument([FieldViolation("page_token", str(err))]))
        return training_service_pb2.ListStudiesResponse(
            studies=[resources.study_to_proto(r) for r in records], next_page_token=token
        )

    def CreateStudy(
        self, request: training_service_pb2.CreateStudyRequest, context: grpc.ServicerContext
    ) -> study_pb2.Study:
        not_implemented(context, "TrainingService.CreateStudy", TUNING_ISSUE)

    def CancelStudy(
        self, request: training_service_pb2.CancelStudyRequest, context: grpc.ServicerContext
    ) -> study_pb2.Study:
        not_implemented(context, "TrainingService.CancelStudy", TUNING_ISSUE)

    def WatchStudy(
        self, request: training_service_pb2.WatchStudyRequest, context: grpc.ServicerContext
    ) -> Iterator[study_pb2.StudyEvent]:
        not_implemented(context, "TrainingService.WatchStudy", TUNING_ISSUE)

    def PromoteTrial(
        self, request: training_service_pb2.PromoteTrialRequest, context: grpc.ServicerContext
    ) -> job_pb2.Job:
        not_implemented(context, "TrainingService.PromoteTrial", TUNING_ISSUE)
