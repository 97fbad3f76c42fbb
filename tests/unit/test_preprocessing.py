"""The shared preprocessing: every bad input is an `ImageRejected` with a reason, never another exception,
and the normalisation is bit-for-bit torchvision's eval transform (the trainer's)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from PIL import Image
from tests.fuzz_images import malformed_images, png_claiming, valid_images
from torchvision.transforms import v2
from visiontune.preprocessing import ImageRejected, center_crop, decode_hwc, decode_image, normalize

MAX_PIXELS = 1_000_000


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_images())
def test_malformed_bytes_are_rejected_with_a_reason_or_decoded(data: bytes) -> None:
    reason = ""
    try:
        hwc = decode_hwc(data, 16, max_pixels=MAX_PIXELS)
    except ImageRejected as err:
        reason = str(err)
    if reason:
        assert decode_image(data, 16, max_pixels=MAX_PIXELS) is None
        return
    assert hwc.shape == (16, 16, 3)
    assert hwc.dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(valid_images())
def test_valid_images_of_every_format_and_mode_decode(data: bytes) -> None:
    assert decode_hwc(data, 8).shape == (8, 8, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a-but-not-really", r"corrupt|truncated|not an image"),
        (b"hello, world", "not an image"),
        (png_claiming(100_000, 100_000), "too large"),
        (png_claiming(2000, 1000), "too large"),
    ],
)
def test_rejections_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected, match=reason):
        decode_hwc(data, 16, max_pixels=MAX_PIXELS)


def test_a_truncated_png_is_rejected_as_truncated() -> None:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out, "PNG")
    with pytest.raises(ImageRejected, match=r"truncated|corrupt"):
        decode_hwc(out.getvalue()[:-200], 16)


def test_normalize_is_torchvisions_eval_transform_bit_for_bit() -> None:
    images = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(images)
    assert torch.equal(normalize(images, mean, std), reference)


def test_normalize_refuses_what_it_cannot_normalise() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 3, 4, 4), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="std"):
        normalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (0, 0, 0), (1, 0, 1))


def test_center_crop_takes_the_middle() -> None:
    chw = torch.arange(36).reshape(1, 6, 6)
    assert center_crop(chw, 2).tolist() == [[[14, 15], [20, 21]]]
    assert center_crop(chw, 6) is chw
    with pytest.raises(ValueError, match="larger"):
        center_crop(chw, 7)
