"""Hypothesis strategies for malformed images: what a hostile or broken client sends.

Shared by the decoder's fuzz test (many examples, in-process) and the inference service's (fewer, over gRPC).
"""

from __future__ import annotations

import io
import struct
import zlib

from hypothesis import strategies as st
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def _encode(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    img = Image.new(mode, size, 77)
    if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


@st.composite
def valid_images(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(("RGB", "L", "RGBA", "P")))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    return _encode(fmt, size, mode)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a valid CRC) with one tiny IDAT: a dimension bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image, then broken: truncated, bytes flipped, a run overwritten, or junk appended/prepended."""
    data = bytearray(draw(valid_images()))
    how = draw(st.sampled_from(("truncate", "flip", "overwrite", "prepend", "append")))
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, max(0, len(data) - 1)))])
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=32))
        data[start : start + len(junk)] = junk
        return bytes(data)
    junk = draw(st.binary(min_size=1, max_size=64))
    return junk + bytes(data) if how == "prepend" else bytes(data) + junk


def malformed_images() -> st.SearchStrategy[bytes]:
    """Anything a broken client might send as an image."""
    return st.one_of(
        st.binary(max_size=256),
        mutated_images(),
        st.builds(png_claiming, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
    )
