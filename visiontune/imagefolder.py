"""The ImageFolder layout of a dataset: `{prefix}/{label}/{image}`, an image known by its file suffix.

One rule for the client that uploads a dataset (`visiontune dataset push`) and the trainer that lists one
in the bucket (docs/architecture.md §5), so a file the upload sends is a file training reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix (any case); the bytes are checked when they are decoded."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def label_of(parts: Sequence[str]) -> str | None:
    """The label of the file at `parts` (its path below the dataset's prefix, split), or None when it is not an
    image directly inside a label folder, or a hidden file or folder."""
    if len(parts) != 2 or not parts[0] or any(part.startswith(".") for part in parts) or not is_image_name(parts[1]):
        return None
    return parts[0]
