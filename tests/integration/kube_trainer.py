"""A trainer with the Kubernetes executor on the test control plane (tests/kube_cluster.py), its job pods run by the
stand-in kubelet (tests/standin_kubelet.py, the one fake: there is no container runtime here), sharing a real
PostgreSQL and a real S3 server with them; and a watch that counts the Jobs that exist at once."""

from __future__ import annotations

import base64
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from tests.integration.trainer_helpers import Trainer, start_trainer
from trainer_service.jobs.kubernetes.manifest import SELECTOR
from urllib3.exceptions import ProtocolError
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.settings import DATABASE_URL_ENV
from visiontune.store import ArtifactStore

WORKER_IMAGE = "visiontune/trainer:test"
ENV_SECRET = "visiontune-worker-env"
WORKER_SERVICE_ACCOUNT = "visiontune-worker"


def worker_path_env() -> str:
    """PATH with this interpreter's directory first: the job pods' `python` is the image's, here this venv's."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def create_worker_secret(api: k8s.ApiClient, namespace: str, s3: S3ServerProcess, bucket: str, db_url: str) -> None:
    """What deploy/k8s gives job pods: their ServiceAccount, and the Secret they take their S3 and database settings
    from (`--k8s-worker-env-from secret:…`)."""
    k8s.CoreV1Api(api).create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=WORKER_SERVICE_ACCOUNT))
    )
    values = {**s3.settings(bucket).to_env(), DATABASE_URL_ENV: db_url, "VISIONTUNE_LOG_FORMAT": "json"}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    k8s.CoreV1Api(api).create_namespaced_secret(
        namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=ENV_SECRET), data=data)
    )


def start_kube_trainer(
    store: ArtifactStore,
    s3: S3ServerProcess,
    data_dir: Path,
    *,
    kubeconfig: Path,
    namespace: str,
    database_url: str,
    replica_id: str = "kube-trainer",
    extra: tuple[str, ...] = (),
) -> Trainer:
    data_dir.mkdir(parents=True, exist_ok=True)
    return start_trainer(
        store,
        s3,
        data_dir,
        "--executor",
        "kubernetes",
        "--database-url",
        database_url,
        "--replica-id",
        replica_id,
        "--k8s-kubeconfig",
        str(kubeconfig),
        "--k8s-namespace",
        namespace,
        "--k8s-worker-image",
        WORKER_IMAGE,
        "--k8s-worker-env-from",
        f"secret:{ENV_SECRET}",
        "--k8s-worker-cpu",
        "100m",
        "--k8s-worker-memory",
        "512Mi",
        *extra,
    )


class JobCounter:
    """Watches the executor's Jobs in `namespace`: every name ever created, and the most that existed at once."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self._batch = k8s.BatchV1Api(api)
        self._namespace = namespace
        self.created: list[str] = []
        self.existing: set[str] = set()
        self.max_existing = 0
        self.max_active_by_label: dict[str, int] = {}
        self._active: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._watch = k8s_watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stopped = False

    def __enter__(self) -> JobCounter:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped = True
        self._watch.stop()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        stream = self._watch.stream(
            self._batch.list_namespaced_job, self._namespace, label_selector=SELECTOR, deserialize=False
        )
        try:
            self._count(stream)
        except ProtocolError:
            if not self._stopped:
                raise  # the stream broke while counting: the counts would be wrong

    def _count(self, stream: Any) -> None:
        for event in stream:
            obj: dict[str, Any] = event["object"]
            name = obj["metadata"]["name"]
            with self._lock:
                if event["type"] == "ADDED" and name not in self.existing:
                    self.created.append(name)
                if event["type"] == "DELETED":
                    self.existing.discard(name)
                else:
                    self.existing.add(name)
                self.max_existing = max(self.max_existing, len(self.existing))

    def snapshot(self) -> tuple[list[str], int]:
        with self._lock:
            return list(self.created), self.max_existing


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
