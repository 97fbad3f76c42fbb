"""Download and decode a dataset's images once into a uint8 memmap on local disk, cached across jobs.

`materialize` reads every image with threads (S3 I/O is the bottleneck) and decodes it with
`visiontune.preprocessing` (the decoder the inference service uses too, so both give the same probabilities
for the same image) into [N, 3, S, S]. A corrupt image is skipped and counted, never fatal. Decoded sets are
cached across jobs under a size bound (LRU); `cache_max_mb == 0` disables the cross-job cache. The engine reads
`DecodedSet.images` as it is (docs/architecture.md §4).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
from visiontune.preprocessing import ImageRejected, decode_hwc, preprocessing
from visiontune.store import ObjectNotFound

from trainer_service.datasets.listing import SKIPPED_EXAMPLES, DatasetError, ImageItem, hash_items

log = logging.getLogger(__name__)


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
        self,
        path: Path,
        size: int,
        keys: Sequence[str],
        labels: np.ndarray[Any, np.dtype[np.int64]],
        corrupt: Sequence[str],
        fingerprint: str,
        *,
        from_cache: bool,
        owned: bool,
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
    digest.update(json.dumps({"format": _CACHE_FORMAT, "preprocessing": preprocessing(size)}, sort_keys=True).encode())
    # In the given order: row i of the file is items[i].
    digest.update(hash_items((item.key, item.etag, item.size) for item in items).encode())
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


def _open_cached(entry: Path, cache_dir: Path, items: Sequence[ImageItem], size: int, key: str) -> DecodedSet | None:
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
        if (
            not isinstance(meta, dict)
            or meta.get("count") != len(good)
            or data.stat().st_size != len(good) * 3 * size * size
        ):
            log.warning("discarding inconsistent cache entry %s", entry)
            _discard(entry)
            return None
        path = _link_private(data, cache_dir)
        os.utime(entry / _META)  # LRU: this entry was just used
    except FileNotFoundError:
        return None  # evicted by another job meanwhile
    labels = np.fromiter((item.label for item in good), dtype=np.int64, count=len(good))
    return DecodedSet(
        path or data,
        size,
        [item.key for item in good],
        labels,
        [item.key for item in items if item.key in corrupt],
        key,
        from_cache=True,
        owned=path is not None,
    )


def _decode_into(
    path: Path,
    store: ObjectReader,
    items: Sequence[ImageItem],
    size: int,
    workers: int,
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
        meta = {
            "format": _CACHE_FORMAT,
            "size": size,
            "count": sum(good),
            "items": len(items),
            "corrupt": [item.key for item, ok in zip(items, good, strict=True) if not ok],
            "preprocessing": preprocessing(size),
        }
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
        log.warning(
            "skipped %d of %d images that did not decode, e.g. %s",
            len(corrupt),
            len(items),
            ", ".join(corrupt[:SKIPPED_EXAMPLES]),
        )
    labels = np.fromiter((item.label for item in kept), dtype=np.int64, count=len(kept))
    return DecodedSet(path, size, [item.key for item in kept], labels, corrupt, key, from_cache=False, owned=owned)
