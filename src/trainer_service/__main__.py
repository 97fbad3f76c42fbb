"""`python -m trainer_service`: the TrainingService gRPC server."""

from __future__ import annotations

import sys
from collections.abc import Callable

from trainer_service.jobstore import JobStore
from trainer_service.servicer import TrainingServicer
from visiontune.bootstrap import run_service
from visiontune.server import ServiceBinding
from visiontune.settings import DEFAULT_TRAINER_PORT, ServerSettings
from visiontune.store import ArtifactStore
from visiontune.v1 import training_service_pb2, training_service_pb2_grpc

SERVICE_NAME = training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


def build(settings: ServerSettings, store: ArtifactStore) -> tuple[list[ServiceBinding], Callable[[], None]]:
    jobs = JobStore(settings.data_dir / "trainer" / "jobs.sqlite3")
    servicer = TrainingServicer(jobs)
    binding = ServiceBinding(
        SERVICE_NAME, lambda server: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    )
    return [binding], jobs.close


def main() -> int:
    return run_service(
        service="trainer_service",
        description="VisionTune TrainingService: training jobs, LR finder, spec recommender, tuning studies.",
        default_port=DEFAULT_TRAINER_PORT,
        port_env="TRAINER_PORT",
        factory=build,
    )


if __name__ == "__main__":
    sys.exit(main())
