"""The inference service's plain parts, without Triton: feedback outcomes, routing by traffic weight and draining,
the manifest check, Triton model configs, and the metrics' rolling rate (the prediction store has its own suite,
test_prediction_store.py)."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from inference_service.deployments import Deployment, DeploymentRegistry, DeploymentState, DeploySettings, NoLiveVersion
from inference_service.feedback import Outcome, outcome
from inference_service.metrics import InferenceMetrics
from inference_service.served_model import ManifestInvalid, from_manifest
from inference_service.triton.repository import TritonModelConfig, triton_model_name, write_model
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


def test_an_unservable_manifest_is_refused_with_every_problem() -> None:
    manifest = _manifest(schema_version=2, labels=["a"])
    manifest.weights.format = manifest_pb2.WEIGHTS_FORMAT_ONNX
    with pytest.raises(ManifestInvalid) as refused:
        from_manifest(manifest, ModelVersionName("m", "v1"))
    message = str(refused.value)
    for problem in ("schema_version 2", "labels", "ONNX"):
        assert problem in message


def test_triton_model_config_and_atomic_write(tmp_path: Path) -> None:
    config = TritonModelConfig(
        name="m__v1",
        input_name="images",
        input_dims=(3, 32, 32),
        output_name="logits",
        output_dims=(5,),
        max_batch_size=16,
        max_queue_delay_us=2000,
        instance_count=2,
        gpu=False,
        torch_threads=1,
    )
    text = config.pbtxt()
    for line in (
        'backend: "python"',
        "max_batch_size: 16",
        "dims: [3, 32, 32]",
        "dims: [5]",
        "max_queue_delay_microseconds: 2000",
        "count: 2 kind: KIND_CPU",
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
