"""The gRPC InferenceService. Deployment into Triton and classification land with issue #4; until then
every RPC answers UNIMPLEMENTED with a message that says so."""

from __future__ import annotations

import grpc

from visiontune.rpc_errors import not_implemented
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb
from visiontune.v1 import inference_service_pb2_grpc

INFERENCE_ISSUE = "issue #4 (inference through Triton)"


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, store: ArtifactStore) -> None:
        self._store = store

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        not_implemented(context, "InferenceService.Classify", INFERENCE_ISSUE)

    def DeployModel(self, request: pb.DeployModelRequest, context: grpc.ServicerContext) -> pb.Deployment:
        not_implemented(context, "InferenceService.DeployModel", INFERENCE_ISSUE)

    def UndeployModel(
        self, request: pb.UndeployModelRequest, context: grpc.ServicerContext
    ) -> pb.UndeployModelResponse:
        not_implemented(context, "InferenceService.UndeployModel", INFERENCE_ISSUE)

    def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        not_implemented(context, "InferenceService.ListDeployments", INFERENCE_ISSUE)

    def ReportFeedback(
        self, request: pb.ReportFeedbackRequest, context: grpc.ServicerContext
    ) -> pb.ReportFeedbackResponse:
        not_implemented(context, "InferenceService.ReportFeedback", INFERENCE_ISSUE)
