"""The executor's rules over any worker runtime, with a runtime whose workers are plain objects the test ends (the
rules are the executor's; the real runtimes have their own tests): retries, failures that are not retried, the cap,
and handing workers that outlive their trainer over to another replica."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import json_format
from tests.integration.trainer_helpers import tiny_spec
from trainer_service.jobs.executor import JobExecutor, SlotsBusy
from trainer_service.jobs.records import JobRecord, WorkerRecord
from trainer_service.jobs.runtime import WorkerExit
from trainer_service.jobs.store import JobState, JobStore


@dataclass
class PlainWorker:
    job_id: str
    attempt: int
    ended: WorkerExit | None = None
    terminated: bool = False
    gone: bool = False

    def exited(self) -> WorkerExit | None:
        return self.ended

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.ended = self.ended or WorkerExit(None, "killed", "")

    def cleaned_up(self) -> bool:
        return self.gone


@dataclass
class PlainRuntime:
    cluster_cap: int | None = None
    workers_outlive_trainer: bool = False
    gpu_count: int | None = 0
    launched: list[PlainWorker] = field(default_factory=list)
    adopted: list[PlainWorker] = field(default_factory=list)

    def worker_name(self, job_id: str, attempt: int) -> str:
        return f"vt-{job_id}-{attempt}"

    def borrow_gpu(self) -> contextlib.AbstractContextManager[str | None]:
        return contextlib.nullcontext(None)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def launch(self, record: JobRecord) -> PlainWorker:
        worker = PlainWorker(record.job_id, record.attempt)
        self.launched.append(worker)
        return worker

    def adopt(self, row: WorkerRecord) -> PlainWorker:
        worker = PlainWorker(row.job_id, row.attempt)
        self.adopted.append(worker)
        return worker

    def stop_strays(self, job_id: str) -> None:
        pass


SPEC = json_format.MessageToJson(tiny_spec())


def _until(predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _executor(jobs: JobStore, runtime: PlainRuntime, replica: str = "r1", slots: int = 4) -> JobExecutor:
    executor = JobExecutor(jobs, runtime, replica_id=replica, slots=slots, poll_interval_s=0.05)
    executor.start()
    return executor


def test_a_killed_worker_is_retried_and_one_that_cannot_run_fails_at_once(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = PlainRuntime()
        executor = _executor(jobs, runtime)
        try:
            jobs.create_job("retried", SPEC)  # max_retries 2 by default
            _until(lambda: len(runtime.launched) == 1)
            first = runtime.launched[0]
            first.ended, first.gone = WorkerExit(None, "signal SIGKILL (exit code 137)", ""), True
            _until(lambda: len(runtime.launched) == 2)
            assert jobs.get_job("retried").attempt == 2

            jobs.create_job("hopeless", "{}")
            _until(lambda: len(runtime.launched) == 3)
            stuck = runtime.launched[2]
            stuck.ended = WorkerExit(None, "its image x could not be pulled for 300 s", "", retryable=False)
            stuck.gone = True
            _until(lambda: jobs.get_job("hopeless").state == JobState.FAILED)
            assert jobs.get_job("hopeless").error == "its image x could not be pulled for 300 s"
            assert len(runtime.launched) == 3
        finally:
            executor.stop()


def test_the_cap_holds_until_a_worker_is_cleaned_up(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = PlainRuntime(cluster_cap=2, workers_outlive_trainer=True)
        executor = _executor(jobs, runtime, slots=2)
        try:
            for i in range(3):
                jobs.create_job(f"j{i}", "{}")
            _until(lambda: len(runtime.launched) == 2)
            done = runtime.launched[0]
            jobs.update_state(done.job_id, JobState.SUCCEEDED)  # what the worker itself records
            done.ended = WorkerExit(0, "exit code 0", "")
            time.sleep(0.5)
            assert len(runtime.launched) == 2  # ended, but its Job still exists: no third yet
            done.gone = True
            _until(lambda: len(runtime.launched) == 3)
            assert len(jobs.workers()) == 2
        finally:
            executor.stop(requeue=False)


def test_a_stopped_replica_s_workers_are_adopted_by_another_never_relaunched(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        first = PlainRuntime(cluster_cap=8, workers_outlive_trainer=True)
        executor = _executor(jobs, first, "r1")
        jobs.create_job("long", "{}")
        _until(lambda: len(first.launched) == 1)
        executor.stop()  # the worker runs on; its row and job are released
        assert jobs.get_job("long").state == JobState.RUNNING
        assert jobs.get_job("long").owner is None

        second = PlainRuntime(cluster_cap=8, workers_outlive_trainer=True)
        other = _executor(jobs, second, "r2")
        try:
            _until(lambda: len(second.adopted) == 1)
            assert second.launched == []
            assert jobs.get_job("long").owner == "r2"
            adopted = second.adopted[0]
            jobs.update_state("long", JobState.SUCCEEDED)
            adopted.ended, adopted.gone = WorkerExit(0, "exit code 0", ""), True
            _until(lambda: not jobs.workers())
            assert jobs.get_job("long").attempt == 1
        finally:
            other.stop()


def test_a_borrowed_slot_waits_for_a_free_one_and_holds_claims_back(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = PlainRuntime()
        executor = _executor(jobs, runtime, slots=1)
        try:
            jobs.create_job("running", SPEC)
            _until(lambda: len(runtime.launched) == 1)
            # The one slot runs a job: the LR range test waits as long as its caller does, then says why not.
            started = time.monotonic()
            with (
                pytest.raises(SlotsBusy, match="all 1 job slot of this trainer stayed busy for 0 s"),
                executor.borrow_slot(0.3),
            ):
                pass
            assert time.monotonic() - started >= 0.3
            # The job ends while the test waits: the test gets the slot, and no queued job is claimed meanwhile.
            jobs.create_job("queued", SPEC)
            running = runtime.launched[0]

            def end_running() -> None:
                time.sleep(0.3)
                jobs.update_state("running", JobState.SUCCEEDED)
                running.ended, running.gone = WorkerExit(0, "exit code 0", ""), True

            threading.Thread(target=end_running).start()
            with executor.borrow_slot(10) as gpu:
                assert gpu is None  # PlainRuntime has no GPUs
                time.sleep(0.5)
                assert len(runtime.launched) == 1
                assert jobs.get_job("queued").state == JobState.QUEUED
            _until(lambda: len(runtime.launched) == 2)  # given back: the queued job runs
            assert runtime.launched[1].job_id == "queued"
        finally:
            executor.stop()


def _spec_on(devices: int) -> str:
    spec = tiny_spec()
    spec.run.devices = devices
    return json_format.MessageToJson(spec)


def _finish(jobs: JobStore, worker: PlainWorker) -> None:
    jobs.update_state(worker.job_id, JobState.SUCCEEDED)  # what the worker itself records
    worker.ended, worker.gone = WorkerExit(0, "exit code 0", ""), True


def test_a_job_on_several_local_gpus_takes_a_slot_per_gpu_and_waits_its_turn(tmp_path: Path) -> None:
    """Two GPUs, a slot each: a two-GPU job queued behind a one-GPU job waits for both (and the one-GPU job
    queued after it does not overtake it); a job on more GPUs than the replica has runs alone."""
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        runtime = PlainRuntime(gpu_count=2)
        executor = _executor(jobs, runtime, slots=2)
        try:
            jobs.create_job("one", _spec_on(1))
            _until(lambda: len(runtime.launched) == 1)
            jobs.create_job("two", _spec_on(2))
            jobs.create_job("after", _spec_on(1))
            time.sleep(0.5)
            assert [w.job_id for w in runtime.launched] == ["one"]  # one GPU free: "two" waits, "after" behind it
            _finish(jobs, runtime.launched[0])
            _until(lambda: len(runtime.launched) == 2)
            assert runtime.launched[1].job_id == "two"
            time.sleep(0.5)
            assert len(runtime.launched) == 2  # "two" holds both slots
            _finish(jobs, runtime.launched[1])
            _until(lambda: len(runtime.launched) == 3)
            assert runtime.launched[2].job_id == "after"
            jobs.create_job("four", _spec_on(4))
            _finish(jobs, runtime.launched[2])
            _until(lambda: len(runtime.launched) == 4)  # larger than the replica: it runs once the replica is idle
            jobs.create_job("next", _spec_on(1))
            time.sleep(0.5)
            assert len(runtime.launched) == 4
        finally:
            executor.stop(requeue=False)


def test_without_a_gpu_pool_a_job_takes_one_slot_whatever_its_devices(tmp_path: Path) -> None:
    """On the CPU (gloo ranks share the cores) and on Kubernetes (the scheduler finds a pod's GPUs) the slots
    count workers, not devices."""
    with JobStore(tmp_path / "jobs.sqlite3") as jobs:
        for gpus in (0, None):
            runtime = PlainRuntime(gpu_count=gpus)
            executor = _executor(jobs, runtime, replica=f"r{gpus}", slots=2)
            try:
                jobs.create_job(f"a{gpus}", _spec_on(2))
                jobs.create_job(f"b{gpus}", _spec_on(2))
                _until(lambda r=runtime: len(r.launched) == 2)
                for worker in runtime.launched:
                    _finish(jobs, worker)
            finally:
                executor.stop(requeue=False)
