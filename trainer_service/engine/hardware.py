"""What the worker trains on, found rather than assumed: the GPU, its compute capability, the driver, the CUDA
torch was built for, and what that means for precision.

`probe` reads the machine once; everything else here is a pure function of its `Hardware`, so the choices (native
bf16 or not, "a GPU is here but torch cannot use it") are tested without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from trainer_service.spec.config import DeviceKind, Precision

# Ampere (8.0) is the first architecture with bf16 tensor cores; `torch.cuda.is_bf16_supported()` also says yes on
# older GPUs, where bf16 is emulated and slower than fp16.
NATIVE_BF16_CAPABILITY: Final = (8, 0)
_DRIVER_VERSION_FILE: Final = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]
    memory_bytes: int


@dataclass(frozen=True)
class Hardware:
    """The machine as a worker sees it. `gpus` are those torch can use; `driver_version` is set wherever an NVIDIA
    driver is loaded, even when torch cannot use it (a driver older than `cuda_build` needs)."""

    gpus: tuple[Gpu, ...] = ()
    driver_version: str = ""
    driver_cuda_version: str = ""
    cuda_build: str = ""
    cudnn_version: int = 0
    visible_devices: str | None = None

    def gpu(self, device: torch.device) -> Gpu | None:
        """The GPU `device` is (None on the CPU)."""
        if device.type != "cuda" or not self.gpus:
            return None
        return self.gpus[device.index or 0]


def native_bf16(capability: tuple[int, int]) -> bool:
    return capability >= NATIVE_BF16_CAPABILITY


def autocast_dtype(
    precision: Precision, device: torch.device, capability: tuple[int, int] | None
) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: full fp32). AUTO: fp32 on the CPU; on a GPU bf16
    where it is native (`capability` 8.0+), else fp16 (with a GradScaler)."""
    if precision == Precision.FP32:
        return None
    if precision == Precision.AMP_BF16:
        return torch.bfloat16
    if precision == Precision.AMP_FP16:
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if capability is not None and native_bf16(capability) else torch.float16


def device_warnings(
    hardware: Hardware, asked: DeviceKind, device: torch.device, dtype: torch.dtype | None
) -> list[tuple[str, str]]:
    """(code, message) warnings about the choice, for the job's events: what would otherwise go unnoticed."""
    out = []
    if asked == DeviceKind.AUTO and device.type == "cpu" and hardware.driver_version:
        needs = f", and this torch build needs CUDA {hardware.cuda_build}" if hardware.cuda_build else ""
        supports = f" supports CUDA {hardware.driver_cuda_version}" if hardware.driver_cuda_version else " is loaded"
        out.append(
            (
                "gpu_unusable",
                f"an NVIDIA driver ({hardware.driver_version}){supports}{needs}, but torch sees no usable GPU: "
                "training on the CPU (set run.device CUDA to fail instead)",
            )
        )
    gpu = hardware.gpu(device)
    if gpu is not None and dtype == torch.bfloat16 and not native_bf16(gpu.capability):
        out.append(
            (
                "emulated_bf16",
                f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) has no native bf16: "
                "AMP_BF16 is emulated and slower than AMP_FP16 there",
            )
        )
    return out


# -- reading the machine ------------------------------------------------------------------------------------


def probe(environ: Mapping[str, str] = os.environ) -> Hardware:
    """The machine as this process sees it (initialises CUDA when it is usable)."""
    gpus: tuple[Gpu, ...] = ()
    if torch.cuda.is_available():
        gpus = tuple(_gpu(i) for i in range(torch.cuda.device_count()))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None  # type: ignore[no-untyped-call]
    return Hardware(
        gpus=gpus,
        driver_version=_kernel_driver_version(),
        driver_cuda_version=_driver_cuda_version(),
        cuda_build=torch.version.cuda or "",
        cudnn_version=cudnn or 0,
        visible_devices=environ.get("CUDA_VISIBLE_DEVICES"),
    )


def _gpu(index: int) -> Gpu:
    props = torch.cuda.get_device_properties(index)
    return Gpu(name=props.name, capability=(props.major, props.minor), memory_bytes=props.total_memory)


def _kernel_driver_version() -> str:
    """ "550.54.15" from the loaded NVIDIA kernel module; "" where none is."""
    try:
        text = _DRIVER_VERSION_FILE.read_text()
    except OSError:
        return ""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else ""


def _driver_cuda_version() -> str:
    """The newest CUDA the user-space driver supports ("12.4"), asked of libcuda itself; "" without one."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ""
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return ""
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def out_of_memory_message(
    hardware: Hardware, device: torch.device, dtype: torch.dtype | None, batch_field: str | None, batch_size: int
) -> str:
    """The job's error when the GPU ran out of memory: where, at what batch size (`batch_field`, the spec's path of
    the running stage's batch size; None outside a stage), and what to change for the retry. The same spec would run
    out again: the worker's GPU is its own."""
    gpu = hardware.gpu(device)
    on = f" on {gpu.name} ({gpu.memory_bytes / 2**30:.1f} GiB)" if gpu is not None else ""
    if batch_field is not None:
        where = f" at {batch_field} {batch_size}"
        smaller = f"a smaller {batch_field} (e.g. {max(1, batch_size // 2)})"
    else:
        where, smaller = "", "smaller batch sizes"
    cheaper = ", or run.precision AMP_BF16/AMP_FP16 instead of FP32" if dtype is None else ""
    return f"out of GPU memory{where}{on}: retry the job with {smaller}, a smaller dataset.image_size{cheaper}"
