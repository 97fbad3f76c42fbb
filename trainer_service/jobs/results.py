"""From the engine's plain results to the v1 messages a job reports: JobResult and the ModelManifest."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torchvision
from google.protobuf.duration_pb2 import Duration
from visiontune import protoreflect
from visiontune.store import sha256_file
from visiontune.v1 import job_pb2, manifest_pb2, training_spec_pb2

from trainer_service.engine.evaluation import ClassificationReport, OpenSetReport
from trainer_service.engine.hardware import Hardware
from trainer_service.engine.loop import CLASSIFIER, FINE_TUNING, EpochRecord
from trainer_service.engine.recipe import TrainingResult
from trainer_service.spec.config import OPEN_SET_SCORES, OpenSetScore

MANIFEST_SCHEMA_VERSION = 1

# The engine's stage names are the short names of job.proto's Stage values: `fine_tuning` is STAGE_FINE_TUNING.
STAGES: Final = {name: protoreflect.enum_value(job_pb2.Stage, name) for name in (CLASSIFIER, FINE_TUNING)}


PRECISIONS: Final[dict[torch.dtype | None, training_spec_pb2.Precision.ValueType]] = {
    None: training_spec_pb2.PRECISION_FP32,
    torch.bfloat16: training_spec_pb2.PRECISION_AMP_BF16,
    torch.float16: training_spec_pb2.PRECISION_AMP_FP16,
}


def compute_device(hardware: Hardware, device: torch.device, dtype: torch.dtype | None) -> job_pb2.ComputeDevice:
    """Where a job trains: its `device_selected` event, its result's and its model manifest's record."""
    record = job_pb2.ComputeDevice(
        type=device.type,
        gpu_count=len(hardware.gpus) if device.type == "cuda" else 0,
        driver_version=hardware.driver_version,
        driver_cuda_version=hardware.driver_cuda_version,
        cuda_build=hardware.cuda_build,
        cudnn_version=hardware.cudnn_version,
        precision=PRECISIONS[dtype],
        visible_devices=hardware.visible_devices or "",
    )
    gpu = hardware.gpu(device)
    if gpu is not None:
        record.gpu_name = gpu.name
        record.compute_capability = f"{gpu.capability[0]}.{gpu.capability[1]}"
        record.gpu_memory_bytes = gpu.memory_bytes
    return record


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def epoch_metrics(repeat: int, record: EpochRecord) -> job_pb2.EpochMetrics:
    return job_pb2.EpochMetrics(
        stage=STAGES[record.stage],
        repeat=repeat + 1,
        epoch=record.epoch,
        train_loss=record.train_loss,
        train_accuracy=record.train_accuracy,
        validation_loss=record.val_loss,
        validation_accuracy=record.val_accuracy,
        learning_rate=record.learning_rate,
        images_per_second=record.images_per_second,
        epoch_time=duration(record.epoch_seconds),
    )


def open_set_result(report: OpenSetReport, score: OpenSetScore) -> job_pb2.OpenSetResult:
    out = job_pb2.OpenSetResult(
        score=OPEN_SET_SCORES.to_proto(score),
        threshold=report.threshold,
        target_true_positive_rate=report.target_tpr,
        true_positive_rate=report.validation_tpr,
    )
    if report.fpr_at_threshold is not None:
        out.false_positive_rate = report.fpr_at_threshold
    if report.auroc is not None:
        out.auroc = report.auroc
    return out


def metric_summaries(result: TrainingResult) -> dict[str, job_pb2.MetricSummary]:
    values: dict[str, list[float]] = {}
    for run in result.repeats:
        for key, value in run.metrics().items():
            values.setdefault(key, []).append(value)
    return {
        key: job_pb2.MetricSummary(mean=mean, std=std, values=values.get(key, []))
        for key, (mean, std) in result.summary.items()
    }


def job_result(
    result: TrainingResult,
    *,
    labels: Sequence[str],
    score: OpenSetScore,
    model_version: str,
    dataset: job_pb2.DatasetSummary,
    plots: Sequence[str],
    keys_by_split: Mapping[str, Sequence[str]],
    device: job_pb2.ComputeDevice | None = None,
) -> job_pb2.JobResult:
    best = result.best
    report: ClassificationReport = best.test if best.test is not None else best.validation
    split = "test" if best.test is not None else "validation"
    keys = keys_by_split.get(split, [])
    misclassified = [
        job_pb2.Misclassified(
            uri=keys[m.index] if m.index < len(keys) else str(m.index),
            true_label=m.true_label,
            predicted_label=m.predicted_label,
            score=m.confidence,
        )
        for m in report.misclassified
    ]
    out = job_pb2.JobResult(
        model_version=model_version,
        metrics=metric_summaries(result),
        history=[epoch_metrics(best.repeat, r) for r in best.history],
        per_class=[
            job_pb2.ClassMetrics(
                label=labels[i],
                precision=report.precision[i],
                recall=report.recall[i],
                f1=report.f1[i],
                support=report.support[i],
            )
            for i in range(len(labels))
        ],
        labels=list(labels),
        confusion_matrix=[int(v) for row in report.confusion_matrix for v in row],
        open_set=open_set_result(best.open_set, score),
        misclassified=misclassified,
        dataset=dataset,
        plots=list(plots),
    )
    if device is not None:
        out.device.CopyFrom(device)
    return out


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }


# The exported model as the manifest describes it: its file in the version's folder and its tensors' names.
MODEL_FILE: Final = "model.pt"
INPUT_NAME: Final = "images"
OUTPUT_NAME: Final = "logits"


def preprocessing(size: int, mean: Sequence[float], std: Sequence[float]) -> manifest_pb2.Preprocessing:
    """How inference must prepare an image for a model trained at `size` px: what the trainer decoded with."""
    return manifest_pb2.Preprocessing(
        resize_size=size,
        crop_size=size,
        interpolation=manifest_pb2.INTERPOLATION_BILINEAR,
        mean=list(mean),
        std=list(std),
        color_mode=manifest_pb2.COLOR_MODE_RGB,
    )


def torchscript_weights(path: Path, *, size: int, num_labels: int) -> manifest_pb2.Weights:
    """The manifest's entry for the TorchScript classifier at `path` (its sha256 and size read from the file)."""
    return manifest_pb2.Weights(
        path=MODEL_FILE,
        format=manifest_pb2.WEIGHTS_FORMAT_TORCHSCRIPT,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        input_name=INPUT_NAME,
        input_shape=[-1, 3, size, size],
        output_name=OUTPUT_NAME,
        output_shape=[-1, num_labels],
    )


def manifest(
    *,
    name: str,
    job: str,
    created: datetime,
    labels: Sequence[str],
    architecture: training_spec_pb2.Architecture.ValueType,
    preprocessing: manifest_pb2.Preprocessing,
    weights: manifest_pb2.Weights,
    open_set: job_pb2.OpenSetResult,
    metrics: Mapping[str, job_pb2.MetricSummary],
    spec: training_spec_pb2.TrainingSpec,
    dataset: job_pb2.DatasetSummary,
    files: Sequence[str],
    device: job_pb2.ComputeDevice | None = None,
) -> manifest_pb2.ModelManifest:
    out = manifest_pb2.ModelManifest(
        schema_version=MANIFEST_SCHEMA_VERSION,
        name=name,
        job=job,
        labels=list(labels),
        architecture=architecture,
        preprocessing=preprocessing,
        weights=weights,
        open_set=open_set,
        metrics=dict(metrics),
        spec=spec,
        dataset=dataset,
        library_versions=library_versions(),
        files=list(files),
    )
    if device is not None:
        out.training_device.CopyFrom(device)
    out.create_time.FromDatetime(created)
    return out
