"""Where Triton runs every deployed version's instances: the CPU or named GPUs, and in which precision.

The service's `--device`, `--gpus` and `--gpu-precision` flags, checked once at start-up against the GPUs torch
sees (the ones Triton, its child with the same CUDA_VISIBLE_DEVICES, sees too). Each deployment's instance group
is placed on `gpus` (`instance_count` instances on each), and its Python-backend model runs in `precision`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

ALL_GPUS: Final = "all"


class Precision(enum.StrEnum):
    """The dtype the Python backend runs the TorchScript module in (the names are model.py's too)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


DEFAULT_PRECISION: Final = Precision.FP32


@dataclass(frozen=True)
class Placement:
    gpus: tuple[int, ...] = ()  # CUDA device indices; empty: the CPU
    precision: Precision = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        if not self.gpus and self.precision != Precision.FP32:
            raise ValueError(f"precision {self.precision} needs GPUs; on the CPU models run in fp32")
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise ValueError(f"GPU indices must be distinct and >= 0, got {list(self.gpus)}")

    @property
    def gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def device(self) -> str:
        """What ListDeployments shows: "cuda" or "cpu"."""
        return "cuda" if self.gpus else "cpu"


def parse_gpus(text: str, visible: int) -> tuple[int, ...]:
    """`all` (every GPU of the `visible` ones) or comma-separated indices among them; ValueError saying why not."""
    if visible < 1:
        raise ValueError("no CUDA device is visible")
    if text.strip() == ALL_GPUS:
        return tuple(range(visible))
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise ValueError(f"{text!r} is not {ALL_GPUS!r} or comma-separated GPU indices") from err
    outside = [g for g in gpus if not 0 <= g < visible]
    if outside:
        raise ValueError(f"GPU(s) {outside} do not exist: {visible} visible (indices 0-{visible - 1})")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"GPU indices repeat in {text!r}")
    return gpus


def placement_for(device: str, gpus: str, precision: str, visible: int) -> Placement:
    """The flags' placement: `device` auto|cpu|cuda (auto = cuda when `visible` > 0), `gpus` for parse_gpus,
    `precision` a Precision name. ValueError naming the flag that is wrong."""
    try:
        chosen = Precision(precision)
    except ValueError as err:
        raise ValueError(f"--gpu-precision {precision!r}: one of {', '.join(p.value for p in Precision)}") from err
    if device == "cpu" or (device == "auto" and visible == 0):
        if chosen != Precision.FP32:
            raise ValueError(f"--gpu-precision {chosen} needs a GPU; models on the CPU run in fp32")
        return Placement()
    if device not in ("auto", "cuda"):
        raise ValueError(f"--device {device!r}: auto, cpu or cuda")
    try:
        return Placement(gpus=parse_gpus(gpus, visible), precision=chosen)
    except ValueError as err:
        raise ValueError(f"--gpus {gpus}: {err}") from err
