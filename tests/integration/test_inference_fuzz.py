"""A corpus of malformed images never crashes or wedges the inference service.

Hypothesis sends broken images (random bytes; valid images truncated, bit-flipped, overwritten or padded;
PNG headers claiming absurd dimensions) to a real service with a real Triton, alone and mixed with good
images in one request. Every call must end in bounded time with OK (a mutation that still decodes) or
INVALID_ARGUMENT naming the bad image; nothing else. Afterwards the service still classifies correctly.
The slow suite (`make test-slow`) sends SLOW_EXAMPLES such requests.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.fuzz_images import malformed_images
from tests.integration.inference_helpers import RED, Inference, publish_color_model, solid_image, start_inference
from visiontune.client import is_serving
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.status import field_violations
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def service(s3_server: S3ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    store = ArtifactStore.connect(s3_server.settings("fuzz-" + secrets.token_hex(4)))
    store.ensure_bucket()
    running = start_inference(store, s3_server, tmp_path_factory.mktemp("fuzz"), "--max-image-pixels", "4000000")
    try:
        running.deploy(publish_color_model(store, "fuzz"))
        yield running
    finally:
        running.stop()


SLOW_EXAMPLES = 10_000


def _classify_malformed(service: Inference, bad: list[bytes], good_first: bool) -> grpc.StatusCode:
    """Send one request of `bad` images (after a good one with `good_first`); its code, once checked."""
    images = [solid_image(RED), *bad] if good_first else bad
    request = pb.ClassifyRequest(model="models/fuzz", images=[pb.Image(content=i) for i in images])
    error: grpc.RpcError | None = None
    try:
        response = service.stub.Classify(request, timeout=30)
    except grpc.RpcError as err:
        error = err
    if error is None:
        assert len(response.classifications) == len(images)
        return grpc.StatusCode.OK
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    fields = {v.field for v in field_violations(error)}
    assert fields, error.details()
    assert fields <= {f"images[{i}].content" for i in range(len(images))}
    if good_first:
        assert "images[0].content" not in fields
    return grpc.StatusCode.INVALID_ARGUMENT


def _still_classifies(service: Inference) -> None:
    assert is_serving(service.process.target, "visiontune.v1.InferenceService", 5.0)
    response = service.classify("models/fuzz", solid_image(RED))
    assert response.classifications[0].top_k[0].label == "red"
    assert service.process.proc.poll() is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(malformed_images(), min_size=1, max_size=4), good_first=st.booleans())
def test_malformed_images_get_invalid_argument_and_never_break_the_service(
    service: Inference, bad: list[bytes], good_first: bool
) -> None:
    _classify_malformed(service, bad, good_first)


def test_the_service_still_serves_after_the_corpus(service: Inference) -> None:
    # Runs after the fuzz test in file order; on its own it is a plain smoke test.
    _still_classifies(service)


@pytest.mark.slow
def test_ten_thousand_malformed_images(service: Inference, capsys: pytest.CaptureFixture[str]) -> None:
    codes: Counter[str] = Counter()

    @settings(
        max_examples=SLOW_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bad=st.lists(malformed_images(), min_size=1, max_size=4), good_first=st.booleans())
    def send(bad: list[bytes], good_first: bool) -> None:
        codes[_classify_malformed(service, bad, good_first).name] += 1

    started = time.monotonic()
    send()
    seconds = time.monotonic() - started
    by_code = ", ".join(f"{code}={n}" for code, n in sorted(codes.items()))
    with capsys.disabled():
        print(f"\nfuzz: {codes.total()} Classify requests of malformed images, {by_code}, in {seconds:.1f} s")
    assert codes.total() >= SLOW_EXAMPLES
    _still_classifies(service)
