"""Datasets for training: list an ImageFolder prefix in S3, split it, decode it once into a local cache.

The pipeline (docs/architecture.md §4):

1. `list_image_folder` lists `{prefix}/{label}/{image}`; `dataset_fingerprint` identifies its content.
2. `stratified_split` holds out a fraction of every label for validation, deterministically for a seed.
3. `materialize` downloads and decodes every image once (threads: S3 I/O is the bottleneck) into a uint8
   memmap [N, 3, S, S] on local disk. A corrupt image is skipped and counted, never fatal. Decoded sets
   are cached across jobs under a size bound (LRU); `cache_max_mb == 0` disables the cross-job cache.
4. `ImageDataset` serves rows of that memmap to a DataLoader (picklable for worker processes);
   `class_weights` / `balanced_sampler` implement `ClassBalancing`; `label_warnings` flags small labels.

Decoding is `visiontune.preprocessing`, shared with the inference service so both give the same
probabilities for the same image; `preprocessing()` records it in the model manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import secrets
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler
from visiontune.dataset_upload import IMAGE_SUFFIXES
from visiontune.errors import FailedPrecondition
from visiontune.preprocessing import (  # noqa: F401 (re-exported: the trainer's decoding is the shared one)
    MAX_IMAGE_PIXELS,
    PREPROCESSING,
    ImageRejected,
    decode_hwc,
    decode_image,
    preprocessing,
)
from visiontune.store import ArtifactStore, ObjectNotFound
from visiontune.uris import S3Location, parse_location

log = logging.getLogger(__name__)

# -- listing ----------------------------------------------------------------------------------------------


class DatasetError(FailedPrecondition):
    """The dataset cannot be used as given; the one-line message names its URI."""


class ImageItem(NamedTuple):
    key: str
    label: int  # index into ImageFolderListing.labels
    size: int  # bytes
    etag: str


_SKIPPED_EXAMPLES: Final = 5


@dataclass(frozen=True)
class ImageFolderListing:
    location: S3Location
    labels: tuple[str, ...]  # sorted; label index i is labels[i]
    items: tuple[ImageItem, ...]  # in key order
    skipped: tuple[str, ...]  # keys that are not images by extension, or not directly in a label folder

    @property
    def skipped_examples(self) -> tuple[str, ...]:
        """The first few skipped keys, for messages."""
        return self.skipped[:_SKIPPED_EXAMPLES]

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


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


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
        parts = info.key[len(prefix):].split("/")
        if (len(parts) != 2 or not parts[0] or any(p.startswith(".") for p in parts)
                or not _is_image_name(parts[1])):
            skipped.append(info.key)
            continue
        found.append((info.key, parts[0], info.size, info.etag))

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
        log.info("dataset %s: skipped %d objects that are not images in label folders, e.g. %s",
                 location, len(skipped), ", ".join(skipped[:_SKIPPED_EXAMPLES]))
    return ImageFolderListing(location, labels, items, tuple(skipped))


def _hash_items(items: Iterable[tuple[str, str, int]]) -> str:
    digest = hashlib.sha256()
    for key, etag, size in items:
        # JSON per line: unambiguous whatever characters a key holds.
        digest.update(json.dumps([key, etag, size]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def dataset_fingerprint(listing: ImageFolderListing) -> str:
    """Hex sha256 over the sorted (key, etag, size) of every image: the dataset's identity for a manifest."""
    return _hash_items(sorted((item.key, item.etag, item.size) for item in listing.items))


def count_labels(label_indices: Sequence[int], labels: Sequence[str]) -> dict[str, int]:
    """Images per label name (every label present, zeros included), e.g. for `label_warnings`."""
    counts = np.bincount(np.asarray(label_indices, dtype=np.int64), minlength=len(labels))
    return {label: int(counts[i]) for i, label in enumerate(labels)}


# -- splitting --------------------------------------------------------------------------------------------


def stratified_split(label_indices: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `fraction` of every label for validation: (train positions, validation positions), sorted.

    Per label with n images, round(fraction * n) (halves up) go to validation, but at least 1 when
    n >= 2 and at most n - 1, so both sides see the label; a label with a single image keeps it for
    training (0 in validation). `fraction == 0` holds out nothing (a separate validation set).
    Deterministic for a seed; each label draws from its own generator, so adding a label does not
    reshuffle the others.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    by_label: dict[int, list[int]] = {}
    for position, label in enumerate(label_indices):
        by_label.setdefault(int(label), []).append(position)
    val: list[int] = []
    for label, positions in sorted(by_label.items()):
        n = len(positions)
        if fraction == 0.0 or n < 2:
            continue
        k = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
        # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"visiontune-split:{seed}:{label}")
        val.extend(rng.sample(positions, k))
    val_set = set(val)
    train = [i for i in range(len(label_indices)) if i not in val_set]
    return train, sorted(val)


# -- class balancing and warnings -------------------------------------------------------------------------


def class_weights(label_indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights ∝ 1 / frequency, normalised to mean 1 over the classes present.

    A class with no examples gets weight 0 (it contributes no loss terms anyway). Float32 [num_classes].
    """
    counts = torch.bincount(torch.as_tensor(list(label_indices), dtype=torch.long), minlength=num_classes)
    counts = counts[:num_classes].double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = 1.0 / counts[present]
    if present.any():
        weights[present] /= weights[present].mean()
    return weights.float()


def balanced_sampler(
    label_indices: Sequence[int], num_samples: int, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Draws `num_samples` positions with replacement so that every label is equally likely per draw."""
    labels = torch.as_tensor(list(label_indices), dtype=torch.long)
    counts = torch.bincount(labels).double()
    sample_weights = (1.0 / counts)[labels]
    return WeightedRandomSampler(sample_weights.tolist(), num_samples, replacement=True, generator=generator)


def label_warnings(
    train_counts: Mapping[str, int], val_counts: Mapping[str, int], min_train: int = 20, min_val: int = 15
) -> list[str]:
    """One line per label with fewer than `min_train` training or `min_val` validation images."""
    lines = []
    for label in sorted(set(train_counts) | set(val_counts)):
        n_train, n_val = train_counts.get(label, 0), val_counts.get(label, 0)
        problems = []
        if n_train < min_train:
            problems.append(f"{n_train} training images (fewer than {min_train})")
        if n_val < min_val:
            problems.append(f"{n_val} validation images (fewer than {min_val})")
        if problems:
            lines.append(f"label {label!r}: " + " and ".join(problems) + "; its metrics will be unreliable")
    return lines


# -- materializing: download + decode once, cached on local disk --------------------------------------------


class ObjectReader(Protocol):
    """What `materialize` needs of a store (an ArtifactStore for the items' bucket)."""

    def get_bytes(self, key: str) -> bytes: ...


_CACHE_FORMAT: Final = 1  # bump when the file layout or the decoding changes
_DATA: Final = "images.u8"
_META: Final = "meta.json"
_DECODED_DIR: Final = "decoded"  # committed cache entries: decoded/{key}/{images.u8, meta.json}
_PRIVATE_DIR: Final = "private"  # per-process files: {pid}-{token}.u8, deleted when their set is closed
_MiB: Final = 1024 * 1024


def _remove_owned(path: Path, owner_pid: int) -> None:
    # Only the creating process removes the file: a forked DataLoader worker holds a copy of the set.
    if os.getpid() == owner_pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class DecodedSet:
    """Decoded images on local disk: `images` uint8 memmap [N, 3, S, S], `labels` int64 [N], `keys` [N].

    `corrupt` lists the keys that were skipped because they did not decode (or vanished since listing).
    Picklable: a copy in another process reopens the memmap lazily and never deletes the file. Close it
    (or use it as a context manager) to delete the job-private file it reads.
    """

    def __init__(
        self, path: Path, size: int, keys: Sequence[str], labels: np.ndarray[Any, np.dtype[np.int64]],
        corrupt: Sequence[str], fingerprint: str, *, from_cache: bool, owned: bool,
    ) -> None:
        self.path = path
        self.size = size
        self.keys = tuple(keys)
        self.labels = labels
        self.corrupt = list(corrupt)
        self.fingerprint = fingerprint  # the cache key: items (in order) + size + preprocessing
        self.from_cache = from_cache  # True when no image was downloaded
        self._images: np.memmap[Any, np.dtype[np.uint8]] | None = None
        self._finalizer = weakref.finalize(self, _remove_owned, path, os.getpid()) if owned else None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def images(self) -> np.memmap[Any, np.dtype[np.uint8]]:
        if self._images is None:
            self._images = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(len(self), 3, self.size, self.size))
        return self._images

    def close(self) -> None:
        self._images = None  # numpy unmaps when the last view goes
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> DecodedSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None  # reopened lazily in the receiving process
        state["_finalizer"] = None  # the file belongs to the process that made it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _items_cache_key(items: Sequence[ImageItem], size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": _CACHE_FORMAT, "preprocessing": preprocessing(size)},
                             sort_keys=True).encode())
    # In the given order: row i of the file is items[i].
    digest.update(_hash_items((item.key, item.etag, item.size) for item in items).encode())
    return digest.hexdigest()[:40]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clean_stale(cache_dir: Path) -> None:
    """Remove temporaries and private files of processes that died (a crash, a kill -9)."""
    for tmp in (cache_dir / _DECODED_DIR).glob(".*.tmp"):
        parts = tmp.name.split(".")  # ".{name}.{pid}.{token}.tmp"
        if len(parts) >= 4 and parts[-3].isdigit() and not _pid_alive(int(parts[-3])):
            _remove_path(tmp)
    for private in (cache_dir / _PRIVATE_DIR).glob("*-*.u8"):
        pid = private.name.split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove_path(private)


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _private_path(cache_dir: Path) -> Path:
    return cache_dir / _PRIVATE_DIR / f"{os.getpid()}-{secrets.token_hex(6)}.u8"


def _link_private(data: Path, cache_dir: Path) -> Path | None:
    """A private hard link to a cache entry's data, so eviction by another job cannot pull it away
    from this job's DataLoader workers (which reopen it by path). None where links are unsupported."""
    link = _private_path(cache_dir)
    try:
        os.link(data, link)
    except FileNotFoundError:
        raise  # the entry is gone (evicted): the caller treats that as a miss
    except OSError as err:  # EPERM, EXDEV, EMLINK...: fall back to reading the entry itself
        log.debug("cannot hard-link %s: %s", data, err)
        return None
    return link


def _entry_size(entry: Path) -> int:
    total = 0
    for file in (entry / _DATA, entry / _META):
        with contextlib.suppress(FileNotFoundError):
            total += file.stat().st_size
    return total


def _entry_used(entry: Path) -> int:
    """Last use in ns: the meta file is touched on every cache hit."""
    for file in (entry / _META, entry):
        with contextlib.suppress(FileNotFoundError):
            return file.stat().st_mtime_ns
    return 0


def _discard(entry: Path) -> bool:
    """Remove a cache entry: renamed away first (atomic), so readers see it whole or not at all."""
    doomed = entry.parent / _temp_name(entry.name)
    try:
        entry.rename(doomed)
    except FileNotFoundError:
        return False
    _remove_path(doomed)
    return True


def _evict(decoded_dir: Path, need: int, bound: int) -> None:
    """Remove least-recently-used entries until `need` more bytes fit under `bound`.

    Lock-free across processes (see `_discard`); two jobs may briefly overshoot the bound together.
    """
    entries = [p for p in decoded_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    sizes = {entry: _entry_size(entry) for entry in entries}
    total = sum(sizes.values())
    for entry in sorted(entries, key=_entry_used):
        if total + need <= bound:
            break
        if not _discard(entry):
            continue  # another job evicted it first
        total -= sizes[entry]
        log.info("evicted decoded-image cache entry %s (%.1f MiB)", entry.name, sizes[entry] / _MiB)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_cached(
    entry: Path, cache_dir: Path, items: Sequence[ImageItem], size: int, key: str
) -> DecodedSet | None:
    try:
        meta = json.loads((entry / _META).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("discarding unreadable cache entry %s: %s", entry, err)
        _discard(entry)
        return None
    corrupt = set(meta.get("corrupt", [])) if isinstance(meta, dict) else set()
    good = [item for item in items if item.key not in corrupt]
    data = entry / _DATA
    try:
        if (not isinstance(meta, dict) or meta.get("count") != len(good)
                or data.stat().st_size != len(good) * 3 * size * size):
            log.warning("discarding inconsistent cache entry %s", entry)
            _discard(entry)
            return None
        path = _link_private(data, cache_dir)
        os.utime(entry / _META)  # LRU: this entry was just used
    except FileNotFoundError:
        return None  # evicted by another job meanwhile
    labels = np.fromiter((item.label for item in good), dtype=np.int64, count=len(good))
    return DecodedSet(path or data, size, [item.key for item in good], labels,
                      [item.key for item in items if item.key in corrupt], key,
                      from_cache=True, owned=path is not None)


def _decode_into(
    path: Path, store: ObjectReader, items: Sequence[ImageItem], size: int, workers: int,
    on_progress: Callable[[int, int], None] | None,
) -> list[bool]:
    """Download + decode every item into row i of a new file at `path`; returns which rows are good."""
    total = len(items)
    images = np.memmap(path, dtype=np.uint8, mode="w+", shape=(total, 3, size, size))
    good = [False] * total

    def fetch(i: int) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
        key = items[i].key
        try:
            data = store.get_bytes(key)
        except ObjectNotFound:
            log.warning("image %s vanished since it was listed; skipping it", key)
            return None
        try:
            return decode_hwc(data, size)
        except ImageRejected as err:
            log.warning("skipping corrupt image %s: %s", key, err)
            return None

    # A bounded window of futures: a million-image dataset must not mean a million pending futures
    # (or decoded arrays). Rows are written here, in the calling thread.
    window = max(1, workers) * 4
    done = 0
    pending: dict[Future[np.ndarray[Any, np.dtype[np.uint8]] | None], int] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        try:
            next_item = 0
            while next_item < total or pending:
                while next_item < total and len(pending) < window:
                    pending[pool.submit(fetch, next_item)] = next_item
                    next_item += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    hwc = future.result()  # a StoreError (the server down after retries) is fatal
                    if hwc is not None:
                        images[i] = hwc.transpose(2, 0, 1)
                        good[i] = True
                done += len(finished)
                if on_progress is not None:
                    on_progress(done, total)
        except BaseException:
            for future in pending:
                future.cancel()
            raise

    n_good = sum(good)
    if n_good < total:
        # Compact in place so rows are exactly the good images, in item order (a deterministic layout).
        j = 0
        for i in range(total):
            if good[i]:
                if i != j:
                    images[j] = images[i]
                j += 1
    images.flush()
    del images
    os.truncate(path, n_good * 3 * size * size)
    return good


def materialize(
    store: ObjectReader,
    items: Sequence[ImageItem],
    size: int,
    cache_dir: Path,
    cache_max_mb: int,
    workers: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
) -> DecodedSet:
    """Download and decode every item once into a uint8 memmap [N, 3, size, size] under `cache_dir`.

    `store` reads the items' bucket (see `ArtifactStore.for_bucket`). Images that do not decode are skipped and
    listed in `corrupt`; if none decodes, DatasetError. A StoreError other than a vanished object is fatal.
    `on_progress(done, total)` is called from the calling thread.

    Decoded sets are cached across jobs, keyed by the items (keys, etags, sizes, in order) and `size`;
    a repeat of the same data downloads nothing. The cache holds at most `cache_max_mb` MiB, evicting
    the least recently used sets. A set larger than that bound, or any set when `cache_max_mb == 0`
    (0 disables the cross-job cache), goes to a job-private file deleted when the DecodedSet is closed.
    Cache entries are committed by an atomic rename, so a crash never leaves a torn entry.
    """
    if not items:
        raise ValueError("materialize: no items")
    if size < 1 or cache_max_mb < 0:
        raise ValueError(f"materialize: bad size {size} or cache_max_mb {cache_max_mb}")
    decoded_dir = cache_dir / _DECODED_DIR
    decoded_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / _PRIVATE_DIR).mkdir(parents=True, exist_ok=True)
    _clean_stale(cache_dir)

    key = _items_cache_key(items, size)
    entry = decoded_dir / key
    bound = cache_max_mb * _MiB
    need = len(items) * 3 * size * size
    if bound > 0:
        hit = _open_cached(entry, cache_dir, items, size, key)
        if hit is not None:
            log.info("decoded images of %d items found in the cache (%s)", len(items), key)
            if on_progress is not None:
                on_progress(len(items), len(items))
            return hit

    if need > bound:
        # Not cacheable: a private file, written in place (no one else ever reads it).
        path = _private_path(cache_dir)
        try:
            good = _decode_into(path, store, items, size, workers, on_progress)
            _require_some(items, good)
        except BaseException:
            _remove_path(path)
            raise
        return _decoded(path, size, items, good, key, owned=True)

    _evict(decoded_dir, need, bound)
    tmp = decoded_dir / _temp_name(key)
    tmp.mkdir()
    try:
        good = _decode_into(tmp / _DATA, store, items, size, workers, on_progress)
        _require_some(items, good)
        meta = {"format": _CACHE_FORMAT, "size": size, "count": sum(good), "items": len(items),
                "corrupt": [item.key for item, ok in zip(items, good, strict=True) if not ok],
                "preprocessing": preprocessing(size)}
        (tmp / _META).write_text(json.dumps(meta))
        # Durable before visible: a power cut after the rename must not expose unwritten pages.
        _fsync(tmp / _DATA)
        _fsync(tmp / _META)
        private = _link_private(tmp / _DATA, cache_dir)
        try:
            tmp.rename(entry)  # the commit
        except OSError:
            if private is None and not (entry / _META).exists():
                raise  # not the benign race below, and nothing else holds our data
            # Another job committed the same set meanwhile: theirs is identical, so ours goes.
            log.debug("cache entry %s appeared meanwhile; using it", key)
    finally:
        _remove_path(tmp)  # nothing is left there after a successful rename
    return _decoded(private or entry / _DATA, size, items, good, key, owned=private is not None)


def _require_some(items: Sequence[ImageItem], good: Sequence[bool]) -> None:
    if not any(good):
        raise DatasetError(f"none of the {len(items)} images could be decoded, e.g. {items[0].key}")


def _decoded(
    path: Path, size: int, items: Sequence[ImageItem], good: Sequence[bool], key: str, *, owned: bool
) -> DecodedSet:
    kept = [item for item, ok in zip(items, good, strict=True) if ok]
    corrupt = [item.key for item, ok in zip(items, good, strict=True) if not ok]
    if corrupt:
        log.warning("skipped %d of %d images that did not decode, e.g. %s", len(corrupt), len(items),
                    ", ".join(corrupt[:_SKIPPED_EXAMPLES]))
    labels = np.fromiter((item.label for item in kept), dtype=np.int64, count=len(kept))
    return DecodedSet(path, size, [item.key for item in kept], labels, corrupt, key, from_cache=False, owned=owned)


# -- the torch dataset ------------------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Rows `indices` of a DecodedSet as (transform(uint8 [3, S, S] tensor), label).

    Picklable for DataLoader worker processes: the memmap is reopened lazily in each worker.
    """

    def __init__(
        self, decoded: DecodedSet, indices: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.decoded = decoded
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[index])
        # A copy: the memmap is read-only, and a tensor must not pin the mapping.
        image = torch.from_numpy(np.array(self.decoded.images[row]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.decoded.labels[row])
