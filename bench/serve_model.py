"""The serving benchmark's inputs and model: photo-like JPEGs, the service's preprocessing of them, and a
MobileNetV2 exported and published the way the trainer does it, plus the same network as versions exported before
the uint8 input were (a float32 graph) (bench/serve.py's docstring has the method)."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format
from PIL import Image
from trainer_service.engine.models import WeightsUnavailable, build_classifier, export_torchscript, normalization
from trainer_service.jobs import results
from trainer_service.spec.config import Architecture, ModelConfig
from trainer_service.weights import load_base_weights
from visiontune.preprocessing import center_crop, decode_hwc, normalize
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, manifest_pb2, training_spec_pb2

MODEL_ID = "bench-serve"
VERSION_ID = "v1"  # the trainer's export: uint8 input, normalisation inside the graph
FLOAT_VERSION_ID = "float"  # the same network as a float32 graph, the manifest's input_format unset
PHOTO_SIDE = 256  # the encoded images' side: decode + resize to --size is part of Classify's work
INPUT_NAME, OUTPUT_NAME = results.INPUT_NAME, results.OUTPUT_NAME  # what the trainer's manifest names them


def make_jpegs(count: int, side: int, seed: int) -> list[bytes]:
    """Photo-like JPEGs (quality 90): a colour cast, smooth large-scale structure, a few edges, sensor noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
        cast = rng.uniform(0, 255, size=(1, 1, 3)).astype(np.float32)
        pixels = 0.55 * smooth + 0.35 * cast
        for _ in range(3):  # rectangles: edges for the JPEG coder and the network
            y, x = rng.integers(0, side * 3 // 4, size=2)
            h, w = rng.integers(side // 8, side // 3, size=2)
            pixels[y : y + h, x : x + w] = rng.uniform(0, 255, size=3)
        pixels += rng.normal(0, 8, size=pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def preprocess(jpegs: Sequence[bytes], size: int) -> np.ndarray[Any, Any]:
    """uint8 [N, 3, S, S] exactly as the service's `_preprocess` makes them (resize = crop = S): what it sends
    a version whose network normalises inside."""
    chw = torch.from_numpy(np.stack([decode_hwc(j, size) for j in jpegs])).permute(0, 3, 1, 2)
    return center_crop(chw, size).contiguous().numpy()


def normalized(pixels: np.ndarray[Any, Any], mean: Sequence[float], std: Sequence[float]) -> np.ndarray[Any, Any]:
    """float32 [N, 3, S, S] of `preprocess`'s pixels, as the service sends a version exported before."""
    return normalize(torch.from_numpy(pixels), mean, std).numpy()


def export_model(
    path: Path, float_path: Path, size: int, classes: int, weights: str, seed: int
) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """MobileNetV2 + a fresh head (`weights`: "imagenet" or "none" for its base), exported as the trainer
    exports it to `path`, and traced on float32 input as versions exported before to `float_path`;
    (weights described, mean, std)."""
    cfg = ModelConfig(architecture=Architecture.MOBILENET_V2)
    state = None
    described = "random initialisation (--weights none)"
    if weights == "imagenet":
        try:
            state = load_base_weights(cfg, None)
            described = "ImageNet IMAGENET1K_V1 base, random 10-label head"
        except WeightsUnavailable as err:
            print(f"note: {err}; serving randomly initialised weights instead", file=sys.stderr)
            described = "random initialisation (ImageNet weights unavailable)"
    torch.manual_seed(seed)
    model = build_classifier(cfg, classes, state).eval()
    mean, std = normalization(cfg)
    export_torchscript(model, size, path, mean=mean, std=std)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated", category=FutureWarning)
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, size, size)), str(float_path))  # type: ignore[no-untyped-call]
    return described, mean, std


def publish(
    store: ArtifactStore,
    weights: Path,
    labels: Sequence[str],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    version: str = VERSION_ID,
    input_format: manifest_pb2.InputFormat.ValueType = manifest_pb2.INPUT_FORMAT_UINT8_RGB,
) -> str:
    """The exported file plus a manifest built like the trainer's (`jobs/artifacts.publish_model_version`),
    committed as a model version (`input_format` unset: a version exported before the uint8 input)."""
    manifest = manifest_pb2.ModelManifest(
        schema_version=1,
        name=f"models/{MODEL_ID}/versions/{version}",
        labels=list(labels),
        architecture=training_spec_pb2.ARCHITECTURE_MOBILENET_V2,
        preprocessing=results.preprocessing(size, mean, std),
        weights=results.torchscript_weights(weights, size=size, num_labels=len(labels)),
        open_set=job_pb2.OpenSetResult(
            score=training_spec_pb2.OPEN_SET_SCORE_MAX_SOFTMAX, threshold=0.5, target_true_positive_rate=0.95
        ),
    )
    manifest.weights.input_format = input_format
    with store.begin_model_version(MODEL_ID, version) as writer:
        writer.put_file(results.MODEL_FILE, weights)
        writer.commit(json_format.MessageToJson(manifest).encode())
    return manifest.name


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated", category=FutureWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module.eval()
