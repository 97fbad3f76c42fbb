"""Each local job slot owns a GPU: a worker's `CUDA_VISIBLE_DEVICES` names its own GPU of the trainer's pool.

This machine has no GPU, so the pool is given (a fake device count) and the worker is a stand-in script that
reports the environment it got; the assignment is the same code a GPU box runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
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
    slots = GpuSlots(("0", "1"))
    alive = {"a": True, "b": True, "c": True}
    first = slots.pick()
    assert first == "0"
    slots.hold(first, lambda: alive["a"])
    second = slots.pick()
    assert second == "1"
    slots.hold(second, lambda: alive["b"])
    assert slots.in_use() == {"0": 1, "1": 1}
    alive["a"] = False  # the first worker exited
    third = slots.pick()
    assert third == "0"
    slots.hold(third, lambda: alive["c"])
    # More workers than GPUs (--job-slots above the GPU count): they are spread, not piled onto GPU 0.
    fourth = slots.pick()
    assert fourth == "0"  # a tie (one each): the first of the pool
    slots.hold(fourth, lambda: True)
    assert slots.pick() == "1"
    assert GpuSlots(()).pick() is None


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
        assert runtime.offers_gpus
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
        assert not runtime.offers_gpus
        worker = _launch(jobs, runtime, "cpu")
        try:
            assert _reported_gpu(worker) == "unset"
        finally:
            _stop(worker, tmp_path)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None


def test_cuda_is_refused_only_where_no_worker_can_get_a_gpu() -> None:
    cuda = training_spec_pb2.TrainingSpec(run=training_spec_pb2.RunSpec(device=training_spec_pb2.DEVICE_CUDA))
    auto = training_spec_pb2.TrainingSpec(run=training_spec_pb2.RunSpec(device=training_spec_pb2.DEVICE_AUTO))
    (violation,) = device_violations(cuda, "job.spec", offers_gpus=False)
    assert (violation.field, violation.description) == ("job.spec.run.device", NO_GPU)
    assert device_violations(cuda, "job.spec", offers_gpus=True) == []
    assert device_violations(auto, "job.spec", offers_gpus=False) == []
