"""Serve/train parity of the device JPEG path: `jpeg_on_device` against the trainer's decoder (`decode_hwc`).

Run on the CPU everywhere (torchvision's libjpeg decode, the same resize and orientation code) and on CUDA (nvJPEG)
where torch sees a GPU; `scripts/gpu-check.sh` runs this file on its GPU. Without one the CUDA cases are skipped, and
pytest's summary says so.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from visiontune.jpeg_on_device import DeviceJpegDecoder, decode_jpeg_on, jpeg_header
from visiontune.preprocessing import ImageRejected, decode_hwc

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")),
]


def _photo(width: int, height: int, seed: int = 1) -> Image.Image:
    """A smooth colourful image with sensor-like noise: what JPEG is for."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, height // 50 + 2, width // 50 + 2, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    noisy = (smooth + 0.04 * torch.randn(3, height, width, generator=g)).clamp(0, 1)
    return Image.fromarray((noisy.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _jpeg(img: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _diff(data: bytes, size: int, device: str) -> np.ndarray:
    header = jpeg_header(data)
    assert header is not None
    got = decode_jpeg_on(data, header, size, torch.device(device))
    assert got.device.type == device
    assert got.dtype == torch.uint8
    assert got.shape == (3, size, size)
    reference = decode_hwc(data, size).astype(np.int32)
    return np.abs(got.permute(1, 2, 0).cpu().numpy().astype(np.int32) - reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("width", "height", "size"), [(4000, 3000, 224), (1600, 1200, 224), (300, 200, 96)])
def test_large_and_small_jpegs_match_the_trainers_decoder(device: str, width: int, height: int, size: int) -> None:
    """Within a few uint8 levels of `decode_hwc` (measured on the CPU: mean 0.13-0.47, max 3; the CPU path shrinks
    large JPEGs in the DCT first, and IDCTs round differently), so the network sees what it was evaluated on."""
    diff = _diff(_jpeg(_photo(width, height)), size, device)
    assert diff.mean() <= 1.0
    assert np.percentile(diff, 99) <= 3
    assert diff.max() <= 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(device: str, orientation: int) -> None:
    """An image with distinct quadrants, tagged with each EXIF orientation: a wrong turn or flip would move a
    quadrant's colour elsewhere (differences near 255), not a few levels."""
    img = Image.new("RGB", (64, 40), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 20))
    img.paste((0, 255, 0), (0, 20, 32, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(img, exif=exif.tobytes())
    header = jpeg_header(data)
    assert header is not None
    assert header.orientation == orientation
    diff = _diff(data, 32, device)
    assert diff.mean() <= 2.0


def test_what_is_not_an_rgb_or_grey_jpeg_is_left_to_the_cpu_decoder() -> None:
    png = io.BytesIO()
    _photo(64, 64).save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None
    assert jpeg_header(_jpeg(_photo(64, 64).convert("CMYK"))) is None
    assert jpeg_header(b"\xff\xd8\xff not really a jpeg") is None
    grey = _jpeg(_photo(64, 48).convert("L"))
    header = jpeg_header(grey)
    assert header is not None
    assert (header.width, header.height) == (64, 48)


def test_too_many_pixels_and_truncated_data_are_rejected() -> None:
    data = _jpeg(_photo(400, 300))
    with pytest.raises(ImageRejected, match="image too large: 400x300 = 120000 pixels"):
        jpeg_header(data, max_pixels=100_000)
    truncated = data[: len(data) // 3]
    header = jpeg_header(truncated)
    assert header is not None  # the header is intact; the pixels are not
    with pytest.raises(ImageRejected):
        decode_jpeg_on(truncated, header, 32, torch.device("cpu"))


def test_the_decoder_takes_only_jpegs_of_at_least_min_pixels() -> None:
    decoder = DeviceJpegDecoder(torch.device("cpu"), min_pixels=100_000)
    assert decoder.decode(_jpeg(_photo(300, 300)), 32) is None  # 90 000 pixels: the CPU path's
    decoded = decoder.decode(_jpeg(_photo(400, 300)), 32)
    assert decoded is not None
    assert decoded.shape == (32, 32, 3)
    assert decoded.dtype == np.uint8
    with pytest.raises(ValueError, match="at least 1"):
        DeviceJpegDecoder(torch.device("cpu"), min_pixels=0)
