"""List an ImageFolder dataset in S3: `{prefix}/{label}/{image}` -> labels and items (docs/architecture.md §4).

`list_image_folder` reads the listing through an `ArtifactStore`; `dataset_fingerprint` identifies its content
for the model manifest. A dataset that cannot be used as given raises `DatasetError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple

from visiontune.errors import FailedPrecondition
from visiontune.imagefolder import label_of
from visiontune.store import ArtifactStore
from visiontune.uris import S3Location, parse_location

from trainer_service.datasets.splits import count_labels

log = logging.getLogger(__name__)


class DatasetError(FailedPrecondition):
    """The dataset cannot be used as given; the one-line message names its URI."""


class ImageItem(NamedTuple):
    key: str
    label: int  # index into ImageFolderListing.labels
    size: int  # bytes
    etag: str


# How many skipped or corrupt keys a message names.
SKIPPED_EXAMPLES: Final = 5


@dataclass(frozen=True)
class ImageFolderListing:
    location: S3Location
    labels: tuple[str, ...]  # sorted; label index i is labels[i]
    items: tuple[ImageItem, ...]  # in key order
    skipped: tuple[str, ...]  # keys that are not images by extension, or not directly in a label folder

    @property
    def skipped_examples(self) -> tuple[str, ...]:
        """The first few skipped keys, for messages."""
        return self.skipped[:SKIPPED_EXAMPLES]

    @property
    def uri(self) -> str:
        return str(self.location)

    @property
    def bucket(self) -> str:
        """Where the items live: pass `store.for_bucket(listing.bucket)` to `materialize`."""
        return self.location.bucket

    @property
    def label_indices(self) -> list[int]:
        return [item.label for item in self.items]

    def label_counts(self) -> dict[str, int]:
        return count_labels(self.label_indices, self.labels)


def list_image_folder(store: ArtifactStore, uri: str, *, min_labels: int = 2) -> ImageFolderListing:
    """List an ImageFolder-style dataset `{prefix}/{label}/{image}`.

    `uri` is `s3://bucket/prefix` or a key prefix in `store`'s bucket (another bucket is read through
    `ArtifactStore.for_bucket`). Objects that are not images by extension (the CLI upload's rules), hidden ones,
    and those not directly inside a label folder are skipped and listed in `skipped`. Raises DatasetError
    for a malformed URI, no images, or fewer than `min_labels` labels (2 for a training set; 1 suits an
    unknown-class set). StoreError (a missing bucket included) propagates.
    """
    if min_labels < 1:
        raise ValueError(f"min_labels must be at least 1, got {min_labels}")
    try:
        location = parse_location(uri, default_bucket=store.bucket, folder=True)
    except ValueError as err:
        raise DatasetError(f"dataset {uri}: {err}") from err
    source = store.for_bucket(location.bucket)
    prefix = location.prefix
    found: list[tuple[str, str, int, str]] = []  # key, label, size, etag
    skipped: list[str] = []
    for info in source.list(prefix, recursive=True):
        if info.key.endswith("/"):
            continue  # a "folder" marker some tools create, not a file
        label = label_of(info.key[len(prefix) :].split("/"))
        if label is None:
            skipped.append(info.key)
            continue
        found.append((info.key, label, info.size, info.etag))

    labels = tuple(sorted({label for _, label, _, _ in found}))
    if not found:
        extra = f" ({len(skipped)} other objects skipped, e.g. {skipped[0]})" if skipped else ""
        raise DatasetError(f"dataset {location}: no images found, expected PREFIX/LABEL/IMAGE{extra}")
    if len(labels) < min_labels:
        raise DatasetError(
            f"dataset {location}: only {len(labels)} label folder(s) hold images ({', '.join(labels)}); "
            f"at least {min_labels} are needed"
        )
    index = {label: i for i, label in enumerate(labels)}
    items = tuple(ImageItem(key, index[label], size, etag) for key, label, size, etag in found)
    if skipped:
        log.info(
            "dataset %s: skipped %d objects that are not images in label folders, e.g. %s",
            location,
            len(skipped),
            ", ".join(skipped[:SKIPPED_EXAMPLES]),
        )
    return ImageFolderListing(location, labels, items, tuple(skipped))


def hash_items(items: Iterable[tuple[str, str, int]]) -> str:
    """Hex sha256 over (key, etag, size) triples in the given order: the content identity of a list of objects."""
    digest = hashlib.sha256()
    for key, etag, size in items:
        # JSON per line: unambiguous whatever characters a key holds.
        digest.update(json.dumps([key, etag, size]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def dataset_fingerprint(listing: ImageFolderListing) -> str:
    """Hex sha256 over the sorted (key, etag, size) of every image: the dataset's identity for a manifest."""
    return hash_items(sorted((item.key, item.etag, item.size) for item in listing.items))
