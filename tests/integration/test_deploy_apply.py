"""The dev overlay applied for real to the test control plane (tests/kube_cluster.py), and the trainer's
ServiceAccount checked with `kubectl auth can-i`: it may manage Jobs and read pods in its namespace, nothing more.

The test API server is Kubernetes 1.20: it serves neither autoscaling/v2 nor policy/v1 and has no gRPC probes. The
rendered documents are validated strictly against 1.32's schemas in tests/unit/test_deploy_manifests.py; here the
newer kinds are set aside by name, and gRPC probes are applied as TCP probes on the same port (the one change made).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from tests.kube_cluster import KubeControlPlane

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "visiontune"
# Kinds newer than the test server serves (it is 1.20): validated against 1.32 elsewhere.
NEWER_THAN_THE_TEST_SERVER = {("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget")}


def _kubectl(plane: KubeControlPlane, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(plane.kubeconfig), *args], input=stdin, capture_output=True, text=True
    )


@pytest.fixture
def applied(kube_control_plane: KubeControlPlane) -> Iterator[KubeControlPlane]:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy/k8s/overlays/dev")], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    set_aside = {
        (d["apiVersion"], d["kind"]) for d in docs if (d["apiVersion"], d["kind"]) in NEWER_THAN_THE_TEST_SERVER
    }
    assert set_aside == NEWER_THAN_THE_TEST_SERVER  # the overlay does carry its autoscaler and disruption budgets
    kept = [d for d in docs if (d["apiVersion"], d["kind"]) not in NEWER_THAN_THE_TEST_SERVER]
    assert sum(_grpc_probes_as_tcp(d) for d in kept) >= 6  # both services: readiness, liveness, startup
    result = _kubectl(kube_control_plane, "apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump_all(kept))
    assert result.returncode == 0, result.stderr
    try:
        yield kube_control_plane
    finally:
        _kubectl(kube_control_plane, "delete", "namespace", NAMESPACE, "--wait=false")


def _grpc_probes_as_tcp(doc: dict[str, Any]) -> int:
    """1.20 knows no gRPC probes: the same port as a TCP probe. Returns how many probes it changed."""
    changed = 0
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []):
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind)
            if probe and "grpc" in probe:
                probe["tcpSocket"] = {"port": probe.pop("grpc")["port"]}
                changed += 1
    return changed


def _can(plane: KubeControlPlane, account: str, *args: str) -> bool:
    result = _kubectl(plane, "auth", "can-i", f"--as=system:serviceaccount:{NAMESPACE}:{account}", *args)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def test_the_dev_overlay_applies_and_its_workloads_exist(applied: KubeControlPlane) -> None:
    with applied.api_client() as api:
        apps = k8s.AppsV1Api(api)
        deployments = {d.metadata.name for d in apps.list_namespaced_deployment(NAMESPACE).items}
        statefulsets = {s.metadata.name for s in apps.list_namespaced_stateful_set(NAMESPACE).items}
        accounts = {a.metadata.name for a in k8s.CoreV1Api(api).list_namespaced_service_account(NAMESPACE).items}
    assert {"visiontune-trainer", "visiontune-inference"} <= deployments
    assert len(statefulsets) == 2  # MinIO and PostgreSQL
    assert {"visiontune-trainer", "visiontune-worker", "visiontune-inference"} <= accounts


def test_the_trainer_may_manage_jobs_and_read_pods_and_nothing_more(applied: KubeControlPlane) -> None:
    trainer = "visiontune-trainer"
    for verb in ("create", "get", "list", "watch", "delete"):
        assert _can(applied, trainer, verb, "jobs.batch", "-n", NAMESPACE), verb
    for verb in ("get", "list", "watch"):
        assert _can(applied, trainer, verb, "pods", "-n", NAMESPACE), verb
    assert _can(applied, trainer, "get", "pods/log", "-n", NAMESPACE)
    forbidden = [
        ("create", "pods", "-n", NAMESPACE),
        ("delete", "pods", "-n", NAMESPACE),
        ("create", "secrets", "-n", NAMESPACE),
        ("get", "secrets", "-n", NAMESPACE),
        ("patch", "jobs.batch", "-n", NAMESPACE),
        ("create", "jobs.batch", "-n", "default"),  # only its own namespace
        ("list", "nodes"),  # nothing cluster-wide
        ("create", "namespaces"),
        ("create", "clusterrolebindings"),
    ]
    for args in forbidden:
        assert not _can(applied, trainer, *args), args


def test_job_pods_and_inference_may_do_nothing_with_the_api(applied: KubeControlPlane) -> None:
    for account in ("visiontune-worker", "visiontune-inference"):
        for args in (("get", "pods"), ("create", "jobs.batch"), ("get", "secrets"), ("get", "configmaps")):
            assert not _can(applied, account, *args, "-n", NAMESPACE), (account, args)
