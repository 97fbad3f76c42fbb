"""The CLI's training commands against a real trainer process and a real S3 server.

`visiontune train` and the Ctrl-C path run as real subprocesses (what a user runs, signals included); the other
commands run in-process through click's runner against the same trainer, which keeps the file cheap. One trainer
serves the module; its jobs are the tiny shapes jobs of test_training_jobs.py (seconds on a CPU).
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
from visiontune.cli import cli
from visiontune.devstack.ports import free_port
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.specfile import dump_spec_yaml, load_spec_file, parse_spec
from visiontune.v1 import job_pb2, training_service_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trainer(s3_server: S3ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    running = start_shapes_trainer(s3_server, tmp_path_factory.mktemp("cli-trainer"), "cli")
    yield running
    running.stop()


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """The tiny spec as `visiontune` writes spec files (5 classifier epochs; tests shorten it with --set)."""
    path = tmp_path / "spec.yaml"
    path.write_text(dump_spec_yaml(tiny_spec(epochs=5)))
    return path


def _env(target: str) -> dict[str, str]:
    return {**os.environ, "VISIONTUNE_TRAINER": target}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "visiontune.cli", *args]


def _run(trainer: Trainer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args), env=_env(trainer.target), capture_output=True, text=True, timeout=240, check=False
    )


def _invoke(target: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"VISIONTUNE_TRAINER": target})


def test_train_follows_the_job_to_its_model_version_and_jobs_get_shows_it(trainer: Trainer, spec_file: Path) -> None:
    done = _run(
        trainer, "train", str(spec_file), "--job-id", "cli-1", "--name", "cli demo", "--set", "classifier.epochs=2"
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert f"created jobs/cli-1 on {trainer.target} (2 epochs planned)" in out  # --set beat the file's 5
    assert "-- stage data\n" in out
    assert "-- stage classifier: 2 epochs\n" in out
    epoch = (
        r"^classifier  epoch   {}/2  train loss \d+\.\d{{4}} acc [01]\.\d{{3}}  val loss \d+\.\d{{4}} acc "
        r"[01]\.\d{{3}}  lr 1\.00e-02  [\d,]+ img/s$"
    )
    assert re.search(epoch.format(1), out, re.MULTILINE), out
    assert re.search(epoch.format(2), out, re.MULTILINE), out
    assert "warning [corrupt_image]" in out  # the dataset's one corrupt file: skipped, reported, not fatal
    assert "state: succeeded\n" in out
    assert "model version: models/shapes/versions/cli-1\n" in out
    assert re.search(r"^  val_accuracy +[01]\.\d{4} ± 0\.0000$", out, re.MULTILINE), out
    assert re.search(r"^  circle +[01]\.\d{3} +[01]\.\d{3} +[01]\.\d{3} +4$", out, re.MULTILINE), out
    assert "open set (max_softmax): threshold" in out
    assert "  s3://" in out

    shown = _invoke(trainer.target, "jobs", "get", "cli-1")
    assert shown.exit_code == 0, shown.output
    assert "name:      jobs/cli-1 (cli demo)\n" in shown.stdout
    assert "state:     succeeded\n" in shown.stdout
    assert "model version: models/shapes/versions/cli-1\n" in shown.stdout

    # The resolved spec `jobs get --spec` prints reads back as the job's spec: a re-run is one command away.
    resolved = _invoke(trainer.target, "jobs", "get", "jobs/cli-1", "--spec")
    job = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name="jobs/cli-1"), timeout=10)
    assert parse_spec(resolved.stdout) == job.spec

    ended = _invoke(trainer.target, "jobs", "cancel", "cli-1")
    assert ended.exit_code == 1
    assert ended.stderr.startswith(f"Error: {trainer.target}: FAILED_PRECONDITION: jobs/cli-1 already ended")


def test_an_invalid_spec_exits_2_listing_every_field_and_creates_nothing(trainer: Trainer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "dataset: {uri: datasets/shapes, image_size: 8}\nmodel: {architecture: mobilenet_v3_small, dropout: 1.5}\n"
    )
    done = _run(trainer, "train", str(bad), "--job-id", "bad-1", "--set", "classifier.batch_size=0")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"Error: {bad}: 3 invalid fields:",
        "  dataset.image_size: must be in [32, 1024], got 8",
        "  model.dropout: must be in [0, 0.95], got 1.5",
        "  classifier.batch_size: must be in [1, 4096], got 0",
    ]
    missing = _invoke(trainer.target, "jobs", "get", "bad-1")
    assert missing.exit_code == 1
    assert missing.stderr == f"Error: {trainer.target}: NOT_FOUND: jobs/bad-1 does not exist\n"

    bad.write_text("dataset: {uri: datasets/shapes}\nclassifier:\n  learnig_rate: 0.1\n")
    typo = _invoke(trainer.target, "train", str(bad))
    assert typo.exit_code == 2
    assert typo.stderr == f"Error: {bad}: unknown key 'classifier.learnig_rate' (did you mean 'learning_rate'?)\n"

    bad.write_text("dataset: {uri: datasets/shapes\n")
    broken = _invoke(trainer.target, "train", str(bad))
    assert broken.exit_code == 2
    assert broken.stderr.startswith(f"Error: {bad}: invalid YAML at line 2, column 1: ")


def test_ctrl_c_stops_following_but_not_the_job_and_cancel_stops_the_job(trainer: Trainer, spec_file: Path) -> None:
    submitted = _invoke(
        trainer.target, "train", str(spec_file), "--job-id", "cli-long", "--detach", "--set", "classifier.epochs=500"
    )
    assert submitted.exit_code == 0, submitted.output
    assert "follow it with: visiontune jobs watch jobs/cli-long\n" in submitted.stdout

    watcher = subprocess.Popen(
        _command("jobs", "watch", "cli-long"),
        env=_env(trainer.target),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert watcher.stdout is not None
    seen = []
    for line in watcher.stdout:  # follow until a worker has the job, then press Ctrl-C
        seen.append(line)
        if line.startswith("state: running"):
            break
    watcher.send_signal(signal.SIGINT)
    rest, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130, "".join(seen) + rest + err
    assert "re-attach with: visiontune jobs watch jobs/cli-long" in err

    running = trainer.stub.GetJob(training_service_pb2.GetJobRequest(name="jobs/cli-long"), timeout=10)
    assert running.state == job_pb2.JOB_STATE_RUNNING  # Ctrl-C ended the watch, not the job

    cancelled = _invoke(trainer.target, "jobs", "cancel", "jobs/cli-long")
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout in ("jobs/cli-long: cancelling\n", "jobs/cli-long: cancelled\n")
    followed = _invoke(trainer.target, "jobs", "watch", "cli-long")  # re-attach: the log replays to its end
    assert followed.exit_code == 1
    assert re.search(r"^state: cancelled\b", followed.stdout, re.MULTILINE), followed.stdout
    assert followed.stderr.endswith("jobs/cli-long was cancelled\n")


def test_a_failed_job_exits_1_with_its_error(trainer: Trainer, spec_file: Path) -> None:
    failed = _invoke(
        trainer.target,
        "train",
        str(spec_file),
        "--job-id",
        "cli-fail",
        "--set",
        "model.weights=uri",
        "--set",
        "model.weights_uri=datasets/weights/missing.pt",
    )
    assert failed.exit_code == 1, failed.output
    assert re.search(r"^state: failed \(.*missing\.pt", failed.stdout, re.MULTILINE), failed.stdout
    assert re.search(r"^jobs/cli-fail failed in [\d.]+s: [A-Z_]+: .*missing\.pt", failed.stderr, re.MULTILINE)


def test_recommend_writes_a_spec_that_train_accepts(trainer: Trainer, tmp_path: Path) -> None:
    out = tmp_path / "recommended.yaml"
    done = _invoke(trainer.target, "recommend", "datasets/shapes", "-o", str(out))
    assert done.exit_code == 0, done.output
    assert re.search(r"^dataset datasets/shapes: \d+ images in 3 labels", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^model\.architecture +MOBILENET_V2 +\S", done.stdout, re.MULTILINE), done.stdout
    assert f"wrote {out}; train it with: visiontune train {out}\n" in done.stdout
    assert out.read_text().startswith("# Recommended by `visiontune recommend datasets/shapes`.\n")
    validate_spec(load_spec_file(out))
    checked = _invoke(trainer.target, "train", str(out), "--dry-run")  # the trainer accepts it as written
    assert checked.exit_code == 0, checked.output
    assert parse_spec(checked.stdout) == parse_spec(out.read_text())

    missing = _invoke(trainer.target, "recommend", "datasets/nothing-here")
    assert missing.exit_code == 1
    assert missing.stderr.startswith(f"Error: {trainer.target}: FAILED_PRECONDITION: ")
    assert missing.stderr.count("\n") == 1


def test_lr_find_prints_the_suggestion_the_rule_and_the_curve(trainer: Trainer, spec_file: Path) -> None:
    done = _invoke(trainer.target, "lr-find", str(spec_file), "--min-lr", "1e-4", "--max-lr", "1", "--steps", "10")
    assert done.exit_code == 0, done.output
    assert re.search(r"^suggested learning rate: \d", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^rule: \S", done.stdout, re.MULTILINE)
    assert re.search(r"^plot: s3://\S+\.png$", done.stdout, re.MULTILINE)
    assert re.search(r"^  [▁▂▃▄▅▆▇█]+$", done.stdout, re.MULTILINE)
    assert "<- suggested" in done.stdout

    crossed = _invoke(trainer.target, "lr-find", str(spec_file), "--min-lr", "1", "--max-lr", "0.1")
    assert crossed.exit_code == 2
    assert "  min_learning_rate: need 0 < min < max <= 100, got min 1, max 0.1" in crossed.stderr

    # The sweep runs in a process of its own (in a job slot); its failure still reaches the caller as one line
    # with the status the same failure has in a job.
    nothing = _invoke(trainer.target, "lr-find", str(spec_file), "--set", "dataset.uri=datasets/nothing-here")
    assert nothing.exit_code == 1
    assert nothing.stderr.startswith(f"Error: {trainer.target}: FAILED_PRECONDITION: "), nothing.stderr
    assert "datasets/nothing-here" in nothing.stderr
    assert nothing.stderr.count("\n") == 1
    # CUDA on a trainer with no GPU: refused before anything is read.
    cuda = _invoke(trainer.target, "lr-find", str(spec_file), "--set", "run.device=CUDA")
    assert cuda.exit_code == 2
    assert "  run.device: CUDA was asked for, but this trainer's job slots have no GPU" in cuda.stderr


def test_a_trainer_that_is_not_there_is_one_line(spec_file: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    for args in (("lr-find", str(spec_file)), ("recommend", "datasets/shapes"), ("jobs", "get", "x")):
        result = _invoke(nowhere, *args)
        assert result.exit_code == 1, args
        assert result.stderr.startswith(f"Error: {nowhere}: UNAVAILABLE: "), result.stderr
        assert result.stderr.count("\n") == 1
