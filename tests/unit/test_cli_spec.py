"""`visiontune spec defaults`: the reference it prints is the proto's, and reads back as a spec of defaults."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner
from trainer_service.spec.validate import validate_spec
from visiontune.cli import cli
from visiontune.protoreflect import field_default
from visiontune.specfile import parse_spec
from visiontune.v1 import training_spec_pb2


def test_spec_defaults_prints_every_default_of_the_protos_and_reads_back_as_the_defaults(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["spec", "defaults"])
    assert result.exit_code == 0, result.output
    tree = yaml.safe_load(result.output)
    epochs = field_default(training_spec_pb2.TrainingSpec.DESCRIPTOR, "classifier.epochs")
    assert tree["classifier"]["epochs"] == epochs
    assert tree["fine_tuning"]["stage"]["epochs"] == field_default(
        training_spec_pb2.TrainingSpec.DESCRIPTOR, "fine_tuning.stage.epochs"
    )
    assert "# range [1, 1000]" in result.output

    written = tmp_path / "reference.yaml"
    result = CliRunner().invoke(cli, ["spec", "defaults", "-o", str(written)])
    assert result.exit_code == 0, result.output
    spec = parse_spec(written.read_text(), overrides=["dataset.uri=datasets/shapes"])
    minimal = training_spec_pb2.TrainingSpec(dataset=training_spec_pb2.DatasetSpec(uri="datasets/shapes"))
    assert validate_spec(spec) == validate_spec(minimal)
