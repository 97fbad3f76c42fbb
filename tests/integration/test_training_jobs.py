"""Training jobs end to end: a real trainer process, a real S3 server, workers as real subprocesses.

Tiny data (three synthetic shape labels at 32 px) and MobileNetV3-small from scratch keep each job to
seconds on a CPU; what is checked is the job machinery: events, artifacts, cancel, kill -9 and resume.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format
from tests.integration.trainer_helpers import Trainer, tiny_spec, wait_for_checkpoint, worker_pid
from visiontune.devstack.dataset_upload import plan_upload, upload
from visiontune.devstack.sample_data import SHAPES, write_shapes_dataset
from visiontune.status import field_violations
from visiontune.store import ArtifactStore
from visiontune.v1 import (
    job_pb2,
    manifest_pb2,
    training_service_pb2,
    training_spec_pb2,
)

pytestmark = pytest.mark.integration


def _create(trainer: Trainer, spec: training_spec_pb2.TrainingSpec, job_id: str) -> job_pb2.Job:
    return trainer.stub.CreateJob(
        training_service_pb2.CreateJobRequest(job=job_pb2.Job(spec=spec), job_id=job_id), timeout=30
    )


def _watch(trainer: Trainer, name: str, timeout: float = 240) -> list[job_pb2.JobEvent]:
    return list(trainer.stub.WatchJob(training_service_pb2.WatchJobRequest(name=name), timeout=timeout))


def test_a_job_trains_streams_its_progress_and_publishes_a_model_version(
    trainer: Trainer, shapes: ArtifactStore
) -> None:
    job = _create(trainer, tiny_spec(epochs=2, fine_tuning_epochs=1), "shapes-1")
    assert job.name == "jobs/shapes-1"
    assert job.state == job_pb2.JOB_STATE_QUEUED
    assert job.spec.classifier.optimizer.type == training_spec_pb2.OPTIMIZER_TYPE_ADAM  # defaults resolved

    events = _watch(trainer, job.name)
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    epochs = [e.epoch_ended for e in events if e.HasField("epoch_ended")]
    assert [(m.stage, m.epoch) for m in epochs] == [
        (job_pb2.STAGE_CLASSIFIER, 1),
        (job_pb2.STAGE_CLASSIFIER, 2),
        (job_pb2.STAGE_FINE_TUNING, 1),
    ]
    assert all(m.images_per_second > 0 and m.learning_rate > 0 for m in epochs)
    stages = [e.stage_started.stage for e in events if e.HasField("stage_started")]
    assert stages == [job_pb2.STAGE_DATA, job_pb2.STAGE_CLASSIFIER, job_pb2.STAGE_FINE_TUNING, job_pb2.STAGE_EXPORT]
    warnings = [e.warning for e in events if e.HasField("warning")]
    assert any(w.code == "corrupt_image" for w in warnings)  # skipped and counted, not fatal
    assert any(w.code == "few_images" for w in warnings)  # 12 train images per label < 20
    assert kinds[-2:] == ["result", "state_changed"]
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    # Where it trained, as the worker found it: this machine has no GPU, so AUTO is the CPU in fp32.
    (device,) = [e.device_selected for e in events if e.HasField("device_selected")]
    assert kinds.index("device_selected") < kinds.index("stage_started")
    assert (device.type, device.gpu_count, device.precision) == ("cpu", 0, training_spec_pb2.PRECISION_FP32)
    assert device.cuda_build == (torch.version.cuda or "")

    done = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=job.name), timeout=10)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    result = done.result
    assert result.model_version == "models/shapes/versions/shapes-1"
    assert list(result.labels) == ["circle", "square", "triangle"]
    assert len(result.confusion_matrix) == 9
    assert result.dataset.skipped_files == 1
    # validation_split 0.25 holds out 4 of each label's 16 (the default 0.2 would hold out 3); the circles' corrupt
    # file may fall on either side.
    assert [(c.train_images, c.validation_images) for c in result.dataset.labels[1:]] == [(12, 4), (12, 4)]
    assert {"val_accuracy", "val_loss", "open_set_threshold"} <= set(result.metrics)
    assert result.device == device

    assert shapes.list_model_versions("shapes") == ["shapes-1"]
    manifest = json_format.Parse(shapes.get_manifest("shapes", "shapes-1"), manifest_pb2.ModelManifest())
    assert list(manifest.labels) == ["circle", "square", "triangle"]
    assert manifest.weights.format == manifest_pb2.WEIGHTS_FORMAT_TORCHSCRIPT
    assert manifest.training_device == device
    assert manifest.weights.input_format == manifest_pb2.INPUT_FORMAT_UINT8_RGB  # the export normalises inside
    keys = {o.key for o in shapes.list("models/shapes/versions/shapes-1/")}
    assert {f"models/shapes/versions/shapes-1/{f}" for f in manifest.files} <= keys
    assert not list(shapes.list("jobs/shapes-1/checkpoints/"))
    logged = [json.loads(line) for line in shapes.get_bytes("jobs/shapes-1/events.jsonl").decode().splitlines()]
    assert [e["sequence"] for e in logged][-1] == events[-1].sequence
    assert logged[-1]["kind"] == "state_changed"  # resume state is dropped once published
    assert json.loads(shapes.get_bytes("jobs/shapes-1/spec.json"))["outputModel"] == "shapes"


def test_ten_bad_fields_are_one_invalid_argument_naming_all_ten(trainer: Trainer) -> None:
    spec = tiny_spec()
    spec.dataset.validation_split = 0.9
    spec.dataset.image_size = 8
    spec.augmentation.rotation_degrees = 400
    spec.augmentation.copies_per_original = 9
    spec.model.dropout = 1.5
    spec.model.classifier_dim = 3
    spec.classifier.learning_rate = 50
    spec.classifier.batch_size = 0
    spec.classifier.label_smoothing = 0.7
    spec.run.repeats = 100
    with pytest.raises(grpc.RpcError) as err:
        _create(trainer, spec, "bad-spec")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = sorted(v.field for v in field_violations(err.value))
    assert fields == sorted(
        f"job.spec.{f}"
        for f in (
            "dataset.validation_split",
            "dataset.image_size",
            "augmentation.rotation_degrees",
            "augmentation.copies_per_original",
            "model.dropout",
            "model.classifier_dim",
            "classifier.learning_rate",
            "classifier.batch_size",
            "classifier.label_smoothing",
            "run.repeats",
        )
    )
    with pytest.raises(grpc.RpcError) as missing:
        trainer.stub.GetJob(training_service_pb2.GetJobRequest(name="jobs/bad-spec"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was created


def test_cuda_is_refused_at_create_where_no_job_slot_has_a_gpu(trainer: Trainer) -> None:
    spec = tiny_spec()
    spec.run.device = training_spec_pb2.DEVICE_CUDA
    spec.classifier.batch_size = 0
    with pytest.raises(grpc.RpcError) as err:
        _create(trainer, spec, "wants-a-gpu")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = {v.field: v.description for v in field_violations(err.value)}
    assert set(violations) == {"job.spec.run.device", "job.spec.classifier.batch_size"}  # every bad field at once
    assert "no GPU" in violations["job.spec.run.device"]


def test_cancel_stops_a_running_job_within_seconds_and_leaves_no_artifacts(
    trainer: Trainer, shapes: ArtifactStore
) -> None:
    job = _create(trainer, tiny_spec(epochs=500), "long-1")
    for event in trainer.stub.WatchJob(training_service_pb2.WatchJobRequest(name=job.name), timeout=120):
        if event.HasField("epoch_ended"):
            break
    started = time.monotonic()
    trainer.stub.CancelJob(training_service_pb2.CancelJobRequest(name=job.name), timeout=10)
    events = _watch(trainer, job.name, timeout=60)
    assert time.monotonic() - started < 15
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_CANCELLED
    assert not list(shapes.list("jobs/long-1/checkpoints/"))
    assert shapes.list_model_versions("shapes") == []
    # Cancelling again is idempotent; cancelling a finished job is not possible.
    again = trainer.stub.CancelJob(training_service_pb2.CancelJobRequest(name=job.name), timeout=10)
    assert again.state == job_pb2.JOB_STATE_CANCELLED


def test_kill_9_of_the_worker_resumes_and_matches_an_uninterrupted_run(trainer: Trainer, shapes: ArtifactStore) -> None:
    spec = tiny_spec(epochs=4, fine_tuning_epochs=1, seed=3)
    reference = _create(trainer, spec, "reference")
    _watch(trainer, reference.name)

    job = _create(trainer, spec, "killed")
    for event in trainer.stub.WatchJob(training_service_pb2.WatchJobRequest(name=job.name), timeout=120):
        if event.HasField("epoch_ended") and event.epoch_ended.epoch == 2:
            break
    wait_for_checkpoint(trainer, "killed")  # committed in the background: the kill must find one to resume from
    pid = worker_pid("killed")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    events = _watch(trainer, job.name)

    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    assert any(e.HasField("state_changed") and "resuming" in e.state_changed.message for e in events)
    # Both attempts checked the data; the job has each of its warnings once.
    warnings = [(e.warning.code, e.warning.message) for e in events if e.HasField("warning")]
    assert len(warnings) == len(set(warnings)), warnings
    assert {"few_images", "corrupt_image", "resumed"} <= {code for code, _ in warnings}
    done = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=job.name), timeout=10)
    ref = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=reference.name), timeout=10)
    assert done.attempt == 2
    for key in ("val_accuracy", "val_loss", "train_loss", "open_set_threshold"):
        assert done.result.metrics[key].mean == pytest.approx(ref.result.metrics[key].mean, rel=1e-4, abs=1e-5), key
    assert sorted(shapes.list_model_versions("shapes")) == ["killed", "reference"]


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()}
    except OSError:
        return set()


def test_a_job_on_two_processes_trains_once_and_resumes_after_kill_9_of_its_rank_0(
    trainer: Trainer, shapes: ArtifactStore
) -> None:
    """run.devices 2 on the CPU (gloo): the worker starts its follower, records each epoch once, and a kill -9 of the
    worker takes the follower with it; the retry resumes both ranks from the checkpoint to the uninterrupted numbers."""
    spec = tiny_spec(epochs=4, fine_tuning_epochs=1, seed=3)
    spec.run.devices = 2
    reference = _create(trainer, spec, "ddp-reference")
    events = _watch(trainer, reference.name)
    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    epochs = [(e.epoch_ended.stage, e.epoch_ended.epoch) for e in events if e.HasField("epoch_ended")]
    assert epochs == [(job_pb2.STAGE_CLASSIFIER, i) for i in range(1, 5)] + [(job_pb2.STAGE_FINE_TUNING, 1)]

    job = _create(trainer, spec, "ddp-killed")
    for event in trainer.stub.WatchJob(training_service_pb2.WatchJobRequest(name=job.name), timeout=120):
        if event.HasField("epoch_ended") and event.epoch_ended.epoch == 2:
            break
    wait_for_checkpoint(trainer, "ddp-killed")
    pid = worker_pid("ddp-killed")
    assert pid is not None
    followers = _children(pid)
    assert followers  # rank 1 (and multiprocessing's helpers)
    os.kill(pid, signal.SIGKILL)
    events = _watch(trainer, job.name)

    assert events[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    assert any(e.HasField("state_changed") and "resuming" in e.state_changed.message for e in events)
    assert all(not Path(f"/proc/{child}").exists() for child in followers)  # none outlived its rank 0
    done = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=job.name), timeout=10)
    ref = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=reference.name), timeout=10)
    assert done.attempt == 2
    for key in ("val_accuracy", "val_loss", "train_loss", "open_set_threshold"):
        assert done.result.metrics[key].mean == pytest.approx(ref.result.metrics[key].mean, rel=1e-4, abs=1e-5), key
    assert sorted(shapes.list_model_versions("shapes")) == ["ddp-killed", "ddp-reference"]


def test_separate_validation_test_and_unknown_sets_reach_the_job_result(
    trainer: Trainer, shapes: ArtifactStore, tmp_path: Path
) -> None:
    """dataset.validation_uri, test_uri, unknown_uri and cache_max_mb, and output_model, through a real job."""
    known = SHAPES[:3]
    for name, labels, per_label, seed in (
        ("validation", known, 5, 1),
        ("test", known, 4, 2),
        ("unknown", SHAPES[3:], 6, 3),
    ):
        write_shapes_dataset(tmp_path / name, labels=labels, per_label=per_label, size=32, seed=seed)
        upload(shapes, plan_upload(tmp_path / name, f"datasets/shapes-{name}/"))
    spec = tiny_spec(epochs=1)
    spec.dataset.validation_uri = "datasets/shapes-validation"
    spec.dataset.test_uri = f"s3://{shapes.bucket}/datasets/shapes-test"
    spec.dataset.unknown_uri = "datasets/shapes-unknown"
    spec.dataset.cache_max_mb = 0
    spec.output_model = "shapes-extra"
    job = _create(trainer, spec, "extra-1")
    assert _watch(trainer, job.name)[-1].state_changed.state == job_pb2.JOB_STATE_SUCCEEDED
    result = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name=job.name), timeout=10).result

    # validation_uri: nothing is split off the training set (all 16 decodable images per label train, though
    # validation_split is 0.25); validation is the separate set's 5 per label. test_uri: its 4 per label, and
    # test metrics.
    counts = {c.label: (c.train_images, c.validation_images, c.test_images) for c in result.dataset.labels}
    assert counts == {label: (16, 5, 4) for label in known}
    assert {"test_accuracy", "test_loss", "test_top5_accuracy", "test_macro_f1"} <= set(result.metrics)
    # unknown_uri: the open-set threshold's false positive rate on the unknown class, and the AUROC.
    assert result.open_set.HasField("false_positive_rate")
    assert result.open_set.HasField("auroc")
    assert {"open_set_fpr", "open_set_auroc"} <= set(result.metrics)
    # output_model: the version is published under it.
    assert result.model_version == "models/shapes-extra/versions/extra-1"
    assert shapes.list_model_versions("shapes-extra") == ["extra-1"]
    # cache_max_mb 0: every set went to a job-private file; nothing was kept in the shared decoded-image cache.
    decoded = trainer.data_dir / "trainer" / "cache" / "decoded"
    assert not decoded.exists() or not any(decoded.iterdir())
