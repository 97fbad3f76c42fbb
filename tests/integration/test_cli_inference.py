"""The CLI's serving commands (deploy, deployments, classify, feedback, metrics, undeploy) against a real stack.

One `visiontune up --any-ports` serves the module (S3, trainer, inference service with its Triton). The model
is the hand-made colour model of inference_helpers.py, whose answers are known: a pure red image is "red",
a grey one scores 1/3 for every label and is an unknown. `up` and `down` run as subprocesses, as a user runs
them; the other commands run in-process through click's runner against that stack, which keeps the file cheap.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests.integration.inference_helpers import GREY, RED, publish_color_model, solid_image
from visiontune.cli import cli
from visiontune.devstack import stack
from visiontune.devstack.ports import free_port
from visiontune.store import ArtifactStore

pytestmark = pytest.mark.integration

# The CLI must find everything through the stack's state file, not through variables of the caller's shell.
_NO_ENV: dict[str, str | None] = {
    name: None
    for name in (
        "VISIONTUNE_INFERENCE",
        "VISIONTUNE_INFERENCE_METRICS",
        "VISIONTUNE_S3_ENDPOINT",
        "VISIONTUNE_DATA_DIR",
        "VISIONTUNE_TRAINER",
    )
}


@dataclass
class Stack:
    data_dir: Path
    inference: str  # host:port of the inference service

    def invoke(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        return CliRunner().invoke(cli, [*args, "--data-dir", str(self.data_dir)], env={**_NO_ENV, **(env or {})})


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONTUNE_")}
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("cli-inference") / "state"
    try:
        _cli("up", "--any-ports", "--data-dir", str(data_dir))
        state = stack.load_state(data_dir)
        assert state is not None
        store = ArtifactStore.connect(state.s3_settings)
        # Two versions of models/colors: "v9" first, then "v1". `deploy models/colors` must pick the newest
        # committed one, v1, though v9 sorts last (versions are job IDs: their order says nothing).
        publish_color_model(store, "colors", "v9")
        time.sleep(1.5)  # S3 times have one-second resolution
        publish_color_model(store, "colors", "v1")
        yield Stack(data_dir, f"{stack.HOST}:{state.component('inference').port}")
    finally:
        _cli("down", "--data-dir", str(data_dir), check=False)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "red.png").write_bytes(solid_image(RED))
    (folder / "grey.png").write_bytes(solid_image(GREY))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_deploy_classify_feedback_metrics_undeploy(local_stack: Stack, images: Path) -> None:
    deployed = _ok(local_stack.invoke("deploy", "models/colors", "--max-batch-size", "8"))
    assert "models/colors: picked v1, the newest of its 2 committed versions\n" in deployed
    assert f"deploying models/colors/versions/v1 on {local_stack.inference} ... (Triton loads the model)\n" in deployed
    assert re.search(r"^models/colors/versions/v1: ready in \d+\.\d s$", deployed, re.MULTILINE), deployed
    assert re.search(r"^  triton model: +\S+", deployed, re.MULTILINE), deployed
    assert "  device:         cpu\n" in deployed
    assert "  traffic weight: 100 (100% of models/colors's traffic)\n" in deployed
    assert "  batching:       batch <= 8, queue delay 2 ms, 1 instance\n" in deployed

    listed = _ok(local_stack.invoke("deployments", "--model", "models/colors")).splitlines()
    assert listed[0].split()[:4] == ["model", "version", "state", "weight"]
    assert re.fullmatch(
        r"models/colors/versions/v1 +ready +100 +100% +\S+ +cpu +[\d-]+ [\d:]+ +batch <= 8, "
        r"queue delay 2 ms, 1 instance",
        listed[1],
    ), listed
    assert len(listed) == 2
    nothing = _ok(local_stack.invoke("deployments", "--model", "models/other"))
    assert nothing.startswith("nothing deployed of models/other on ")

    # A directory: its image files, sorted (grey.png, red.png); notes.txt is not one.
    table = _ok(local_stack.invoke("classify", str(images), "--model", "models/colors", "--top-k", "2"))
    lines = table.splitlines()
    assert lines[0].split() == ["#", "file", "label", "score", "verdict", "open-set", "score", "other", "top-k"]
    grey, red = images / "grey.png", images / "red.png"
    assert re.fullmatch(rf"  0  {re.escape(str(grey))}  \w+ +0\.333  UNKNOWN  0\.333 < 0\.500 +\w+ 0\.333", lines[1])
    assert re.fullmatch(rf"  1  {re.escape(str(red))} +red +1\.000  known    1\.000 >= 0\.500 +\w+ 0\.000", lines[2])
    assert lines[3] == "1 of 2 images accepted as a known class, 1 UNKNOWN"
    match = re.fullmatch(r"request (req-\w+) answered by models/colors/versions/v1 \(2 images, \d+ ms\)", lines[4])
    assert match, lines
    assert lines[5] == f"report the truth: visiontune feedback {match.group(1)} INDEX --label LABEL   (or --unknown)"

    # --json: one object per image, with what feedback needs; a lower --threshold accepts the grey one too.
    out = _ok(
        local_stack.invoke(
            "classify", str(red), str(grey), "--model", "models/colors/versions/v1", "--json", "--threshold", "0.3"
        )
    )
    rows = json.loads(out)
    assert [(r["file"], r["index"], r["unknown"]) for r in rows] == [(str(red), 0, False), (str(grey), 1, False)]
    assert rows[0]["request_id"] == rows[1]["request_id"] != match.group(1)
    assert rows[0]["model_version"] == "models/colors/versions/v1"
    assert rows[0]["label"] == rows[0]["top_k"][0]["label"] == "red"
    assert rows[0]["score"] == pytest.approx(1.0)
    assert len(rows[0]["top_k"]) == 3  # the service's default: up to 5, at most the model's labels
    assert rows[1]["threshold"] == pytest.approx(0.3)
    assert rows[1]["unknown_score"] == pytest.approx(1 / 3, abs=1e-3)

    request_id = match.group(1)
    first = _ok(local_stack.invoke("feedback", request_id, "0", "--unknown"))
    assert first == (
        f"{request_id} #0 (models/colors/versions/v1): true rejection (an unknown image rejected as unknown)\n"
    )
    again = _ok(local_stack.invoke("feedback", request_id, "0", "--unknown"))
    assert again.startswith(f"{request_id} #0 (models/colors/versions/v1): true rejection")
    assert "duplicate: this image already had feedback" in again
    correct = _ok(local_stack.invoke("feedback", request_id, "1", "--label", "red"))
    assert correct.endswith(": correct (a known image, accepted with the right label)\n")
    wrong_label = local_stack.invoke("feedback", request_id, "1", "--label", "purple")
    assert wrong_label.exit_code == 2, wrong_label.output
    assert "--label" in wrong_label.stderr

    shown = _ok(local_stack.invoke("metrics", "--grep", "feedback_total"))
    assert re.search(
        r'^visiontune_inference_feedback_total\{model="colors",outcome="true_rejection",'
        r'version="v1"\} +1\.0$',
        shown,
        re.MULTILINE,
    ), shown
    everything = _ok(local_stack.invoke("metrics"))
    assert "visiontune_inference_images_total{" in everything
    assert "visiontune_inference_request_duration_seconds_count{" in everything
    assert "_bucket{" not in everything
    assert "_created" not in everything
    assert "# HELP" not in everything
    assert "_bucket{" in _ok(local_stack.invoke("metrics", "--all", "--grep", "request_duration"))

    # More images than one request takes (64): consecutive requests, each with its own request id and indices.
    many = images / "many"
    many.mkdir()
    for i in range(70):
        (many / f"red-{i:02d}.png").write_bytes(solid_image(RED))
    split = json.loads(_ok(local_stack.invoke("classify", str(many), "--model", "models/colors", "--json")))
    assert [r["file"] for r in split] == [str(many / f"red-{i:02d}.png") for i in range(70)]
    assert [r["index"] for r in split] == [*range(64), *range(6)]
    assert len({r["request_id"] for r in split[:64]}) == len({r["request_id"] for r in split[64:]}) == 1
    assert split[0]["request_id"] != split[64]["request_id"]
    tables = _ok(local_stack.invoke("classify", str(many), "--model", "models/colors")).splitlines()
    assert tables[0].split()[:3] == ["req", "#", "file"]
    assert re.fullmatch(r"  2    5  \S+red-69\.png +red +1\.000  known .*", tables[70]), tables[70]
    assert tables[71] == "70 of 70 images accepted as a known class, 0 UNKNOWN"
    for line, (n, count) in zip(tables[72:74], ((1, 64), (2, 6)), strict=True):
        assert re.fullmatch(
            rf"req {n}: request req-\w+ answered by models/colors/versions/v1 \({count} images, "
            r"\d+ ms\)",
            line,
        ), line

    # A file that is not an image: the service refuses it, and the CLI names the file.
    bad = local_stack.invoke("classify", str(red), str(images / "notes.txt"), "--model", "models/colors")
    assert bad.exit_code == 2, bad.output
    assert bad.stdout == ""
    assert bad.stderr.startswith(
        f"Error: {local_stack.inference}: INVALID_ARGUMENT: 1 invalid field:\n  {images / 'notes.txt'}: "
    ), bad.stderr

    gone = _ok(local_stack.invoke("undeploy", "models/colors/versions/v1"))
    assert re.fullmatch(r"undeployed models/colors/versions/v1 \(Triton model \S+, was ready\)\n", gone), gone
    assert _ok(local_stack.invoke("deployments")).startswith("nothing deployed on ")
    after = local_stack.invoke("classify", str(red), "--model", "models/colors")
    assert after.exit_code == 1
    assert after.stderr.startswith(f"Error: {local_stack.inference}: ")
    assert after.stderr.count("\n") == 1


def test_errors_are_one_line_or_name_the_option(local_stack: Stack, images: Path) -> None:
    weight = local_stack.invoke("deploy", "models/colors/versions/v1", "--weight", "-1", "--instances", "99")
    assert weight.exit_code == 2, weight.output
    assert weight.stderr.splitlines()[1:] == ["  --weight: must be in [0, 10000]", "  --instances: must be in [1, 16]"]

    missing = local_stack.invoke("deploy", "models/colors/versions/nope")
    assert missing.exit_code == 1
    assert re.fullmatch(rf"Error: {local_stack.inference}: [A-Z_]+: .*nope.*\n", missing.stderr), missing.stderr

    no_model = local_stack.invoke("deploy", "models/nothing")
    assert no_model.exit_code == 1
    assert no_model.stderr.startswith("Error: models/nothing has no committed version in s3://visiontune")

    unknown_request = local_stack.invoke("feedback", "req-nothing", "0", "--unknown")
    assert unknown_request.exit_code == 1
    assert unknown_request.stderr.startswith(f"Error: {local_stack.inference}: NOT_FOUND: ")

    both = local_stack.invoke("feedback", "req-x", "0", "--unknown", "--label", "red")
    assert both.exit_code == 2
    assert "give exactly one of --label LABEL or --unknown" in both.stderr

    typo = local_stack.invoke("classify", str(images), "--model", "colors")
    assert typo.exit_code == 2
    assert "invalid model name 'colors'" in typo.stderr

    empty = images / "empty"
    empty.mkdir()
    nothing = local_stack.invoke("classify", str(empty), "--model", "models/colors")
    assert nothing.exit_code == 1
    assert nothing.stderr.startswith(f"Error: {empty}: no image files in it")

    nowhere = f"127.0.0.1:{free_port()}"
    down = local_stack.invoke("deployments", env={"VISIONTUNE_INFERENCE": nowhere})
    assert down.exit_code == 1
    assert down.stderr.startswith(f"Error: {nowhere}: UNAVAILABLE: ")
    assert down.stderr.count("\n") == 1
    no_metrics = local_stack.invoke("metrics", env={"VISIONTUNE_INFERENCE_METRICS": f"http://{nowhere}/metrics"})
    assert no_metrics.exit_code == 1
    assert no_metrics.stderr.startswith(f"Error: http://{nowhere}/metrics: ")
