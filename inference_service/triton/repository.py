"""The Triton model repository the service writes: one Triton model per deployed model version.

    {repository}/{model}__{version}/config.pbtxt      backend python, dynamic batching, instance group
    {repository}/{model}__{version}/1/model.py        triton/model.py
    {repository}/{model}__{version}/1/model.pt        the version's TorchScript weights (sha256 verified)

Model IDs and version IDs never contain "_", so `{model}__{version}` is unambiguous. Files are written
to a temporary directory and renamed into place, so Triton never sees half a model.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from visiontune.names import ModelVersionName

MODEL_FILE: Final = Path(__file__).with_name("model.py")
WEIGHTS_FILE: Final = "model.pt"
WARMUP_CALLS: Final = 3


def triton_model_name(name: ModelVersionName) -> str:
    return f"{name.model}__{name.version}"


@dataclass(frozen=True)
class TritonModelConfig:
    """What config.pbtxt says about one model."""

    name: str
    input_name: str
    input_dims: tuple[int, ...]  # without the batch dimension
    output_name: str
    output_dims: tuple[int, ...]
    max_batch_size: int
    max_queue_delay_us: int
    instance_count: int  # per GPU on GPUs
    gpus: tuple[int, ...] = ()  # KIND_GPU on these CUDA devices; empty: KIND_CPU
    torch_threads: int = 0  # 0 = torch's default
    input_datatype: str = "FP32"  # a KServe v2 datatype name (triton.server.TRITON_DATATYPES)
    precision: str = "fp32"  # model.py's dtype for the module (placement.Precision)

    def pbtxt(self) -> str:
        if self.gpus:
            group = f"count: {self.instance_count} kind: KIND_GPU gpus: [{_dims(self.gpus)}]"
        else:
            group = f"count: {self.instance_count} kind: KIND_CPU"
        input_type = f"TYPE_{self.input_datatype}"
        # TorchScript optimises a graph on its first calls (the profiling executor), per input shape: run them
        # during the load at batch 1 and at the largest batch the dynamic batcher makes, so READY means warm and
        # neither a lone request nor a full batch is 5-10x slower than the rest.
        warmups = ", ".join(
            f'{{ name: "zeros_{batch}" batch_size: {batch} count: {WARMUP_CALLS} '
            f'inputs {{ key: "{self.input_name}" '
            f"value: {{ data_type: {input_type} dims: [{_dims(self.input_dims)}] zero_data: true }} }} }}"
            for batch in sorted({1, self.max_batch_size})
        )
        return "\n".join(
            [
                f'name: "{self.name}"',
                'backend: "python"',
                f"max_batch_size: {self.max_batch_size}",
                f'input [{{ name: "{self.input_name}" data_type: {input_type} dims: [{_dims(self.input_dims)}] }}]',
                f'output [{{ name: "{self.output_name}" data_type: TYPE_FP32 dims: [{_dims(self.output_dims)}] }}]',
                f"dynamic_batching {{ max_queue_delay_microseconds: {self.max_queue_delay_us} }}",
                f"instance_group [{{ {group} }}]",
                f'parameters {{ key: "torch_threads" value: {{ string_value: "{self.torch_threads}" }} }}',
                f'parameters {{ key: "precision" value: {{ string_value: "{self.precision}" }} }}',
                f"model_warmup [{warmups}]",
                "",
            ]
        )


def _dims(dims: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in dims)


def write_model(repository: Path, config: TritonModelConfig, weights: Path) -> Path:
    """Write (or replace) model `config.name` with `weights`; returns its directory."""
    repository.mkdir(parents=True, exist_ok=True)
    final = repository / config.name
    staging = Path(tempfile.mkdtemp(dir=repository, prefix=f".{config.name}."))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(MODEL_FILE, staging / "1" / "model.py")
        shutil.copyfile(weights, staging / "1" / WEIGHTS_FILE)
        (staging / "config.pbtxt").write_text(config.pbtxt())
        if final.exists():
            old = final.with_name(f".{config.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def remove_model(repository: Path, name: str) -> None:
    shutil.rmtree(repository / name, ignore_errors=True)
