"""Smoke test of bench/tuning in its --quick form: keeps the benchmark from rotting.

The run needs Fashion-MNIST from the Debian package `dataset-fashion-mnist` (`make fashion-mnist`) and the
MobileNetV2 ImageNet weights (`make setup`), and trains a few dozen tiny trials: about 15 s on a 2-core CPU, hence
`slow` (`make test-slow`), like the other benchmark smoke tests. Argument checking stays in the default run.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATA_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
needs_fashion_mnist = pytest.mark.skipif(
    not all((FASHION_MNIST / name).is_file() for name in DATA_FILES),
    reason=f"Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist (puts it under {FASHION_MNIST})",
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # bench/ sits at the repository root, which is on sys.path under `python -m pytest` but not under a bare
    # `pytest`; put it there either way.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.tuning")


@pytest.fixture(scope="module")
def study(bench: ModuleType) -> ModuleType:
    return importlib.import_module("bench.tuning_study")  # the arms' names (bench.tuning puts ROOT on sys.path)


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.timeout(600)
def test_quick_run_reports_both_arms_the_ratio_and_every_trials_epochs(
    bench: ModuleType, study: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "tuning.md"
    assert bench.main(["--quick", "--output", str(output)]) == 0
    report = output.read_text(encoding="utf-8")
    budget = bench.QUICK["budget_epochs"]

    # Both arms, in the summary table and in the trial log.
    for arm in (study.RANDOM, study.TPE_HB):
        assert f"| {arm} |" in report
    assert "python -m bench.tuning --quick" in report

    # The headline: a compute ratio (a number, or "not reached"), printed as well as written.
    ratio = re.search(r"Compute ratio TPE \+ Hyperband / random search .*: median (\S+) over 1 seed", report)
    assert ratio is not None, report
    assert ratio.group(1) == "not reached" or float(ratio.group(1)) > 0
    assert "Compute ratio TPE + Hyperband / random search" in capsys.readouterr().out

    # Every trial's epochs: each arm spent exactly the budget, and random search only ran full trials.
    log = dict(re.findall(r"^- seed 0, (.+?) \(\d+ trials, \d+ epochs\): (.+)$", report, flags=re.MULTILINE))
    assert set(log) == {study.RANDOM, study.TPE_HB}, report
    for arm, marks in log.items():
        trials = [(int(m[:-1]), m[-1]) for m in marks.split()]
        assert trials, arm
        assert sum(epochs for epochs, _ in trials) == budget, (arm, marks)
        assert all(epochs >= 1 and state in "cpbf" for epochs, state in trials), (arm, marks)
        assert "f" not in {state for _, state in trials}, (arm, marks)
    max_epochs = bench.QUICK["max_epochs"]
    assert all(m == f"{max_epochs}c" for m in log[study.RANDOM].split()), log[study.RANDOM]


def test_bad_settings_are_refused(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "tuning.md"
    assert bench.main(["--budget-epochs", "2", "--max-epochs", "9", "--output", str(output)]) == 2
    assert bench.main(["--size", "16", "--output", str(output)]) == 2  # refused by validate_study: image_size >= 32
    assert "bad settings" in capsys.readouterr().err
    assert not output.exists()


def test_missing_dataset_prints_the_install_command(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "tuning.md"
    assert bench.main(["--quick", "--data-dir", str(tmp_path), "--output", str(output)]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    assert not output.exists()
