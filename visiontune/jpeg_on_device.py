"""Large JPEGs decoded on a GPU (nvJPEG, through torchvision.io.decode_jpeg): the serving-side alternative to
`preprocessing.decode_hwc` for images whose CPU decode would dominate a request.

Same steps as `decode_hwc`, on the device: the header read by PIL (size limits, EXIF orientation, without
decoding pixels), the whole image decoded to RGB, turned upright, then one antialiased bilinear resize to
size x size (torch's `antialias=True` is PIL's filter). What differs from the CPU path: `decode_hwc` shrinks a
large JPEG while decoding (DCT scaling, then a box `reduce`) before its bilinear resize, and libjpeg and nvJPEG
round their IDCTs differently, so the pixels agree only to within a few uint8 levels
(`tests/unit/test_jpeg_on_device.py` measures it, on the CPU everywhere and on CUDA where there is one).

Only baseline RGB or greyscale JPEGs take this path (`jpeg_header`); CMYK and everything else stays on
`decode_hwc`. Bad bytes raise `ImageRejected`, as there.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg  # type: ignore[import-untyped, unused-ignore]

from visiontune.preprocessing import DECODE_ERRORS, MAX_IMAGE_PIXELS, ImageRejected, UInt8Array, rejection_message

_EXIF_ORIENTATION: Final = 0x0112
# EXIF orientation -> how a decoded [C, H, W] image is turned upright: PIL's exif_transpose, on tensors
# (torch.rot90 with k = 1 over (H, W) is PIL's ROTATE_90, counter-clockwise).
_UPRIGHT: Final[dict[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),  # ROTATE_270
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),  # ROTATE_90
}


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    orientation: int  # EXIF, 1 = upright

    @property
    def pixels(self) -> int:
        return self.width * self.height


def jpeg_header(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> JpegHeader | None:
    """The header of an RGB or greyscale JPEG, read without decoding pixels; None for anything else (other
    formats, CMYK, bytes PIL cannot open: `decode_hwc` says what is wrong with those). Raises ImageRejected for a
    JPEG over `max_pixels`."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except DECODE_ERRORS:
        return None
    if width * height > max_pixels:
        raise ImageRejected(f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels}")
    return JpegHeader(width, height, orientation if orientation in _UPRIGHT else 1)


def decode_jpeg_on(data: bytes, header: JpegHeader, size: int, device: torch.device) -> torch.Tensor:
    """JPEG bytes (with their `jpeg_header`) -> uint8 [3, size, size] RGB on `device`, decoded there."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image decoders in favour of TorchCodec's, which this project does not
            # ship; the pinned torchvision keeps them.
            warnings.simplefilter("ignore", DeprecationWarning)
            chw = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise ImageRejected(rejection_message(exc)) from exc
    turn = _UPRIGHT.get(header.orientation)
    upright = turn(chw) if turn is not None else chw
    resized = F.interpolate(
        upright[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


class DeviceJpegDecoder:
    """Decodes the JPEGs of at least `min_pixels` pixels on `device` for the inference service (the rest, and
    every other format, go through `decode_hwc`). Safe to call from many threads (nvJPEG's decode is)."""

    def __init__(self, device: torch.device, min_pixels: int) -> None:
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
        self.device = device
        self.min_pixels = min_pixels

    def decode(self, data: bytes, size: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> UInt8Array | None:
        """uint8 [size, size, 3] as `decode_hwc` returns it, or None when the image is not this decoder's."""
        header = jpeg_header(data, max_pixels=max_pixels)
        if header is None or header.pixels < self.min_pixels:
            return None
        chw = decode_jpeg_on(data, header, size, self.device)
        return np.ascontiguousarray(chw.permute(1, 2, 0).cpu().numpy())
