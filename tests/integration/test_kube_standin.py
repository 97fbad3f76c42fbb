"""The test control plane and its stand-in kubelet (tests/standin_kubelet.py, the one fake) behave as Kubernetes
does where the executor's tests rely on it: the real Job controller, scheduler and garbage collector act on what the
stand-in reports."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from kubernetes import client as k8s
from tests.conftest import Kube
from tests.integration.kube_trainer import wait_for


def _job(name: str, script: str, *, image: str = "visiontune/trainer:test", gpus: int = 0) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "c",
        "image": image,
        "command": ["sh", "-c", script],
        "env": [
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            # The stand-in gives each container a file of its own for the path (it mounts nothing).
            {"name": "TERM_FILE", "value": "/dev/termination-log"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"t": name}},
                "spec": {"restartPolicy": "Never", "containers": [container]},
            },
        },
    }


@pytest.fixture
def cluster(kube: Kube) -> Kube:
    k8s.CoreV1Api(kube.api_client).create_namespaced_secret(
        kube.namespace, {"metadata": {"name": "s"}, "stringData": {"k": "secret-value"}}
    )
    return kube


def _run(kube: Kube, name: str, script: str, **kw: Any) -> None:
    k8s.BatchV1Api(kube.api_client).create_namespaced_job(kube.namespace, _job(name, script, **kw))


def _pod(kube: Kube, name: str) -> Any:
    pods = wait_for(
        lambda: k8s.CoreV1Api(kube.api_client).list_namespaced_pod(kube.namespace, label_selector=f"t={name}").items,
        30,
        f"a pod of {name}",
    )
    return pods[0]


def _condition(kube: Kube, name: str, kind: str) -> Any:
    def find() -> Any:
        job = k8s.BatchV1Api(kube.api_client).read_namespaced_job(name, kube.namespace)
        return next((c for c in job.status.conditions or [] if c.type == kind and c.status == "True"), None)

    return wait_for(find, 30, "the stand-in's report")


def test_exit_codes_messages_and_env_reach_the_job_controller(cluster: Kube) -> None:
    _run(cluster, "fails", 'echo "$FROM_SECRET" > "$TERM_FILE"; exit 3')
    _run(cluster, "works", 'test "$FROM_SECRET" = secret-value')
    assert _condition(cluster, "fails", "Failed").reason == "BackoffLimitExceeded"
    _condition(cluster, "works", "Complete")
    terminated = _pod(cluster, "fails").status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message.strip()) == (3, "Error", "secret-value")


def test_a_gpu_request_above_the_node_s_stays_unschedulable(cluster: Kube) -> None:
    _run(cluster, "big", "true", gpus=8)

    def unschedulable() -> Any:
        pod = _pod(cluster, "big")
        return next(
            (c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.reason == "Unschedulable"), None
        )

    assert "nvidia.com/gpu" in wait_for(unschedulable, 30, "the scheduler's verdict").message


def test_an_unknown_image_is_not_pulled(cluster: Kube) -> None:
    _run(cluster, "noimage", "true", image="example.invalid/none:1")

    def waiting() -> Any:
        statuses = _pod(cluster, "noimage").status.container_statuses or []
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason == "ImagePullBackOff"

    wait_for(waiting, 30, "the stand-in's report")


def test_kill_evict_and_foreground_deletion(cluster: Kube) -> None:
    for name in ("killed", "evicted", "deleted"):
        _run(cluster, name, "sleep 60")
    for name in ("killed", "evicted", "deleted"):
        wait_for(lambda n=name: _pod(cluster, n).status.phase == "Running", 30, "the stand-in's report")
    cluster.kubelet.kill(_pod(cluster, "killed").metadata.name, cluster.namespace, signal.SIGKILL)
    cluster.kubelet.evict(_pod(cluster, "evicted").metadata.name, cluster.namespace)
    _condition(cluster, "killed", "Failed")
    assert _pod(cluster, "killed").status.container_statuses[0].state.terminated.exit_code == 137
    assert wait_for(lambda: _pod(cluster, "evicted").status.reason, 30, "the eviction") == "Evicted"
    batch = k8s.BatchV1Api(cluster.api_client)
    batch.delete_namespaced_job("deleted", cluster.namespace, propagation_policy="Foreground")

    def gone() -> bool:
        names = [j.metadata.name for j in batch.list_namespaced_job(cluster.namespace).items]
        pods = (
            k8s.CoreV1Api(cluster.api_client).list_namespaced_pod(cluster.namespace, label_selector="t=deleted").items
        )
        return "deleted" not in names and not pods

    wait_for(gone, 60, "the stand-in's report")
