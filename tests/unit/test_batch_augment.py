"""Tests of the batched device augmentation against v2's per-sample functional ops (tiny images, CPU)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torchvision.transforms.v2 import functional as TF  # type: ignore[import-untyped, unused-ignore]
from trainer_service.engine.augment import build_eval_transform
from trainer_service.engine.batch_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    AugmentParams,
    BatchPipeline,
    build_batch_pipeline,
    colour_jitter,
    draw_params,
)
from trainer_service.spec.config import AugmentationConfig

SIZE = 24
N = 12
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OFF = AugmentationConfig(
    horizontal_flip=False,
    vertical_flip=False,
    rotation_degrees=0.0,
    zoom_min_scale=1.0,
    zoom_max_scale=1.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    shear_degrees=0.0,
    gaussian_noise_std=0.0,
)
# Each switch alone, with the number of uint8 quantisations v2 does for it (see test_parity).
ALONE: dict[str, tuple[dict[str, Any], int]] = {
    "zoom": ({"zoom_min_scale": 0.3, "zoom_max_scale": 0.9}, 1),
    "horizontal_flip": ({"horizontal_flip": True}, 0),
    "vertical_flip": ({"vertical_flip": True}, 0),
    "rotation": ({"rotation_degrees": 30.0}, 1),
    "shear": ({"shear_degrees": 20.0}, 1),
    "brightness": ({"brightness": 0.5}, 1),
    "contrast": ({"contrast": 0.5}, 2),
    "saturation": ({"saturation": 0.5}, 2),
    "hue": ({"hue": 0.3}, 1),
    "noise": ({"gaussian_noise_std": 0.2}, 0),
}
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
# crop + affine + one per jitter step (contrast/saturation truncate their grey reference too).
ALL_ON_STEPS = 2 + 1 + 2 + 2 + 1


def _images(n: int = N, seed: int = 3) -> torch.Tensor:
    """Smooth-ish colourful uint8 images (random at low resolution, upsampled) plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    noisy = smooth + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def _pipeline(**switches: Any) -> BatchPipeline:
    return build_batch_pipeline(dataclasses.replace(OFF, **switches), SIZE, MEAN, STD)


def _reference(image: torch.Tensor, p: AugmentParams, i: int, aug: AugmentationConfig) -> torch.Tensor:
    """Row i through v2's functional ops on uint8, in build_train_transform's order, with row i's params."""
    x = image
    top, left, side = (int(v) for v in p.crop[i])
    if aug.zoom_min_scale < 1.0 or aug.zoom_max_scale < 1.0:
        x = TF.resized_crop(x, top, left, side, side, [SIZE, SIZE], antialias=True)
    if aug.horizontal_flip and p.hflip[i]:
        x = TF.horizontal_flip(x)
    if aug.vertical_flip and p.vflip[i]:
        x = TF.vertical_flip(x)
    if aug.rotation_degrees > 0 or aug.shear_degrees > 0:
        shear = [float(v) for v in p.shear[i]]
        x = TF.affine(
            x,
            angle=float(p.angle[i]),
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=TF.InterpolationMode.BILINEAR,
            fill=0,  # RandomAffine's default
        )
    ops = {
        BRIGHTNESS: (aug.brightness, TF.adjust_brightness),
        CONTRAST: (aug.contrast, TF.adjust_contrast),
        SATURATION: (aug.saturation, TF.adjust_saturation),
        HUE: (aug.hue, TF.adjust_hue),
    }
    for step in p.order[i].tolist():
        strength, op = ops[step]
        if strength > 0:
            x = op(x, float(p.jitter[i, step]))
    out = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), mean=list(MEAN), std=list(STD))
    return out  # type: ignore[no-any-return]


def _noise(p: AugmentParams, shape: torch.Size, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(p.noise_seed)
    return torch.randn(shape, generator=g) * sigma


def test_normalise_equals_eval_transform() -> None:
    images = _images()
    expected = build_eval_transform(SIZE, MEAN, STD)(images)
    got = _pipeline().normalise(images)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_everything_off_is_normalise_exactly() -> None:
    images = _images()
    pipe = _pipeline()
    assert torch.equal(pipe.augment(images, torch.Generator().manual_seed(0)), pipe.normalise(images))


@pytest.mark.parametrize("name", [*ALONE, "all"])
def test_parity_with_v2_functional_ops(name: str) -> None:
    """The batched output equals v2's per-sample functional ops with the same parameters, within quantisation.

    v2 rounds (geometry, hue) or truncates (brightness/contrast/saturation blends, and their grey reference)
    to uint8 after each step; the batch stays float. Each quantisation moves a pixel by at most one uint8
    step (1/255), later steps scale such errors by at most their factor (<= 1 + strength), so the max abs
    difference in normalised units is bounded by k * growth / 255 / min(std) with k the steps counted in
    ALONE / ALL_ON_STEPS; the mean difference is at most half a step per quantisation (most pixels round to the
    same value; measured about 0.2 steps each with everything on).
    """
    switches, steps = (ALL_ON, ALL_ON_STEPS) if name == "all" else ALONE[name]
    pipe = _pipeline(**switches)
    images = _images()
    params = draw_params(pipe.aug, N, SIZE, torch.Generator().manual_seed(11))
    got = pipe.apply_params(images, params)
    expected = torch.stack([_reference(images[i], params, i, pipe.aug) for i in range(N)])
    if pipe.aug.gaussian_noise_std > 0:
        expected = expected + _noise(params, expected.shape, pipe.aug.gaussian_noise_std)
    diff = (got - expected).abs()
    unit = 1 / 255 / min(STD)
    growth = 1.5 if name != "all" else 1.2**3
    assert diff.max().item() <= max(steps, 1e-3) * growth * unit + 1e-5
    assert diff.mean().item() <= 0.5 * max(steps, 1) * unit


def test_hue_equals_v2_on_float_images_with_grey_black_and_primaries() -> None:
    """Without uint8 rounding in between, the fused hue step is v2's adjust_hue to float precision, including the
    pixels its closed form treats specially: grey and black (no hue), white, the primaries and ties for max."""
    special = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]
    )
    images = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    images[:, :, 0, : len(special)] = special.T  # the special pixels along the first row of every image
    pipe = _pipeline(hue=0.5)
    params = draw_params(pipe.aug, N, SIZE, torch.Generator().manual_seed(2))
    got = colour_jitter(images, params.jitter, params.order, (False, False, False, True))
    expected = torch.stack([TF.adjust_hue(images[i], float(params.jitter[i, HUE])) for i in range(N)])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got[:, :, 0, :3], images[:, :, 0, :3])  # black, white and grey keep their value


def test_draws_match_v2_distributions() -> None:
    aug = dataclasses.replace(OFF, **ALL_ON)
    n = 4000
    p = draw_params(aug, n, SIZE, torch.Generator().manual_seed(5))
    top, left, side = p.crop.unbind(1)
    area = (side.double() / SIZE) ** 2
    # side = round(S * sqrt(fraction)): the area is within one rounding of [min, max].
    slack = 2 / SIZE
    assert area.min() >= aug.zoom_min_scale - slack
    assert area.max() <= aug.zoom_max_scale + slack
    assert (top >= 0).all()
    assert (left >= 0).all()
    assert (top + side <= SIZE).all()
    assert (left + side <= SIZE).all()
    assert len(set(top.tolist())) > 3
    assert len(set(side.tolist())) > 3
    for flags in (p.hflip, p.vflip):
        assert abs(flags.double().mean().item() - 0.5) < 0.04
    assert p.angle.abs().max() <= aug.rotation_degrees
    assert p.angle.abs().max() > 0.9 * aug.rotation_degrees
    assert p.shear.abs().max() <= aug.shear_degrees
    assert p.shear.std(0).min() > 0.4 * aug.shear_degrees
    for k, x in enumerate((aug.brightness, aug.contrast, aug.saturation)):
        assert p.jitter[:, k].min() >= 1 - x
        assert p.jitter[:, k].max() <= 1 + x
        assert abs(p.jitter[:, k].mean().item() - 1.0) < 0.02
    assert p.jitter[:, HUE].abs().max() <= aug.hue
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))
    # Each step is first about a quarter of the time (ColorJitter's randperm(4)).
    firsts = torch.bincount(p.order[:, 0], minlength=4).double() / n
    assert (firsts - 0.25).abs().max() < 0.04


def test_same_seed_same_output_and_rows_differ() -> None:
    pipe = _pipeline(**ALL_ON)
    images = _images(1).expand(N, -1, -1, -1).contiguous()
    a = pipe.augment(images, torch.Generator().manual_seed(9))
    b = pipe.augment(images, torch.Generator().manual_seed(9))
    c = pipe.augment(images, torch.Generator().manual_seed(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Identical input rows, different parameters -> every pair of rows differs.
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(N) * 1e9).min() > 1.0


def test_mask_leaves_false_rows_normalised_and_keeps_true_rows_params() -> None:
    pipe = _pipeline(**ALL_ON)
    images = _images()
    mask = torch.arange(N) % 3 == 0
    masked = pipe.augment(images, torch.Generator().manual_seed(4), augmented=mask)
    full = pipe.augment(images, torch.Generator().manual_seed(4))
    normal = pipe.normalise(images)
    assert torch.equal(masked[~mask], normal[~mask])
    # Augmented rows keep their positional parameters; the noise differs (drawn for fewer rows).
    no_noise = _pipeline(**{**ALL_ON, "gaussian_noise_std": 0.0})
    a = no_noise.augment(images, torch.Generator().manual_seed(4), augmented=mask)
    b = no_noise.augment(images, torch.Generator().manual_seed(4))
    assert torch.allclose(a[mask], b[mask], atol=1e-6)
    assert not torch.allclose(full[mask], normal[mask])


def test_split_batches_take_their_own_draws() -> None:
    """Documented behaviour: a batch's rows depend on the batch, so two halves != one whole batch."""
    pipe = _pipeline(**{**ALL_ON, "gaussian_noise_std": 0.0})
    images = _images(16)
    g = torch.Generator().manual_seed(2)
    halves = torch.cat([pipe.augment(images[:8], g), pipe.augment(images[8:], g)])
    whole = pipe.augment(images, torch.Generator().manual_seed(2))
    assert not torch.allclose(halves, whole)
    g = torch.Generator().manual_seed(2)
    again = torch.cat([pipe.augment(images[:8], g), pipe.augment(images[8:], g)])
    assert torch.equal(halves, again)


def test_global_rng_untouched() -> None:
    pipe = _pipeline(**ALL_ON)
    before = torch.get_rng_state()
    pipe.augment(_images(), torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_zoom_and_mask_shape_rejected() -> None:
    with pytest.raises(ValueError, match="zoom"):
        _pipeline(zoom_min_scale=0.9, zoom_max_scale=0.5)
    with pytest.raises(ValueError, match="augmented"):
        _pipeline(**ALL_ON).augment(_images(), torch.Generator(), augmented=torch.ones(3, dtype=torch.bool))
