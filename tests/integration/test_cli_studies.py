"""The CLI's `study` commands against a real trainer process and a real S3 server.

One trainer serves the module. Its study is the smallest real one: three trials of the tiny shapes job
(MobileNetV3-small from scratch at 32 px, 2 epochs: seconds each on a CPU) with the median pruner; the commands
run in-process through click's runner, as in test_cli_training.py. Study files are read without a trainer too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests.integration.trainer_helpers import Trainer, start_shapes_trainer, tiny_spec
from trainer_service.spec.validate import validate_spec
from trainer_service.tuning.study_config import validate_study
from visiontune.cli import cli
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.specfile import SpecFileError, dump_spec_yaml, load_spec_file, load_study_file, parse_study_spec
from visiontune.v1 import study_pb2, training_service_pb2, training_spec_pb2

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SPACE = """\
base_spec: base.yaml            # the tiny spec, next to this file
parameters:
  - path: classifier.learning_rate
    float_range: {min: 1e-4, max: 0.05, log: true}
  - path: model.classifier_dim
    categorical: {values: [16, 32]}
objective: {metric: validation_loss}
budget: {max_trials: 3}
parallelism: 1
sampler: tpe
pruner: {type: median, min_resource: 1, startup_trials: 1}
seed: 7
"""


@pytest.fixture(scope="module")
def trainer(s3_server: S3ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    running = start_shapes_trainer(s3_server, tmp_path_factory.mktemp("cli-study-trainer"), "cli-study")
    yield running
    running.stop()


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(dump_spec_yaml(tiny_spec(epochs=2)))
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def _invoke(target: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"VISIONTUNE_TRAINER": target})


def _get(trainer: Trainer, name: str) -> study_pb2.Study:
    study: study_pb2.Study = trainer.stub.GetStudy(training_service_pb2.GetStudyRequest(name=name), timeout=30)
    return study


# -- study files, no trainer ----------------------------------------------------------------------------------


def test_the_example_study_loads_with_its_base_spec_file_and_passes_the_trainers_validation() -> None:
    spec = load_study_file(EXAMPLES / "shapes-study.yaml")
    assert spec.base_spec == load_spec_file(EXAMPLES / "shapes-quick.yaml")
    assert [p.path for p in spec.parameters] == ["classifier.learning_rate", "model.classifier_dim", "model.dropout"]
    assert list(spec.parameters[1].categorical.values) == ["32", "64", "128"]  # YAML ints, sent as strings
    assert spec.budget.max_duration.seconds == 1800  # 30m
    config = validate_study(spec, default_bucket="visiontune")
    assert (config.max_trials, config.parallelism, config.direction.value) == (6, 1, "minimize")


def test_study_files_take_yaml_values_for_categoricals_durations_and_set_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(dump_spec_yaml(tiny_spec()))
    searched = (
        "parameters:\n"
        "  - path: model.architecture\n"
        "    categorical: {values: [resnet18, MOBILENET_V3_SMALL]}  # enum values by short name\n"
        "  - path: augmentation.horizontal_flip\n"
        "    categorical: {values: [true, false]}\n"
    )
    text = SPACE.replace("parameters:\n", searched).replace(
        "budget: {max_trials: 3}", "budget: {max_trials: 3, max_duration: 1h30m}"
    )
    spec = parse_study_spec(
        text,
        base_dir=tmp_path,
        overrides=["budget.max_trials=5", "base_spec.classifier.epochs=4", "budget.max_duration=90s"],
    )
    assert list(spec.parameters[0].categorical.values) == ["ARCHITECTURE_RESNET18", "ARCHITECTURE_MOBILENET_V3_SMALL"]
    assert list(spec.parameters[1].categorical.values) == ["true", "false"]
    assert spec.budget.max_trials == 5
    assert spec.budget.max_duration.seconds == 90
    assert spec.base_spec.classifier.epochs == 4
    assert spec.base_spec.dataset.uri == "datasets/shapes"  # the rest from base.yaml

    inline = parse_study_spec("base_spec: {dataset: {uri: datasets/x}}\nbudget: {max_duration: 1h30m}\n")
    assert inline.base_spec.dataset.uri == "datasets/x"
    assert inline.budget.max_duration.seconds == 5400

    for bad, message in [
        ("paramters: []", "study: unknown key 'paramters' (did you mean 'parameters'?)"),
        (
            "budget: {max_duration: soon}",
            "study: budget.max_duration: expected a duration such as 600s, 10m or 1h30m, got 'soon'",
        ),
        (
            "base_spec: nowhere.yaml",
            f"study: base_spec: cannot read {tmp_path / 'nowhere.yaml'}: No such file or directory",
        ),
    ]:
        with pytest.raises(SpecFileError) as refused:
            parse_study_spec(bad, base_dir=tmp_path)
        assert str(refused.value) == message
    (tmp_path / "typo.yaml").write_text("classifier: {learnig_rate: 0.1}\n")
    with pytest.raises(
        SpecFileError,
        match=r"typo\.yaml \(the base_spec of study\): unknown key "
        r"'classifier\.learnig_rate' \(did you mean 'learning_rate'\?\)",
    ):
        parse_study_spec("base_spec: typo.yaml", base_dir=tmp_path)


# -- against a trainer ----------------------------------------------------------------------------------------


def test_a_study_from_create_to_promote(trainer: Trainer, space_file: Path, tmp_path: Path) -> None:
    target = trainer.target
    done = _invoke(target, "study", "create", str(space_file), "--id", "cli-study")
    out = done.stdout
    assert done.exit_code == 0, done.output
    assert out.startswith(
        f"created studies/cli-study on {target}: minimize val_loss; 2 parameters, sampler tpe, "
        "pruner median, parallelism 1; budget 3 trials\n"
    ), out
    assert "state: running\n" in out
    params = r"classifier\.learning_rate=[\d.e+-]+ model\.classifier_dim=(16|32)"
    for n in range(3):
        assert re.search(rf"^trial {n} queued: {params} \(jobs/job-[0-9a-f]+\)$", out, re.MULTILINE), out
        assert re.search(
            rf"^trial {n} (complete: value \d+\.\d{{4}} after 2 epochs|pruned after 1 epoch "
            rf"\(last value \d+\.\d{{4}}\)); {params} \(jobs/job-[0-9a-f]+\)$",
            out,
            re.MULTILINE,
        ), out
    assert re.search(r"^new best: trial \d value \d+\.\d{4}$", out, re.MULTILINE), out
    assert "state: succeeded\n" in out

    study = _get(trainer, "studies/cli-study")
    assert study.state == study_pb2.STUDY_STATE_SUCCEEDED
    assert len(study.trials) == 3
    best = next(t for t in study.trials if t.number == study.best_trial)
    # It ends with the outcome and the best trial.
    summary = out[out.index("\nstudies/cli-study succeeded in ") :]
    assert re.match(r"\nstudies/cli-study succeeded in [\d.]+s: 3 trials \(\d complete(, \d pruned)?\)\n", summary)
    assert (
        f"best trial: {best.number}, value {best.value:.4f} (minimize val_loss, 2 epochs, {best.job})\nparameters:\n"
    ) in summary
    assert re.search(rf"^  model\.classifier_dim +{best.parameters['model.classifier_dim']}$", summary, re.MULTILINE)
    assert summary.endswith(
        "best spec as YAML: visiontune study best studies/cli-study --spec-out best.yaml\n"
        "train it in full for a deployable model version: visiontune study promote "
        "studies/cli-study\n"
    )

    replay = _invoke(target, "study", "watch", "cli-study")  # re-attach to a finished study: its events replay
    assert replay.exit_code == 0, replay.output
    assert replay.stdout == out.split("\n", 1)[1]

    shown = _invoke(target, "study", "get", "studies/cli-study")
    assert shown.exit_code == 0, shown.output
    assert "state:      succeeded\n" in shown.stdout
    assert "objective:  minimize val_loss\n" in shown.stdout
    assert f"best:       trial {best.number}, value {best.value:.4f}\n" in shown.stdout
    rows = re.findall(r"^ +(\d) +(complete|pruned) +([\d.]+|-) +(\d) +(jobs/\S+) +(.*)$", shown.stdout, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [0, 1, 2], shown.stdout
    trials = sorted(study.trials, key=lambda t: t.number)
    for (number, state, value, epochs, job, params_text), trial in zip(rows, trials, strict=True):
        assert int(number) == trial.number
        assert state == study_pb2.TrialState.Name(trial.state).removeprefix("TRIAL_STATE_").lower()
        assert int(epochs) == len(trial.intermediate_values)
        assert job == trial.job
        assert value == (f"{trial.value:.4f}" if trial.HasField("value") else "-")
        assert params_text.endswith(" *") == (trial.number == best.number)

    best_file = tmp_path / "best.yaml"
    written = _invoke(target, "study", "best", "cli-study", "--spec-out", str(best_file))
    assert written.exit_code == 0, written.output
    assert f"wrote the best spec to {best_file}; train it with: visiontune train {best_file}\n" in written.stdout
    assert "parameter importances (fANOVA):" in written.stdout or study.state != study_pb2.STUDY_STATE_SUCCEEDED
    assert re.search(r"^  s3://\S+/optimization_history\.png$", written.stdout, re.MULTILINE), written.stdout
    loaded = load_spec_file(best_file)
    assert loaded == study.best_spec
    assert loaded.classifier.learning_rate == pytest.approx(float(best.parameters["classifier.learning_rate"]))
    assert loaded.model.classifier_dim == int(best.parameters["model.classifier_dim"])
    validate_spec(loaded)  # `visiontune train best.yaml` would take it

    listed = _invoke(target, "study", "list")
    assert listed.exit_code == 0, listed.output
    assert re.search(
        rf"^studies/cli-study +succeeded +[\d-]+ [\d:]+ +minimize val_loss +trial {best.number} +space$",
        listed.stdout,
        re.MULTILINE,
    ), listed.stdout

    ended = _invoke(target, "study", "cancel", "cli-study")
    assert ended.exit_code == 1
    assert ended.stderr == (
        f"Error: {target}: FAILED_PRECONDITION: studies/cli-study already ended (SUCCEEDED); "
        "there is nothing to cancel\n"
    )

    promoted = _invoke(target, "study", "promote", "cli-study", "--job-id", "cli-promoted")
    assert promoted.exit_code == 0, promoted.output
    assert promoted.stdout.startswith(
        f"created jobs/cli-promoted on {target} from trial {best.number} of studies/cli-study (2 epochs planned)\n"
    ), promoted.stdout
    assert "model version: models/shapes/versions/cli-promoted\n" in promoted.stdout
    assert promoted.stdout.endswith("deploy it with: visiontune deploy models/shapes/versions/cli-promoted\n")


def test_an_invalid_space_exits_2_naming_each_field_and_creates_nothing(trainer: Trainer, space_file: Path) -> None:
    space_file.write_text(SPACE.replace("model.classifier_dim", "classifier.no_such_field"))
    done = _invoke(
        trainer.target, "study", "create", str(space_file), "--id", "bad-space", "--set", "budget.max_trials=0"
    )
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == f"Error: {space_file}: 2 invalid fields:"
    assert re.fullmatch(r"  parameters\[1\]\.path \(classifier\.no_such_field\): .*'no_such_field'.*", lines[1])
    assert lines[2] == "  budget.max_trials: 0 means no limit, which needs spec.budget.max_duration; got neither"
    missing = _invoke(trainer.target, "study", "get", "bad-space")
    assert missing.exit_code == 1
    assert missing.stderr == f"Error: {trainer.target}: NOT_FOUND: studies/bad-space does not exist\n"

    space_file.write_text(SPACE.replace("parallelism: 1", "paralelism: 1"))
    typo = _invoke(trainer.target, "study", "create", str(space_file))
    assert typo.exit_code == 2
    assert typo.stderr == f"Error: {space_file}: unknown key 'paralelism' (did you mean 'parallelism'?)\n"

    space_file.write_text(SPACE)
    checked = _invoke(trainer.target, "study", "create", str(space_file), "--dry-run")
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith(f"the trainer at {trainer.target} accepts {space_file}: minimize val_loss")


def test_a_study_with_no_completed_trial_has_no_best(trainer: Trainer, space_file: Path) -> None:
    created = _invoke(
        trainer.target,
        "study",
        "create",
        str(space_file),
        "--id",
        "cli-cancelled",
        "--no-watch",
        "--set",
        "base_spec.classifier.epochs=200",
    )
    assert created.exit_code == 0, created.output
    assert created.stdout.endswith("follow it with: visiontune study watch studies/cli-cancelled\n")
    early = _invoke(trainer.target, "study", "best", "cli-cancelled")
    assert early.exit_code == 1
    assert early.stderr.startswith("Error: studies/cli-cancelled has no completed trial yet (running, ")

    # Ctrl-C stops following, not the study (a real process: the signal is what a user sends).
    watcher = subprocess.Popen(
        [sys.executable, "-m", "visiontune.cli", "study", "watch", "cli-cancelled"],
        env={**os.environ, "VISIONTUNE_TRAINER": trainer.target},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert watcher.stdout is not None
    seen = []
    for line in watcher.stdout:
        seen.append(line)
        if line.startswith("trial 0 queued: "):
            break
    watcher.send_signal(signal.SIGINT)
    rest, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130, "".join(seen) + rest + err
    assert "re-attach with: visiontune study watch studies/cli-cancelled\n" in err
    assert _get(trainer, "studies/cli-cancelled").state == study_pb2.STUDY_STATE_RUNNING

    cancelled = _invoke(trainer.target, "study", "cancel", "cli-cancelled")
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.startswith(("studies/cli-cancelled: cancelling", "studies/cli-cancelled: cancelled"))
    followed = _invoke(trainer.target, "study", "watch", "cli-cancelled")
    assert followed.exit_code == 1, followed.output
    assert "state: cancelled\n" in followed.stdout
    assert followed.stderr.endswith("studies/cli-cancelled was cancelled\n")
    study = _get(trainer, "studies/cli-cancelled")
    assert study.state == study_pb2.STUDY_STATE_CANCELLED
    assert study.spec.base_spec.classifier.epochs == 200
    assert study.spec.objective.metric == training_spec_pb2.METRIC_VALIDATION_LOSS
