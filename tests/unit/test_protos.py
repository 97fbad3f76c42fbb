"""The v1 contract: committed stubs match the .proto files, and the API follows its conventions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from visiontune.v1 import (
    inference_service_pb2,
    job_pb2,
    manifest_pb2,
    study_pb2,
    training_service_pb2,
    training_spec_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "scripts" / "gen_protos.py"
FILES: list[FileDescriptor] = [
    m.DESCRIPTOR
    for m in (inference_service_pb2, job_pb2, manifest_pb2, study_pb2, training_service_pb2, training_spec_pb2)
]


def _check(proto_root: Path, out_root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN), "--check", "--proto-root", str(proto_root), "--out-root", str(out_root)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_committed_stubs_are_up_to_date() -> None:
    result = _check(ROOT / "protos", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stale_stub_check_fails_when_a_proto_changes_without_regenerating(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    spec = tmp_path / "protos" / "visiontune" / "v1" / "training_spec.proto"
    text = spec.read_text()
    spec.write_text(text.replace("message RunSpec {", "message RunSpec {\n  string added_field = 99;", 1))

    result = _check(tmp_path / "protos", ROOT)

    assert result.returncode == 1
    assert "stale: training_spec_pb2.py" in result.stdout
    assert "stale: training_spec_pb2.pyi" in result.stdout


def _enums(fd: FileDescriptor) -> list[EnumDescriptor]:
    found = list(fd.enum_types_by_name.values())

    def walk(msg: Descriptor) -> None:
        found.extend(msg.enum_types)
        for nested in msg.nested_types:
            walk(nested)

    for msg in fd.message_types_by_name.values():
        walk(msg)
    return found


@pytest.mark.parametrize("fd", FILES, ids=lambda fd: fd.name)
def test_every_enum_zero_value_is_unspecified(fd: FileDescriptor) -> None:
    for enum in _enums(fd):
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name}: zero value {zero}"


def test_services_expose_every_rpc_of_the_design() -> None:
    training = training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"]
    inference = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert set(training.methods_by_name) >= {
        "CreateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "FindLearningRate",
        "CreateStudy",
        "GetStudy",
        "ListStudies",
        "CancelStudy",
        "WatchStudy",
        "RecommendSpec",
    }
    assert training.methods_by_name["WatchJob"].server_streaming
    assert training.methods_by_name["WatchStudy"].server_streaming
    assert set(inference.methods_by_name) == {
        "Classify",
        "DeployModel",
        "UndeployModel",
        "ListDeployments",
        "ReportFeedback",
    }


def _paths(desc: Descriptor, prefix: str = "") -> set[str]:
    out = set()
    for f in desc.fields:
        path = f"{prefix}{f.name}"
        out.add(path)
        if f.message_type is not None and f.message_type.full_name.startswith("visiontune."):
            out |= _paths(f.message_type, path + ".")
    return out


def test_training_spec_carries_every_hyperparameter_of_the_design() -> None:
    paths = _paths(training_spec_pb2.TrainingSpec.DESCRIPTOR)
    expected = {
        # dataset
        "dataset.uri",
        "dataset.validation_uri",
        "dataset.test_uri",
        "dataset.unknown_uri",
        "dataset.validation_split",
        "dataset.image_size",
        "dataset.class_balancing",
        # augmentation
        "augmentation.horizontal_flip",
        "augmentation.vertical_flip",
        "augmentation.rotation_degrees",
        "augmentation.zoom_min_scale",
        "augmentation.zoom_max_scale",
        "augmentation.brightness",
        "augmentation.contrast",
        "augmentation.saturation",
        "augmentation.hue",
        "augmentation.shear_degrees",
        "augmentation.gaussian_noise_std",
        "augmentation.copies_per_original",
        # model
        "model.architecture",
        "model.weights",
        "model.weights_uri",
        "model.classifier_dim",
        "model.dropout",
        # stage 1 and 2
        "classifier.epochs",
        "classifier.learning_rate",
        "classifier.batch_size",
        "classifier.optimizer.type",
        "classifier.optimizer.momentum",
        "classifier.optimizer.nesterov",
        "classifier.optimizer.weight_decay",
        "classifier.schedule.type",
        "classifier.schedule.warmup_epochs",
        "classifier.early_stopping.monitor",
        "classifier.early_stopping.patience",
        "classifier.early_stopping.min_delta",
        "classifier.label_smoothing",
        "classifier.gradient_clip_norm",
        "fine_tuning.enabled",
        "fine_tuning.stage.learning_rate",
        "fine_tuning.unfreeze.all",
        "fine_tuning.unfreeze.last_n_blocks",
        "fine_tuning.override_learning_rate_limit",
        # open set and run
        "open_set.score",
        "open_set.target_true_positive_rate",
        "run.seed",
        "run.repeats",
        "run.precision",
        "run.device",
        "run.data_loader_workers",
    }
    assert expected <= paths, sorted(expected - paths)
    schedules = set(training_spec_pb2.ScheduleType.keys())
    assert {
        f"SCHEDULE_TYPE_{s}" for s in ("CONSTANT", "STEP", "COSINE", "ONE_CYCLE", "CYCLIC", "SGDR", "REDUCE_ON_PLATEAU")
    } <= schedules
    architectures = set(training_spec_pb2.Architecture.keys())
    assert {
        f"ARCHITECTURE_{a}"
        for a in (
            "RESNET18",
            "RESNET34",
            "RESNET50",
            "RESNET101",
            "RESNET152",
            "MOBILENET_V3_SMALL",
            "MOBILENET_V3_LARGE",
            "MOBILENET_V2",
        )
    } <= architectures


def test_defaults_that_are_not_zero_are_optional_so_unset_is_detectable() -> None:
    spec = training_spec_pb2.TrainingSpec()
    for msg, field in (
        (spec.dataset, "validation_split"),
        (spec.dataset, "image_size"),
        (spec.model, "classifier_dim"),
        (spec.model, "dropout"),
        (spec.classifier, "epochs"),
        (spec.classifier, "learning_rate"),
        (spec.classifier, "batch_size"),
        (spec.open_set, "target_true_positive_rate"),
    ):
        assert not msg.HasField(field)


# -- docs/spec.md and the rules' single source (field_rules.proto) -------------------------------------------------

_CLASSIFIER_EPOCHS = '{field: "epochs", rules: {default: "10"}}'


def _with_classifier_epochs(tmp_path: Path, default: int) -> Path:
    """A copy of protos/ whose classifier stage defaults to `default` epochs."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    spec = tmp_path / "protos" / "visiontune" / "v1" / "training_spec.proto"
    text = spec.read_text()
    assert _CLASSIFIER_EPOCHS in text
    spec.write_text(text.replace(_CLASSIFIER_EPOCHS, _CLASSIFIER_EPOCHS.replace('"10"', f'"{default}"'), 1))
    return tmp_path / "protos"


def test_the_stale_check_covers_docs_spec_md(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    spec = tmp_path / "protos" / "visiontune" / "v1" / "training_spec.proto"
    spec.write_text(spec.read_text().replace("// Images per mini-batch.", "// Images per batch.", 1))

    result = _check(tmp_path / "protos", ROOT)

    assert result.returncode == 1
    assert "stale: docs/spec.md" in result.stdout
    assert "stale: visiontune/v1/proto_comments.py" in result.stdout


def test_the_committed_docs_list_every_spec_field() -> None:
    docs = (ROOT / "docs" / "spec.md").read_text()
    for path in _paths(training_spec_pb2.TrainingSpec.DESCRIPTOR):
        assert f"| `{path}` |" in docs, path


def test_a_default_changed_in_the_proto_reaches_the_validator_the_yaml_reference_and_the_docs(tmp_path: Path) -> None:
    protos, out = _with_classifier_epochs(tmp_path, 12), tmp_path / "out"
    generated = subprocess.run(
        [sys.executable, str(GEN), "--proto-root", str(protos), "--out-root", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # This tree's code on the regenerated stubs: nothing but the proto changed.
    probe = (
        "import visiontune.v1\n"
        f"visiontune.v1.__path__.insert(0, {str(out / 'visiontune' / 'v1')!r})\n"
        "from trainer_service.spec.config import StageConfig\n"
        "from trainer_service.spec.validate import validate_spec\n"
        "from visiontune.specfile import spec_reference_yaml\n"
        "from visiontune.v1 import training_spec_pb2 as pb\n"
        "config = validate_spec(pb.TrainingSpec(dataset=pb.DatasetSpec(uri='datasets/x')))\n"
        "print(config.classifier.epochs, StageConfig().epochs, config.fine_tuning.stage.epochs)\n"
        "print(spec_reference_yaml())\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert ran.returncode == 0, ran.stderr
    resolved, reference = ran.stdout.split("\n", 1)
    assert resolved == "12 12 5"
    classifier = reference[reference.index("\nclassifier:") : reference.index("\nfine_tuning:")]
    assert "\n  epochs: 12  # range [1, 1000]\n" in classifier
    docs = (out / "docs" / "spec.md").read_text()
    assert "| `classifier.epochs` | optional int32 | `12` | `[1, 1000]` |" in docs
    assert "| `fine_tuning.stage.epochs` | optional int32 | `5` | `[1, 5]` |" in docs
    assert "stale: docs/spec.md" in _check(protos, ROOT).stdout
