"""`python -m inference_service`: the InferenceService gRPC server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from inference_service.servicer import InferenceServicer
from visiontune.bootstrap import run_service
from visiontune.server import ServiceBinding
from visiontune.settings import DEFAULT_INFERENCE_PORT, ServerSettings
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2, inference_service_pb2_grpc

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def build(
    settings: ServerSettings, store: ArtifactStore, args: argparse.Namespace
) -> tuple[list[ServiceBinding], Callable[[], None]]:
    servicer = InferenceServicer(store)
    binding = ServiceBinding(
        SERVICE_NAME, lambda server: inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    )
    return [binding], lambda: None


def main() -> int:
    return run_service(
        service="inference_service",
        description="VisionTune InferenceService: model deployments on Triton, classification, feedback.",
        default_port=DEFAULT_INFERENCE_PORT,
        port_env="INFERENCE_PORT",
        factory=build,
    )


if __name__ == "__main__":
    sys.exit(main())
