"""What a job records about its device, and what it says when the GPU runs out of memory.

The GPUs here are described, not present (this machine has none): every function under test takes what `probe`
found as plain data, which is what a GPU box passes in too.
"""

from __future__ import annotations

import torch
from trainer_service.engine.hardware import Gpu, Hardware, out_of_memory_message, probe
from trainer_service.jobs.results import compute_device
from visiontune.cli.jobs import device_words
from visiontune.v1 import training_spec_pb2

H100 = Hardware(
    gpus=(Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80 << 30),),
    driver_version="550.54.15",
    driver_cuda_version="12.4",
    cuda_build="12.4",
    cudnn_version=90100,
    visible_devices="GPU-5d1c",
)


def test_the_record_names_the_gpu_versions_and_the_precision_used() -> None:
    record = compute_device(H100, torch.device("cuda"), torch.bfloat16)
    assert (record.type, record.gpu_name, record.gpu_count) == ("cuda", "NVIDIA H100 80GB HBM3", 1)
    assert (record.compute_capability, record.gpu_memory_bytes) == ("9.0", 80 << 30)
    assert (record.driver_version, record.driver_cuda_version, record.cuda_build) == ("550.54.15", "12.4", "12.4")
    assert (record.cudnn_version, record.visible_devices) == (90100, "GPU-5d1c")
    assert record.precision == training_spec_pb2.PRECISION_AMP_BF16
    assert device_words(record) == (
        "cuda NVIDIA H100 80GB HBM3 (9.0, 80 GiB), amp_bf16, CUDA 12.4 (driver 550.54.15 supports 12.4)"
    )
    # The same machine told to train on the CPU records no GPU.
    cpu = compute_device(H100, torch.device("cpu"), None)
    assert (cpu.type, cpu.gpu_name, cpu.gpu_count, cpu.precision) == ("cpu", "", 0, training_spec_pb2.PRECISION_FP32)
    assert device_words(cpu) == "cpu, fp32"


def test_this_machine_probes_as_a_cpu_only_one() -> None:
    found = probe({})
    assert len(found.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert found.cuda_build == (torch.version.cuda or "")
    assert found.visible_devices is None


def test_out_of_memory_says_where_and_what_to_change() -> None:
    cuda = torch.device("cuda")
    message = out_of_memory_message(H100, cuda, None, "fine_tuning.stage.batch_size", 256)
    assert message == (
        "out of GPU memory at fine_tuning.stage.batch_size 256 on NVIDIA H100 80GB HBM3 (80.0 GiB): retry the job "
        "with a smaller fine_tuning.stage.batch_size (e.g. 128), a smaller dataset.image_size, or run.precision "
        "AMP_BF16/AMP_FP16 instead of FP32"
    )
    # Already in mixed precision, outside a stage (loading, evaluation): no precision advice, no batch field to name.
    assert out_of_memory_message(H100, cuda, torch.bfloat16, None, 0) == (
        "out of GPU memory on NVIDIA H100 80GB HBM3 (80.0 GiB): retry the job with smaller batch sizes, "
        "a smaller dataset.image_size"
    )
    assert "(e.g. 1)" in out_of_memory_message(H100, cuda, None, "classifier.batch_size", 1)
