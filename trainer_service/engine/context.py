"""Where and how the engine computes: device, precision, data-loader workers, and the seeds of its RNG streams.

`run_context` turns a job's `run.*` fields into a `RunContext`; `derive_seed` names every random stream after
where the run is (seed, stage, epoch, purpose), which is what makes a resumed run replay an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from trainer_service.engine.hardware import Hardware, autocast_dtype, probe
from trainer_service.engine.models import normalization
from trainer_service.spec.config import DeviceKind, Precision, TrainingConfig

CPU_EVAL_BATCH_SIZE = 64
GPU_EVAL_BATCH_SIZE = 512


@dataclass
class RunContext:
    """What the loop needs besides the config: device, precision and the data-loading setup."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    workers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_batch_size: int = (
        CPU_EVAL_BATCH_SIZE  # batches of evaluation, feature extraction and prediction (no gradients)
    )

    @property
    def use_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16 and self.device.type == "cuda"


# -- device and precision -----------------------------------------------------------------------------


def resolve_device(kind: DeviceKind, hardware: Hardware) -> torch.device:
    if kind == DeviceKind.CUDA:
        if not hardware.gpus:
            raise RuntimeError("the spec asks for device CUDA, but no GPU is available to this trainer")
        return torch.device("cuda")
    if kind == DeviceKind.AUTO and hardware.gpus:
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_autocast(precision: Precision, device: torch.device, hardware: Hardware) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (`hardware.autocast_dtype`: AUTO is bf16 only where it is native)."""
    gpu = hardware.gpu(device)
    return autocast_dtype(precision, device, gpu.capability if gpu is not None else None)


def run_context(config: TrainingConfig, hardware: Hardware | None = None) -> RunContext:
    """The RunContext a job's spec asks for on `hardware` (probed when not given): its device, precision and
    data-loader workers (run.*)."""
    hardware = hardware if hardware is not None else probe()
    device = resolve_device(config.run.device, hardware)
    mean, std = normalization(config.model)
    return RunContext(
        device=device,
        autocast_dtype=resolve_autocast(config.run.precision, device, hardware),
        workers=config.run.data_loader_workers,
        mean=mean,
        std=std,
        # Without gradients a GPU holds far larger batches, and small ones leave it waiting on the host.
        eval_batch_size=GPU_EVAL_BATCH_SIZE if device.type == "cuda" else CPU_EVAL_BATCH_SIZE,
    )


def configure_kernels(deterministic: bool) -> None:
    """This process's kernel choice for a run (`run.deterministic`): the fastest (cuDNN autotuning, TF32 matmuls
    on Ampere and later), or only deterministic ones for exact replay. Set on every run: the flags are global."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    # warn_only: an op without a deterministic kernel warns rather than failing the job.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it reads this when its handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def to_device(inputs: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """A batch on the run's device; image batches [N, 3, S, S] in channels_last on a GPU, as the model is there
    (a mismatch would make every convolution convert its input first)."""
    inputs = inputs.to(ctx.device, non_blocking=True)
    if ctx.device.type == "cuda" and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def autocast(ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision as the context asks, or nothing for fp32."""
    if ctx.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)


# -- seeding ------------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and where we are (stage, epoch, purpose)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
