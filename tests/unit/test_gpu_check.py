"""`make gpu-check` (scripts/gpu-check.sh) on a machine without a GPU, and the report it writes.

The whole script only means something on a GPU; here it must refuse at once and say why, and its report must read
what the script's steps leave behind (the files below are what a smoke run on this machine wrote, cut down).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench.gpu_report import report

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_without_a_gpu_the_check_stops_at_once_and_says_why(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh")],
        env={**os.environ, "PYTHON": sys.executable, "VISIONTUNE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "torch sees no usable GPU here" in done.stderr
    assert "GPU_CHECK_ALLOW_CPU=1" in done.stderr
    assert not (tmp_path / "gpu-check").exists()  # nothing started, nothing written


def test_the_report_names_the_device_precision_and_throughput(tmp_path: Path) -> None:
    (tmp_path / "machine.json").write_text(
        json.dumps({"gpus": ["NVIDIA H200"], "torch": "2.14.1", "cuda_build": "13.0", "driver_version": "580.1"})
    )
    job = {
        "name": "jobs/gpu-amp",
        "state": "JOB_STATE_SUCCEEDED",
        "result": {
            "device": {"type": "cuda", "gpu_name": "NVIDIA H200", "gpu_count": 1, "precision": "PRECISION_AMP_BF16"},
            "history": [{"stage": "STAGE_FINE_TUNING", "epoch": 1, "images_per_second": 2345.6, "train_loss": 0.5}],
            "metrics": {"val_accuracy": {"mean": 0.975}},
        },
    }
    (tmp_path / "gpu-amp.json").write_text(json.dumps(job))
    (tmp_path / "serve.md").write_text("# Serving\n\n| a | b |\n")
    (tmp_path / "jpeg_parity.txt").write_text("...........\n11 passed in 9.1s\n")
    text = report(tmp_path)
    assert "Machine: NVIDIA H200; torch 2.14.1, CUDA build 13.0, driver 580.1" in text
    assert "`jobs/gpu-amp`: succeeded; device cuda 1 x NVIDIA H200, precision amp_bf16" in text
    assert "| fine_tuning | 1 | 2,346 | 0.5000 |" in text
    assert "Final validation accuracy 0.975." in text
    assert "## Serving on this device\n\n## Serving" in text  # the bench's own report, its title a level down
    assert "against the trainer's decoder\n\n11 passed in 9.1s\n" in text
    assert "(not run: no train_throughput.md)" in text  # a step that did not run is said, not left out
