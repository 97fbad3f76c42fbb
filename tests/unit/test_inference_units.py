"""The inference service's plain parts, without Triton: feedback outcomes, routing by traffic weight and draining,
the manifest check and its input format, Triton model configs, GPU placement, and the metrics' rolling rate (the
prediction store has its own suite, test_prediction_store.py)."""

from __future__ import annotations

import argparse
import random
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inference_service.__main__ import add_arguments, jpeg_decoder
from inference_service.deployments import Deployment, DeploymentRegistry, DeploymentState, DeploySettings, NoLiveVersion
from inference_service.engine import input_dtype, network_input
from inference_service.feedback import Outcome, outcome
from inference_service.metrics import InferenceMetrics
from inference_service.placement import ALL_GPUS, Placement, Precision, placement_for
from inference_service.served_model import ManifestInvalid, from_manifest
from inference_service.triton.repository import TritonModelConfig, triton_model_name, write_model
from inference_service.triton.server import TRITON_DATATYPES
from visiontune.bootstrap import StartupError
from visiontune.names import ModelVersionName
from visiontune.openset import OpenSetScore
from visiontune.v1 import job_pb2, manifest_pb2, training_spec_pb2

# -- feedback -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "unknown", "truth", "expected"),
    [
        ("cat", False, "cat", Outcome.CORRECT),
        ("cat", False, "dog", Outcome.MISCLASSIFIED),
        ("cat", True, "cat", Outcome.FALSE_REJECTION),
        ("cat", True, "dog", Outcome.FALSE_REJECTION),
        ("cat", False, None, Outcome.FALSE_POSITIVE),
        ("cat", True, None, Outcome.TRUE_REJECTION),
    ],
)
def test_outcome_of_each_prediction_and_truth(label: str, unknown: bool, truth: str | None, expected: Outcome) -> None:
    assert outcome(predicted_label=label, predicted_unknown=unknown, true_label=truth) == expected


# -- routing -----------------------------------------------------------------------------------------------


def _deployment(version: str, weight: int, state: DeploymentState = DeploymentState.READY) -> Deployment:
    name = ModelVersionName("m", version)
    return Deployment(
        name=name,
        settings=DeploySettings(traffic_weight=weight),
        triton_model=triton_model_name(name),
        device="cpu",
        deploy_time=datetime.now(UTC),
        state=state,
    )


def test_traffic_is_split_by_weight_among_ready_versions() -> None:
    registry = DeploymentRegistry(rng=random.Random(0))
    registry.put(_deployment("v1", 300))
    registry.put(_deployment("v2", 100))
    registry.put(_deployment("v3", 500, DeploymentState.LOADING))  # not ready: no traffic
    registry.put(_deployment("v4", 0))  # weight 0: reachable only when pinned
    picks = []
    for _ in range(4000):
        with registry.lease("m") as d:
            picks.append(d.name.version)
    assert set(picks) == {"v1", "v2"}
    assert picks.count("v1") / len(picks) == pytest.approx(0.75, abs=0.03)
    with registry.lease("m", "v4") as pinned:
        assert pinned.name.version == "v4"


def test_no_live_version_says_whether_anything_is_deployed() -> None:
    registry = DeploymentRegistry()
    with pytest.raises(NoLiveVersion) as nothing, registry.lease("m"):
        pass
    assert not nothing.value.deployed
    registry.put(_deployment("v1", 100, DeploymentState.LOADING))
    with pytest.raises(NoLiveVersion, match="loading") as loading, registry.lease("m"):
        pass
    assert loading.value.deployed


def test_an_undeployed_version_is_drained_before_it_is_unloaded() -> None:
    registry = DeploymentRegistry()
    registry.put(_deployment("v1", 100))
    entered, release = threading.Event(), threading.Event()

    def request() -> None:
        with registry.lease("m"):
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=request)
    worker.start()
    entered.wait(10)
    removed = registry.remove(ModelVersionName("m", "v1"))
    assert removed is not None
    assert not DeploymentRegistry.wait_drained(removed, 0.2)  # a request still holds it
    release.set()
    assert DeploymentRegistry.wait_drained(removed, 10)
    worker.join()


# -- manifests and Triton configs ---------------------------------------------------------------------------


def _manifest(**changes: object) -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest(
        schema_version=1,
        name="models/m/versions/v1",
        labels=["a", "b"],
        preprocessing=manifest_pb2.Preprocessing(resize_size=32, crop_size=32, mean=[0.5] * 3, std=[0.25] * 3),
        weights=manifest_pb2.Weights(path="model.pt", format=manifest_pb2.WEIGHTS_FORMAT_TORCHSCRIPT, sha256="0" * 64),
        open_set=job_pb2.OpenSetResult(score=training_spec_pb2.OPEN_SET_SCORE_ENERGY, threshold=2.5),
    )
    for key, value in changes.items():
        if isinstance(value, list):
            getattr(manifest, key)[:] = value
        else:
            setattr(manifest, key, value)
    return manifest


def test_a_servable_manifest_becomes_a_typed_model() -> None:
    served = from_manifest(_manifest(), ModelVersionName("m", "v1"))
    assert served.labels == ("a", "b")
    assert (served.resize_size, served.crop_size) == (32, 32)
    assert served.score == OpenSetScore.ENERGY
    assert served.threshold == 2.5
    assert served.weights_key == "models/m/versions/v1/model.pt"
    assert (served.input_name, served.output_name) == ("images", "logits")
    assert not served.uint8_input  # input_format unset: a version exported before it, float32 normalised
    assert input_dtype(served) == np.float32


def test_the_input_format_chooses_what_the_service_sends() -> None:
    name = ModelVersionName("m", "v1")
    manifest = _manifest()
    manifest.weights.input_format = manifest_pb2.INPUT_FORMAT_UINT8_RGB
    uint8 = from_manifest(manifest, name)
    manifest.weights.input_format = manifest_pb2.INPUT_FORMAT_FLOAT32_NORMALIZED
    float32 = from_manifest(manifest, name)
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sent = network_input(crops, uint8)
    assert sent.dtype == np.uint8
    assert input_dtype(uint8) == np.uint8
    np.testing.assert_array_equal(sent, crops.numpy())
    normalised = network_input(crops, float32)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised, (crops.numpy() / 255 - 0.5) / 0.25, atol=1e-6)
    assert sent.nbytes * 4 == normalised.nbytes  # a quarter of the bytes to Triton
    manifest.weights.input_format = 7  # type: ignore[assignment]  # a format from a newer trainer
    with pytest.raises(ManifestInvalid, match="input format 7"):
        from_manifest(manifest, name)


def test_an_unservable_manifest_is_refused_with_every_problem() -> None:
    manifest = _manifest(schema_version=2, labels=["a"])
    manifest.weights.format = manifest_pb2.WEIGHTS_FORMAT_ONNX
    with pytest.raises(ManifestInvalid) as refused:
        from_manifest(manifest, ModelVersionName("m", "v1"))
    message = str(refused.value)
    for problem in ("schema_version 2", "labels", "ONNX"):
        assert problem in message


def _triton_config(**changes: Any) -> TritonModelConfig:
    """A model's Triton config: 3x32x32 in, 5 logits out, two instances; `changes` override any field."""
    fields: dict[str, Any] = {
        "name": "m__v1",
        "input_name": "images",
        "input_dims": (3, 32, 32),
        "output_name": "logits",
        "output_dims": (5,),
        "max_batch_size": 16,
        "max_queue_delay_us": 2000,
        "instance_count": 2,
    }
    return TritonModelConfig(**{**fields, **changes})


def test_triton_model_config_and_atomic_write(tmp_path: Path) -> None:
    config = _triton_config(torch_threads=1)
    text = config.pbtxt()
    for line in (
        'backend: "python"',
        "max_batch_size: 16",
        "dims: [3, 32, 32]",
        "dims: [5]",
        "max_queue_delay_microseconds: 2000",
        "count: 2 kind: KIND_CPU",
        "data_type: TYPE_FP32 dims: [3, 32, 32]",
        'name: "zeros_1" batch_size: 1',
        'name: "zeros_16" batch_size: 16',  # warmed at the largest batch too
        'key: "precision" value: { string_value: "fp32" }',
    ):
        assert line in text
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    written = write_model(tmp_path / "repo", config, weights)
    assert (written / "1" / "model.pt").read_bytes() == b"weights"
    assert (written / "1" / "model.py").read_text().startswith('"""The Triton Python-backend model')
    weights.write_bytes(b"new weights")
    write_model(tmp_path / "repo", config, weights)  # a redeploy replaces it whole
    assert (written / "1" / "model.pt").read_bytes() == b"new weights"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m__v1"]  # no staging leftovers


def test_gpu_triton_config_names_its_gpus_and_takes_uint8() -> None:
    config = _triton_config(
        max_batch_size=1,
        max_queue_delay_us=0,
        gpus=(0, 2),
        input_datatype=TRITON_DATATYPES[np.dtype(np.uint8)],
        precision=Precision.FP16.value,
    )
    text = config.pbtxt()
    assert "instance_group [{ count: 2 kind: KIND_GPU gpus: [0, 2] }]" in text
    assert 'input [{ name: "images" data_type: TYPE_UINT8 dims: [3, 32, 32] }]' in text
    assert "data_type: TYPE_UINT8 dims: [3, 32, 32] zero_data: true" in text
    assert text.count("batch_size: 1 count:") == 1  # max batch 1: one warm-up, not two of the same
    assert 'string_value: "fp16"' in text


# -- placement: --device, --gpus, --gpu-precision -----------------------------------------------------------


def test_placement_defaults_to_every_visible_gpu_in_fp32() -> None:
    assert placement_for("auto", ALL_GPUS, "fp32", visible=0) == Placement()
    assert placement_for("auto", ALL_GPUS, "fp32", visible=3) == Placement(gpus=(0, 1, 2))
    assert placement_for("cpu", ALL_GPUS, "fp32", visible=3).device == "cpu"
    chosen = placement_for("cuda", "2,0", "bf16", visible=3)
    assert (chosen.gpus, chosen.precision, chosen.device) == ((2, 0), Precision.BF16, "cuda")


@pytest.mark.parametrize(
    ("device", "gpus", "precision", "visible", "message"),
    [
        ("cuda", "0,3", "fp32", 2, "GPU(s) [3] do not exist: 2 visible"),
        ("cuda", "1,1", "fp32", 2, "repeat"),
        ("cuda", "one", "fp32", 2, "comma-separated GPU indices"),
        ("cuda", ALL_GPUS, "fp32", 0, "no CUDA device"),
        ("cpu", ALL_GPUS, "fp16", 2, "needs a GPU"),
        ("auto", ALL_GPUS, "fp16", 0, "needs a GPU"),
        ("cuda", ALL_GPUS, "int8", 1, "--gpu-precision 'int8'"),
    ],
)
def test_placement_refuses_what_triton_could_not_honour(
    device: str, gpus: str, precision: str, visible: int, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        placement_for(device, gpus, precision, visible)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_jpeg_decoding_is_off_by_default_and_refused_without_cuda() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert jpeg_decoder(parser.parse_args([])) is None
    with pytest.raises(StartupError, match="--gpu-jpeg-min-pixels is set, but torch sees no CUDA device"):
        jpeg_decoder(parser.parse_args(["--gpu-jpeg-min-pixels", "1000000"]))


# -- metrics -----------------------------------------------------------------------------------------------


def test_rolling_false_positive_rate_and_deployment_gauges() -> None:
    metrics = InferenceMetrics(rate_window=3)
    rates = [metrics.record_unknown_feedback("m", "v1", accepted=a) for a in (True, False, True, True, False)]
    assert rates == pytest.approx([1.0, 0.5, 2 / 3, 2 / 3, 2 / 3])
    metrics.set_deployments({("m", "v1"): 100, ("m", "v2"): 5}, {"m"})
    text = metrics.exposition().decode()
    assert 'visiontune_inference_deployed_versions{model="m"} 2.0' in text
    assert 'visiontune_inference_traffic_weight{model="m",version="v2"} 5.0' in text
    metrics.set_deployments({}, set())
    metrics.forget_version("m", "v1")
    text = metrics.exposition().decode()
    assert 'visiontune_inference_deployed_versions{model="m"} 0.0' in text  # stays, at 0
    assert "visiontune_inference_traffic_weight{" not in text
    assert "visiontune_inference_unknown_false_positive_rate{" not in text
    assert metrics.record_unknown_feedback("m", "v1", accepted=False) == 0.0  # a fresh window


def test_lease_snapshots_do_not_leak_registry_state() -> None:
    registry = DeploymentRegistry()
    registry.put(_deployment("v1", 100))
    with registry.lease("m") as held:
        held.settings = DeploySettings(traffic_weight=1)  # a caller scribbling on its copy
    listed = registry.list("m")
    assert listed[0].settings.traffic_weight == 100
    assert listed[0].in_flight == 0
