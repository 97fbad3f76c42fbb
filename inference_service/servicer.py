"""The gRPC InferenceService: protobuf in, `InferenceEngine` calls, protobuf out.

Errors are raised, never aborted here: the server runtime maps every `visiontune.errors` class to its status
code in one place (docs/architecture.md §3).
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from visiontune import pagination
from visiontune.auth import TokenRegistry
from visiontune.errors import FieldViolation, parse_field
from visiontune.names import InvalidName, ModelVersionName, parse_model_name, parse_model_version_name
from visiontune.v1 import inference_service_pb2 as pb
from visiontune.v1 import inference_service_pb2_grpc

from inference_service import deployments as dep
from inference_service.deployments import Deployment, DeploymentState, DeploySettings
from inference_service.engine import ClassifyInput, InferenceEngine
from inference_service.errors import InvalidRequest
from inference_service.feedback import Outcome

_STATES = {
    DeploymentState.LOADING: pb.DEPLOYMENT_STATE_LOADING,
    DeploymentState.READY: pb.DEPLOYMENT_STATE_READY,
    DeploymentState.FAILED: pb.DEPLOYMENT_STATE_FAILED,
}
_OUTCOMES = {
    Outcome.CORRECT: pb.FEEDBACK_OUTCOME_CORRECT,
    Outcome.MISCLASSIFIED: pb.FEEDBACK_OUTCOME_MISCLASSIFIED,
    Outcome.FALSE_REJECTION: pb.FEEDBACK_OUTCOME_FALSE_REJECTION,
    Outcome.FALSE_POSITIVE: pb.FEEDBACK_OUTCOME_FALSE_POSITIVE,
    Outcome.TRUE_REJECTION: pb.FEEDBACK_OUTCOME_TRUE_REJECTION,
}


def _parse_target(model: str) -> tuple[str, str | None]:
    """`models/{m}` or `models/{m}/versions/{v}` -> (m, v or None)."""
    if "/versions/" in model:
        name = parse_field("model", parse_model_version_name, model, InvalidRequest)
        return name.model, name.version
    return parse_field("model", parse_model_name, model, InvalidRequest), None


def _version_name(value: str) -> ModelVersionName:
    return parse_field("model_version", parse_model_version_name, value, InvalidRequest)


def deploy_settings(request: pb.DeployModelRequest) -> DeploySettings:
    """The request's settings with defaults filled in; InvalidRequest naming every out-of-range field."""
    violations = []
    weight = request.traffic_weight if request.HasField("traffic_weight") else dep.DEFAULT_TRAFFIC_WEIGHT
    if not 0 <= weight <= dep.MAX_TRAFFIC_WEIGHT:
        violations.append(FieldViolation("traffic_weight", f"must be in [0, {dep.MAX_TRAFFIC_WEIGHT}]"))
    batch = request.max_batch_size if request.HasField("max_batch_size") else dep.DEFAULT_MAX_BATCH_SIZE
    if not 1 <= batch <= dep.MAX_BATCH_SIZE_LIMIT:
        violations.append(FieldViolation("max_batch_size", f"must be in [1, {dep.MAX_BATCH_SIZE_LIMIT}]"))
    delay = (
        request.max_queue_delay.ToTimedelta().total_seconds()
        if request.HasField("max_queue_delay")
        else dep.DEFAULT_MAX_QUEUE_DELAY_S
    )
    if not 0 <= delay <= dep.MAX_QUEUE_DELAY_S:
        violations.append(FieldViolation("max_queue_delay", f"must be in [0, {dep.MAX_QUEUE_DELAY_S:g} s]"))
    instances = request.instance_count if request.HasField("instance_count") else dep.DEFAULT_INSTANCE_COUNT
    if not 1 <= instances <= dep.MAX_INSTANCE_COUNT:
        violations.append(FieldViolation("instance_count", f"must be in [1, {dep.MAX_INSTANCE_COUNT}]"))
    if violations:
        raise InvalidRequest(violations)
    return DeploySettings(
        traffic_weight=weight, max_batch_size=batch, max_queue_delay_s=delay, instance_count=instances
    )


def deployment_proto(d: Deployment) -> pb.Deployment:
    deploy_time = timestamp_pb2.Timestamp()
    deploy_time.FromDatetime(d.deploy_time)
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(d.settings.max_queue_delay_s * 1e9))
    return pb.Deployment(
        model_version=str(d.name),
        traffic_weight=d.settings.traffic_weight,
        state=_STATES[d.state],
        triton_model=d.triton_model,
        max_batch_size=d.settings.max_batch_size,
        max_queue_delay=delay,
        instance_count=d.settings.instance_count,
        deploy_time=deploy_time,
        device=d.device,
    )


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, *, registry: TokenRegistry | None = None) -> None:
        self._engine = engine
        # Who calls (`caller_name(context, self._registry)`); None: authentication is off, every caller anonymous.
        self._registry = registry

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        model, version = _parse_target(request.model)
        output = self._engine.classify(
            ClassifyInput(
                model=model,
                version=version,
                images=[image.content for image in request.images],
                client_ids=[image.client_id for image in request.images],
                top_k=request.top_k if request.HasField("top_k") else None,
                threshold=request.unknown_threshold if request.HasField("unknown_threshold") else None,
                request_id=request.request_id,
            )
        )
        latency = duration_pb2.Duration()
        latency.FromNanoseconds(round(output.latency_s * 1e9))
        return pb.ClassifyResponse(
            request_id=output.request_id,
            model_version=str(output.name),
            latency=latency,
            classifications=[
                pb.Classification(
                    index=r.index,
                    client_id=r.client_id,
                    unknown=r.unknown,
                    unknown_score=r.score,
                    threshold=r.threshold,
                    top_k=[pb.LabelScore(label=label, score=score) for label, score in r.top_k],
                )
                for r in output.results
            ],
        )

    def DeployModel(self, request: pb.DeployModelRequest, context: grpc.ServicerContext) -> pb.Deployment:
        deployment = self._engine.deploy(_version_name(request.model_version), deploy_settings(request))
        return deployment_proto(deployment)

    def UndeployModel(
        self, request: pb.UndeployModelRequest, context: grpc.ServicerContext
    ) -> pb.UndeployModelResponse:
        deployment = self._engine.undeploy(_version_name(request.model_version))
        return pb.UndeployModelResponse(deployment=deployment_proto(deployment))

    def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        violations = pagination.page_size_violations(request.page_size)
        model = None
        if request.model:
            try:
                model = parse_model_name(request.model)
            except InvalidName as err:
                violations.append(FieldViolation("model", str(err)))
        if violations:
            raise InvalidRequest(violations)
        # Sorted by name, which the page token holds: pages stay stable while deployments come and go.
        page, token = pagination.page_of(
            self._engine.list_deployments(model), lambda d: str(d.name), request.page_size, request.page_token, [model]
        )
        return pb.ListDeploymentsResponse(deployments=[deployment_proto(d) for d in page], next_page_token=token)

    def ReportFeedback(
        self, request: pb.ReportFeedbackRequest, context: grpc.ServicerContext
    ) -> pb.ReportFeedbackResponse:
        truth = request.WhichOneof("truth")
        if truth is None or (truth == "unknown" and not request.unknown):
            raise InvalidRequest([FieldViolation("truth", "set true_label, or unknown = true")])
        result = self._engine.report_feedback(
            request.request_id, request.index, request.true_label if truth == "true_label" else None
        )
        return pb.ReportFeedbackResponse(
            outcome=_OUTCOMES[result.outcome],
            duplicate=result.duplicate,
            model_version=f"models/{result.model}/versions/{result.version}",
        )
