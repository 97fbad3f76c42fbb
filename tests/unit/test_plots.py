"""Tests of the PNG plots: valid images of the expected size, edge cases accepted."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image
from trainer_service.engine.plots import (
    confusion_matrix_png,
    learning_rate_png,
    lr_finder_png,
    training_curves_png,
    weight_histogram,
    weight_histograms_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(data: bytes, width: int, height: int, tolerance: int = 2) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2_000  # more than a blank canvas
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes the pixels, not only the header
        assert image.format == "PNG"
        assert abs(image.width - width) <= tolerance
        assert abs(image.height - height) <= tolerance


def _history(classifier_epochs: int, fine_tuning_epochs: int) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    for i in range(classifier_epochs + fine_tuning_epochs):
        fine = i >= classifier_epochs
        rows.append(
            {
                "epoch": float(i - classifier_epochs + 1 if fine else i + 1),  # stage-relative numbering
                "stage": "fine_tuning" if fine else "classifier",
                "train_loss": 2.0 / (i + 1),
                "val_loss": 2.2 / (i + 1),
                "train_accuracy": 1 - 0.5 / (i + 1),
                "val_accuracy": 1 - 0.6 / (i + 1),
                "learning_rate": 1e-3 if not fine else 1e-4,
            }
        )
    return rows


# -- training curves ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("classifier", "fine_tuning"), [(5, 3), (1, 0), (4, 0), (1, 1)])
def test_training_curves(classifier: int, fine_tuning: int) -> None:
    _assert_png(training_curves_png(_history(classifier, fine_tuning)), 1200, 450)


def test_training_curves_without_validation_or_history() -> None:
    rows = _history(3, 2)
    for row in rows:
        del row["val_loss"]
        row["val_accuracy"] = math.nan
    _assert_png(training_curves_png(rows), 1200, 450)
    _assert_png(training_curves_png([]), 1200, 450, tolerance=2)


# -- learning rate --------------------------------------------------------------------------------------------


def test_learning_rate() -> None:
    lrs = [1e-3 * 0.5 * (1 + math.cos(math.pi * step / 100)) for step in range(100)]  # cosine down to 0
    _assert_png(learning_rate_png(lrs, steps_per_epoch=10), 800, 400)
    _assert_png(learning_rate_png([3e-3], steps_per_epoch=1), 800, 400)
    _assert_png(learning_rate_png([], steps_per_epoch=5), 800, 400)


def test_learning_rate_rejects_zero_steps_per_epoch() -> None:
    with pytest.raises(ValueError, match="steps_per_epoch"):
        learning_rate_png([1e-3], steps_per_epoch=0)


# -- confusion matrix -----------------------------------------------------------------------------------------


def test_confusion_matrix_two_classes() -> None:
    _assert_png(confusion_matrix_png([[5, 1], [0, 0]], ["cat", "dog"]), 650, 500)  # an empty row is fine


def test_confusion_matrix_fifty_classes() -> None:
    n = 50
    matrix = [[(10 if i == j else (i * j) % 3) for j in range(n)] for i in range(n)]
    labels = [f"class_{i:02d}" for i in range(n)]
    _assert_png(confusion_matrix_png(matrix, labels), 1750, 1600)


def test_confusion_matrix_rejects_a_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="match the labels"):
        confusion_matrix_png([[1, 0], [0, 1]], ["a", "b", "c"])


# -- weight histograms ----------------------------------------------------------------------------------------


def test_weight_histogram_counts_by_hand() -> None:
    edges, counts = weight_histogram([torch.tensor([0.0, 1.0]), torch.tensor([[2.0, 3.0]])], bins=3)
    assert edges == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert counts == [1, 1, 2]  # the last bin includes the maximum


def test_weight_histogram_constant_and_non_finite_values() -> None:
    edges, counts = weight_histogram([torch.zeros(7), torch.tensor([math.nan, math.inf])], bins=1)
    assert edges == pytest.approx([-0.5, 0.5])
    assert counts == [7]
    with pytest.raises(ValueError, match="no finite"):
        weight_histogram([torch.tensor([math.nan])])
    with pytest.raises(ValueError, match="no finite"):
        weight_histogram([])


def test_weight_histogram_of_a_module() -> None:
    layer = torch.nn.Linear(20, 10)
    edges, counts = weight_histogram(layer.parameters(), bins=50)
    assert len(edges) == 51
    assert len(counts) == 50
    assert sum(counts) == 20 * 10 + 10


def test_weight_histograms_three_groups_several_epochs() -> None:
    generator = torch.Generator().manual_seed(0)
    histograms = {
        group: [
            (epoch, *weight_histogram([torch.randn(500, generator=generator) * (1 + epoch / 10)]))
            for epoch in (1, 2, 3)
        ]
        for group in ("early", "late", "head")
    }
    _assert_png(weight_histograms_png(histograms), 1600, 400)


def test_weight_histograms_edge_cases() -> None:
    one_epoch = {"head": [(1, *weight_histogram([torch.linspace(-1, 1, 100)], bins=10))]}
    _assert_png(weight_histograms_png(one_epoch), 600, 400)
    _assert_png(weight_histograms_png({}), 600, 400)
    with pytest.raises(ValueError, match="edges"):
        weight_histograms_png({"head": [(1, [0.0, 1.0], [1.0, 2.0])]})


# -- LR finder ------------------------------------------------------------------------------------------------


def test_lr_finder() -> None:
    lrs = [1e-7 * 10 ** (i / 10) for i in range(70)]
    losses = [2.3 - 1.5 * math.exp(-((i - 40) ** 2) / 200) + (0 if i < 60 else (i - 60) ** 2) for i in range(70)]
    losses[-1] = math.inf  # the sweep diverged
    _assert_png(lr_finder_png(lrs, losses, suggested_lr=lrs[35]), 800, 400)
    _assert_png(lr_finder_png(lrs, losses, suggested_lr=None), 800, 400)
    _assert_png(lr_finder_png([1e-3], [2.0], suggested_lr=1e-3), 800, 400)
    _assert_png(lr_finder_png([], [], suggested_lr=None), 800, 400)


def test_lr_finder_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="learning rates"):
        lr_finder_png([1e-3, 1e-2], [2.0], suggested_lr=None)
