"""The inference service end to end: a real Triton server, real S3, real gRPC on loopback.

One service (and so one Triton) is shared by the tests of this module; each test deploys what it needs
under its own model ID, so they do not depend on each other's order.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image
from tests.integration.inference_helpers import (
    BLUE,
    GREEN,
    GREY,
    RED,
    Inference,
    publish_color_model,
    restart,
    solid_image,
    start_inference,
    wait_ready,
)
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.status import field_violations
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MAX_IMAGES = 8
MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def bucket(s3_server: S3ServerProcess) -> ArtifactStore:
    store = ArtifactStore.connect(s3_server.settings("inference-" + secrets.token_hex(4)))
    store.ensure_bucket()
    return store


@pytest.fixture(scope="module")
def service(
    bucket: ArtifactStore, s3_server: S3ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Inference]:
    running = start_inference(
        bucket,
        s3_server,
        tmp_path_factory.mktemp("inference"),
        "--max-images",
        str(MAX_IMAGES),
        "--max-image-pixels",
        str(MAX_PIXELS),
        "--max-message-mb",
        "4",
    )
    try:
        yield running
    finally:
        running.stop()


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = excinfo.value.code()
    return code


def _top1(c: pb.Classification) -> str:
    label: str = c.top_k[0].label
    return label


def test_deploy_classify_and_triton_endpoints(service: Inference, bucket: ArtifactStore) -> None:
    name = publish_color_model(bucket, "colors")
    deployment = service.deploy(name, max_batch_size=16)
    assert deployment.state == pb.DEPLOYMENT_STATE_READY
    assert deployment.triton_model == "colors__v1"
    assert deployment.device == "cpu"
    assert deployment.max_batch_size == 16
    assert deployment.traffic_weight == 100

    response = service.classify("models/colors", *(solid_image(c) for c in (RED, GREEN, BLUE, GREY)))
    assert response.model_version == name
    assert response.request_id
    assert [_top1(c) for c in response.classifications[:3]] == ["red", "green", "blue"]
    assert [c.unknown for c in response.classifications] == [False, False, False, True]
    assert response.classifications[0].top_k[0].score == pytest.approx(1.0, abs=1e-6)
    assert response.classifications[3].unknown_score == pytest.approx(1 / 3, abs=1e-6)
    assert response.classifications[3].threshold == pytest.approx(0.5)
    assert [c.index for c in response.classifications] == [0, 1, 2, 3]

    # Per-request threshold override and top_k.
    lenient = service.classify("models/colors", solid_image(GREY), unknown_threshold=0.3, top_k=1)
    assert not lenient.classifications[0].unknown
    assert len(lenient.classifications[0].top_k) == 1

    # JPEG and WebP decode too; client ids are echoed.
    jpeg, webp = solid_image(GREEN, fmt="JPEG"), solid_image(BLUE, fmt="WEBP")
    request = pb.ClassifyRequest(
        model=name, images=[pb.Image(content=jpeg, client_id="a.jpg"), pb.Image(content=webp, client_id="b.webp")]
    )
    pinned = service.stub.Classify(request, timeout=60)
    assert [(c.client_id, _top1(c)) for c in pinned.classifications] == [("a.jpg", "green"), ("b.webp", "blue")]

    # Triton's own endpoints: tritonclient runs the deployed model directly; HTTP health; Triton's metrics.
    client = triton_grpc.InferenceServerClient(service.process.triton_grpc)
    try:
        assert client.is_model_ready("colors__v1")
        red = np.zeros((2, 3, 16, 16), dtype=np.float32)
        red[:, 0] = 1.0  # normalised red channel at its maximum, the others at 0
        tensor = triton_grpc.InferInput("images", list(red.shape), "FP32")
        tensor.set_data_from_numpy(red)
        logits = client.infer("colors__v1", [tensor]).as_numpy("logits")
        assert logits.shape == (2, 3)
        assert np.allclose(logits, [[10, 0, 0], [10, 0, 0]], atol=1e-5)  # scale x channel means
    finally:
        client.close()
    with urllib.request.urlopen(f"http://{service.process.triton_http}/v2/health/ready", timeout=10) as ready:
        assert ready.status == 200
    with urllib.request.urlopen(service.process.triton_metrics_url, timeout=10) as triton_metrics:
        assert 'nv_inference_request_success{model="colors__v1"' in triton_metrics.read().decode()
    listed = service.stub.ListDeployments(pb.ListDeploymentsRequest(model="models/colors"), timeout=10)
    assert [d.model_version for d in listed.deployments] == [name]


def test_bad_requests_get_clear_errors_and_the_service_keeps_serving(service: Inference, bucket: ArtifactStore) -> None:
    name = publish_color_model(bucket, "badinput")
    service.deploy(name)

    with pytest.raises(grpc.RpcError) as unknown_model:
        service.classify("models/nosuchmodel", solid_image(RED))
    assert _code(unknown_model) == grpc.StatusCode.NOT_FOUND
    assert "no deployed version" in unknown_model.value.details()

    with pytest.raises(grpc.RpcError) as bad_name:
        service.classify("colors", solid_image(RED))
    assert _code(bad_name) == grpc.StatusCode.INVALID_ARGUMENT

    png = solid_image(RED)
    big = io.BytesIO()
    Image.new("L", (2500, 2000)).save(big, "PNG")  # 5 MP of zeros: a few KB that decode to more than the limit
    bad = [b"", b"definitely not an image", png[: len(png) // 2], big.getvalue()]
    with pytest.raises(grpc.RpcError) as bad_images:
        service.classify("models/badinput", solid_image(RED), *bad)
    assert _code(bad_images) == grpc.StatusCode.INVALID_ARGUMENT
    violations = {v.field: v.description for v in field_violations(bad_images.value)}
    assert set(violations) == {f"images[{i}].content" for i in range(1, 5)}
    assert "empty" in violations["images[1].content"]
    assert "not an image" in violations["images[2].content"]
    assert "truncated" in violations["images[3].content"] or "corrupt" in violations["images[3].content"]
    assert "too large" in violations["images[4].content"]

    with pytest.raises(grpc.RpcError) as too_many:
        service.classify("models/badinput", *([png] * (MAX_IMAGES + 1)))
    assert _code(too_many) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_IMAGES) in too_many.value.details()

    with pytest.raises(grpc.RpcError) as oversized:
        service.classify("models/badinput", b"\0" * (5 * 1024 * 1024))  # over --max-message-mb 4
    assert _code(oversized) == grpc.StatusCode.RESOURCE_EXHAUSTED

    with pytest.raises(grpc.RpcError) as bad_knobs:
        service.classify("models/badinput", png, top_k=4, unknown_threshold=1.5)
    assert {v.field for v in field_violations(bad_knobs.value)} == {"top_k", "unknown_threshold"}

    with pytest.raises(grpc.RpcError) as no_images:
        service.classify("models/badinput")
    assert _code(no_images) == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as missing:
        service.deploy("models/badinput/versions/nope")
    assert _code(missing) == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as bad_settings:
        service.deploy(name, traffic_weight=-1, max_batch_size=0, instance_count=99)
    assert {v.field for v in field_violations(bad_settings.value)} == {
        "traffic_weight",
        "max_batch_size",
        "instance_count",
    }

    # Still serving.
    assert _top1(service.classify("models/badinput", png).classifications[0]) == "red"


def test_weights_that_do_not_match_their_sha256_are_refused(service: Inference, bucket: ArtifactStore) -> None:
    name = publish_color_model(bucket, "tampered")
    bucket.put_bytes("models/tampered/versions/v1/model.pt", b"not the weights the manifest describes")
    with pytest.raises(grpc.RpcError) as refused:
        service.deploy(name)
    assert _code(refused) == grpc.StatusCode.FAILED_PRECONDITION
    assert "sha256" in refused.value.details()
    listed = service.stub.ListDeployments(pb.ListDeploymentsRequest(model="models/tampered"), timeout=10)
    assert not listed.deployments


def test_feedback_outcomes_duplicates_and_unknown_ids(service: Inference, bucket: ArtifactStore) -> None:
    name = publish_color_model(bucket, "feedback")
    service.deploy(name)
    response = service.classify("models/feedback", *(solid_image(c) for c in (RED, GREEN, GREY, GREY)))
    rid = response.request_id

    def report(index: int, **truth: object) -> pb.ReportFeedbackResponse:
        request = pb.ReportFeedbackRequest(request_id=rid, index=index, **truth)
        result: pb.ReportFeedbackResponse = service.stub.ReportFeedback(request, timeout=10)
        return result

    assert report(0, true_label="red").outcome == pb.FEEDBACK_OUTCOME_CORRECT
    assert report(1, true_label="blue").outcome == pb.FEEDBACK_OUTCOME_MISCLASSIFIED
    assert report(2, unknown=True).outcome == pb.FEEDBACK_OUTCOME_TRUE_REJECTION
    assert report(3, true_label="green").outcome == pb.FEEDBACK_OUTCOME_FALSE_REJECTION
    again = report(0, unknown=True)
    assert again.duplicate
    assert again.outcome == pb.FEEDBACK_OUTCOME_CORRECT  # the first report stands
    assert again.model_version == name

    lenient = service.classify("models/feedback", solid_image(GREY), unknown_threshold=0.2)
    fp = service.stub.ReportFeedback(
        pb.ReportFeedbackRequest(request_id=lenient.request_id, index=0, unknown=True), timeout=10
    )
    assert fp.outcome == pb.FEEDBACK_OUTCOME_FALSE_POSITIVE
    assert not fp.duplicate

    with pytest.raises(grpc.RpcError) as unknown_id:
        service.stub.ReportFeedback(pb.ReportFeedbackRequest(request_id="req-never", index=0, unknown=True), timeout=10)
    assert _code(unknown_id) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad_index:
        report(9, unknown=True)
    assert _code(bad_index) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as bad_label:
        report(1, true_label="purple")
    assert _code(bad_label) == grpc.StatusCode.INVALID_ARGUMENT
    assert "purple" in bad_label.value.details()
    with pytest.raises(grpc.RpcError) as no_truth:
        report(1)
    assert _code(no_truth) == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as reused:
        service.classify("models/feedback", solid_image(RED), request_id=rid)
    assert _code(reused) == grpc.StatusCode.ALREADY_EXISTS

    with urllib.request.urlopen(service.process.metrics_url, timeout=10) as scrape:
        text = scrape.read().decode()
    assert 'visiontune_inference_unknown_false_positives_total{model="feedback",version="v1"} 1.0' in text
    assert 'visiontune_inference_false_rejections_total{model="feedback",version="v1"} 1.0' in text
    assert 'visiontune_inference_unknown_false_positive_rate{model="feedback",version="v1"} 0.5' in text


def test_classify_answers_when_its_prediction_cannot_be_recorded(service: Inference, bucket: ArtifactStore) -> None:
    name = publish_color_model(bucket, "unrecorded")
    service.deploy(name)
    # Another process holds the write lock of the service's prediction database (its default SQLite file) past
    # the few seconds the service waits for it.
    holder = sqlite3.connect(service.process.data_dir / "inference" / "predictions.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        answered = service.classify("models/unrecorded", solid_image(RED))
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _top1(answered.classifications[0]) == "red"
    assert waited < 15
    with pytest.raises(grpc.RpcError) as unrecorded:
        service.stub.ReportFeedback(
            pb.ReportFeedbackRequest(request_id=answered.request_id, index=0, true_label="red"), timeout=10
        )
    assert _code(unrecorded) == grpc.StatusCode.NOT_FOUND
    with urllib.request.urlopen(service.process.metrics_url, timeout=10) as scrape:
        assert 'visiontune_inference_unrecorded_requests_total{model="unrecorded",version="v1"} 1.0' in (
            scrape.read().decode()
        )

    # The lock is gone: the next request is recorded, and its feedback scored.
    recorded = service.classify("models/unrecorded", solid_image(RED))
    scored = service.stub.ReportFeedback(
        pb.ReportFeedbackRequest(request_id=recorded.request_id, index=0, true_label="red"), timeout=10
    )
    assert (scored.outcome, scored.duplicate) == (pb.FEEDBACK_OUTCOME_CORRECT, False)


def test_traffic_split_and_hot_swap_under_load_fail_no_request(service: Inference, bucket: ArtifactStore) -> None:
    v1 = publish_color_model(bucket, "swap", "v1")
    v2 = publish_color_model(bucket, "swap", "v2", scale=5.0)
    service.deploy(v1)

    errors: list[str] = []
    answered: Counter[str] = Counter()
    stop = threading.Event()
    image = solid_image(RED)

    def client() -> None:
        while not stop.is_set():
            try:
                response = service.classify("models/swap", image)
                answered[response.model_version] += 1
                if _top1(response.classifications[0]) != "red":
                    errors.append(f"wrong answer from {response.model_version}")
            except grpc.RpcError as err:
                errors.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        service.deploy(v2, traffic_weight=100)  # loads while v1 answers
        seen_both = Counter[str]()
        for _ in range(60):
            seen_both[service.classify("models/swap", image).model_version] += 1
        assert min(seen_both[v1], seen_both[v2]) > 5, seen_both  # a 50/50 split
        service.deploy(v1, traffic_weight=0)  # drain v1 by weight, then remove it
        assert {service.classify("models/swap", image).model_version for _ in range(10)} == {v2}
        service.stub.UndeployModel(pb.UndeployModelRequest(model_version=v1), timeout=120)
        after = answered.copy()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert min(after[v1], after[v2]) > 0, after
    listed = service.stub.ListDeployments(pb.ListDeploymentsRequest(model="models/swap"), timeout=10)
    assert [(d.model_version, d.traffic_weight) for d in listed.deployments] == [(v2, 100)]


def test_deployments_are_restored_after_a_restart(
    store: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path
) -> None:
    # A service and bucket of its own: restarting the shared service would slow every other test.
    bucket = store
    name = publish_color_model(bucket, "restored")
    own = start_inference(bucket, s3_server, tmp_path / "own")
    try:
        own.deploy(name, traffic_weight=7, max_batch_size=4)
        records = json.loads(bucket.get_bytes("deployments/restored/v1.json"))
        assert records["traffic_weight"] == 7
        own = restart(own, bucket, s3_server)
        restored = wait_ready(own, name)
        assert (restored.traffic_weight, restored.max_batch_size) == (7, 4)
        assert _top1(own.classify("models/restored", solid_image(BLUE)).classifications[0]) == "blue"

        # Triton killed under the service: Classify says UNAVAILABLE (retryable) until the supervisor has
        # restarted Triton and reloaded the deployment; the service process itself never goes down.
        triton_pid = int(
            subprocess.run(
                ["pgrep", "-P", str(own.process.proc.pid), "-f", "tritonserver"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        os.kill(triton_pid, signal.SIGKILL)
        codes = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer = own.classify("models/restored", solid_image(BLUE))
            except grpc.RpcError as err:
                codes.add(err.code())
                time.sleep(0.2)
                continue
            if codes:  # answered again after failing: Triton is back
                break
            time.sleep(0.05)
        assert codes, "Triton's death was never noticed"
        assert codes <= {grpc.StatusCode.UNAVAILABLE}, codes
        assert _top1(answer.classifications[0]) == "blue"
        assert own.process.proc.poll() is None
        own.stub.UndeployModel(pb.UndeployModelRequest(model_version=name), timeout=120)
        assert not bucket.exists("deployments/restored/v1.json")
    finally:
        own.stop()
