"""The Job of one attempt, and the executor's settings: what Kubernetes is asked for follows the spec and the flags."""

from __future__ import annotations

import argparse
import json

import kubernetes_validate
import pytest
from trainer_service.jobs.kubernetes import manifest
from trainer_service.jobs.kubernetes.settings import (
    KubernetesSettings,
    KubernetesSettingsError,
    add_arguments,
    settings_from_args,
)
from trainer_service.jobs.records import JobRecord, JobState, utc_now
from trainer_service.spec.config import DeviceKind


def _record(job_id: str = "job-3f9a1c2b7d4e", attempt: int = 2, **extra: object) -> JobRecord:
    now = utc_now()
    fields: dict[str, object] = {
        "job_id": job_id,
        "state": JobState.RUNNING,
        "spec_json": "{}",
        "display_name": "",
        "request_id": None,
        "create_time": now,
        "update_time": now,
        "start_time": now,
        "end_time": None,
        "attempt": attempt,
        "error": None,
        "result_json": None,
        "labels": {},
        "study_id": None,
        "trial_number": None,
        "owner": "r1",
    }
    fields.update(extra)
    return JobRecord(**fields)  # type: ignore[arg-type]


def _settings(*argv: str) -> KubernetesSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(["--k8s-worker-image", "visiontune/trainer:1", *argv]))


GPU_FLAGS = (
    "--k8s-gpu-node-selector",
    "nvidia.com/gpu.present=true",
    "--k8s-gpu-tolerations",
    "nvidia.com/gpu:NoSchedule,dedicated=ml:NoExecute",
    "--k8s-worker-env-from",
    "configmap:visiontune-settings,secret:visiontune-s3",
)


def test_a_cuda_job_requests_a_gpu_and_lands_on_gpu_nodes() -> None:
    job = manifest.job_manifest(_record(study_id="study-1", trial_number=4), DeviceKind.CUDA, _settings(*GPU_FLAGS))
    kubernetes_validate.validate(json.loads(json.dumps(job)), "1.32.0", strict=True)
    assert job["metadata"]["name"] == "vt-job-3f9a1c2b7d4e-2"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
    ]
    assert container["envFrom"] == [
        {"configMapRef": {"name": "visiontune-settings"}},
        {"secretRef": {"name": "visiontune-s3"}},
    ]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[manifest.LABEL_STUDY] == "study-1"
    assert labels[manifest.LABEL_TRIAL] == "4"
    assert labels[manifest.LABEL_WORKER] == job["metadata"]["name"]
    assert container["command"][-4:] == ["--job", "job-3f9a1c2b7d4e", "--data-dir", "/var/lib/visiontune"]
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("device", "auto_gpu", "gpu"), [("cpu", True, False), ("auto", False, False), ("auto", True, True)]
)
def test_cpu_and_auto_jobs(device: str, auto_gpu: bool, gpu: bool) -> None:
    flags = (*GPU_FLAGS, "--k8s-auto-device-gpu") if auto_gpu else GPU_FLAGS
    job = manifest.job_manifest(_record(), DeviceKind(device), _settings(*flags))
    pod = job["spec"]["template"]["spec"]
    assert ("nvidia.com/gpu" in pod["containers"][0]["resources"]["limits"]) is gpu
    assert ("nodeSelector" in pod) is gpu


def test_long_ids_still_make_valid_unique_names() -> None:
    a, b = "a" * 62 + "x", "a" * 62 + "y"
    names = {manifest.job_name(a, 10), manifest.job_name(b, 10)}
    assert len(names) == 2
    for name in names:
        assert len(name) <= 63
        assert name.endswith("-10")
    assert manifest.label_value("ends-with-dash-").startswith("h-")


def test_every_bad_setting_is_reported_at_once() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--k8s-max-jobs", "0", "--k8s-gpu-tolerations", "x:Sometimes", "--k8s-worker-env-from", "volume:x"]
    )
    with pytest.raises(KubernetesSettingsError) as caught:
        settings_from_args(args)
    message = str(caught.value)
    for part in ("--k8s-worker-image is required", "--k8s-max-jobs", "--k8s-gpu-tolerations", "--k8s-worker-env-from"):
        assert part in message


@pytest.mark.parametrize(("device", "gpus"), [("cuda", "4"), ("cpu", None)])
def test_a_job_on_several_devices_asks_its_one_pod_for_that_many_gpus(device: str, gpus: str | None) -> None:
    job = manifest.job_manifest(_record(), DeviceKind(device), _settings(*GPU_FLAGS), devices=4)
    kubernetes_validate.validate(json.loads(json.dumps(job)), "1.32.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # One pod for the job's processes: rank 0 (the worker) starts the others on the same node.
    assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus
    assert "parallelism" not in job["spec"]  # Kubernetes' default: one pod
