"""What a platform team limits, enforced by a real trainer: input locations, images per job, queued jobs per caller.

Authentication is off here, so every call is the same (anonymous) caller; the per-principal split of the quotas
is covered where tokens are (the job store's quota counts by the creator it is given).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tests.integration.trainer_helpers import Trainer, create_job, start_trainer, tiny_spec, watch_job
from visiontune.client import make_channel
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.status import field_violations
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, training_service_pb2, training_service_pb2_grpc, training_spec_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def limited(
    request: pytest.FixtureRequest, shapes: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path
) -> Iterator[Trainer]:
    """A trainer on one job slot with the limits the test's `limits` marker names (flag, value pairs)."""
    marker = request.node.get_closest_marker("limits")
    (tmp_path / "state").mkdir()
    running = start_trainer(shapes, s3_server, tmp_path / "state", "--job-slots", "1", *(marker.args if marker else ()))
    yield running
    running.stop()


def _violations(trainer: Trainer, spec: training_spec_pb2.TrainingSpec) -> dict[str, str]:
    request = training_service_pb2.CreateJobRequest(job=job_pb2.Job(spec=spec), validate_only=True)
    with pytest.raises(grpc.RpcError) as info:
        trainer.stub.CreateJob(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {v.field: v.description for v in field_violations(info.value)}


@pytest.mark.limits("--input-locations", "datasets/,weights/")
def test_uris_outside_the_allowed_locations_are_a_violation_each(limited: Trainer) -> None:
    spec = tiny_spec()
    spec.dataset.uri = "jobs/another-job/"
    spec.dataset.validation_uri = "models/shapes/versions/1/"
    spec.dataset.test_uri = "s3://another-bucket/datasets/test/"
    spec.model.weights = training_spec_pb2.WEIGHTS_SOURCE_URI
    spec.model.weights_uri = "checkpoints/w.pt"
    found = _violations(limited, spec)
    assert set(found) >= {
        "job.spec.dataset.uri",
        "job.spec.dataset.validation_uri",
        "job.spec.dataset.test_uri",
        "job.spec.model.weights_uri",
    }, found
    assert "own jobs/ prefix" in found["job.spec.dataset.uri"]
    assert "own models/ prefix" in found["job.spec.dataset.validation_uri"]
    assert "allowed input location" in found["job.spec.dataset.test_uri"]
    assert "allowed input location" in found["job.spec.model.weights_uri"]

    ok = tiny_spec()
    ok.model.weights = training_spec_pb2.WEIGHTS_SOURCE_URI
    ok.model.weights_uri = "weights/w.pt"  # the second configured location
    request = training_service_pb2.CreateJobRequest(job=job_pb2.Job(spec=ok), validate_only=True)
    assert limited.stub.CreateJob(request, timeout=30).spec.model.weights_uri == "weights/w.pt"

    with pytest.raises(grpc.RpcError) as info:
        limited.stub.RecommendSpec(training_service_pb2.RecommendSpecRequest(dataset_uri="jobs/x/"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "own jobs/ prefix" in field_violations(info.value)[0].description


@pytest.mark.limits("--max-images-per-job", "20")
def test_a_job_over_the_image_limit_fails_before_it_downloads_anything(limited: Trainer, shapes: ArtifactStore) -> None:
    job = create_job(limited, tiny_spec(), "too-big")
    events = watch_job(limited, job.name)
    done = limited.stub.GetJob(training_service_pb2.GetJobRequest(name=job.name), timeout=10)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert "over the limit of 20 per job (--max-images-per-job" in done.error.message, done.error.message
    assert not any(e.HasField("epoch_ended") for e in events)
    assert not list(shapes.list_model_versions("shapes"))


@pytest.mark.limits("--max-queued-jobs-per-caller", "2")
def test_a_caller_with_its_queue_full_gets_resource_exhausted(limited: Trainer) -> None:
    # One slot, and jobs long enough to hold it: the queue behind it fills.
    spec = tiny_spec(epochs=50)
    created: list[str] = []
    refused: grpc.RpcError | None = None
    for i in range(6):
        try:
            created.append(create_job(limited, spec, f"q{i}").name)
        except grpc.RpcError as err:
            refused = err
            break
    assert refused is not None, "six jobs were accepted with a queue of two"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 2 (--max-queued-jobs-per-caller)" in (refused.details() or "")
    assert len(created) >= 2
    queued = limited.stub.ListJobs(
        training_service_pb2.ListJobsRequest(states=[job_pb2.JOB_STATE_QUEUED]), timeout=10
    ).jobs
    assert len(queued) <= 2
    for name in created:
        limited.stub.CancelJob(training_service_pb2.CancelJobRequest(name=name), timeout=30)


def test_queue_quotas_count_per_authenticated_caller(
    shapes: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "principals": [
                    {"name": "alice", "scopes": ["train", "read"], "token": "alice-token-0123456789"},
                    {"name": "bob", "scopes": ["train", "read"], "token": "bob-token-0123456789"},
                ]
            }
        )
    )
    (tmp_path / "state").mkdir()
    trainer = start_trainer(
        shapes,
        s3_server,
        tmp_path / "state",
        "--job-slots",
        "1",
        "--auth-token-file",
        str(tokens),
        "--max-queued-jobs-per-caller",
        "1",
    )
    spec = tiny_spec(epochs=50)
    try:
        stubs = {
            name: training_service_pb2_grpc.TrainingServiceStub(
                make_channel(trainer.target, token=f"{name}-token-0123456789")
            )
            for name in ("alice", "bob")
        }

        def create(who: str, job_id: str) -> job_pb2.Job:
            request = training_service_pb2.CreateJobRequest(job=job_pb2.Job(spec=spec), job_id=job_id)
            return stubs[who].CreateJob(request, timeout=30)

        created = [create("alice", "a0").name]
        refused = None
        for i in range(1, 5):  # the first may start at once; then one more fits in alice's queue
            try:
                created.append(create("alice", f"a{i}").name)
            except grpc.RpcError as err:
                refused = err
                break
        assert refused is not None
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "caller 'alice' already has 1 job queued" in (refused.details() or "")
        created.append(create("bob", "b0").name)  # bob's queue is his own
        for name in created:
            stubs["alice"].CancelJob(training_service_pb2.CancelJobRequest(name=name), timeout=30)
    finally:
        trainer.stop()
