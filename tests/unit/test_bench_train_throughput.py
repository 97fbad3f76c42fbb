"""Smoke test of bench/train_throughput on tiny sizes: keeps the benchmark script from rotting.

Even tiny, a run builds and trains MobileNetV2 several times (warm-up, both loops, both stage-1 variants):
tens of seconds on a 2-core CPU, hence `slow` (`make test-slow`); argument checking stays in the default run.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--images",
    "16",
    "--size",
    "32",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--stage1-epochs",
    "1",
    "--rounds",
    "1",
    "--val-images",
    "8",
    "--device",
    "cpu",
    "--weights",
    "none",
]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # bench/ sits at the repository root, which is on sys.path under `python -m pytest` but not under a bare
    # `pytest`; put it there either way.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.train_throughput")


@pytest.fixture(scope="module")
def tiny_result(bench: ModuleType) -> dict[str, Any]:
    settings, _ = bench.parse_args(TINY)
    result: dict[str, Any] = bench.benchmark(settings)
    return result


@pytest.mark.slow
def test_benchmark_reports_positive_throughputs_and_ratios(tiny_result: dict[str, Any]) -> None:
    st = tiny_result["stage1"]
    for ft in (tiny_result["fine_tuning"], tiny_result["augmented_fine_tuning"]):
        assert ft["ours_images_per_second"] > 0
        assert ft["reference_images_per_second"] > 0
        assert ft["ratio_ours_over_reference"] > 0
        assert ft["ratio_of_medians"] > 0
        assert len(ft["ours_rounds"]) == len(ft["reference_rounds"]) == len(ft["paired_ratios"]) == 1
    assert st["cached_epoch_seconds"] > 0
    assert st["uncached_epoch_seconds"] > 0
    assert st["ratio_cached_over_uncached"] > 0
    assert st["feature_seconds"] > 0
    assert st["break_even_epochs"] > 0
    assert math.isfinite(st["break_even_epochs"]) == (st["cache_ahead_from_epoch"] is not None)


@pytest.mark.slow
def test_main_writes_the_markdown_report(
    bench: ModuleType, tiny_result: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "benchmark", lambda settings: tiny_result)  # the run above, not a second one
    out = tmp_path / "results" / "train_throughput.md"
    assert bench.main([*TINY, "--out", str(out)]) == 0
    report = out.read_text(encoding="utf-8")
    assert "python -m bench.train_throughput --images 16" in report
    assert "ratio ours / reference" in report
    assert "ratio cached / uncached epoch" in report
    assert "augmented on the device" in report
    assert "horizontal_flip True" in report


def test_bad_settings_are_refused(bench: ModuleType) -> None:
    assert bench.main(["--images", "0"]) == 2
    with pytest.raises(ValueError, match="--rounds"):
        bench.Settings(rounds=0).check()
