"""Workers as Kubernetes Jobs: each job attempt (and each tuning trial) a batch/v1 Job that Kubernetes schedules on a
node with the GPU it asks for.

- Launch: create the Job of the attempt (`manifest.job_manifest`); AlreadyExists means it was created before (by this
  replica before a restart, or by one whose claim this is): it is adopted, never duplicated. A create the API server
  refuses for a while (it is away) is retried until the schedule timeout.
- Watch: the Jobs and pods of the executor (one label selects both) are watched (`watch.WatchedObjects`) and each
  worker's end is read from them (`outcomes.worker_exit`).
- Cancel: the Job is deleted with foreground propagation, so its pod gets SIGTERM (the worker records CANCELLED) and
  the Job object goes only after its pod. Cleaning up after any end is the same delete; the worker's place under the
  cluster cap frees once the Job is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, Final, cast

from google.protobuf import json_format
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError
from visiontune.settings import DEFAULT_BUCKET

from trainer_service.jobs.kubernetes import manifest, outcomes
from trainer_service.jobs.kubernetes.settings import KubernetesSettings
from trainer_service.jobs.kubernetes.watch import WatchedObjects
from trainer_service.jobs.records import JobRecord, WorkerRecord
from trainer_service.jobs.runtime import WorkerExit
from trainer_service.spec.config import DeviceKind, RunConfig
from trainer_service.spec.convert import load_stored_spec
from trainer_service.spec.validate import SpecInvalid

log = logging.getLogger(__name__)

# How often a refused create is tried again, and how long a Job may be missing from the watch before a GET decides.
_CREATE_RETRY_S: Final = 2.0
_MISSING_CHECK_S: Final = 5.0
# API errors that no retry mends: the manifest or a setting is wrong.
_PERMANENT: Final = frozenset({400, 403, 404, 422})


def api_client(settings: KubernetesSettings) -> k8s.ApiClient:
    """An API client from `settings.kubeconfig`, else the pod's service account, else ~/.kube/config."""
    client: k8s.ApiClient
    if settings.kubeconfig:
        client = k8s_config.new_client_from_config(config_file=settings.kubeconfig)
        return client
    try:
        configuration = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=configuration)
        return k8s.ApiClient(configuration)
    except k8s_config.ConfigException:
        client = k8s_config.new_client_from_config()
        return client


def _api_error(err: ApiException | HTTPError | OSError) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}".strip()
    return str(err)


class KubernetesWorker:
    """One attempt's Kubernetes Job."""

    def __init__(self, runtime: KubernetesWorkers, name: str, job_id: str, attempt: int) -> None:
        self._runtime = runtime
        self.name = name
        self.job_id = job_id
        self.attempt = attempt
        self._created = False
        self._body: dict[str, Any] | None = None
        self._first_try = time.monotonic()
        self._next_try = 0.0
        self._failed: WorkerExit | None = None
        self._deleting = False
        self._missing_since: float | None = None

    # -- creating

    def create(self, body: dict[str, Any]) -> None:
        self._body = body
        self._try_create()

    def mark_existing(self) -> None:
        self._created = True

    def _try_create(self) -> None:
        if self._body is None or self._created or self._failed is not None:
            return
        if time.monotonic() < self._next_try:
            return
        try:
            self._runtime.create_job(self._body)
            self._created = True
            log.info(
                "Kubernetes Job created", extra={"job": self.job_id, "attempt": self.attempt, "k8s_job": self.name}
            )
        except ApiException as err:
            if err.status == 409:  # AlreadyExists: made before (a restart, a replayed claim): adopt it
                self._created = True
                log.info("adopted an existing Kubernetes Job", extra={"job": self.job_id, "k8s_job": self.name})
                return
            self._create_failed(err, permanent=err.status in _PERMANENT)
        except (HTTPError, OSError) as err:
            self._create_failed(err, permanent=False)

    def _create_failed(self, err: ApiException | HTTPError | OSError, *, permanent: bool) -> None:
        waited = time.monotonic() - self._first_try
        why = f"could not create its Kubernetes Job {self.name}: {_api_error(err)}"
        if permanent or waited >= self._runtime.settings.schedule_timeout_s:
            self._failed = WorkerExit(None, why, why, retryable=False)
            log.error("%s", why, extra={"job": self.job_id})
        else:
            log.warning("%s; retrying", why, extra={"job": self.job_id})
            self._next_try = time.monotonic() + _CREATE_RETRY_S

    # -- the Worker protocol

    def exited(self) -> WorkerExit | None:
        if self._failed is not None:
            return self._failed
        self._try_create()
        if not self._created:
            return self._failed
        job = self._runtime.jobs.get(self.name)
        if job is None and not self._confirmed_gone():
            return None
        pods = self._runtime.pods_of(self.name)
        ended = outcomes.worker_exit(
            job,
            pods,
            datetime.now(UTC),
            name=self.name,
            schedule_timeout_s=self._runtime.settings.schedule_timeout_s,
            image_pull_timeout_s=self._runtime.settings.image_pull_timeout_s,
        )
        if ended is None:
            return None
        if job is None and not self._deleting:
            return WorkerExit(None, f"its Kubernetes Job {self.name} was deleted outside the trainer", ended.last_words)
        return ended

    def _confirmed_gone(self) -> bool:
        """The watch has no such Job: gone for sure once a GET says 404 (a just-made Job may not be in the copy yet)."""
        now = time.monotonic()
        if self._missing_since is None:
            self._missing_since = now
        if now - self._missing_since < _MISSING_CHECK_S:
            return False
        self._missing_since = now
        found = self._runtime.read_job(self.name)
        if found is None:
            return True
        self._runtime.jobs.put(found)
        return False

    def terminate(self) -> None:
        self._delete()

    def kill(self) -> None:
        self._delete()

    def cleaned_up(self) -> bool:
        if not self._created:
            return True
        if self._runtime.jobs.get(self.name) is None and not self._runtime.pods_of(self.name):
            # Gone from the watch: a GET confirms it (a Job made a moment ago may not be in the copy yet).
            return self._runtime.read_job(self.name) is None
        self._delete()
        return False

    def _delete(self) -> None:
        """Delete the Job (idempotent: not again once the watch shows it on its way)."""
        if not self._created:
            self._failed = self._failed or WorkerExit(None, "stopped before its Kubernetes Job was created", "")
            return
        job = self._runtime.jobs.get(self.name)
        if job is not None and job.get("metadata", {}).get("deletionTimestamp"):
            return
        if self._deleting and job is None:
            return
        self._deleting = True
        self._runtime.delete_job(self.name)


class KubernetesWorkers:
    """The Kubernetes runtime (`--executor kubernetes`)."""

    workers_outlive_trainer = True
    gpu_count = None  # a GPU job's pod requests its GPUs; the scheduler finds it a GPU node

    def __init__(
        self,
        settings: KubernetesSettings,
        api: k8s.ApiClient,
        *,
        default_bucket: str = DEFAULT_BUCKET,
    ) -> None:
        self.settings = settings
        self._batch = k8s.BatchV1Api(api)
        self._core = k8s.CoreV1Api(api)
        self._default_bucket = default_bucket
        self._wake = threading.Event()
        self.jobs = WatchedObjects(
            self._batch.list_namespaced_job, settings.namespace, manifest.SELECTOR, kind="jobs", changed=self._wake.set
        )
        self.pods = WatchedObjects(
            self._core.list_namespaced_pod, settings.namespace, manifest.SELECTOR, kind="pods", changed=self._wake.set
        )

    @property
    def cluster_cap(self) -> int:
        return self.settings.max_jobs

    def borrow_gpu(self) -> contextlib.AbstractContextManager[str | None]:
        return contextlib.nullcontext(None)  # the trainer's pod has no GPU of its own to lend

    def worker_name(self, job_id: str, attempt: int) -> str:
        return manifest.job_name(job_id, attempt)

    def start(self) -> None:
        self.jobs.start()
        self.pods.start()

    def close(self) -> None:
        self.jobs.stop()
        self.pods.stop()

    def launch(self, record: JobRecord) -> KubernetesWorker:
        name = manifest.job_name(record.job_id, record.attempt)
        worker = KubernetesWorker(self, name, record.job_id, record.attempt)
        run = self._run_of(record)
        worker.create(manifest.job_manifest(record, run.device, self.settings, devices=run.devices))
        return worker

    def adopt(self, row: WorkerRecord) -> KubernetesWorker:
        worker = KubernetesWorker(self, row.name, row.job_id, row.attempt)
        worker.mark_existing()
        found = self.read_job(row.name)
        if found is not None:
            self.jobs.put(found)
        return worker

    def stop_strays(self, job_id: str) -> None:
        # Jobs of this job's earlier attempts that nobody tracks any more (their rows are gone): not a second worker.
        value = manifest.label_value(job_id)
        for job in self.jobs.select(lambda j: _labels(j).get(manifest.LABEL_JOB) == value):
            log.warning("deleting a stray Kubernetes Job", extra={"job": job_id, "k8s_job": job["metadata"]["name"]})
            self.delete_job(job["metadata"]["name"])

    def _run_of(self, record: JobRecord) -> RunConfig:
        try:
            return load_stored_spec(record.spec_json, default_bucket=self._default_bucket).config.run
        except (json_format.ParseError, SpecInvalid):
            return RunConfig(device=DeviceKind.CPU)  # its worker fails on the spec at once: no GPU for that

    # -- API calls (one place for the client's arguments)

    def pods_of(self, name: str) -> list[dict[str, Any]]:
        return self.pods.select(lambda pod: _labels(pod).get(manifest.LABEL_WORKER) == name)

    def create_job(self, body: dict[str, Any]) -> None:
        # The client takes the manifest as the API's JSON (a dict) as well as a V1Job.
        created = self._batch.create_namespaced_job(self.settings.namespace, cast(Any, body), _preload_content=False)
        self.jobs.put(_json(created))

    def read_job(self, name: str) -> dict[str, Any] | None:
        try:
            return _json(self._batch.read_namespaced_job(name, self.settings.namespace, _preload_content=False))
        except ApiException as err:
            if err.status == 404:
                self.jobs.forget(name)
                return None
            raise

    def delete_job(self, name: str) -> None:
        """Delete with foreground propagation: the Job object stays, marked, until its pods are gone."""
        try:
            self._batch.delete_namespaced_job(
                name,
                self.settings.namespace,
                body=k8s.V1DeleteOptions(propagation_policy="Foreground"),
                _preload_content=False,
            )
        except ApiException as err:
            if err.status != 404:
                log.warning("deleting Kubernetes Job %s failed: %s; retrying", name, _api_error(err))
        except (HTTPError, OSError) as err:
            log.warning("deleting Kubernetes Job %s failed: %s; retrying", name, err)


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def _json(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data)
    return data
