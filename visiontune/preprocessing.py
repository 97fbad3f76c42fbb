"""How an encoded image becomes a network input: the one definition the trainer and inference share.

The trainer decodes every training, validation and test image with `decode_hwc`; the inference service
decodes request images with the same function and normalises them with `normalize`, so an image gives
the same probabilities in the trainer's evaluation and in Classify (the manifest's `Preprocessing`
records the parameters):

1. EXIF orientation applied; converted to RGB (greyscale replicated, palette expanded, alpha dropped,
   16-bit samples scaled to 8 bits).
2. A large image is shrunk while decoding (JPEG draft, then `Image.reduce`) to no less than
   `REDUCING_GAP` x the target, so its full resolution never becomes an array.
3. A straight (aspect-ignoring) bilinear, antialiased resize to size x size (PIL).
4. To float in [0, 1], then per-channel (x - mean) / std: torchvision's `ToDtype(scale=True)` and
   `Normalize`, written out so inference does not need the training transforms.

Bad bytes never raise anything but `ImageRejected`, whose message says why in words a client can act on.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Images above this many pixels are refused (decompression bombs). Below PIL's own
# Image.MAX_IMAGE_PIXELS (~89 MP), so an image we accept never trips PIL's warning; PIL itself refuses
# anything above twice its limit while reading the header.
MAX_IMAGE_PIXELS: Final = 64 * 1024 * 1024

# Before the final resize, JPEG DCT scaling (`draft`) and box reduction (`reduce`) shrink a large image
# to no less than REDUCING_GAP x the target, so the bilinear resize still sees enough pixels to
# antialias well (the same trade-off as PIL's `Image.thumbnail`).
REDUCING_GAP: Final = 2.0

# What a manifest carries so inference repeats the preprocessing exactly; `preprocessing(size)` adds
# the size of one job.
PREPROCESSING: Final = {
    "resize": "bilinear",  # straight to size x size, aspect ratio not kept, antialiased (PIL resize)
    "mode": "RGB",  # greyscale replicated, palette expanded, CMYK converted, alpha dropped
    "exif_transpose": True,  # EXIF orientation applied before anything else
    "sixteen_bit": "shift_right_8",  # 16-bit samples scaled to 8 bits (PIL's own convert would clip)
    "reducing_gap": REDUCING_GAP,  # JPEG draft + Image.reduce down to >= gap x size before resizing
}

UInt8Array = np.ndarray[Any, np.dtype[np.uint8]]


def preprocessing(size: int) -> dict[str, Any]:
    """`PREPROCESSING` with the image size of one job, e.g. for the model manifest."""
    return {**PREPROCESSING, "size": size}


class ImageRejected(ValueError):
    """The bytes are not a usable image; the message says why (empty, not an image, truncated, too large)."""


# What PIL raises for bytes that are not a (complete, sane) image. Plugins differ: most raise OSError
# (UnidentifiedImageError and "image file is truncated" included) or ValueError, some SyntaxError,
# EOFError or struct.error on malformed headers, TypeError on odd metadata. DecompressionBombError
# derives from Exception alone.
DECODE_ERRORS: Final = (
    OSError,
    ValueError,
    TypeError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _to_reducible(img: Image.Image) -> Image.Image:
    """Bring `img` to "L" or "RGB", the modes that reduce/resize average correctly, dropping alpha."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("LA", "La", "1"):
        return img.convert("L")
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert clips 16-bit values at 255 (a white image); keep the top 8 bits instead.
        samples = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(samples, 0, 65535) >> 8).astype(np.uint8), "L")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.nan_to_num(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    # P, PA, RGBA, RGBX, CMYK, YCbCr, LAB, HSV...: converting first also keeps palette indices and
    # premultiplied alpha out of the averaging.
    return img.convert("RGB")


def rejection_message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large, refused as a decompression bomb: {text}"
    if "truncated" in text or isinstance(exc, EOFError):
        return "truncated image: the file ends before its pixel data does"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)"
    return f"corrupt image ({type(exc).__name__}: {text})"


def decode_hwc(data: bytes, size: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> UInt8Array:
    """Encoded bytes -> uint8 [size, size, 3] RGB. Raises `ImageRejected` (and nothing else) for bad bytes."""
    if not data:
        raise ImageRejected("empty image: no bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageRejected(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels}"
                )
            target = math.ceil(size * REDUCING_GAP)
            # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale, never below `target`.
            img.draft("RGB", (target, target))
            # Loads the (drafted) pixels and rotates/flips them upright; in place spares a full-size copy.
            ImageOps.exif_transpose(img, in_place=True)
            plain = _to_reducible(img)
            factor = (max(1, int(plain.width // target)), max(1, int(plain.height // target)))
            if factor != (1, 1):
                plain = plain.reduce(factor)
            resized = plain.resize((size, size), Image.Resampling.BILINEAR)
            if resized.mode != "RGB":
                resized = resized.convert("RGB")
            return np.asarray(resized, dtype=np.uint8)
    except ImageRejected:
        raise
    except DECODE_ERRORS as exc:
        log.debug("not a decodable image: %s: %s", type(exc).__name__, exc)
        raise ImageRejected(rejection_message(exc)) from exc


def decode_image(data: bytes, size: int, *, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor | None:
    """Encoded image bytes -> uint8 tensor [3, size, size] (RGB), or None for corrupt or non-image bytes.

    Never raises for bad input: truncated files, unknown formats, decompression bombs (more than
    `max_pixels` pixels) all give None.
    """
    try:
        hwc = decode_hwc(data, size, max_pixels=max_pixels)
    except ImageRejected:
        return None
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def center_crop(chw: torch.Tensor, crop: int) -> torch.Tensor:
    """The central crop x crop window of [..., H, W]; the input itself when it is already that size."""
    height, width = chw.shape[-2], chw.shape[-1]
    if crop > min(height, width):
        raise ValueError(f"crop {crop} is larger than the image ({height}x{width})")
    if (height, width) == (crop, crop):
        return chw
    top, left = (height - crop) // 2, (width - crop) // 2
    return chw[..., top : top + crop, left : left + crop]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 (x / 255 - mean) / std per channel, as torchvision's eval transform does."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values each, std > 0; got {list(mean)}, {list(std)}")
    scaled = images.to(torch.float32).mul_(1.0 / 255)  # torchvision's exact arithmetic, for bitwise parity
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return scaled.sub_(mean_t).div_(std_t)
