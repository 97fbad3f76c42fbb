"""The LR range test in a process of its own, in one of the trainer's job slots, like a job's worker.

In the gRPC server the sweep would keep a CUDA context and its cached memory for the server's life, draw from the
server's process-global RNG while other requests run, and put its work on whatever GPU it found first, outside the
slots that keep jobs from sharing one. Here the trainer borrows a slot (`JobExecutor.borrow_slot`), which gives the
process that slot's GPU, and the process ends with the sweep.

`python -m trainer_service.advice.lr_worker --dir DIR --cache-dir CACHE` reads DIR/request.pb (a validated
FindLearningRateRequest) and writes DIR/response.pb, or DIR/error.json (`{"code", "message"}`) for a failure the
caller is to see; S3 settings come from the environment (the trainer's own, as for job workers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from visiontune import errors
from visiontune.logs import configure_logging
from visiontune.outages import NO_WAIT
from visiontune.settings import S3Settings, add_s3_arguments, s3_settings_from_args
from visiontune.store import ArtifactStore, StoreError
from visiontune.v1 import training_service_pb2

from trainer_service.jobs.gpus import CUDA_VISIBLE_DEVICES
from trainer_service.jobs.local_workers import worker_environment

log = logging.getLogger(__name__)

MODULE: Final = "trainer_service.advice.lr_worker"
REQUEST_FILE: Final = "request.pb"
RESPONSE_FILE: Final = "response.pb"
ERROR_FILE: Final = "error.json"

# The statuses a sweep's failure may carry back; anything else is INTERNAL.
_ERRORS: Final[dict[str, type[errors.VisionTuneError]]] = {
    cls.code: cls for cls in (errors.FailedPrecondition, errors.ResourceExhausted, errors.Unavailable)
}


class LrFinderProcess:
    """Runs the sweep of a request as `python -m trainer_service.advice.lr_worker` with `s3`'s settings."""

    def __init__(self, s3: S3Settings, cache_dir: Path, *, python: str = sys.executable) -> None:
        self._s3 = s3
        self._cache_dir = cache_dir
        self._python = python

    def run(
        self, request: training_service_pb2.FindLearningRateRequest, gpu: str | None, timeout_s: float
    ) -> training_service_pb2.FindLearningRateResponse:
        """The sweep's response; raises the sweep's own error (FAILED_PRECONDITION for the caller's data or
        weights), or an INTERNAL VisionTuneError with the process's last words when it died."""
        env = worker_environment(self._s3)
        if gpu is not None:
            env[CUDA_VISIBLE_DEVICES] = gpu
        with tempfile.TemporaryDirectory(prefix="vt-lr-") as tmp:
            work = Path(tmp)
            (work / REQUEST_FILE).write_bytes(request.SerializeToString())
            argv = [self._python, "-m", MODULE, "--dir", str(work), "--cache-dir", str(self._cache_dir)]
            try:
                done = subprocess.run(
                    argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, check=False
                )
            except subprocess.TimeoutExpired as err:
                raise errors.VisionTuneError(f"the LR range test did not finish within {timeout_s:.0f} s") from err
            if (work / ERROR_FILE).exists():
                failure = json.loads((work / ERROR_FILE).read_text())
                cls = _ERRORS.get(failure["code"], errors.VisionTuneError)
                raise cls(failure["message"])
            if done.returncode != 0 or not (work / RESPONSE_FILE).exists():
                words = done.stderr.decode(errors="replace").strip().splitlines()
                last = words[-1] if words else f"exit code {done.returncode}"
                raise errors.VisionTuneError(f"the LR range test's process died: {last}")
            return training_service_pb2.FindLearningRateResponse.FromString((work / RESPONSE_FILE).read_bytes())


def sweep(
    request: training_service_pb2.FindLearningRateRequest, store: ArtifactStore, cache_dir: Path
) -> training_service_pb2.FindLearningRateResponse:
    """The sweep of an already validated request, in this process."""
    # Imported here: the trainer imports this module for LrFinderProcess and must not load the engine for it.
    from trainer_service.advice.lr_range_test import run_lr_finder
    from trainer_service.spec.lr_sweep import validate_lr_request

    config, settings = validate_lr_request(request, default_bucket=store.bucket)
    outcome = run_lr_finder(config, settings, store, cache_dir)
    return training_service_pb2.FindLearningRateResponse(
        points=[
            training_service_pb2.LearningRatePoint(learning_rate=p.lr, loss=p.loss, smoothed_loss=p.smoothed_loss)
            for p in outcome.result.points
        ],
        suggested_learning_rate=outcome.result.suggested_lr,
        rule=outcome.result.rule,
        plot_uri=outcome.plot_uri,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="holds request.pb; gets response.pb or error.json")
    parser.add_argument("--cache-dir", type=Path, required=True, help="the decoded-image cache")
    add_s3_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("VISIONTUNE_LOG_LEVEL", "INFO"), "json", service="trainer_lr_finder")
    request = training_service_pb2.FindLearningRateRequest.FromString((args.dir / REQUEST_FILE).read_bytes())
    failure: errors.VisionTuneError | None = None
    try:
        # A caller waits on the sweep: S3 down fails it now, as every request path does, rather than at the window.
        store = ArtifactStore.connect(s3_settings_from_args(args)).with_outage(NO_WAIT)
        response = sweep(request, store, args.cache_dir)
    except StoreError as err:
        failure = errors.FailedPrecondition(err.message)  # the dataset's or weights' location is the caller's to fix
    except errors.VisionTuneError as err:
        failure = err
    except RuntimeError as err:  # run.device CUDA where the slot has no GPU, an out-of-memory sweep
        failure = errors.FailedPrecondition(f"{type(err).__name__}: {err}")
    if failure is not None:
        log.error("the LR range test failed: %s", failure.message)
        (args.dir / ERROR_FILE).write_text(json.dumps({"code": failure.code, "message": failure.message}))
        return 1
    (args.dir / RESPONSE_FILE).write_bytes(response.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
