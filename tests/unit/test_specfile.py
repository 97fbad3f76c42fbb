"""Spec files: YAML/JSON to TrainingSpec, enum names with or without prefix, typed `--set` overrides, errors that
name the key, the YAML the CLI writes, and the shipped examples/ passing the trainer's validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.validate import validate_spec
from visiontune import protoreflect
from visiontune.specfile import SpecFileError, dump_spec_yaml, load_spec_file, parse_spec, spec_reference_yaml
from visiontune.v1 import training_spec_pb2 as pb

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

NESTED = """
dataset:
  uri: datasets/shapes
  image_size: 64
  class_balancing: weighted_sampler
model:
  architecture: MOBILENET_V2
  weights: WEIGHTS_SOURCE_NONE
classifier:
  epochs: 3
  learning_rate: 1e-3          # YAML 1.1 reads this as text; a number field takes it as a number
  optimizer:
    type: adamw
  schedule:
    type: Cosine
    warmup_epochs: 1
fine_tuning:
  enabled: yes
  unfreeze:
    last_n_blocks: 2
run:
  seed: 7
"""


def test_nested_yaml_becomes_the_same_spec_as_built_in_code() -> None:
    expected = pb.TrainingSpec(
        dataset=pb.DatasetSpec(
            uri="datasets/shapes", image_size=64, class_balancing=pb.CLASS_BALANCING_WEIGHTED_SAMPLER
        ),
        model=pb.ModelSpec(architecture=pb.ARCHITECTURE_MOBILENET_V2, weights=pb.WEIGHTS_SOURCE_NONE),
        classifier=pb.StageSpec(
            epochs=3,
            learning_rate=0.001,
            optimizer=pb.OptimizerSpec(type=pb.OPTIMIZER_TYPE_ADAMW),
            schedule=pb.ScheduleSpec(type=pb.SCHEDULE_TYPE_COSINE, warmup_epochs=1),
        ),
        fine_tuning=pb.FineTuningSpec(enabled=True, unfreeze=pb.UnfreezeSpec(last_n_blocks=2)),
        run=pb.RunSpec(seed=7),
    )
    assert parse_spec(NESTED) == expected


@pytest.mark.parametrize("written", ["RESNET50", "ARCHITECTURE_RESNET50", "resnet50", "architecture_resnet50", 3])
def test_enum_values_with_or_without_their_prefix_in_any_case(written: object) -> None:
    spec = parse_spec(f"model: {{architecture: {written}}}")
    assert spec.model.architecture == pb.ARCHITECTURE_RESNET50


def test_unset_optionals_stay_unset_and_empty_groups_mean_defaults() -> None:
    spec = parse_spec("dataset:\n  uri: datasets/x\naugmentation:\nclassifier: {epochs: 2}\n")
    assert not spec.HasField("augmentation")
    assert spec.classifier.HasField("epochs")
    assert not spec.classifier.HasField("learning_rate")  # the trainer's default applies
    assert parse_spec("") == pb.TrainingSpec()


def test_json_files_and_camel_case_keys(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(
        '{"dataset": {"uri": "datasets/x", "imageSize": 96}, "run": {"seed": "5"}, "outputModel": "flowers"}'
    )
    spec = load_spec_file(path)
    assert (spec.dataset.image_size, spec.run.seed, spec.output_model) == (96, 5, "flowers")


def test_set_overrides_are_typed_by_the_proto_field() -> None:
    spec = parse_spec(
        NESTED,
        overrides=[
            "classifier.epochs=12",  # int32
            "classifier.learning_rate=2.5e-4",  # float
            "run.seed=18446744073709551615",  # uint64, full range
            "augmentation.horizontal_flip=true",  # bool, group not in the file
            "fine_tuning.enabled=false",
            "model.architecture=resnet18",  # enum, short name
            "run.precision=PRECISION_AMP_BF16",  # enum, full name
            "fine_tuning.stage.optimizer.type=sgd",  # deeply nested, created on the way
            "fine_tuning.stage.optimizer.momentum=0.8",
            "output_model=shapes-2",  # string
        ],
    )
    assert spec.classifier.epochs == 12
    assert spec.classifier.learning_rate == pytest.approx(2.5e-4)
    assert spec.run.seed == 2**64 - 1
    assert spec.augmentation.horizontal_flip is True
    assert spec.fine_tuning.enabled is False
    assert spec.model.architecture == pb.ARCHITECTURE_RESNET18
    assert spec.run.precision == pb.PRECISION_AMP_BF16
    assert spec.fine_tuning.stage.optimizer.type == pb.OPTIMIZER_TYPE_SGD
    assert spec.fine_tuning.stage.optimizer.momentum == pytest.approx(0.8)
    assert spec.output_model == "shapes-2"
    assert spec.classifier.schedule.type == pb.SCHEDULE_TYPE_COSINE  # untouched fields keep the file's values


def test_setting_a_oneof_member_replaces_its_sibling() -> None:
    spec = parse_spec("fine_tuning: {unfreeze: {all: true}}", overrides=["fine_tuning.unfreeze.last_n_blocks=3"])
    assert spec.fine_tuning.unfreeze.WhichOneof("which") == "last_n_blocks"
    assert spec.fine_tuning.unfreeze.last_n_blocks == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "classifier:\n  learnig_rate: 0.1\n",
            "spec.yaml: unknown key 'classifier.learnig_rate' (did you mean 'learning_rate'?)",
        ),
        ("datset: {uri: x}\n", "spec.yaml: unknown key 'datset' (did you mean 'dataset'?)"),
        (
            "model: {zzz: 1}\n",
            "spec.yaml: unknown key 'model.zzz' (ModelSpec has architecture, weights, weights_uri, "
            "classifier_dim, dropout, activation, weights_sha256)",
        ),
        (
            "model: {architecture: vgg16}\n",
            "spec.yaml: model.architecture: unknown Architecture 'vgg16'; expected one "
            "of RESNET18, RESNET34, RESNET50, RESNET101, RESNET152, MOBILENET_V3_SMALL, MOBILENET_V3_LARGE, "
            "MOBILENET_V2",
        ),
        ("classifier: {epochs: 2.5}\n", "spec.yaml: classifier.epochs: expected an integer, got 2.5"),
        ("classifier: {epochs: true}\n", "spec.yaml: classifier.epochs: expected an integer, got True"),
        ("classifier: {learning_rate: fast}\n", "spec.yaml: classifier.learning_rate: expected a number, got 'fast'"),
        (
            "augmentation: {horizontal_flip: maybe}\n",
            "spec.yaml: augmentation.horizontal_flip: expected true or false, got 'maybe'",
        ),
        ("output_model: 2024\n", "spec.yaml: output_model: expected a string, got 2024 (quote it to make it text)"),
        ("dataset: datasets/x\n", "spec.yaml: dataset: expected a mapping of DatasetSpec fields, got 'datasets/x'"),
        ("- a\n- b\n", "spec.yaml: the spec: expected a mapping of TrainingSpec fields, got ['a', 'b']"),
        ("run: {seed: -1}\n", "spec.yaml: run.seed: -1 is out of range for uint64"),
        (
            "fine_tuning: {unfreeze: {all: true, last_n_blocks: 2}}\n",
            "spec.yaml: fine_tuning.unfreeze: set only one of all, last_n_blocks",
        ),
        (
            "dataset: {image_size: 64, imageSize: 32}\n",
            "spec.yaml: dataset.image_size: given twice (as 'image_size' and 'imageSize')",
        ),
        (
            "dataset: {uri: [unclosed\n",
            "spec.yaml: invalid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'",
        ),
    ],
)
def test_mistakes_in_a_file_are_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(SpecFileError) as err:
        parse_spec(text, source="spec.yaml")
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "classifier.epochs",
            "--set expects PATH=VALUE (e.g. classifier.learning_rate=0.001), got 'classifier.epochs'",
        ),
        (
            "classifier.lr=0.1",
            "--set classifier.lr=0.1: unknown key 'classifier.lr' (StageSpec has epochs, "
            "learning_rate, batch_size, optimizer, schedule, early_stopping, label_smoothing, "
            "gradient_clip_norm)",
        ),
        ("classifier=3", "--set classifier: is a group of fields; set one of them, e.g. classifier.epochs=…"),
        ("dataset.uri.bucket=x", "--set dataset.uri: is a value, not a group; it has no field 'bucket'"),
        ("classifier.epochs=ten", "--set classifier.epochs: expected an integer, got 'ten'"),
        ("classifier.learning_rate=inf", "--set classifier.learning_rate: expected a finite number, got 'inf'"),
        ("classifier.learning_rate=1e39", "--set classifier.learning_rate: '1e39' is too large for a 32-bit float"),
        ("run.repeats=3000000000", "--set run.repeats: 3000000000 is out of range for int32"),
        ("run.device=tpu", "--set run.device: unknown Device 'tpu'; expected one of AUTO, CPU, CUDA"),
    ],
)
def test_mistakes_in_overrides_name_the_override(override: str, message: str) -> None:
    with pytest.raises(SpecFileError) as err:
        parse_spec("", overrides=[override])
    assert str(err.value) == message


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecFileError, match=r"missing\.yaml: cannot read: "):
        load_spec_file(tmp_path / "missing.yaml")


def test_written_yaml_reads_back_to_the_same_spec_with_short_enums_and_short_floats() -> None:
    # A resolved spec sets every field, floats included (0.003 as a float32 is 0.0030000000260770321).
    resolved = config_to_spec(validate_spec(parse_spec(NESTED)))
    text = dump_spec_yaml(resolved, "made by a test\n\nsecond paragraph")
    assert text.startswith("# made by a test\n#\n# second paragraph\ndataset:\n")
    assert "architecture: MOBILENET_V2\n" in text
    assert "learning_rate: 0.001\n" in text
    assert "seed: 7\n" in text  # uint64 as a YAML int, not JSON's quoted string
    assert parse_spec(text) == resolved


@pytest.mark.parametrize(
    "path",
    # Study files (*-study.yaml) are StudySpecs: tests/integration/test_cli_studies.py validates them.
    sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json") and not p.stem.endswith("-study")),
    ids=lambda p: p.name,
)
def test_every_example_passes_the_trainers_validation(path: Path) -> None:
    spec = load_spec_file(path)
    config = validate_spec(spec)
    assert config.dataset.uri.startswith("datasets/")


def test_the_examples_are_there() -> None:
    assert {p.name for p in EXAMPLES.iterdir()} >= {"shapes-quick.yaml", "flowers-full.yaml", "shapes-study.yaml"}


# -- the reference ---------------------------------------------------------------------------------------------


def _yaml_keys(text: str) -> list[str]:
    """Every key path the reference writes, commented out or not, from its indentation."""
    paths: list[str] = []
    stack: list[str] = []
    for line in text.splitlines():
        body = line.lstrip(" ")
        depth = (len(line) - len(body)) // 2
        key = re.match(r"(?:# )?([a-z0-9_]+):(?: [^#]+)?(?:  # .*)?$", body)
        if key is None:
            continue  # a description line
        stack[depth:] = [key[1]]
        paths.append(".".join(stack))
    return paths


def test_the_reference_writes_every_field_with_its_default_and_range() -> None:
    text = spec_reference_yaml()
    assert _yaml_keys(text) == [d.path for d in protoreflect.spec_reference(pb.TrainingSpec.DESCRIPTOR)]
    assert "\n  classifier_dim: 256  # range [8, 8192]\n" in text
    assert "\n  uri:  # required\n" in text
    assert "\n    # learning_rate:  # range (0, 10]\n" in text  # the fine-tuning LR: its default is derived
    assert "\n  architecture: MOBILENET_V2\n" in text


def test_the_reference_reads_back_to_the_defaults() -> None:
    spec = parse_spec(spec_reference_yaml(), source="reference", overrides=["dataset.uri=datasets/x"])
    assert validate_spec(spec) == validate_spec(pb.TrainingSpec(dataset=pb.DatasetSpec(uri="datasets/x")))
