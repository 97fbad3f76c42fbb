"""The Kubernetes executor end to end on a real control plane: etcd, kube-apiserver, kube-controller-manager (the real
Job controller and garbage collector) and kube-scheduler, built from Debian's source package (`make
kube-control-plane`). The one fake is the stand-in kubelet (tests/standin_kubelet.py): there is no container runtime
here, so it runs each pod's command as a local process and reports its status as a kubelet would. The trainer, its
job workers, PostgreSQL and S3 are all real."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from tests.integration.kube_trainer import (
    JobCounter,
    create_worker_secret,
    start_kube_trainer,
    wait_for,
    worker_path_env,
)
from tests.integration.trainer_helpers import Trainer, create_job, tiny_spec, watch_job, watch_job_until
from trainer_service.jobs.kubernetes.manifest import LABEL_STUDY, LABEL_WORKER, SELECTOR
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, study_pb2, training_service_pb2, training_spec_pb2

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def cluster(kube: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PATH", worker_path_env())
    return kube


@pytest.fixture
def db(postgres_url: str) -> str:
    return postgres_url


@pytest.fixture
def kube_trainer(
    cluster: Any, shapes: ArtifactStore, s3_server: S3ServerProcess, db: str, tmp_path: Path
) -> Iterator[Trainer]:
    create_worker_secret(cluster.api_client, cluster.namespace, s3_server, shapes.bucket, db)
    trainer = start_kube_trainer(
        shapes,
        s3_server,
        tmp_path / "state",
        kubeconfig=cluster.kubeconfig,
        namespace=cluster.namespace,
        database_url=db,
    )
    yield trainer
    trainer.stop()


def _get(trainer: Trainer, name: str) -> job_pb2.Job:
    job: job_pb2.Job = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=name), timeout=30)
    return job


def _pods(cluster: Any, worker: str) -> list[Any]:
    pods = k8s.CoreV1Api(cluster.api_client).list_namespaced_pod(
        cluster.namespace, label_selector=f"{LABEL_WORKER}={worker}"
    )
    return list(pods.items)


def _jobs(cluster: Any) -> list[str]:
    jobs = k8s.BatchV1Api(cluster.api_client).list_namespaced_job(cluster.namespace, label_selector=SELECTOR)
    return sorted(j.metadata.name for j in jobs.items)


def test_a_job_runs_as_a_kubernetes_job_and_succeeds(
    kube_trainer: Trainer, cluster: Any, shapes: ArtifactStore
) -> None:
    with JobCounter(cluster.api_client, cluster.namespace) as counter:
        job = create_job(kube_trainer, tiny_spec(epochs=1), "kube-1")
        events = watch_job(kube_trainer, job.name)
        assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED, events[-1]
        assert shapes.list_model_versions("shapes") == ["kube-1"]
        # The finished Job and its pod are deleted once the trainer has read the end.
        wait_for(lambda: not _jobs(cluster) and not _pods(cluster, "vt-kube-1-1"), 60, "the Job to be cleaned up")
        created, most = counter.snapshot()
    assert created == ["vt-kube-1-1"]
    assert most == 1
    assert _get(kube_trainer, job.name).attempt == 1


def test_a_killed_pod_resumes_in_a_new_job_and_matches_an_uninterrupted_run(
    kube_trainer: Trainer, cluster: Any
) -> None:
    spec = tiny_spec(epochs=4, fine_tuning_epochs=1, seed=3)
    reference = create_job(kube_trainer, spec, "reference")
    watch_job(kube_trainer, reference.name)

    with JobCounter(cluster.api_client, cluster.namespace) as counter:
        job = create_job(kube_trainer, spec, "killed")
        watch_job_until(kube_trainer, job.name, lambda e: e.HasField("epoch_ended") and e.epoch_ended.epoch == 2)
        (pod,) = _pods(cluster, "vt-killed-1")
        cluster.kubelet.kill(pod.metadata.name, cluster.namespace, signal.SIGKILL)
        events = watch_job(kube_trainer, job.name)
        created, _ = counter.snapshot()

    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    resumed = [
        e.state_changed.message for e in events if e.HasField("state_changed") and "resuming" in e.state_changed.message
    ]
    assert resumed
    assert "signal SIGKILL (exit code 137)" in resumed[0]
    assert [n for n in created if n.startswith("vt-killed-")] == ["vt-killed-1", "vt-killed-2"]
    done, ref = _get(kube_trainer, job.name), _get(kube_trainer, reference.name)
    assert done.attempt == 2
    for key in ("val_accuracy", "val_loss", "train_loss"):
        assert done.result.metrics[key].mean == pytest.approx(ref.result.metrics[key].mean, rel=1e-4, abs=1e-5), key


def test_cancel_deletes_the_job_and_its_pod(kube_trainer: Trainer, cluster: Any) -> None:
    job = create_job(kube_trainer, tiny_spec(epochs=50), "long")
    watch_job_until(kube_trainer, job.name, lambda e: e.HasField("epoch_ended"))
    kube_trainer.stub.CancelJob(training_service_pb2.CancelJobRequest(name=job.name), timeout=30)
    events = watch_job(kube_trainer, job.name)
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_CANCELLED
    wait_for(lambda: not _jobs(cluster) and not _pods(cluster, "vt-long-1"), 60, "the Job and its pod to go")


def test_a_trainer_restart_adopts_the_running_job(
    kube_trainer: Trainer, cluster: Any, shapes: ArtifactStore, s3_server: S3ServerProcess, db: str, tmp_path: Path
) -> None:
    with JobCounter(cluster.api_client, cluster.namespace) as counter:
        job = create_job(kube_trainer, tiny_spec(epochs=6), "adopted")
        watch_job_until(kube_trainer, job.name, lambda e: e.HasField("epoch_ended"))
        kube_trainer.stop()  # SIGTERM: the Job keeps running, handed over
        assert [p.status.phase for p in _pods(cluster, "vt-adopted-1")] == ["Running"]
        # A new pod of a Deployment: another replica id.
        second = start_kube_trainer(
            shapes,
            s3_server,
            tmp_path / "state2",
            kubeconfig=cluster.kubeconfig,
            namespace=cluster.namespace,
            database_url=db,
            replica_id="kube-trainer-2",
        )
        try:
            events = watch_job(second, job.name)
            final = _get(second, job.name)
        finally:
            second.stop()
        created, _ = counter.snapshot()
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    assert final.attempt == 1
    assert created == ["vt-adopted-1"]


def test_a_study_runs_its_trials_as_concurrent_jobs(kube_trainer: Trainer, cluster: Any) -> None:
    spec = study_pb2.StudySpec(
        base_spec=tiny_spec(epochs=2),
        parameters=[
            study_pb2.SearchParameter(
                path="classifier.learning_rate", float_range=study_pb2.FloatRange(min=1e-4, max=0.05, log=True)
            )
        ],
        objective=study_pb2.Objective(metric=training_spec_pb2.METRIC_VALIDATION_LOSS),
        budget=study_pb2.StudyBudget(max_trials=3),
        parallelism=3,
        sampler=study_pb2.SAMPLER_RANDOM,
        seed=1,
    )
    batch = k8s.BatchV1Api(cluster.api_client)
    with JobCounter(cluster.api_client, cluster.namespace) as counter:
        study = kube_trainer.stub.CreateStudy(
            training_service_pb2.CreateStudyRequest(study=study_pb2.Study(spec=spec), study_id="par"), timeout=30
        )

        def three_running() -> bool:
            jobs = batch.list_namespaced_job(cluster.namespace, label_selector=f"{LABEL_STUDY}=par").items
            return sum(1 for j in jobs if (j.status.active or 0) >= 1) >= 3

        wait_for(three_running, 120, "three trial Jobs running at once")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            got = kube_trainer.stub.GetStudy(training_service_pb2.GetStudyRequest(name=study.name), timeout=30)
            if got.state == study_pb2.STUDY_STATE_SUCCEEDED:
                break
            time.sleep(1)
        created, _ = counter.snapshot()
    assert got.state == study_pb2.STUDY_STATE_SUCCEEDED
    assert len(created) == 3


def _kube_trainer_with(
    cluster: Any, shapes: ArtifactStore, s3_server: S3ServerProcess, db: str, root: Path, *extra: str
) -> Trainer:
    create_worker_secret(cluster.api_client, cluster.namespace, s3_server, shapes.bucket, db)
    return start_kube_trainer(
        shapes,
        s3_server,
        root,
        kubeconfig=cluster.kubeconfig,
        namespace=cluster.namespace,
        database_url=db,
        extra=extra,
    )


def _run_to_end(trainer: Trainer, spec: training_spec_pb2.TrainingSpec, job_id: str) -> tuple[int, job_pb2.Job]:
    """Run one job on `trainer` to its end, then stop the trainer: the last state and the job."""
    try:
        job = create_job(trainer, spec, job_id)
        events = watch_job(trainer, job.name)
        return events[-1].state_changed.state, _get(trainer, job.name)
    finally:
        trainer.stop()


def test_an_image_that_cannot_be_pulled_fails_the_job_with_the_cause(
    cluster: Any, shapes: ArtifactStore, s3_server: S3ServerProcess, db: str, tmp_path: Path
) -> None:
    image = "registry.invalid/visiontune/trainer:nope"
    flags = ("--k8s-worker-image", image, "--k8s-image-pull-timeout-s", "3")
    trainer = _kube_trainer_with(cluster, shapes, s3_server, db, tmp_path / "state", *flags)
    state, final = _run_to_end(trainer, tiny_spec(epochs=1), "no-image")
    assert state == job_pb2.JOB_STATE_FAILED
    assert final.error.message.startswith(f"its image {image} could not be pulled"), final.error.message
    assert final.attempt == 1  # no retry: another attempt would wait the same way
    wait_for(lambda: not _jobs(cluster), 60, "the failed Job to be deleted")


def test_a_gpu_request_no_node_meets_fails_the_job_with_the_scheduler_s_reason(
    cluster: Any, shapes: ArtifactStore, s3_server: S3ServerProcess, db: str, tmp_path: Path
) -> None:
    flags = ("--k8s-gpu-resource", "example.com/huge-gpu", "--k8s-schedule-timeout-s", "4")
    trainer = _kube_trainer_with(cluster, shapes, s3_server, db, tmp_path / "state", *flags)
    spec = tiny_spec(epochs=1)
    spec.run.device = training_spec_pb2.DEVICE_CUDA
    state, final = _run_to_end(trainer, spec, "no-gpu")
    assert state == job_pb2.JOB_STATE_FAILED
    assert final.error.message.startswith("no node could run it for "), final.error.message
    assert "Insufficient example.com/huge-gpu" in final.error.message


def test_a_job_deleted_by_someone_else_resumes(kube_trainer: Trainer, cluster: Any) -> None:
    job = create_job(kube_trainer, tiny_spec(epochs=4), "deleted")
    watch_job_until(kube_trainer, job.name, lambda e: e.HasField("epoch_ended") and e.epoch_ended.epoch == 1)
    k8s.BatchV1Api(cluster.api_client).delete_namespaced_job(
        "vt-deleted-1", cluster.namespace, propagation_policy="Background"
    )
    events = watch_job(kube_trainer, job.name)
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    notes = [e.state_changed.message for e in events if e.HasField("state_changed")]
    assert any("vt-deleted-1 was deleted outside the trainer" in n for n in notes), notes
    assert _get(kube_trainer, job.name).attempt == 2


MANY = 24  # jobs, under a cap of 8


@pytest.mark.slow
def test_three_times_the_cap_of_jobs_never_exceed_it(
    cluster: Any, shapes: ArtifactStore, s3_server: S3ServerProcess, db: str, tmp_path: Path
) -> None:
    # Jobs that end in seconds: their dataset does not exist, so each worker fails it itself (one attempt, no retry).
    # Three times the cap keeps the cap saturated through several turnovers; each more job costs a worker start.
    trainer = _kube_trainer_with(cluster, shapes, s3_server, db, tmp_path / "state", "--k8s-max-jobs", "8")
    spec = tiny_spec(epochs=1)
    spec.dataset.uri = "datasets/none-here"
    try:
        with JobCounter(cluster.api_client, cluster.namespace) as counter:
            names = [create_job(trainer, spec, f"many-{i:02d}").name for i in range(MANY)]

            def all_ended() -> bool:
                return all(_get(trainer, n).state == job_pb2.JOB_STATE_FAILED for n in names)

            wait_for(all_ended, 540, f"all {MANY} jobs to end")
            wait_for(lambda: not _jobs(cluster), 60, "the last Jobs to be deleted")
            created, most = counter.snapshot()
        attempts = [_get(trainer, n).attempt for n in names]
    finally:
        trainer.stop()
    assert most <= 8
    assert most >= 2  # they did run side by side
    assert sorted(created) == sorted(f"vt-many-{i:02d}-1" for i in range(MANY))  # each exactly once
    assert attempts == [1] * MANY
