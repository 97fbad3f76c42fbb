"""Smoke test of bench/serve: a --quick run against a real S3 server, inference service and Triton.

It starts the whole serving stack and drives it at concurrency 1 and 8 for a second each: about 45-60 s on a
2-core CPU, hence `integration`. Argument checking needs no servers.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # bench/ and tests/ sit at the repository root, which is on sys.path under `python -m pytest` but not
    # under a bare `pytest`; put it there either way.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.serve")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_quick_run_writes_every_path_concurrency_and_ratio(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "serve.md"
    assert bench.main(["--quick", "--output", str(out)]) == 0  # 1 on any failed request or disagreement
    report = out.read_text(encoding="utf-8")
    assert "python -m bench.serve --quick --output" in report
    for concurrency in (1, 8):
        for path in ("Classify", "Triton direct"):
            row = next((line for line in report.splitlines() if line.startswith(f"| {path} | {concurrency} |")), None)
            assert row is not None, f"no row for {path} at concurrency {concurrency}"
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            images_per_second, requests, failed = float(cells[2]), int(cells[6]), int(cells[7])
            assert images_per_second > 0
            assert requests > 0
            assert failed == 0
        assert any(line.startswith(f"| {concurrency} | ") for line in report.split("## Ratios")[1].splitlines())
    assert "| Classify / Triton direct (images/s) | Triton direct / ceiling | Classify / ceiling" in report
    assert "(**ceiling**)" in report
    assert "Failed requests: 0." in report
    assert "**Errors:**" not in report
    payload = report.split("## Payload to Triton")[1]
    pixels = 3 * 96 * 96  # the default --size
    assert f"(the trainer's export now) | {pixels} | 1.00 |" in payload
    assert f"input_format unset) | {4 * pixels} | 4.00 |" in payload


def test_bad_arguments_are_refused(bench: ModuleType) -> None:
    assert bench.main(["--concurrency", "0,8"]) == 2
    assert bench.main(["--seconds", "0"]) == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--concurrency", "a,b"])


def test_quick_sets_short_points_but_explicit_flags_win(bench: ModuleType) -> None:
    settings, out = bench.parse_args(["--quick", "--seconds", "3"])
    assert (settings.seconds, settings.warmup, settings.concurrency) == (3.0, 0.5, (1, 8))
    settings, _ = bench.parse_args([])
    assert (settings.seconds, settings.warmup, settings.concurrency) == (10.0, 2.0, (1, 8, 32))
    assert (settings.size, settings.max_batch_size, settings.queue_delay_ms) == (96, 32, 2.0)
    assert out.name == "serve.md"
