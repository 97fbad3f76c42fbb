"""Triton system shared memory against a real Triton: the inference service's own (started as in
test_inference.py, shared memory off there), with the colour model deployed; each test drives it through a
`TritonModels` of its own, on shared memory, and reads Triton's registrations through its status API.

The colour model takes float32 [N, 3, 16, 16] (3 KiB an image) and answers 10 x each channel's mean, so every
answer is known exactly. The last test starts a service of its own with --triton-shared-memory-min-bytes.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from inference_service.triton import server as triton_server
from inference_service.triton.server import TritonModels
from tests.integration.inference_helpers import (
    BLUE,
    GREEN,
    GREY,
    RED,
    Inference,
    publish_color_model,
    solid_image,
    start_inference,
)
from tritonclient.utils import InferenceServerException
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "shm__v1"
IMAGE_BYTES = 3 * 16 * 16 * 4
THRESHOLD = 2 * IMAGE_BYTES  # a batch of two images or more goes through shared memory
DEV_SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def bucket(s3_server: S3ServerProcess) -> ArtifactStore:
    store = ArtifactStore.connect(s3_server.settings("shm-" + secrets.token_hex(4)))
    store.ensure_bucket()
    return store


@pytest.fixture(scope="module")
def service(
    bucket: ArtifactStore, s3_server: S3ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Inference]:
    running = start_inference(bucket, s3_server, tmp_path_factory.mktemp("inference"))
    try:
        running.deploy(publish_color_model(bucket, "shm"), max_batch_size=32)
        yield running
    finally:
        running.stop()


@pytest.fixture
def triton(service: Inference) -> Iterator[triton_grpc.InferenceServerClient]:
    """A plain client on the service's Triton, to read its shared memory status."""
    client = triton_grpc.InferenceServerClient(service.process.triton_grpc)
    yield client
    client.close()


@pytest.fixture
def models(service: Inference) -> Iterator[TritonModels]:
    on = TritonModels(service.process.triton_grpc, THRESHOLD)
    yield on
    on.close()


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 16, 16)).astype(np.float32)


def _expected(batch: np.ndarray) -> np.ndarray:
    return batch.mean(axis=(2, 3)) * 10


def _regions(triton: triton_grpc.InferenceServerClient, prefix: str | None) -> dict[str, int]:
    """Triton's registered regions of one `TritonModels` (by their name's prefix) -> byte size."""
    assert prefix is not None
    status = triton.get_system_shared_memory_status()
    return {name: int(r.byte_size) for name, r in status.regions.items() if name.startswith(prefix)}


def _unregister(triton: triton_grpc.InferenceServerClient, name: str) -> None:
    # Triton releases a request's regions just after answering: "currently in use" for a few milliseconds.
    deadline = time.monotonic() + 5
    while True:
        try:
            triton.unregister_system_shared_memory(name)
            return
        except InferenceServerException as err:
            if "in use" not in (err.message() or "") or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_a_batch_gives_the_same_output_through_shared_memory_as_inline(
    service: Inference, models: TritonModels, triton: triton_grpc.InferenceServerClient
) -> None:
    inline = TritonModels(service.process.triton_grpc)
    try:
        batch = _batch(8)
        through_inline = inline.infer(MODEL, "images", "logits", batch)
        through_shm = models.infer(MODEL, "images", "logits", batch)
    finally:
        inline.close()
    assert (models.shared_memory_infers, models.inline_infers) == (1, 0)
    assert inline.inline_infers == 1
    assert through_shm.dtype == np.float32
    assert through_shm.shape == (8, 3)
    assert np.array_equal(through_shm, through_inline)
    assert np.allclose(through_shm, _expected(batch), atol=1e-5)
    # One input and one output region, registered by name with Triton, backed by /dev/shm here.
    regions = _regions(triton, models.shared_memory_prefix)
    assert sorted(regions.values()) == [8 * 3 * 4, 8 * IMAGE_BYTES]
    assert all((DEV_SHM / name).is_file() for name in regions)


def test_batches_below_the_threshold_go_inline(models: TritonModels, triton: triton_grpc.InferenceServerClient) -> None:
    one = _batch(1)
    assert np.allclose(models.infer(MODEL, "images", "logits", one), _expected(one), atol=1e-5)
    assert (models.shared_memory_infers, models.inline_infers) == (0, 1)
    assert _regions(triton, models.shared_memory_prefix) == {}  # nothing was registered for it
    two = _batch(2)
    assert np.allclose(models.infer(MODEL, "images", "logits", two), _expected(two), atol=1e-5)
    assert (models.shared_memory_infers, models.inline_infers) == (1, 1)


def test_regions_are_reused_grow_for_a_larger_batch_and_are_released_on_close(
    service: Inference, triton: triton_grpc.InferenceServerClient
) -> None:
    models = TritonModels(service.process.triton_grpc, THRESHOLD)
    prefix = models.shared_memory_prefix
    for n in (2, 2):
        batch = _batch(n)
        assert np.allclose(models.infer(MODEL, "images", "logits", batch), _expected(batch), atol=1e-5)
    small = _regions(triton, prefix)
    assert sorted(small.values()) == [2 * 3 * 4, 2 * IMAGE_BYTES]  # the second call reused the first's regions

    big = _batch(16, seed=1)
    assert np.allclose(models.infer(MODEL, "images", "logits", big), _expected(big), atol=1e-5)
    grown = _regions(triton, prefix)
    assert sorted(grown.values()) == [16 * 3 * 4, 16 * IMAGE_BYTES]
    assert not set(grown) & set(small)  # the small regions were replaced, in Triton and in /dev/shm
    assert not any((DEV_SHM / name).exists() for name in small)
    two = _batch(2, seed=2)
    assert np.allclose(models.infer(MODEL, "images", "logits", two), _expected(two), atol=1e-5)
    assert _regions(triton, prefix) == grown  # a smaller batch fits the grown pair
    assert models.shared_memory_infers == 4

    models.close()
    assert _regions(triton, prefix) == {}
    assert not any((DEV_SHM / name).exists() for name in grown)


def test_concurrent_calls_share_a_bounded_pool_of_regions(
    service: Inference, triton: triton_grpc.InferenceServerClient
) -> None:
    models = TritonModels(service.process.triton_grpc, THRESHOLD, shared_memory_regions=2)
    wrong: list[str] = []

    def calls(worker: int) -> None:
        for i in range(6):
            batch = _batch(2 + (worker + i) % 7, seed=worker * 100 + i)
            out = models.infer(MODEL, "images", "logits", batch)
            if not np.allclose(out, _expected(batch), atol=1e-5):
                wrong.append(f"worker {worker}, call {i}")

    try:
        threads = [threading.Thread(target=calls, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert wrong == []
        assert models.shared_memory_infers + models.inline_infers == 36
        assert models.shared_memory_infers > 0
        assert len(_regions(triton, models.shared_memory_prefix)) <= 4  # two pairs at most
        assert models.shared_memory_off is None
    finally:
        models.close()
    assert _regions(triton, models.shared_memory_prefix) == {}


def test_a_triton_that_cannot_register_the_regions_gets_inline_batches_after_one_warning(
    service: Inference,
    triton: triton_grpc.InferenceServerClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Triton on another host (or pod) cannot open this host's /dev/shm: registering fails there with an
    # InferenceServerException. Only the register call is replaced, to play that Triton; inference is real.
    def remote_triton(self: object, name: str, key: str, byte_size: int, *args: object, **kwargs: object) -> None:
        raise InferenceServerException(f"Unable to open shared memory region: '{key}'")

    monkeypatch.setattr(triton_grpc.InferenceServerClient, "register_system_shared_memory", remote_triton)
    models = TritonModels(service.process.triton_grpc, THRESHOLD)
    prefix = models.shared_memory_prefix
    try:
        with caplog.at_level(logging.WARNING, logger="inference_service.triton.server"):
            for seed in range(3):
                batch = _batch(8, seed=seed)
                assert np.allclose(models.infer(MODEL, "images", "logits", batch), _expected(batch), atol=1e-5)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "shared memory is off" in warnings[0].getMessage()
        assert "Unable to open shared memory region" in warnings[0].getMessage()
        assert (models.shared_memory_infers, models.inline_infers) == (0, 3)
        assert models.shared_memory_off is not None
        assert list(DEV_SHM.glob(f"{prefix}-*")) == []  # the region made for the refused registration is gone
    finally:
        models.close()


def test_an_inference_triton_refuses_on_the_regions_is_answered_inline_and_turns_shared_memory_off(
    service: Inference,
    triton: triton_grpc.InferenceServerClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Registered fine, then refused at inference: an output region too small for the answer (as a wrong size
    # from the model's metadata would make it). Triton's own error, on a real call.
    monkeypatch.setattr(triton_server, "output_byte_size", lambda shape, datatype, batch: 4)
    models = TritonModels(service.process.triton_grpc, THRESHOLD)
    prefix = models.shared_memory_prefix
    try:
        with caplog.at_level(logging.WARNING, logger="inference_service.triton.server"):
            for seed in range(2):
                batch = _batch(4, seed=seed)
                assert np.allclose(models.infer(MODEL, "images", "logits", batch), _expected(batch), atol=1e-5)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"could not run {MODEL} on shared memory" in warnings[0]
        assert models.shared_memory_infers == 0
        assert models.inline_infers == 2
        assert _regions(triton, prefix) == {}  # unregistered when it was turned off
    finally:
        models.close()


def test_regions_triton_lost_are_registered_again(
    models: TritonModels, triton: triton_grpc.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    batch = _batch(4)
    models.infer(MODEL, "images", "logits", batch)
    lost = _regions(triton, models.shared_memory_prefix)
    for name in lost:  # what a restarted Triton (the supervisor's) would have forgotten
        _unregister(triton, name)
    with caplog.at_level(logging.INFO, logger="inference_service.triton.server"):
        again = _batch(4, seed=3)
        assert np.allclose(models.infer(MODEL, "images", "logits", again), _expected(again), atol=1e-5)  # inline
        assert np.allclose(models.infer(MODEL, "images", "logits", batch), _expected(batch), atol=1e-5)
    assert "lost its shared memory registrations" in caplog.text
    assert models.shared_memory_off is None
    assert models.shared_memory_infers == 2
    registered = _regions(triton, models.shared_memory_prefix)
    assert len(registered) == 2
    assert not set(registered) & set(lost)


def test_a_service_started_with_the_flag_classifies_through_shared_memory(
    bucket: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path
) -> None:
    flagged = start_inference(bucket, s3_server, tmp_path / "inference", "--triton-shared-memory-min-bytes", "1")
    try:
        flagged.deploy(publish_color_model(bucket, "flagged"))
        response = flagged.classify("models/flagged", *(solid_image(c) for c in (RED, GREEN, BLUE, GREY)))
        assert [c.top_k[0].label for c in response.classifications[:3]] == ["red", "green", "blue"]
        assert [c.unknown for c in response.classifications] == [False, False, False, True]
        triton = triton_grpc.InferenceServerClient(flagged.process.triton_grpc)
        try:
            regions = triton.get_system_shared_memory_status().regions
        finally:
            triton.close()
        assert sorted(name.rpartition("-")[2] for name in regions) == ["input", "output"]
        assert all(name.startswith(f"visiontune-{flagged.process.proc.pid}-") for name in regions)
    finally:
        flagged.stop()
    assert "through system shared memory" in flagged.process.log.read_text()
