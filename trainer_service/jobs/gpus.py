"""Which GPU each local job slot owns: a worker sees exactly its own GPU, through `CUDA_VISIBLE_DEVICES`.

Without this every worker would see every GPU and put its work on cuda:0, so eight jobs on an eight-GPU box would
share one GPU and run out of memory while seven idled. The pool is what the trainer itself may use: its own
`CUDA_VISIBLE_DEVICES` when set (indices, GPU UUIDs or MIG UUIDs, passed on verbatim), else every GPU torch counts.
A Kubernetes worker needs none of this: the device plugin gives its pod only the GPUs it requested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from visiontune.errors import FieldViolation
from visiontune.v1 import training_spec_pb2

CUDA_VISIBLE_DEVICES: Final = "CUDA_VISIBLE_DEVICES"

# CreateJob's answer to `run.device: CUDA` on a trainer whose local slots have no GPU: the job could only fail.
NO_GPU: Final = "CUDA was asked for, but this trainer's job slots have no GPU (run.device AUTO or CPU trains here)"


def device_violations(spec: training_spec_pb2.TrainingSpec, field: str, *, offers_gpus: bool) -> list[FieldViolation]:
    """`run.device: CUDA` where no worker can get a GPU, as a violation of `field` + ".run.device"."""
    if offers_gpus or spec.run.device != training_spec_pb2.DEVICE_CUDA:
        return []
    return [FieldViolation(f"{field}.run.device", NO_GPU)]


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

    def pick(self) -> str | None:
        """The GPU the next worker gets; None when the pool is empty (the worker trains on the CPU and inherits the
        trainer's environment). The caller `hold`s it once the worker has started."""
        if not self.pool:
            return None
        for holders in self._holders.values():
            holders[:] = [alive for alive in holders if alive()]
        return min(self.pool, key=lambda gpu: len(self._holders[gpu]))

    def hold(self, gpu: str, running: Callable[[], bool]) -> None:
        """`gpu` is taken for as long as `running()` says so."""
        self._holders[gpu].append(running)

    def in_use(self) -> dict[str, int]:
        """Live workers per GPU (for logs and tests)."""
        return {gpu: sum(1 for alive in holders if alive()) for gpu, holders in self._holders.items()}
