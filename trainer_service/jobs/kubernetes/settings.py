"""The Kubernetes executor's settings: one flag (and `VISIONTUNE_K8S_*` variable) each, parsed once into a typed
`KubernetesSettings`. deploy/k8s's ConfigMap sets the variables; a test checks that every name it uses is here."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

# Where a pod finds its own namespace (the service account's mount).
_NAMESPACE_FILE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_T = TypeVar("_T")
_EFFECTS: Final = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class KubernetesSettingsError(ValueError):
    """A malformed executor setting; the message names the flag."""


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str
    effect: str
    value: str | None = None  # None: the taint's key is tolerated whatever its value (operator Exists)

    def to_dict(self) -> dict[str, str]:
        if self.value is None:
            return {"key": self.key, "operator": "Exists", "effect": self.effect}
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


@dataclass(frozen=True, slots=True)
class EnvSource:
    kind: str  # "configmap" or "secret"
    name: str

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"configMapRef" if self.kind == "configmap" else "secretRef": {"name": self.name}}


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """How the trainer makes each job attempt's Kubernetes Job."""

    worker_image: str
    namespace: str = "default"
    kubeconfig: str = ""  # empty: the in-cluster service account, else ~/.kube/config
    worker_service_account: str = "visiontune-worker"
    worker_env_from: tuple[EnvSource, ...] = ()
    worker_env: tuple[tuple[str, str], ...] = ()  # plain variables every job pod gets (the trainer's limits)
    max_jobs: int = 8  # Jobs in the namespace at once, all trainer replicas together
    gpu_resource: str = "nvidia.com/gpu"
    auto_device_gpu: bool = False  # jobs whose spec says device AUTO get a GPU too
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: tuple[Toleration, ...] = ()
    worker_cpu: str = "2"
    worker_memory: str = "8Gi"
    worker_shm: str = "2Gi"
    job_deadline_s: int = 86_400
    schedule_timeout_s: float = 900.0
    image_pull_timeout_s: float = 300.0
    worker_data_dir: str = "/var/lib/visiontune"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"VISIONTUNE_K8S_{name}", default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = KubernetesSettings(worker_image="")
    g = parser.add_argument_group("Kubernetes executor (--executor kubernetes)")
    g.add_argument(
        "--k8s-namespace",
        default=_env("NAMESPACE"),
        help="where job Jobs go (default: this pod's own namespace, else 'default') [VISIONTUNE_K8S_NAMESPACE]",
    )
    g.add_argument(
        "--k8s-kubeconfig",
        default=_env("KUBECONFIG"),
        help="a kubeconfig file (default: the in-cluster "
        "service account, else ~/.kube/config) [VISIONTUNE_K8S_KUBECONFIG]",
    )
    g.add_argument(
        "--k8s-worker-image",
        default=_env("WORKER_IMAGE"),
        help="the job pods' image (the trainer's image) [VISIONTUNE_K8S_WORKER_IMAGE]",
    )
    g.add_argument(
        "--k8s-worker-service-account",
        default=_env("WORKER_SERVICE_ACCOUNT", d.worker_service_account),
        help=f"job pods' ServiceAccount (default {d.worker_service_account}) [VISIONTUNE_K8S_WORKER_SERVICE_ACCOUNT]",
    )
    g.add_argument(
        "--k8s-worker-env-from",
        default=_env("WORKER_ENV_FROM"),
        help="ConfigMaps and Secrets every job "
        "pod's environment comes from: configmap:NAME,secret:NAME,… (S3 and database settings) "
        "[VISIONTUNE_K8S_WORKER_ENV_FROM]",
    )
    g.add_argument(
        "--k8s-max-jobs",
        type=int,
        default=int(_env("MAX_JOBS", str(d.max_jobs))),
        help=f"Jobs at once in the namespace, all replicas together (default {d.max_jobs}) [VISIONTUNE_K8S_MAX_JOBS]",
    )
    g.add_argument(
        "--k8s-gpu-resource",
        default=_env("GPU_RESOURCE", d.gpu_resource),
        help=f"the extended resource a GPU job requests (default {d.gpu_resource}) [VISIONTUNE_K8S_GPU_RESOURCE]",
    )
    g.add_argument(
        "--k8s-auto-device-gpu",
        action=argparse.BooleanOptionalAction,
        default=_env("AUTO_DEVICE_GPU", "false").lower() in ("1", "true", "yes", "on"),
        help="jobs whose spec says device AUTO request a GPU (CUDA ones always do) [VISIONTUNE_K8S_AUTO_DEVICE_GPU]",
    )
    g.add_argument(
        "--k8s-gpu-node-selector",
        default=_env("GPU_NODE_SELECTOR"),
        help="key=value,… added to GPU job pods [VISIONTUNE_K8S_GPU_NODE_SELECTOR]",
    )
    g.add_argument(
        "--k8s-gpu-tolerations",
        default=_env("GPU_TOLERATIONS"),
        help="key[=value]:Effect,… added to GPU job pods [VISIONTUNE_K8S_GPU_TOLERATIONS]",
    )
    g.add_argument(
        "--k8s-worker-cpu",
        default=_env("WORKER_CPU", d.worker_cpu),
        help=f"job pods' CPU request (default {d.worker_cpu}) [VISIONTUNE_K8S_WORKER_CPU]",
    )
    g.add_argument(
        "--k8s-worker-memory",
        default=_env("WORKER_MEMORY", d.worker_memory),
        help=f"job pods' memory request and limit (default {d.worker_memory}) [VISIONTUNE_K8S_WORKER_MEMORY]",
    )
    g.add_argument(
        "--k8s-worker-shm",
        default=_env("WORKER_SHM", d.worker_shm),
        help="size of job pods' /dev/shm "
        f"(data-loader workers share batches there; default {d.worker_shm}) [VISIONTUNE_K8S_WORKER_SHM]",
    )
    g.add_argument(
        "--k8s-job-deadline-s",
        type=int,
        default=int(_env("JOB_DEADLINE_S", str(d.job_deadline_s))),
        help=f"activeDeadlineSeconds of each attempt (default {d.job_deadline_s}) [VISIONTUNE_K8S_JOB_DEADLINE_S]",
    )
    g.add_argument(
        "--k8s-schedule-timeout-s",
        type=float,
        default=float(_env("SCHEDULE_TIMEOUT_S", str(d.schedule_timeout_s))),
        help="a job pod no node can take for this long fails its job "
        f"(default {d.schedule_timeout_s:g}) [VISIONTUNE_K8S_SCHEDULE_TIMEOUT_S]",
    )
    g.add_argument(
        "--k8s-image-pull-timeout-s",
        type=float,
        default=float(_env("IMAGE_PULL_TIMEOUT_S", str(d.image_pull_timeout_s))),
        help="a job pod whose image cannot be pulled for this long fails its job "
        f"(default {d.image_pull_timeout_s:g}) [VISIONTUNE_K8S_IMAGE_PULL_TIMEOUT_S]",
    )


def own_namespace() -> str:
    try:
        return _NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def settings_from_args(args: argparse.Namespace) -> KubernetesSettings:
    """Every setting checked at once: KubernetesSettingsError lists every bad flag."""
    problems: list[str] = []
    if not args.k8s_worker_image:
        problems.append("--k8s-worker-image is required with --executor kubernetes")
    if args.k8s_max_jobs < 1:
        problems.append(f"--k8s-max-jobs must be at least 1, got {args.k8s_max_jobs}")
    if args.k8s_job_deadline_s < 1:
        problems.append(f"--k8s-job-deadline-s must be positive, got {args.k8s_job_deadline_s}")
    for flag in ("schedule_timeout_s", "image_pull_timeout_s"):
        if getattr(args, f"k8s_{flag}") <= 0:
            problems.append(f"--k8s-{flag.replace('_', '-')} must be positive")
    env_from = _parse_list(args.k8s_worker_env_from, _parse_env_source, "--k8s-worker-env-from", problems)
    selector = dict(_parse_list(args.k8s_gpu_node_selector, _parse_pair, "--k8s-gpu-node-selector", problems))
    tolerations = _parse_list(args.k8s_gpu_tolerations, _parse_toleration, "--k8s-gpu-tolerations", problems)
    if problems:
        raise KubernetesSettingsError("; ".join(problems))
    return KubernetesSettings(
        worker_image=args.k8s_worker_image,
        namespace=args.k8s_namespace or own_namespace(),
        kubeconfig=args.k8s_kubeconfig,
        worker_service_account=args.k8s_worker_service_account,
        worker_env_from=tuple(env_from),
        max_jobs=args.k8s_max_jobs,
        gpu_resource=args.k8s_gpu_resource,
        auto_device_gpu=args.k8s_auto_device_gpu,
        gpu_node_selector=selector,
        gpu_tolerations=tuple(tolerations),
        worker_cpu=args.k8s_worker_cpu,
        worker_memory=args.k8s_worker_memory,
        worker_shm=args.k8s_worker_shm,
        job_deadline_s=args.k8s_job_deadline_s,
        schedule_timeout_s=args.k8s_schedule_timeout_s,
        image_pull_timeout_s=args.k8s_image_pull_timeout_s,
    )


def _parse_list(text: str, parse: Callable[[str], _T], flag: str, problems: list[str]) -> list[_T]:
    out: list[_T] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            out.append(parse(item))
        except ValueError as err:
            problems.append(f"{flag}: {err}")
    return out


def _parse_env_source(item: str) -> EnvSource:
    kind, sep, name = item.partition(":")
    if not sep or kind.lower() not in ("configmap", "secret") or not name:
        raise ValueError(f"{item!r} is not configmap:NAME or secret:NAME")
    return EnvSource(kind.lower(), name)


def _parse_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{item!r} is not key=value")
    return key, value


def _parse_toleration(item: str) -> Toleration:
    spec, sep, effect = item.rpartition(":")
    if not sep or effect not in _EFFECTS or not spec:
        raise ValueError(f"{item!r} is not key[=value]:Effect with Effect one of {', '.join(_EFFECTS)}")
    key, eq, value = spec.partition("=")
    return Toleration(key, effect, value if eq else None)
