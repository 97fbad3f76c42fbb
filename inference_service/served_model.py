"""A model version as inference needs it: read once from its manifest, checked, typed.

Everything the service does with a version (preprocess, name Triton's tensors, label the outputs, make
the open-set decision) comes from here; nothing reads the manifest protobuf after `from_manifest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from google.protobuf import json_format
from visiontune.names import ModelVersionName
from visiontune.openset import OpenSetScore
from visiontune.v1 import manifest_pb2, training_spec_pb2

SCHEMA_VERSION: Final = 1

# What the network's input holds -> what the service sends Triton: True for uint8 pixels (the network normalises),
# False for float32 it normalised itself (every version exported before the manifest said).
_UINT8_INPUT: Final = {
    manifest_pb2.INPUT_FORMAT_UNSPECIFIED: False,
    manifest_pb2.INPUT_FORMAT_FLOAT32_NORMALIZED: False,
    manifest_pb2.INPUT_FORMAT_UINT8_RGB: True,
}

_SCORES: Final = {
    training_spec_pb2.OPEN_SET_SCORE_MAX_SOFTMAX: OpenSetScore.MAX_SOFTMAX,
    training_spec_pb2.OPEN_SET_SCORE_UNSPECIFIED: OpenSetScore.MAX_SOFTMAX,
    training_spec_pb2.OPEN_SET_SCORE_ENERGY: OpenSetScore.ENERGY,
}


class ManifestInvalid(ValueError):
    """The manifest cannot be served; the message names the version and every problem."""


@dataclass(frozen=True)
class ServedModel:
    name: ModelVersionName
    labels: tuple[str, ...]
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    score: OpenSetScore
    threshold: float
    weights_path: str  # relative to the version's prefix
    weights_sha256: str
    weights_size: int
    input_name: str
    output_name: str
    uint8_input: bool = False  # the manifest's input_format: uint8 pixels in, normalisation inside the network

    @property
    def weights_key(self) -> str:
        return self.name.prefix + self.weights_path

    def threshold_bounds(self) -> tuple[float, float]:
        """The range a per-request threshold override may take: the score's own range."""
        if self.score == OpenSetScore.MAX_SOFTMAX:
            return 0.0, 1.0
        return -1e6, 1e6  # energy (logsumexp) is unbounded; this only keeps overrides finite and sane


def parse_manifest(data: bytes, name: ModelVersionName) -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest()
    try:
        json_format.Parse(data, manifest, ignore_unknown_fields=True)
    except json_format.ParseError as err:
        raise ManifestInvalid(f"{name}: manifest.json is not a valid manifest: {err}") from err
    return manifest


def from_manifest(manifest: manifest_pb2.ModelManifest, name: ModelVersionName) -> ServedModel:
    """Check that `manifest` describes a version this service can serve; raises ManifestInvalid listing
    every problem."""
    problems: list[str] = []
    if manifest.schema_version != SCHEMA_VERSION:
        problems.append(f"schema_version {manifest.schema_version} (this service reads {SCHEMA_VERSION})")
    if manifest.name and manifest.name != str(name):
        problems.append(f"name is {manifest.name!r}, not {str(name)!r}")
    labels = tuple(manifest.labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        problems.append(f"labels must be 2 or more distinct names, got {list(labels)}")
    pre = manifest.preprocessing
    crop = pre.crop_size or pre.resize_size
    if pre.resize_size < 1 or not 1 <= crop <= pre.resize_size:
        problems.append(f"preprocessing sizes resize {pre.resize_size}, crop {pre.crop_size}")
    if pre.interpolation not in (manifest_pb2.INTERPOLATION_UNSPECIFIED, manifest_pb2.INTERPOLATION_BILINEAR):
        problems.append(f"interpolation {manifest_pb2.Interpolation.Name(pre.interpolation)} (only bilinear)")
    if len(pre.mean) != 3 or len(pre.std) != 3 or any(s <= 0 for s in pre.std):
        problems.append(f"preprocessing mean/std need 3 values, std > 0: {list(pre.mean)}, {list(pre.std)}")
    weights = manifest.weights
    if weights.format != manifest_pb2.WEIGHTS_FORMAT_TORCHSCRIPT:
        problems.append(f"weights format {manifest_pb2.WeightsFormat.Name(weights.format)} (only TorchScript)")
    if not weights.path or len(weights.sha256) != 64:
        problems.append("weights need a path and a sha256")
    uint8_input = _UINT8_INPUT.get(weights.input_format)
    if uint8_input is None:
        problems.append(f"unknown weights input format {weights.input_format}")
    score = _SCORES.get(manifest.open_set.score)
    if score is None:
        problems.append(f"unknown open-set score {manifest.open_set.score}")
    if not math.isfinite(manifest.open_set.threshold):
        problems.append(f"open-set threshold {manifest.open_set.threshold}")
    if problems:
        raise ManifestInvalid(f"{name} cannot be served: " + "; ".join(problems))
    assert score is not None
    assert uint8_input is not None
    return ServedModel(
        name=name,
        labels=labels,
        resize_size=pre.resize_size,
        crop_size=crop,
        mean=(pre.mean[0], pre.mean[1], pre.mean[2]),
        std=(pre.std[0], pre.std[1], pre.std[2]),
        score=score,
        threshold=manifest.open_set.threshold,
        weights_path=weights.path,
        weights_sha256=weights.sha256.lower(),
        weights_size=weights.size_bytes,
        input_name=weights.input_name or "images",
        output_name=weights.output_name or "logits",
        uint8_input=uint8_input,
    )
