"""One job attempt as a batch/v1 Job manifest: a pure function of the job record and the settings.

The Job runs the same worker the local executor runs (`python -m trainer_service.jobs.worker`), once:
`backoffLimit: 0` and `restartPolicy: Never`, because the trainer owns retries (a new attempt is a new Job that resumes
from the job's last checkpoint in S3, exactly as a local retry does). The worker's environment comes from the
ConfigMaps and Secrets the settings name, so no credential is written into a Job.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from visiontune.settings import TERMINATION_MESSAGE_ENV

from trainer_service.jobs.kubernetes.settings import KubernetesSettings
from trainer_service.jobs.records import JobRecord
from trainer_service.spec.config import DeviceKind

MANAGED_BY: Final = "visiontune-trainer"
# Every Job and pod of the executor carries it: the watches select on it.
SELECTOR: Final = f"app.kubernetes.io/managed-by={MANAGED_BY}"
LABEL_JOB: Final = "visiontune.io/job"
LABEL_ATTEMPT: Final = "visiontune.io/attempt"
LABEL_STUDY: Final = "visiontune.io/study"
LABEL_TRIAL: Final = "visiontune.io/trial"
LABEL_WORKER: Final = "visiontune.io/worker"  # on pods: the Job's name, to find a Job's pods
ANNOTATION_JOB_ID: Final = "visiontune.io/job-id"
CONTAINER: Final = "worker"
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
WORKER_COMMAND: Final = ("python", "-m", "trainer_service.jobs.worker")
# A worker stops within a batch on SIGTERM (a cancel, a drain) and records its end: a minute is plenty.
TERMINATION_GRACE_S: Final = 60

_NAME_MAX: Final = 63  # Job names become pod label values, which Kubernetes caps at 63 characters
_LABEL_VALUE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def job_name(job_id: str, attempt: int) -> str:
    """`vt-{job}-{attempt}`: one Job per attempt, so a restarted trainer finds it by name and creating it twice is
    AlreadyExists, never a duplicate. Long IDs are shortened with a hash so the name stays unique and valid."""
    suffix = f"-{attempt}"
    name = f"vt-{job_id}{suffix}"
    if len(name) <= _NAME_MAX and _LABEL_VALUE.match(name):
        return name
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
    head = job_id[: _NAME_MAX - len("vt-") - len(suffix) - len(digest) - 1].rstrip("-")
    return f"vt-{head}-{digest}{suffix}"


def label_value(value: str) -> str:
    """`value` as a label value (63 characters, alphanumeric at both ends), hashed when it cannot be one as is."""
    if len(value) <= _NAME_MAX and _LABEL_VALUE.match(value):
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:16]


def wants_gpu(device: DeviceKind, settings: KubernetesSettings) -> bool:
    return device == DeviceKind.CUDA or (device == DeviceKind.AUTO and settings.auto_device_gpu)


def job_labels(record: JobRecord) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "visiontune",
        "app.kubernetes.io/component": "training-job",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: label_value(record.job_id),
        LABEL_ATTEMPT: str(record.attempt),
    }
    if record.study_id is not None:
        labels[LABEL_STUDY] = label_value(record.study_id)
    if record.trial_number is not None:
        labels[LABEL_TRIAL] = str(record.trial_number)
    return labels


def job_manifest(
    record: JobRecord, device: DeviceKind, settings: KubernetesSettings, *, devices: int = 1
) -> dict[str, Any]:
    """The batch/v1 Job of `record`'s current attempt. `devices` (the spec's `run.devices`): a GPU job's one pod
    asks for that many GPUs, one for each of the worker's training processes."""
    name = job_name(record.job_id, record.attempt)
    labels = job_labels(record)
    gpu = wants_gpu(device, settings)
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": settings.worker_cpu, "memory": settings.worker_memory},
        "limits": {"memory": settings.worker_memory},
    }
    if gpu:
        # Extended resources are requested through limits (requests follow them).
        resources["limits"][settings.gpu_resource] = str(devices)
    data_dir = settings.worker_data_dir
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.worker_image,
        "command": [*WORKER_COMMAND, "--job", record.job_id, "--data-dir", data_dir],
        "env": [
            {"name": TERMINATION_MESSAGE_ENV, "value": TERMINATION_MESSAGE_PATH},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *({"name": name, "value": value} for name, value in settings.worker_env),
        ],
        "envFrom": [source.to_dict() for source in settings.worker_env_from],
        "resources": resources,
        # The worker writes its last error there; a crash before it can still be read from the log's tail.
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "data", "mountPath": data_dir},
            {"name": "tmp", "mountPath": "/tmp"},
            # PyTorch's data-loader workers pass batches through shared memory; a container's default is 64 MiB.
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.worker_service_account,
        "automountServiceAccountToken": False,  # the worker talks to S3 and the database, never to Kubernetes
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "data", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.worker_shm}},
        ],
    }
    if gpu and settings.gpu_node_selector:
        pod_spec["nodeSelector"] = dict(settings.gpu_node_selector)
    if gpu and settings.gpu_tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in settings.gpu_tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_JOB_ID: record.job_id},
        },
        "spec": {
            "backoffLimit": 0,  # the trainer owns retries: a new attempt is a new Job
            "activeDeadlineSeconds": settings.job_deadline_s,
            "template": {"metadata": {"labels": {**labels, LABEL_WORKER: name}}, "spec": pod_spec},
        },
    }
