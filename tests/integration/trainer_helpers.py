"""Shared by the integration tests that run a real trainer process (training jobs, the CLI's training commands).

Tiny data (three synthetic shape labels at 32 px) and MobileNetV3-small from scratch keep each job to seconds on
a CPU.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from trainer_service.jobs.store import JobStore, default_database_path
from visiontune.client import is_serving
from visiontune.devstack.dataset_upload import plan_upload, upload
from visiontune.devstack.launch import service_environment
from visiontune.devstack.ports import free_port
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.devstack.sample_data import write_shapes_dataset
from visiontune.store import ArtifactStore
from visiontune.v1 import job_pb2, training_service_pb2, training_service_pb2_grpc, training_spec_pb2

DATASET = "datasets/shapes"


@dataclass
class Trainer:
    proc: subprocess.Popen[bytes]
    stub: training_service_pb2_grpc.TrainingServiceStub
    channel: grpc.Channel
    data_dir: Path
    target: str

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def start_trainer(
    store: ArtifactStore, s3: S3ServerProcess, data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Trainer:
    """`python -m trainer_service` (plus `args`, and `env` on top of the service environment) on a free port against
    `store`'s bucket; waits until it serves."""
    port = free_port()
    settings = s3.settings(store.bucket)
    env = {**service_environment(settings, data_dir), **(env or {})}
    log = open(data_dir.parent / f"trainer-{port}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer_service", "--port", str(port), "--log-format", "text", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not is_serving(target, "visiontune.v1.TrainingService", 1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"trainer did not start; see {data_dir.parent}")
    channel = grpc.insecure_channel(target)
    return Trainer(proc, training_service_pb2_grpc.TrainingServiceStub(channel), channel, data_dir, target)


def start_shapes_trainer(s3: S3ServerProcess, root: Path, bucket_prefix: str, *args: str) -> Trainer:
    """A fresh bucket with the tiny shapes dataset, and a trainer on it with its state under `root`."""
    store = ArtifactStore.connect(s3.settings(f"{bucket_prefix}-{secrets.token_hex(6)}"))
    store.ensure_bucket()
    upload_shapes(store, root / "shapes")
    (root / "state").mkdir()
    return start_trainer(store, s3, root / "state", *args)


def upload_shapes(store: ArtifactStore, root: Path) -> None:
    """The tiny shapes dataset (16 images per label at 32 px, one corrupt file) written to `root`, uploaded to
    DATASET."""
    write_shapes_dataset(root, per_label=16, size=32, corrupt_files=1)
    upload(store, plan_upload(root, f"{DATASET}/"))


def tiny_spec(*, epochs: int = 2, fine_tuning_epochs: int = 0, seed: int = 0) -> training_spec_pb2.TrainingSpec:
    """MobileNetV3-small from scratch on the tiny shapes: a job of seconds on a CPU."""
    spec = training_spec_pb2.TrainingSpec(
        dataset=training_spec_pb2.DatasetSpec(uri=DATASET, image_size=32, validation_split=0.25),
        model=training_spec_pb2.ModelSpec(
            architecture=training_spec_pb2.ARCHITECTURE_MOBILENET_V3_SMALL,
            weights=training_spec_pb2.WEIGHTS_SOURCE_NONE,
            classifier_dim=32,
        ),
        classifier=training_spec_pb2.StageSpec(epochs=epochs, batch_size=8, learning_rate=0.01),
        run=training_spec_pb2.RunSpec(seed=seed, data_loader_workers=0),
        output_model="shapes",
    )
    if fine_tuning_epochs:
        spec.fine_tuning.enabled = True
        spec.fine_tuning.stage.epochs = fine_tuning_epochs
        spec.fine_tuning.stage.batch_size = 8
    return spec


def worker_pid(job_id: str) -> int | None:
    """The pid of the worker process running `job_id`, found by its command line; None when there is none."""
    marker = f"trainer_service.jobs.worker\0--job\0{job_id}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def create_job(trainer: Trainer, spec: training_spec_pb2.TrainingSpec, job_id: str) -> job_pb2.Job:
    return trainer.stub.CreateJob(
        training_service_pb2.CreateJobRequest(job=job_pb2.Job(spec=spec), job_id=job_id), timeout=30
    )


def watch_job(trainer: Trainer, name: str) -> list[job_pb2.JobEvent]:
    """Every event of the job until its stream ends (the job ended)."""
    return list(trainer.stub.WatchJob(training_service_pb2.WatchJobRequest(name=name), timeout=600))


def watch_job_until(trainer: Trainer, name: str, until: Callable[[job_pb2.JobEvent], bool]) -> None:
    """Follow the job until an event satisfies `until`; fails the test if the job ends first."""
    for event in trainer.stub.WatchJob(training_service_pb2.WatchJobRequest(name=name), timeout=120):
        if until(event):
            return
    pytest.fail(f"{name} ended before the event the test waits for")


def get_job(trainer: Trainer, name: str) -> job_pb2.Job:
    return trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=name), timeout=10)


def committed_checkpoint(trainer: Trainer, job_id: str) -> str | None:
    """The digest of the checkpoint the trainer's job store names for `job_id` (what a resume loads); None: none."""
    with JobStore(default_database_path(trainer.data_dir)) as jobs:
        return jobs.get_job(job_id).checkpoint_sha256


def wait_for_checkpoint(trainer: Trainer, job_id: str, timeout: float = 60) -> str:
    """Wait until the job store names a checkpoint of `job_id`: checkpoints are committed in the background, so an
    `epoch_ended` event does not mean that a checkpoint a resume could load exists yet."""
    deadline = time.monotonic() + timeout
    while (digest := committed_checkpoint(trainer, job_id)) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{job_id} committed no checkpoint within {timeout} s")
        time.sleep(0.05)
    return digest
