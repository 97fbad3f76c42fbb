"""Shared by the tests that run a real inference service (with its real Triton server).

`publish_color_model` writes a real model version to the bucket (TorchScript weights, manifest, sha256),
made by hand rather than trained so its answers are known in advance: it scores an image by its mean
red, green and blue, so a pure red image is "red" with probability ~1 and a grey one scores 1/3 for every
label (an unknown at the default threshold).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format
from PIL import Image
from torch import nn
from trainer_service.jobs import results
from visiontune.devstack.launch import InferenceProcess, launch_inference
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore
from visiontune.v1 import (
    inference_service_pb2 as pb,
)
from visiontune.v1 import (
    inference_service_pb2_grpc,
    job_pb2,
    manifest_pb2,
    training_spec_pb2,
)

COLOR_LABELS = ("red", "green", "blue")
SERVICE = "visiontune.v1.InferenceService"


class ColorModel(nn.Module):
    """logits = scale * per-channel mean of the normalised image (mean 0.5, std 0.5: values in [-1, 1])."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * self.scale


def publish_model(
    store: ArtifactStore,
    model: str,
    version: str,
    network: nn.Module | Path,
    *,
    labels: Sequence[str],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    threshold: float,
    score: training_spec_pb2.OpenSetScore.ValueType = training_spec_pb2.OPEN_SET_SCORE_MAX_SOFTMAX,
    input_format: manifest_pb2.InputFormat.ValueType = manifest_pb2.INPUT_FORMAT_UNSPECIFIED,
) -> str:
    """Write `network` as TorchScript (or the TorchScript file `network`) plus its manifest as
    `models/{model}/versions/{version}`; returns the version's name. A module is traced on float32 input, as
    versions exported before the uint8 input were (`input_format` unset); a file says its own `input_format`."""
    name = f"models/{model}/versions/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / results.MODEL_FILE
        if isinstance(network, Path):
            shutil.copyfile(network, path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is "deprecated" in this torch; works
                traced = torch.jit.trace(network.eval(), torch.zeros(1, 3, size, size))
                torch.jit.save(traced, str(path))
        manifest = manifest_pb2.ModelManifest(
            schema_version=1,
            name=name,
            labels=list(labels),
            preprocessing=results.preprocessing(size, mean, std),
            weights=results.torchscript_weights(path, size=size, num_labels=len(labels)),
            open_set=job_pb2.OpenSetResult(score=score, threshold=threshold, target_true_positive_rate=0.95),
        )
        manifest.weights.input_format = input_format
        with store.begin_model_version(model, version) as writer:
            writer.put_file(results.MODEL_FILE, path)
            writer.commit(json_format.MessageToJson(manifest).encode())
    return name


def publish_color_model(
    store: ArtifactStore,
    model: str = "colors",
    version: str = "v1",
    *,
    scale: float = 10.0,
    threshold: float = 0.5,
    size: int = 16,
) -> str:
    return publish_model(
        store,
        model,
        version,
        ColorModel(scale),
        labels=COLOR_LABELS,
        size=size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        threshold=threshold,
    )


def solid_image(rgb: tuple[int, int, int], size: int = 24, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(out, fmt)
    return out.getvalue()


RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


@dataclass
class Inference:
    """A running inference service (visiontune.devstack.launch) and a gRPC stub on it."""

    process: InferenceProcess
    channel: grpc.Channel
    stub: inference_service_pb2_grpc.InferenceServiceStub

    def deploy(self, name: str, **kwargs: object) -> pb.Deployment:
        deployment: pb.Deployment = self.stub.DeployModel(
            pb.DeployModelRequest(model_version=name, **kwargs), timeout=180
        )
        return deployment

    def classify(self, model: str, *images: bytes, **kwargs: object) -> pb.ClassifyResponse:
        request = pb.ClassifyRequest(model=model, images=[pb.Image(content=i) for i in images], **kwargs)
        response: pb.ClassifyResponse = self.stub.Classify(request, timeout=60)
        return response

    def stop(self) -> None:
        self.channel.close()
        self.process.stop()


def start_inference(
    store: ArtifactStore, s3: S3ServerProcess, data_dir: Path, *args: str, timeout: float = 180.0
) -> Inference:
    """`python -m inference_service` (and so a Triton server) on free loopback ports against `store`'s bucket."""
    try:
        process = launch_inference(s3.settings(store.bucket), data_dir, *args, timeout=timeout)
    except RuntimeError as err:
        pytest.fail(str(err))
    channel = grpc.insecure_channel(process.target)
    return Inference(process, channel, inference_service_pb2_grpc.InferenceServiceStub(channel))


def restart(service: Inference, store: ArtifactStore, s3: S3ServerProcess) -> Inference:
    service.stop()
    return start_inference(store, s3, service.process.data_dir, *service.process.args)


def wait_ready(service: Inference, name: str, timeout: float = 180.0) -> pb.Deployment:
    """Poll ListDeployments until `name` is READY (restored deployments load in the background)."""
    deadline = time.monotonic() + timeout
    last: pb.Deployment | None = None
    while time.monotonic() < deadline:
        for d in service.stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10).deployments:
            if d.model_version == name:
                last = d
                if d.state == pb.DEPLOYMENT_STATE_READY:
                    return d
                if d.state == pb.DEPLOYMENT_STATE_FAILED:
                    pytest.fail(f"{name} failed to load: see {service.process.log}")
        time.sleep(0.5)
    pytest.fail(f"{name} not ready after {timeout} s (last: {last})")
