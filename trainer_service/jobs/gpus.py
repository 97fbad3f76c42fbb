"""Which GPU each local job slot owns: a worker sees exactly its own GPU, through `CUDA_VISIBLE_DEVICES`.

Without this every worker would see every GPU and put its work on cuda:0, so eight jobs on an eight-GPU box would
share one GPU and run out of memory while seven idled. The pool is what the trainer itself may use: its own
`CUDA_VISIBLE_DEVICES` when set (indices, GPU UUIDs or MIG UUIDs, passed on verbatim), else every GPU torch counts.
A Kubernetes worker needs none of this: the device plugin gives its pod only the GPUs it requested.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final

from visiontune.errors import FieldViolation
from visiontune.v1 import training_spec_pb2

CUDA_VISIBLE_DEVICES: Final = "CUDA_VISIBLE_DEVICES"

# CreateJob's answer to `run.device: CUDA` on a trainer whose local slots have no GPU: the job could only fail.
NO_GPU: Final = "CUDA was asked for, but this trainer's job slots have no GPU (run.device AUTO or CPU trains here)"


def device_violations(spec: training_spec_pb2.TrainingSpec, field: str, *, gpus: int | None) -> list[FieldViolation]:
    """What a job could not get where `gpus` GPUs are to be had (None: no fixed number, a cluster's scheduler finds
    them): `run.device: CUDA` with none, or more `run.devices` on GPUs than there are. Violations of `field` + ".run.*".
    """
    if gpus is None:
        return []
    device, devices = spec.run.device, spec.run.devices if spec.run.HasField("devices") else 1
    if device == training_spec_pb2.DEVICE_CUDA and gpus == 0:
        return [FieldViolation(f"{field}.run.device", NO_GPU)]
    if device != training_spec_pb2.DEVICE_CPU and 0 < gpus < devices:
        return [
            FieldViolation(
                f"{field}.run.devices",
                f"{devices} processes, one per GPU, but this trainer's job slots have {gpus} GPU"
                f"{'s' if gpus != 1 else ''} (run.device CPU runs them on the CPU)",
            )
        ]
    return []


def devices_of(spec_json: str) -> int:
    """`run.devices` of a stored spec (resolved at CreateJob, so present; 1 for a spec stored before the field)."""
    run = json.loads(spec_json).get("run", {}) if spec_json else {}
    return int(run.get("devices", 1))


def slots_taken(devices: int, gpus: int | None, slots: int) -> int:
    """Executor slots a job on `devices` processes takes: where the trainer hands out a fixed pool of GPUs (local
    workers, `gpus` > 0) one per GPU its ranks get, never more than the replica has (a larger job runs alone); one
    elsewhere (on the CPU, or a Kubernetes pod whose GPUs the cluster's scheduler finds)."""
    if not gpus:
        return 1
    return max(1, min(devices, slots))


def gpu_pool(environ: Mapping[str, str], device_count: int) -> tuple[str, ...]:
    """The GPUs the trainer may hand out, each as a `CUDA_VISIBLE_DEVICES` entry.

    `device_count` is what CUDA reports under `environ` (`torch.cuda.device_count()`): CUDA stops reading the
    variable at its first invalid entry, so only that many of the listed entries are real GPUs."""
    listed = environ.get(CUDA_VISIBLE_DEVICES)
    if listed is None:
        return tuple(str(i) for i in range(device_count))
    entries = tuple(entry.strip() for entry in listed.split(",") if entry.strip())
    return entries[: max(0, device_count)]


class GpuSlots:
    """Hands each new worker the pool's GPU with the fewest live workers (first in the pool on a tie).

    With as many slots as GPUs (the default) every worker gets a GPU of its own; with more slots than GPUs, workers
    share them evenly rather than piling onto the first. A worker holds its GPU while its `running()` says so:
    nothing needs to give it back when the worker exits."""

    def __init__(self, pool: tuple[str, ...]) -> None:
        self.pool = pool
        self._holders: dict[str, list[Callable[[], bool]]] = {gpu: [] for gpu in pool}

    def pick(self, count: int = 1) -> tuple[str, ...]:
        """The GPUs the next worker gets: the `count` least-used of the pool (all of it when `count` is larger);
        () when the pool is empty (the worker trains on the CPU and inherits the trainer's environment). The caller
        `hold`s each once the worker has started."""
        for holders in self._holders.values():
            holders[:] = [alive for alive in holders if alive()]
        return tuple(sorted(self.pool, key=lambda gpu: len(self._holders[gpu]))[:count])

    def hold(self, gpu: str, running: Callable[[], bool]) -> None:
        """`gpu` is taken for as long as `running()` says so."""
        self._holders[gpu].append(running)

    def in_use(self) -> dict[str, int]:
        """Live workers per GPU (for logs and tests)."""
        return {gpu: sum(1 for alive in holders if alive()) for gpu, holders in self._holders.items()}
