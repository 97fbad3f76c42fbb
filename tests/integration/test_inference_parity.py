"""Parity: an image gets the same probabilities from Classify (through Triton) as from the trainer's evaluation.

The model is what the trainer ships: a MobileNetV2 `Classifier` with ImageNet weights (shipped offline) and
a fresh head, exported by the trainer's `export_torchscript` (uint8 input, normalisation inside the graph), with
the trainer's normalisation in its manifest. The same classifier is also published as versions exported before
that change were (a float32 graph, the manifest's input_format unset, the service normalising): both versions,
live side by side, give the trainer's probabilities. The trainer's side decodes with its dataset pipeline and
runs `loop.predict` (the evaluation path); the inference side is a real service with a real Triton. The images
vary what preprocessing must get right: JPEG with EXIF rotation, a palette PNG with alpha, greyscale, 16-bit, a
large image that is shrunk while decoding, and a non-square one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.integration.inference_helpers import publish_model, start_inference
from trainer_service.engine.batches import Split
from trainer_service.engine.context import RunContext
from trainer_service.engine.loop import predict
from trainer_service.engine.models import build_classifier, export_torchscript, normalization
from trainer_service.spec.config import ModelConfig
from trainer_service.weights import load_base_weights
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.preprocessing import decode_image
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb
from visiontune.v1 import manifest_pb2
from visiontune.weights_cache import seed_weights_cache

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LABELS = ("bird", "boat", "cat", "tree")
SIZE = 64


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((rng.integers(0, 65535, (50, 40))).astype(np.uint16))
    gradient = np.linspace(0, 255, 1600 * 1200 * 3).reshape(1200, 1600, 3).astype(np.uint8)
    return {
        "photo.jpg": _encode(photo, "JPEG", quality=90, exif=exif.tobytes()),
        "palette.png": _encode(palette, "PNG"),
        "grey.png": _encode(photo.convert("L"), "PNG"),
        "sixteen.png": _encode(sixteen, "PNG"),
        "large.jpg": _encode(Image.fromarray(gradient), "JPEG", quality=85),
        "wide.webp": _encode(photo.resize((400, 100)), "WEBP", quality=90),
    }


@pytest.mark.parametrize(
    "gpu_jpeg",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="JPEG decoding on the GPU needs CUDA"),
            id="jpeg-on-gpu",
        ),
    ],
)
def test_classify_matches_the_trainers_evaluation(
    store: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu_jpeg: bool
) -> None:
    """With --gpu-jpeg-min-pixels the JPEGs are decoded by nvJPEG, which agrees with the trainer's decoder to a few
    uint8 levels (tests/unit/test_jpeg_on_device.py), not bit for bit: their probabilities then agree to 0.02, the
    other formats' still to 1e-5."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    seed_weights_cache()  # the shipped MobileNetV2 checkpoint, so features are real ImageNet features
    config = ModelConfig()
    torch.manual_seed(0)
    model = build_classifier(config, len(LABELS), load_base_weights(config, None)).eval()
    mean, std = normalization(config)
    images = _images()

    # The trainer's side: its decoder, its evaluation loop.
    decoded = [decode_image(data, SIZE) for data in images.values()]
    assert all(d is not None for d in decoded)
    split = Split(
        images=torch.stack([d for d in decoded if d is not None]).numpy(),
        targets=np.zeros(len(decoded), dtype=np.int64),
    )
    ctx = RunContext(device=torch.device("cpu"), autocast_dtype=None, workers=0, mean=mean, std=std)
    trainer_probs = predict(model, split, ctx).softmax(dim=1).numpy()
    assert trainer_probs.std(axis=0).max() > 1e-3  # the images really get different answers

    # The inference side: the trainer's export, a real service and Triton.
    weights = tmp_path / "model.pt"
    export_torchscript(model, SIZE, weights, mean=mean, std=std)
    uint8 = publish_model(
        store,
        "parity",
        "uint8",
        weights,
        labels=LABELS,
        size=SIZE,
        mean=mean,
        std=std,
        threshold=0.5,
        input_format=manifest_pb2.INPUT_FORMAT_UINT8_RGB,
    )
    legacy = publish_model(store, "parity", "float", model, labels=LABELS, size=SIZE, mean=mean, std=std, threshold=0.5)
    service = start_inference(store, s3_server, tmp_path / "inference", *(["--gpu-jpeg-min-pixels", "1"] * gpu_jpeg))
    try:
        service.deploy(uint8)
        service.deploy(legacy, max_batch_size=8)  # warmed at batch 1 and 8
        config = service.process.data_dir / "inference" / "triton" / "models" / "parity__uint8" / "config.pbtxt"
        assert "data_type: TYPE_UINT8" in config.read_text()
        responses = {name: service.classify(name, *images.values(), top_k=len(LABELS)) for name in (uint8, legacy)}
    finally:
        service.stop()

    served = {}
    for name, response in responses.items():
        assert isinstance(response, pb.ClassifyResponse)
        assert response.model_version == name
        probs = np.zeros_like(trainer_probs)
        for c in response.classifications:
            for entry in c.top_k:
                probs[c.index, LABELS.index(entry.label)] = entry.score
            assert c.unknown_score == pytest.approx(float(probs[c.index].max()), abs=1e-6)
        jpeg = np.array([n.endswith(".jpg") and gpu_jpeg for n in images])
        tolerance = np.where(jpeg, 0.02, 1e-5)[:, None]
        assert (np.abs(probs - trainer_probs) <= tolerance).all(), f"{name}, images: {list(images)}"
        np.testing.assert_array_equal(probs.argmax(axis=1), trainer_probs.argmax(axis=1))
        served[name] = probs
    # The uint8-input served graph against today's float path, through the same Triton.
    np.testing.assert_allclose(served[uint8], served[legacy], atol=1e-5)
