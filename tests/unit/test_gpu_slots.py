"""Each local job slot owns a GPU: a worker's `CUDA_VISIBLE_DEVICES` names its own GPU of the trainer's pool.

This machine has no GPU, so the pool is given (a fake device count) and the worker is a stand-in script that
reports the environment it got; the assignment is the same code a GPU box runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from trainer_service.jobs.gpus import NO_GPU, GpuSlots, device_violations, gpu_pool
from trainer_service.jobs.local_workers import LocalWorker, LocalWorkers
from trainer_service.jobs.store import JobStore
from visiontune.settings import S3Settings
from visiontune.v1 import training_spec_pb2


@pytest.mark.parametrize(
    ("environ", "count", "pool"),
    [
        ({}, 0, ()),
        ({}, 4, ("0", "1", "2", "3")),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, ("2", "3")),  # the trainer's own list is the pool, verbatim
        ({"CUDA_VISIBLE_DEVICES": "MIG-4f1c, MIG-9a2e"}, 2, ("MIG-4f1c", "MIG-9a2e")),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb,bogus"}, 2, ("GPU-aa", "GPU-bb")),  # CUDA stops at a bad entry
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, ()),  # every GPU hidden
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 0, ()),
    ],
)
def test_the_pool_is_the_trainers_own_visible_gpus(environ: dict[str, str], count: int, pool: tuple[str, ...]) -> None:
    assert gpu_pool(environ, count) == pool


def test_each_worker_gets_the_least_used_gpu_and_frees_it_when_it_ends() -> None:
    slots = GpuSlots(("0", "1", "2"))
    alive = {"a": True, "b": True}
    (first,) = slots.pick()
    assert first == "0"
    slots.hold(first, lambda: alive["a"])
    (second,) = slots.pick()
    assert second == "1"
    slots.hold(second, lambda: alive["b"])
    assert slots.in_use() == {"0": 1, "1": 1, "2": 0}
    alive["a"] = False  # the first worker exited
    assert slots.pick() == ("0",)  # the free ones, first of the pool first
    # A job on two devices gets the two least-used GPUs.
    pair = slots.pick(2)
    assert pair == ("0", "2")
    for gpu in pair:
        slots.hold(gpu, lambda: True)
    # More workers than GPUs (--job-slots above the GPU count): spread, not piled onto GPU 0.
    assert slots.in_use() == {"0": 1, "1": 1, "2": 1}
    assert slots.pick() == ("0",)
    assert slots.pick(5) == ("0", "1", "2")  # never more than the pool
    assert GpuSlots(()).pick() == ()


def _stand_in_worker(tmp_path: Path) -> Path:
    """A `python` that is not: it reports the GPU it was given and lives while `tmp_path/STOP-<job>` is absent."""
    script = tmp_path / "fake-python"
    script.write_text(
        "#!/bin/sh\n"
        'echo "gpu=${CUDA_VISIBLE_DEVICES-unset}"\n'
        f'while [ ! -e "{tmp_path}/STOP-$4" ]; do sleep 0.05; done\n'  # argv: -m MODULE --job ID ...
    )
    script.chmod(0o755)
    return script


def _reported_gpu(worker: LocalWorker) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = worker.log_path.read_text() if worker.log_path.exists() else ""
        if "gpu=" in text:
            return text.split("gpu=", 1)[1].split()[0]
        time.sleep(0.05)
    raise AssertionError(f"the stand-in worker of {worker.job_id} reported nothing")


def _launch(jobs: JobStore, runtime: LocalWorkers, job_id: str) -> LocalWorker:
    """A new job, claimed, and its (stand-in) worker started."""
    jobs.create_job(job_id, "{}")
    record = jobs.claim_next_queued("r1", start_attempt=True)
    assert record is not None
    assert record.job_id == job_id
    return runtime.launch(record)


def _stop(worker: LocalWorker, tmp_path: Path) -> None:
    (tmp_path / f"STOP-{worker.job_id}").touch()
    worker.proc.wait(timeout=10)


def test_local_workers_run_each_on_their_own_gpu(tmp_path: Path) -> None:
    python = _stand_in_worker(tmp_path)
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = LocalWorkers(
            S3Settings(), tmp_path, database_url=jobs.url, python=str(python), gpus=("GPU-aa", "GPU-bb")
        )
        assert runtime.gpu_count == 2
        workers: list[LocalWorker] = []
        try:
            workers += [_launch(jobs, runtime, "one"), _launch(jobs, runtime, "two")]
            assert [_reported_gpu(w) for w in workers] == ["GPU-aa", "GPU-bb"]
            _stop(workers[0], tmp_path)  # job one ends: its GPU is the free one
            workers.append(_launch(jobs, runtime, "three"))
            assert _reported_gpu(workers[2]) == "GPU-aa"
        finally:
            for worker in workers:
                _stop(worker, tmp_path)


def test_the_lr_range_test_borrows_a_gpu_no_worker_holds(tmp_path: Path) -> None:
    python = _stand_in_worker(tmp_path)
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = LocalWorkers(
            S3Settings(), tmp_path, database_url=jobs.url, python=str(python), gpus=("GPU-aa", "GPU-bb")
        )
        worker = _launch(jobs, runtime, "one")
        try:
            assert _reported_gpu(worker) == "GPU-aa"
            with runtime.borrow_gpu() as gpu:
                assert gpu == "GPU-bb"
                with runtime.borrow_gpu() as shared:
                    assert shared == "GPU-aa"  # more borrowers than GPUs: spread evenly
            with runtime.borrow_gpu() as again:
                assert again == "GPU-bb"  # given back when the block ended
        finally:
            _stop(worker, tmp_path)
    with LocalWorkers(S3Settings(), tmp_path).borrow_gpu() as none:
        assert none is None


def test_without_gpus_a_worker_keeps_the_trainers_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    python = _stand_in_worker(tmp_path)
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = LocalWorkers(S3Settings(), tmp_path, database_url=jobs.url, python=str(python))
        assert runtime.gpu_count == 0
        worker = _launch(jobs, runtime, "cpu")
        try:
            assert _reported_gpu(worker) == "unset"
        finally:
            _stop(worker, tmp_path)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None


def test_what_no_slot_could_give_is_refused_at_create() -> None:
    def spec(device: int, devices: int | None = None) -> training_spec_pb2.TrainingSpec:
        run = training_spec_pb2.RunSpec(device=device)
        if devices is not None:
            run.devices = devices
        return training_spec_pb2.TrainingSpec(run=run)

    cuda, auto, cpu = training_spec_pb2.DEVICE_CUDA, training_spec_pb2.DEVICE_AUTO, training_spec_pb2.DEVICE_CPU
    (violation,) = device_violations(spec(cuda), "job.spec", gpus=0)
    assert (violation.field, violation.description) == ("job.spec.run.device", NO_GPU)
    assert device_violations(spec(cuda), "job.spec", gpus=1) == []
    assert device_violations(spec(auto), "job.spec", gpus=0) == []  # AUTO trains on the CPU here
    assert device_violations(spec(cuda), "job.spec", gpus=None) == []  # a cluster: its scheduler finds GPU nodes
    # Several devices: one GPU each, so not more than the trainer has; on the CPU (no GPUs, or CPU asked) any number.
    (too_many,) = device_violations(spec(auto, 4), "study.spec.base_spec", gpus=2)
    assert too_many.field == "study.spec.base_spec.run.devices"
    assert "4 processes, one per GPU, but this trainer's job slots have 2 GPUs" in too_many.description
    assert device_violations(spec(auto, 2), "job.spec", gpus=2) == []
    assert device_violations(spec(auto, 4), "job.spec", gpus=0) == []
    assert device_violations(spec(cpu, 4), "job.spec", gpus=2) == []


def test_a_job_on_two_devices_gets_two_gpus(tmp_path: Path) -> None:
    python = _stand_in_worker(tmp_path)
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = LocalWorkers(
            S3Settings(), tmp_path, database_url=jobs.url, python=str(python), gpus=("GPU-aa", "GPU-bb", "GPU-cc")
        )
        single = _launch(jobs, runtime, "single")
        jobs.create_job("pair", json_format.MessageToJson(training_spec_pb2.TrainingSpec(run={"devices": 2})))
        record = jobs.claim_next_queued("r1", start_attempt=True)
        assert record is not None
        pair = runtime.launch(record)
        try:
            assert _reported_gpu(single) == "GPU-aa"
            assert _reported_gpu(pair) == "GPU-bb,GPU-cc"
        finally:
            _stop(single, tmp_path)
            _stop(pair, tmp_path)
