"""A small synthetic ImageFolder (shapes on noisy backgrounds) for the demo and the tests.

Real datasets cannot be downloaded on every machine; this one is generated, learnable (the label is the
shape, not the colour) and deterministic for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")


def _draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(0, 256) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pixels = image.load()
    assert pixels is not None
    for _ in range(size * size // 8):  # sparse noise so the task is not trivially separable
        pixels[rng.randrange(size), rng.randrange(size)] = tuple(rng.randrange(256) for _ in range(3))
    draw = ImageDraw.Draw(image)
    fill = tuple((c + 128 + rng.randrange(-40, 40)) % 256 for c in background)
    extent = rng.uniform(0.35, 0.8) * size
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    x1, y1 = x0 + extent, y0 + extent
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "cross":
        w = extent / 4
        draw.rectangle((x0, (y0 + y1) / 2 - w / 2, x1, (y0 + y1) / 2 + w / 2), fill=fill)
        draw.rectangle(((x0 + x1) / 2 - w / 2, y0, (x0 + x1) / 2 + w / 2, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return image


def write_shapes_dataset(
    root: Path,
    *,
    labels: tuple[str, ...] = SHAPES[:3],
    per_label: int = 30,
    size: int = 64,
    seed: int = 0,
    corrupt_files: int = 0,
) -> list[Path]:
    """Write `root/{label}/{label}-{i}.png`; optionally add corrupt `.jpg` files. Returns the files."""
    rng = random.Random(seed)
    written = []
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            path = root / label / f"{label}-{i:04d}.png"
            _draw(label, size, rng).save(path)
            written.append(path)
    for i in range(corrupt_files):
        path = root / labels[i % len(labels)] / f"corrupt-{i:02d}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
        written.append(path)
    return written
