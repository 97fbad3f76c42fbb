"""`python -m trainer_service`: the TrainingService gRPC server."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

import torch
from visiontune.auth import TokenRegistry
from visiontune.bootstrap import StartupError, run_service
from visiontune.database import DatabaseError
from visiontune.outages import BRIEF_WAIT, NO_WAIT
from visiontune.server import ServiceBinding
from visiontune.settings import DATABASE_URL_ENV, DEFAULT_TRAINER_PORT, ServerSettings
from visiontune.store import ArtifactStore
from visiontune.v1 import training_service_pb2, training_service_pb2_grpc

from trainer_service import policy
from trainer_service.advice.lr_worker import LrFinderProcess
from trainer_service.jobs.executor import JobExecutor
from trainer_service.jobs.gpus import gpu_pool
from trainer_service.jobs.kubernetes import settings as k8s_settings
from trainer_service.jobs.local_workers import LocalWorkers
from trainer_service.jobs.replica import DEFAULT_LEASE_TTL_S, ReplicaLease, ReplicaSettings, default_replica_id
from trainer_service.jobs.runtime import WorkerRuntime
from trainer_service.jobs.store import JobStore, SchemaError, database_url_for, default_database_path
from trainer_service.servicer import TrainingServicer
from trainer_service.tuning.runner import StudyRunner
from trainer_service.tuning.studies import Studies

SERVICE_NAME = training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


EXECUTORS = ("local", "kubernetes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training jobs")
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=os.environ.get("VISIONTUNE_EXECUTOR", "local"),
        help="where job workers run: 'local' subprocesses (default) or a Kubernetes Job per attempt "
        "(the --k8s-* flags) [VISIONTUNE_EXECUTOR]",
    )
    group.add_argument(
        "--job-slots",
        type=int,
        default=int(os.environ.get("VISIONTUNE_JOB_SLOTS", "0")),
        help="jobs run at once by the local executor; 0 = one per GPU, or 1 on a CPU-only machine "
        "[VISIONTUNE_JOB_SLOTS]",
    )
    k8s_settings.add_arguments(parser)
    policy.add_arguments(parser)
    state = parser.add_argument_group("shared state (several trainer replicas)")
    state.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV, ""),
        help="the job database: sqlite:///path (embedded, one machine) or postgresql://user:password@host:port/db "
        f"(shared by replicas); default: DATA_DIR/trainer/jobs.sqlite3 [{DATABASE_URL_ENV}]",
    )
    state.add_argument(
        "--replica-id",
        default=os.environ.get("VISIONTUNE_REPLICA_ID", ""),
        help="this replica's name in the job database (default: HOST-PORT; a restart under the same name resumes "
        "its own jobs at once) [VISIONTUNE_REPLICA_ID]",
    )
    state.add_argument(
        "--lease-ttl-s",
        type=float,
        default=float(os.environ.get("VISIONTUNE_LEASE_TTL_S", str(DEFAULT_LEASE_TTL_S))),
        help="seconds without a heartbeat after which another replica takes a replica's jobs and studies over "
        f"(default {DEFAULT_LEASE_TTL_S:g}) [VISIONTUNE_LEASE_TTL_S]",
    )


def job_slots(requested: int, gpus: tuple[str, ...]) -> int:
    """--job-slots, or by default one slot per GPU of the pool (one on a CPU-only machine)."""
    if requested > 0:
        return requested
    return max(1, len(gpus))


def worker_runtime(
    settings: ServerSettings,
    store: ArtifactStore,
    args: argparse.Namespace,
    jobs: JobStore,
    limits: policy.DatasetLimits | None = None,
) -> tuple[WorkerRuntime, int]:
    """The runtime of --executor and the executor's slots on this replica: the local slots, or the cluster cap (the
    Kubernetes executor's bound is the cap on Jobs in the cluster, which the claims enforce across replicas).
    Every worker gets `limits` in its environment: it enforces them once it has listed the data."""
    worker_env = (limits or policy.DatasetLimits()).to_env()
    if args.executor == "kubernetes":
        # Imported here: the local stack never loads the Kubernetes client.
        from trainer_service.jobs.kubernetes.workers import KubernetesWorkers, api_client

        try:
            kube = k8s_settings.settings_from_args(args)
            client = api_client(kube)
        except (k8s_settings.KubernetesSettingsError, OSError) as err:
            raise StartupError(f"the Kubernetes executor: {err}") from err
        except Exception as err:  # the client's config loader raises its own ConfigException and YAML errors
            raise StartupError(f"the Kubernetes executor cannot reach a cluster: {err}") from err
        kube = dataclasses.replace(kube, worker_env=tuple(worker_env.items()))
        return KubernetesWorkers(kube, client, default_bucket=store.bucket), kube.max_jobs
    gpus = gpu_pool(os.environ, torch.cuda.device_count())
    local = LocalWorkers(settings.s3, settings.data_dir, database_url=jobs.url, extra_env=worker_env, gpus=gpus)
    return local, job_slots(args.job_slots, gpus)


def open_job_store(settings: ServerSettings, args: argparse.Namespace) -> JobStore:
    """The job database of --database-url, connected once and migrated; StartupError (one line naming the host and
    the cause, never the password) when the URL cannot work: a wrong password, an unknown database, nobody
    listening, an unknown host, a malformed URL or another scheme than sqlite/postgresql."""
    url = args.database_url or database_url_for(default_database_path(settings.data_dir))
    try:
        return JobStore(url)
    except (DatabaseError, SchemaError) as err:
        raise StartupError(f"{err} (--database-url)") from err
    except OSError as err:  # the SQLite file's directory cannot be made
        raise StartupError(f"cannot create the job database {url}: {err} (--database-url)") from err


class _Opened:
    """The job store `run_service` opens before S3 (`before_store`), handed on to build()."""

    def __init__(self) -> None:
        self.jobs: JobStore | None = None

    def open(self, settings: ServerSettings, args: argparse.Namespace) -> None:
        self.jobs = open_job_store(settings, args)

    def build(
        self, settings: ServerSettings, store: ArtifactStore, args: argparse.Namespace, registry: TokenRegistry | None
    ) -> tuple[list[ServiceBinding], Callable[[], None]]:
        jobs, self.jobs = self.jobs, None
        return build(settings, store, args, jobs, registry=registry)


def build(
    settings: ServerSettings,
    store: ArtifactStore,
    args: argparse.Namespace,
    jobs: JobStore | None = None,
    *,
    registry: TokenRegistry | None = None,
) -> tuple[list[ServiceBinding], Callable[[], None]]:
    if jobs is None:
        jobs = open_job_store(settings, args)
    try:
        limits = policy.policy_from_args(args, artifact_bucket=store.bucket)
    except ValueError as err:
        raise StartupError(str(err)) from err
    lease = ReplicaLease(jobs, ReplicaSettings(args.replica_id or default_replica_id(settings.port), args.lease_ttl_s))
    lease.register()
    workers, slots = worker_runtime(settings, store, args, jobs, limits.dataset)
    executor = JobExecutor(jobs, workers, replica_id=lease.replica_id, default_bucket=store.bucket, slots=slots)
    runner = StudyRunner(
        jobs,
        store,
        default_bucket=store.bucket,
        wake_executor=executor.wake,
        cancel_job=executor.cancel,
        replica_id=lease.replica_id,
    )
    lease.subscribe(on_takeover=executor.took_over, on_lost=executor.lease_lost)
    lease.subscribe(on_takeover=lambda _: runner.wake(), on_lost=runner.lease_lost)
    executor.start()
    runner.start()
    lease.start()
    studies = Studies(
        jobs,
        runner,
        default_bucket=store.bucket,
        wake_executor=executor.wake,
        inputs=limits.inputs,
        gpus=executor.gpu_count,
    )
    # The servicer reads S3 inside requests (FindLearningRate, RecommendSpec): with S3 down they fail now, with
    # the store's one-line error, rather than hold the call for the outage window. The study runner, in the
    # background, waits through an outage as the job workers (their own processes) do.
    request_store = store.with_outage(NO_WAIT)
    # A client waits on each request: a database blip is ridden out, an outage answers UNAVAILABLE in seconds.
    request_jobs = jobs.with_outage(BRIEF_WAIT)
    servicer = TrainingServicer(
        request_jobs,
        executor,
        request_store,
        LrFinderProcess(settings.s3, settings.data_dir / "trainer" / "cache"),
        studies,
        policy=limits,
        registry=registry,
    )
    binding = ServiceBinding(
        SERVICE_NAME, lambda server: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    )

    def close() -> None:
        runner.stop()
        executor.stop()  # its running jobs are queued again, for any replica
        lease.stop()
        jobs.close()

    return [binding], close


def main() -> int:
    opened = _Opened()
    return run_service(
        service="trainer_service",
        description="VisionTune TrainingService: training jobs, LR finder, spec recommender, tuning studies.",
        default_port=DEFAULT_TRAINER_PORT,
        port_env="TRAINER_PORT",
        factory=opened.build,
        add_arguments=add_arguments,
        before_store=opened.open,
    )


if __name__ == "__main__":
    sys.exit(main())
