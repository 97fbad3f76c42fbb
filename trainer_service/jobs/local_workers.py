"""Workers as subprocesses of this trainer: `python -m trainer_service.jobs.worker --job ID`, one per attempt, with
its output in DATA_DIR/trainer/jobs/ID/worker-ATTEMPT.log (the last line of which is the job's error when it dies)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from visiontune.settings import DATABASE_URL_ENV, S3Settings

from trainer_service.jobs.gpus import CUDA_VISIBLE_DEVICES, GpuSlots, devices_of
from trainer_service.jobs.records import JobRecord, WorkerRecord
from trainer_service.jobs.runtime import WorkerExit, last_words

log = logging.getLogger(__name__)

WORKER_MODULE = "trainer_service.jobs.worker"


def worker_environment(
    s3: S3Settings, base: Mapping[str, str] | None = None, *, database_url: str | None = None
) -> dict[str, str]:
    """`base` (this process's environment by default) plus the S3 settings and the job database the worker's flags
    default to. The database URL travels in the environment, not argv, so its password is not in `ps`."""
    env = {**(os.environ if base is None else base), **s3.to_env(), "PYTHONUNBUFFERED": "1"}
    if database_url is not None:
        env[DATABASE_URL_ENV] = database_url
    return env


def exit_cause(code: int) -> str:
    """A process's return code in words: negative codes are signals (subprocess's convention)."""
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class LocalWorker:
    """One worker subprocess."""

    def __init__(self, job_id: str, attempt: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> WorkerExit | None:
        code = self.proc.poll()
        if code is None:
            return None
        return WorkerExit(code if code >= 0 else None, exit_cause(code), last_log_line(self.log_path))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleaned_up(self) -> bool:
        return True  # a process that exited leaves nothing behind but its log


class LocalWorkers:
    """The default runtime: worker subprocesses, bounded by the executor's slots. Each worker gets a GPU of `gpus`
    (`CUDA_VISIBLE_DEVICES` entries, `gpus.gpu_pool`) to itself while there are as many as running workers, and a
    job on several devices that many; such a job also takes that many of the executor's slots (`gpus.slots_taken`),
    so with a slot per GPU (the default) no two workers share a GPU."""

    cluster_cap = None
    workers_outlive_trainer = False

    def __init__(
        self,
        s3: S3Settings,
        data_dir: Path,
        *,
        database_url: str | None = None,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        gpus: tuple[str, ...] = (),
    ) -> None:
        self._s3 = s3
        self._gpus = GpuSlots(gpus)
        # Jobs launch on the executor's thread, LR range tests borrow on gRPC threads: a GPU is picked and held
        # under this lock, so two callers never both take the one that was free.
        self._gpu_lock = threading.Lock()
        self._extra_env = dict(extra_env or {})  # the trainer's limits, which the worker enforces
        self._data_dir = data_dir
        self._database_url = database_url
        self._python = python

    @property
    def gpu_count(self) -> int:
        return len(self._gpus.pool)

    @contextlib.contextmanager
    def borrow_gpu(self) -> Iterator[str | None]:
        returned = threading.Event()
        with self._gpu_lock:
            picked = self._gpus.pick()
            if picked:
                self._gpus.hold(picked[0], lambda: not returned.is_set())
        if not picked:
            yield None
            return
        try:
            yield picked[0]
        finally:
            returned.set()

    def worker_name(self, job_id: str, attempt: int) -> str:
        return f"{job_id}-{attempt}"

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def launch(self, record: JobRecord) -> LocalWorker:
        log_dir = self._data_dir / "trainer" / "jobs" / record.job_id
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"worker-{record.attempt}.log"
        env = {**worker_environment(self._s3, database_url=self._database_url), **self._extra_env}
        with self._gpu_lock:
            # A job on several devices (run.devices) gets that many GPUs: its ranks take one each.
            gpus = self._gpus.pick(devices_of(record.spec_json))
            if gpus:
                env[CUDA_VISIBLE_DEVICES] = ",".join(gpus)
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    [self._python, "-m", WORKER_MODULE, "--job", record.job_id, "--data-dir", str(self._data_dir)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            for gpu in gpus:
                self._gpus.hold(gpu, lambda: proc.poll() is None)
        log.info(
            "job started",
            extra={
                "job": record.job_id,
                "attempt": record.attempt,
                "pid": proc.pid,
                "log": str(log_path),
                "gpus": ",".join(gpus) or "none",
            },
        )
        return LocalWorker(record.job_id, record.attempt, proc, log_path)

    def adopt(self, row: WorkerRecord) -> LocalWorker:
        raise NotImplementedError("local workers hold no worker rows: they die with their trainer")

    def stop_strays(self, job_id: str) -> None:
        _kill_stray_worker(job_id)


def _kill_stray_worker(job_id: str) -> None:
    """A worker of this job still running from a previous trainer process (found through /proc)."""
    marker = f"{WORKER_MODULE}\0--job\0{job_id}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                continue
            log.warning("stopped a stray worker", extra={"job": job_id, "pid": int(entry.name)})
            time.sleep(0.1)


def last_log_line(path: Path, max_bytes: int = 64 * 1024) -> str:
    """What a dead worker said last in its log file, as one line for the job's error (`runtime.last_words`); the
    whole log stays in the file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no worker log)"
    return last_words(text) or "(the worker log is empty)"
