"""Tests of the augmentation pipelines and the per-epoch copies plan (tiny images, CPU, no I/O)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import torch
from torchvision.transforms import v2  # type: ignore[import-untyped, unused-ignore]
from trainer_service.engine.augment import (
    MAX_COPIES_PER_ORIGINAL,
    build_eval_transform,
    build_train_transform,
    epoch_index_plan,
)
from trainer_service.spec.config import AugmentationConfig

SIZE = 32
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SEEDS = range(8)

# Each switch alone, with the transform it must add (besides the always-present ones).
SWITCHES: dict[str, tuple[dict[str, Any], type]] = {
    "horizontal_flip": ({"horizontal_flip": True}, v2.RandomHorizontalFlip),
    "vertical_flip": ({"vertical_flip": True}, v2.RandomVerticalFlip),
    "rotation_degrees": ({"rotation_degrees": 30.0}, v2.RandomAffine),
    "zoom_min_scale": ({"zoom_min_scale": 0.5}, v2.RandomResizedCrop),
    "zoom_max_scale": ({"zoom_min_scale": 0.6, "zoom_max_scale": 0.6}, v2.RandomResizedCrop),
    "brightness": ({"brightness": 0.5}, v2.ColorJitter),
    "contrast": ({"contrast": 0.5}, v2.ColorJitter),
    "saturation": ({"saturation": 0.5}, v2.ColorJitter),
    "hue": ({"hue": 0.2}, v2.ColorJitter),
    "shear_degrees": ({"shear_degrees": 20.0}, v2.RandomAffine),
    "gaussian_noise_std": ({"gaussian_noise_std": 0.2}, v2.GaussianNoise),
}
EVAL_TYPES = [v2.Resize, v2.ToDtype, v2.Normalize]
ALL_ON: dict[str, Any] = {
    "horizontal_flip": True,
    "vertical_flip": True,
    "rotation_degrees": 10.0,
    "zoom_min_scale": 0.5,
    "zoom_max_scale": 0.8,
    "brightness": 0.2,
    "contrast": 0.2,
    "saturation": 0.2,
    "hue": 0.1,
    "shear_degrees": 5.0,
    "gaussian_noise_std": 0.1,
}


@pytest.fixture
def image() -> torch.Tensor:
    """A colourful uint8 image with no symmetry: random pixels from a fixed generator."""
    return torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))


def _run(transform: v2.Compose, image: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out: torch.Tensor = transform(image)
    return out


def _types(transform: v2.Compose) -> list[type]:
    return [type(t) for t in transform.transforms]


def _eval(image: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = build_eval_transform(SIZE, MEAN, STD)(image)
    return out


# -- eval transform -----------------------------------------------------------------------------------------


def test_eval_transform_scales_and_normalises(image: torch.Tensor) -> None:
    out = _eval(image)
    expected = (image.float() / 255.0 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert out.dtype == torch.float32
    assert out.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(out, expected)


def test_eval_transform_resizes_other_sizes_and_takes_batches(image: torch.Tensor) -> None:
    transform = build_eval_transform(SIZE, MEAN, STD)
    big = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert transform(big).shape == (3, SIZE, SIZE)
    batch = torch.stack([image, image.flip(-1)])
    out = transform(batch)
    assert out.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(out[0], _eval(image))


# -- train transform ----------------------------------------------------------------------------------------


def test_all_off_train_transform_equals_eval(image: torch.Tensor) -> None:
    transform = build_train_transform(AugmentationConfig(), SIZE, MEAN, STD)
    assert _types(transform) == EVAL_TYPES
    for seed in SEEDS:
        torch.testing.assert_close(_run(transform, image, seed), _eval(image), rtol=0, atol=0)


def test_copies_alone_do_not_change_the_transform(image: torch.Tensor) -> None:
    transform = build_train_transform(AugmentationConfig(copies_per_original=3), SIZE, MEAN, STD)
    assert _types(transform) == EVAL_TYPES


def test_every_augmentation_field_has_a_switch_test() -> None:
    fields = {f.name for f in dataclasses.fields(AugmentationConfig)}
    assert fields == set(SWITCHES) | {"copies_per_original"}
    assert set(ALL_ON) == set(SWITCHES)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_adds_its_transform_and_changes_the_output(name: str, image: torch.Tensor) -> None:
    kwargs, added = SWITCHES[name]
    aug = AugmentationConfig(**kwargs)
    assert aug.is_random
    transform = build_train_transform(aug, SIZE, MEAN, STD)
    types = _types(transform)
    assert added in types
    # Exactly one transform more than eval (zoom's crop replaces the plain resize).
    expected = [added, v2.ToDtype, v2.Normalize] if added is v2.RandomResizedCrop else EVAL_TYPES.copy()
    if added in (v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomAffine, v2.ColorJitter):
        expected.insert(1, added)
    elif added is v2.GaussianNoise:
        expected.append(added)
    assert types == expected

    reference = _eval(image)
    outputs = [_run(transform, image, seed) for seed in SEEDS]
    assert all(out.shape == reference.shape and out.dtype == torch.float32 for out in outputs)
    assert any(not torch.equal(out, reference) for out in outputs)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_off_leaves_its_transform_out(name: str) -> None:
    # Every switch on except this one: its transform is absent, or (for shared ones) lacks its parameter.
    zoom = ("zoom_min_scale", "zoom_max_scale")  # zoom is one switch: off only when both scales are 1
    off = {key: value for key, value in ALL_ON.items() if key != name and not (name in zoom and key in zoom)}
    transforms = build_train_transform(AugmentationConfig(**off), SIZE, MEAN, STD).transforms
    by_type = {type(t): t for t in transforms}
    assert len(by_type) == len(transforms)
    match name:
        case "horizontal_flip" | "vertical_flip" | "gaussian_noise_std":
            assert SWITCHES[name][1] not in by_type
        case "zoom_min_scale" | "zoom_max_scale":
            assert v2.RandomResizedCrop not in by_type
            assert v2.Resize in by_type
        case "rotation_degrees":
            assert by_type[v2.RandomAffine].degrees == [0.0, 0.0]
        case "shear_degrees":
            assert by_type[v2.RandomAffine].shear is None
        case _:
            assert getattr(by_type[v2.ColorJitter], name) is None


@pytest.mark.parametrize(("flag", "dim"), [("horizontal_flip", -1), ("vertical_flip", -2)])
def test_flips_are_exact_mirror_images(flag: str, dim: int, image: torch.Tensor) -> None:
    transform = build_train_transform(AugmentationConfig(**{flag: True}), SIZE, MEAN, STD)
    outputs = [_run(transform, image, seed) for seed in range(16)]
    plain, mirrored = _eval(image), _eval(image.flip(dim))
    assert all(torch.equal(out, plain) or torch.equal(out, mirrored) for out in outputs)
    assert any(torch.equal(out, plain) for out in outputs)
    assert any(torch.equal(out, mirrored) for out in outputs)


def test_transform_parameters() -> None:
    aug = AugmentationConfig(
        rotation_degrees=15.0,
        shear_degrees=10.0,
        zoom_min_scale=0.4,
        zoom_max_scale=0.9,
        brightness=0.1,
        contrast=0.2,
        saturation=0.3,
        hue=0.05,
        gaussian_noise_std=0.3,
    )
    by_type = {type(t): t for t in build_train_transform(aug, SIZE, MEAN, STD).transforms}
    crop = by_type[v2.RandomResizedCrop]
    assert crop.size == (SIZE, SIZE)
    assert crop.scale == (0.4, 0.9)
    assert crop.ratio == (1.0, 1.0)
    affine = by_type[v2.RandomAffine]
    assert affine.degrees == [-15.0, 15.0]
    assert affine.shear == [-10.0, 10.0, -10.0, 10.0]  # both axes
    jitter = by_type[v2.ColorJitter]
    assert jitter.brightness == pytest.approx((0.9, 1.1))
    assert jitter.contrast == pytest.approx((0.8, 1.2))
    assert jitter.saturation == pytest.approx((0.7, 1.3))
    assert jitter.hue == pytest.approx((-0.05, 0.05))
    noise = by_type[v2.GaussianNoise]
    assert noise.sigma == 0.3
    assert noise.clip is False


def test_everything_on_in_order(image: torch.Tensor) -> None:
    transform = build_train_transform(AugmentationConfig(**ALL_ON, copies_per_original=2), SIZE, MEAN, STD)
    assert _types(transform) == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.RandomVerticalFlip,
        v2.RandomAffine,
        v2.ColorJitter,
        v2.ToDtype,
        v2.Normalize,
        v2.GaussianNoise,
    ]
    out = _run(transform, image, 0)
    assert out.shape == (3, SIZE, SIZE)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _run(transform, image, 0), rtol=0, atol=0)  # same seed, same output
    assert not torch.equal(out, _run(transform, image, 1))


def test_noise_is_added_to_the_normalised_tensor_unclipped(image: torch.Tensor) -> None:
    sigma = 0.5
    transform = build_train_transform(AugmentationConfig(gaussian_noise_std=sigma), SIZE, MEAN, STD)
    noise = _run(transform, image, 0) - _eval(image)
    assert abs(noise.mean().item()) < 0.05
    assert noise.std().item() == pytest.approx(sigma, rel=0.1)


def test_zoom_with_a_fixed_scale_crops_and_resizes_back(image: torch.Tensor) -> None:
    transform = build_train_transform(AugmentationConfig(zoom_min_scale=0.25, zoom_max_scale=0.25), SIZE, MEAN, STD)
    out = _run(transform, image, 0)
    assert out.shape == (3, SIZE, SIZE)
    assert not torch.equal(out, _eval(image))


def test_invalid_zoom_is_rejected() -> None:
    with pytest.raises(ValueError, match="zoom"):
        build_train_transform(AugmentationConfig(zoom_min_scale=0.9, zoom_max_scale=0.5), SIZE, MEAN, STD)


# -- the epoch plan -----------------------------------------------------------------------------------------


def test_plan_without_copies_is_a_shuffled_augmented_pass() -> None:
    plan = epoch_index_plan(50, 0, torch.Generator().manual_seed(0))
    assert sorted(i for i, _ in plan) == list(range(50))
    assert all(augmented for _, augmented in plan)
    assert [i for i, _ in plan] != list(range(50))


@pytest.mark.parametrize("copies", range(1, MAX_COPIES_PER_ORIGINAL + 1))
def test_plan_with_copies(copies: int) -> None:
    n = 30
    plan = epoch_index_plan(n, copies, torch.Generator().manual_seed(3))
    assert len(plan) == n * (1 + copies)
    counts = Counter(plan)
    assert all(counts[(i, False)] == 1 and counts[(i, True)] == copies for i in range(n))
    originals = sum(1 for _, augmented in plan if not augmented)
    assert originals / len(plan) >= 0.2  # the spec's promise
    assert plan != sorted(plan, key=lambda p: (p[1], p[0]))  # shuffled


def test_plan_depends_only_on_the_generator() -> None:
    first = epoch_index_plan(20, 2, torch.Generator().manual_seed(11))
    assert first == epoch_index_plan(20, 2, torch.Generator().manual_seed(11))
    assert first != epoch_index_plan(20, 2, torch.Generator().manual_seed(12))
    assert epoch_index_plan(0, 2, torch.Generator()) == []


@pytest.mark.parametrize("copies", [-1, MAX_COPIES_PER_ORIGINAL + 1])
def test_plan_rejects_out_of_range_copies(copies: int) -> None:
    with pytest.raises(ValueError, match="copies_per_original"):
        epoch_index_plan(10, copies, torch.Generator())
