"""RecommendSpec's rules (docs/architecture.md §4): each rule at its thresholds, monotonicity in dataset size, reasons,
validity."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
from trainer_service.advice import recommend as r
from trainer_service.advice.recommend import Recommendation, recommend_spec
from trainer_service.datasets.splits import stratified_split
from trainer_service.spec.config import (
    Architecture,
    ClassBalancing,
    DatasetConfig,
    TrainingConfig,
    WeightsSource,
)
from trainer_service.spec.convert import config_to_spec
from trainer_service.spec.validate import validate_spec

URI = "s3://data/datasets/Flowers_2024/"


def _balanced(labels: int, per_label: int) -> dict[str, int]:
    return {f"label-{i}": per_label for i in range(labels)}


def _recommend(counts: dict[str, int], *, gpu: bool = False) -> Recommendation:
    return recommend_spec(counts, dataset_uri=URI, gpu_available=gpu)


SHAPES: dict[str, tuple[dict[str, int], bool]] = {
    "one-image-labels": ({"a": 1, "b": 1}, False),
    "tiny": ({"a": 5, "b": 12, "c": 40}, False),
    "small-balanced": (_balanced(5, 60), False),
    "small-gpu": (_balanced(3, 150), True),
    "imbalanced": ({"common": 900, "rare": 40, "mid": 300}, False),
    "medium-cpu": (_balanced(10, 300), False),
    "medium-gpu": (_balanced(10, 300), True),
    "large-cpu": (_balanced(20, 2000), False),
    "large-gpu": (_balanced(20, 2000), True),
    "huge-gpu": (_balanced(100, 1000), True),
    "many-small-labels": (_balanced(200, 30), True),
}


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [{}, {"only": 100}])
def test_fewer_than_two_labels_is_an_error(counts: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 2 labels"):
        _recommend(counts)


def test_a_label_without_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="labels without images: 'empty'"):
        _recommend({"a": 50, "empty": 0})


# -- validity -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("counts", "gpu"), SHAPES.values(), ids=SHAPES.keys())
def test_the_config_passes_validation_unchanged(counts: dict[str, int], gpu: bool) -> None:
    config = _recommend(counts, gpu=gpu).config
    spec = config_to_spec(config)
    assert validate_spec(spec) == config
    # Valid without lifting any limit: fine-tuning LR <= classifier / 10 and <= 5 epochs.
    assert not spec.fine_tuning.override_learning_rate_limit
    assert not spec.fine_tuning.allow_long_fine_tuning


def test_the_dataset_uri_and_the_output_model_come_from_the_caller() -> None:
    config = _recommend(_balanced(2, 50)).config
    assert config.dataset.uri == URI
    assert config.output_model == "flowers-2024"


# -- batch size -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "gpu", "expected"),
    [
        (100, False, 16),
        (499, False, 16),
        (500, False, 32),
        (4999, False, 32),
        (5000, False, 64),
        (10**6, False, 64),
        (499, True, 16),
        (4999, True, 32),
        (5000, True, 128),
        (10**6, True, 128),
    ],
)
def test_batch_size_by_dataset_size(total: int, gpu: bool, expected: int) -> None:
    assert r.batch_size_for(total, train_images=total, gpu=gpu) == expected


@pytest.mark.parametrize(("train_images", "expected"), [(1, 1), (7, 4), (8, 8), (15, 8), (16, 16)])
def test_batch_size_is_at_most_the_training_images(train_images: int, expected: int) -> None:
    assert r.batch_size_for(20, train_images=train_images, gpu=False) == expected


def test_the_fine_tuning_stage_uses_the_classifier_batch_size() -> None:
    config = _recommend(_balanced(10, 600), gpu=True).config
    assert config.classifier.batch_size == config.fine_tuning.stage.batch_size == 128


# -- validation split -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("smallest", "expected"),
    [
        (1, 0.3),
        (10, 0.3),
        (34, 0.3),  # too few for 20 train + 15 validation: 30 %
        (35, 0.43),
        (50, 0.3),
        (60, 0.25),  # the fraction that gives 15 validation images
        (75, 0.2),
        (500, 0.2),
        (999, 0.2),  # the default already does
        (1000, 0.1),
        (50000, 0.1),  # 10 % is >= 100 per label
    ],
)
def test_validation_split_by_the_smallest_label(smallest: int, expected: float) -> None:
    assert r.validation_split_for(smallest) == expected


def test_the_split_gives_15_validation_and_20_training_images_where_possible() -> None:
    for smallest in range(35, 5001):
        split = r.validation_split_for(smallest)
        assert 0 < split <= 0.5
        val = r.validation_count(smallest, split)
        assert val >= 15, smallest
        assert smallest - val >= 20, smallest


def test_the_split_is_driven_by_the_smallest_label() -> None:
    assert _recommend({"a": 40, "b": 5000}).config.dataset.validation_split == 0.38


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 35, 101])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.3, 0.43, 0.5])
def test_validation_count_matches_the_stratified_split(n: int, fraction: float) -> None:
    _, val = stratified_split([0] * n, fraction, seed=0)
    assert r.validation_count(n, fraction) == len(val)


# -- fine-tuning ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "wanted"),
    [
        (_balanced(10, 99), False),  # 990 images, 99 per label: both too small
        (_balanced(5, 199), False),  # 995 images: enough per label, too few in all
        (_balanced(20, 60), False),  # 1200 images, but 60 per label
        (_balanced(10, 100), True),  # exactly the thresholds
        (_balanced(2, 600), True),
    ],
)
def test_fine_tuning_only_for_big_enough_datasets(counts: dict[str, int], wanted: bool) -> None:
    config = _recommend(counts).config
    assert config.fine_tuning.enabled is wanted


@pytest.mark.parametrize(("counts", "gpu"), SHAPES.values(), ids=SHAPES.keys())
def test_fine_tuning_lr_is_the_classifier_lr_over_ten_within_five_epochs(counts: dict[str, int], gpu: bool) -> None:
    config = _recommend(counts, gpu=gpu).config
    assert config.fine_tuning.stage.learning_rate == pytest.approx(config.classifier.learning_rate / 10)
    assert config.fine_tuning.stage.epochs <= 5


@pytest.mark.parametrize(
    ("total", "architecture", "expected"),
    [
        (1000, Architecture.MOBILENET_V2, 6),
        (9999, Architecture.MOBILENET_V3_LARGE, 6),
        (5000, Architecture.RESNET50, 2),
        (10000, Architecture.MOBILENET_V2, None),
    ],
)
def test_unfreeze_the_last_third_below_10000_images(
    total: int, architecture: Architecture, expected: int | None
) -> None:
    assert r.unfreeze_blocks_for(total, architecture) == expected


def test_fine_tuning_stops_early_on_its_best_epoch() -> None:
    stage = _recommend(_balanced(10, 300)).config.fine_tuning.stage
    assert stage.early_stopping.enabled
    assert stage.early_stopping.restore_best_weights
    assert stage.early_stopping.patience == 2


# -- architecture ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "gpu", "expected"),
    [
        (100, False, Architecture.MOBILENET_V2),
        (10**6, False, Architecture.MOBILENET_V2),
        (9999, True, Architecture.MOBILENET_V2),
        (10000, True, Architecture.MOBILENET_V3_LARGE),
        (49999, True, Architecture.MOBILENET_V3_LARGE),
        (50000, True, Architecture.RESNET50),
    ],
)
def test_smallest_architecture_first(total: int, gpu: bool, expected: Architecture) -> None:
    assert r.architecture_for(total, gpu=gpu) is expected


@pytest.mark.parametrize(("counts", "gpu"), SHAPES.values(), ids=SHAPES.keys())
def test_imagenet_weights_always(counts: dict[str, int], gpu: bool) -> None:
    assert _recommend(counts, gpu=gpu).config.model.weights is WeightsSource.IMAGENET


# -- class balancing, augmentation, epochs, image size ------------------------------------------------------------


@pytest.mark.parametrize(
    ("smallest", "largest", "expected"),
    [
        (100, 100, ClassBalancing.NONE),
        (100, 150, ClassBalancing.NONE),
        (100, 151, ClassBalancing.WEIGHTED_LOSS),
        (1, 1000, ClassBalancing.WEIGHTED_LOSS),
    ],
)
def test_weighted_loss_above_an_imbalance_of_one_and_a_half(
    smallest: int, largest: int, expected: ClassBalancing
) -> None:
    assert r.class_balancing_for(smallest, largest) is expected
    assert _recommend({"a": smallest, "b": largest}).config.dataset.class_balancing is expected


@pytest.mark.parametrize(("mean", "copies"), [(5, 3), (49.9, 3), (50, 1), (199.5, 1)])
def test_small_datasets_get_flips_small_rotations_zoom_and_copies(mean: float, copies: int) -> None:
    aug = r.augmentation_for(mean)
    assert aug.horizontal_flip
    assert not aug.vertical_flip
    assert aug.rotation_degrees == 10
    assert (aug.zoom_min_scale, aug.zoom_max_scale) == (0.8, 1.0)
    assert aug.copies_per_original == copies
    assert 1 / (1 + aug.copies_per_original) >= 0.2  # docs/architecture.md §4: originals >= 20 % of an epoch
    assert aug.brightness == aug.shear_degrees == aug.gaussian_noise_std == 0


def test_large_datasets_get_no_augmentation() -> None:
    aug = r.augmentation_for(200)
    assert not aug.is_random
    assert aug.copies_per_original == 0


@pytest.mark.parametrize(("total", "expected"), [(10, 30), (499, 30), (500, 20), (4999, 20), (5000, 10)])
def test_epochs_by_dataset_size(total: int, expected: int) -> None:
    assert r.classifier_epochs_for(total) == expected


def test_the_classifier_stops_early_on_its_best_epoch() -> None:
    early = _recommend(_balanced(3, 40)).config.classifier.early_stopping
    assert early.enabled
    assert early.restore_best_weights


@pytest.mark.parametrize(
    ("total", "gpu", "expected"),
    [
        (100, True, 224),
        (10**6, True, 224),
        (100, False, 160),
        (4999, False, 160),
        (5000, False, 128),
    ],
)
def test_image_size_224_on_gpu_smaller_on_cpu(total: int, gpu: bool, expected: int) -> None:
    assert r.image_size_for(total, gpu=gpu) == expected


# -- monotonicity in dataset size -----------------------------------------------------------------------------------


def _non_increasing(values: list[float]) -> bool:
    return all(a >= b for a, b in itertools.pairwise(values))


def _non_decreasing(values: list[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("labels", [2, 10, 50])
def test_choices_are_monotonic_in_dataset_size(labels: int, gpu: bool) -> None:
    sizes = sorted({round(10 ** (k / 4)) for k in range(2, 21)})  # 3 .. 100000 images per label
    configs = [_recommend(_balanced(labels, n), gpu=gpu).config for n in sizes]
    assert _non_decreasing([c.classifier.batch_size for c in configs])
    assert _non_increasing([c.classifier.epochs for c in configs])
    assert _non_increasing([c.augmentation.copies_per_original for c in configs])
    assert _non_increasing([c.dataset.image_size for c in configs])
    assert _non_decreasing([int(c.fine_tuning.enabled) for c in configs])
    order = {Architecture.MOBILENET_V2: 0, Architecture.MOBILENET_V3_LARGE: 1, Architecture.RESNET50: 2}
    assert _non_decreasing([order[c.model.architecture] for c in configs])
    # Once the smallest label can have 20 training + 15 validation images, more images never need a larger split.
    assert _non_increasing([c.dataset.validation_split for n, c in zip(sizes, configs, strict=True) if n >= 35])


# -- reasons ----------------------------------------------------------------------------------------------------------


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _leaves(getattr(value, f.name), f"{prefix}{f.name}.")
    else:
        yield prefix.rstrip("."), value


def _spec_path(path: str, value: Any) -> str:
    """The TrainingSpec path of a config leaf (only fine-tuning's unfreeze differs)."""
    if path == "fine_tuning.last_n_blocks":
        return "fine_tuning.unfreeze.all" if value is None else "fine_tuning.unfreeze.last_n_blocks"
    return path


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, float):
        return f"{value:g}"
    return "true" if value is None else str(value)


@pytest.mark.parametrize(("counts", "gpu"), SHAPES.values(), ids=SHAPES.keys())
def test_every_field_changed_from_the_defaults_has_a_reason(counts: dict[str, int], gpu: bool) -> None:
    rec = _recommend(counts, gpu=gpu)
    defaults = TrainingConfig(dataset=DatasetConfig(uri=URI), output_model="")
    reasons = {reason.field: reason for reason in rec.reasons}
    assert len(reasons) == len(rec.reasons), "one reason per field"
    changed = [
        (_spec_path(path, value), value)
        for (path, value), (_, default) in zip(_leaves(rec.config), _leaves(defaults), strict=True)
        if value != default
    ]
    assert changed, "some field always changes (output_model at least)"
    for path, value in changed:
        assert path in reasons, f"no reason for {path} = {value!r}"
        assert reasons[path].value == _as_text(value)
    for reason in rec.reasons:
        assert reason.reason
        assert "\n" not in reason.reason


@pytest.mark.parametrize(("counts", "gpu"), SHAPES.values(), ids=SHAPES.keys())
def test_every_reason_states_the_configured_value(counts: dict[str, int], gpu: bool) -> None:
    rec = _recommend(counts, gpu=gpu)
    leaves = {_spec_path(path, value): value for path, value in _leaves(rec.config)}
    for reason in rec.reasons:
        assert reason.field in leaves, reason.field
        assert reason.value == _as_text(leaves[reason.field]), reason


def test_reasons_name_the_numbers_behind_them() -> None:
    reasons = {x.field: x.reason for x in _recommend({"a": 40, "b": 400}).reasons}
    assert "40 images" in reasons["dataset.validation_split"]
    assert "10.0x" in reasons["dataset.class_balancing"]
    assert "440 images" in reasons["classifier.batch_size"]


# -- warnings -------------------------------------------------------------------------------------------------------


def test_labels_below_20_training_or_15_validation_images_are_warned_about() -> None:
    warnings = _recommend({"tiny": 10, "small": 30, "fine": 90}).warnings
    assert len(warnings) == 2
    tiny, small = sorted(warnings, key=lambda w: "small" in w)
    assert "'tiny'" in tiny
    assert "7 training images (fewer than 20)" in tiny
    assert "3 validation images (fewer than 15)" in tiny
    assert "'small'" in small
    assert "9 validation images (fewer than 15)" in small
    assert "training images" not in small


def test_a_severe_imbalance_is_warned_about() -> None:
    warnings = _recommend({"common": 1100, "rare": 100}).warnings
    assert len(warnings) == 1
    assert "'common' has 11x the images of label 'rare'" in warnings[0]


@pytest.mark.parametrize("per_label", [35, 100, 5000])
def test_a_healthy_dataset_has_no_warnings(per_label: int) -> None:
    assert _recommend(_balanced(5, per_label)).warnings == []


def test_the_expected_split_is_the_stratified_split() -> None:
    counts = {"a": 7, "b": 33, "c": 1}
    train, val = r.expected_split(counts, 0.3)
    assert val == {"a": 2, "b": 10, "c": 0}
    assert train == {"a": 5, "b": 23, "c": 1}
    assert all(math.isclose(train[k] + val[k], counts[k]) for k in counts)
