"""Triton system shared memory for large batches: POSIX regions the service and its Triton both map.

When Triton runs beside the service (its child process, or a sidecar sharing the pod's /dev/shm), a batch of
at least `--triton-shared-memory-min-bytes` is written into a region Triton has registered, and the model's
output comes back in another, instead of both being copied through gRPC messages (serialised, sent over
loopback, parsed, copied again by Triton). `TritonModels.infer` decides per batch (`uses_shared_memory`);
this module holds the regions.

`RegionPool` lends pairs of regions (input, output) to one call at a time and takes them back for the next,
so a region is created and registered once, not per call. A pair grows when a batch does not fit: a larger
region is created and registered, then the old one is unregistered and destroyed; new regions are as large
as the largest batch seen, so the pairs settle on the largest size after a few calls. At most `max_pairs`
exist (a call finding all of them lent goes inline): a pair per RPC thread (64 by default) would hold
gigabytes of /dev/shm for concurrency Triton's dynamic batcher turns into a few model calls anyway.

Region names carry the process id and a random token: two services registering on one Triton never clash.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype
from tritonclient.utils import shared_memory as system_shm

log = logging.getLogger(__name__)

DEFAULT_REGION_PAIRS: Final = 4
_UNREGISTER_WAIT_S: Final = 2.0

# tritonclient.utils.shared_memory counts its handles in a module-level dict without a lock: every create and
# destroy goes through this one.
_TRITONCLIENT_LOCK: Final = threading.Lock()


class SharedMemoryUnavailable(Exception):
    """A region could not be created here or registered with Triton; the message says which and why."""


def uses_shared_memory(nbytes: int, min_bytes: int | None) -> bool:
    """Whether a batch of `nbytes` input bytes goes through shared memory: `min_bytes` or more, when set (None
    or 0: never)."""
    return min_bytes is not None and min_bytes > 0 and nbytes >= min_bytes


def output_byte_size(shape: Sequence[int], datatype: str, batch: int) -> int | None:
    """Bytes of a model's output for `batch` items, from its metadata: `shape` with -1 first for the batch
    dimension (a model with max_batch_size > 0), `datatype` a KServe v2 name. None when the size is not known
    before the call (another variable dimension, or variable-length BYTES)."""
    dims = list(shape)
    if dims and dims[0] == -1:
        dims[0] = batch
    if any(d < 0 for d in dims):
        return None
    np_type = triton_to_np_dtype(datatype)
    if np_type is None or np.dtype(np_type).kind == "O":
        return None
    itemsize: int = np.dtype(np_type).itemsize
    return math.prod(dims) * itemsize


def region_prefix() -> str:
    """Unique among the services registering on one Triton: the process id (this host) and a random token (the
    same pid in another container)."""
    return f"visiontune-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class Region:
    """One system shared memory region: `name` is Triton's for it, `key` the POSIX object (/dev/shm/<name>)."""

    name: str
    key: str
    byte_size: int
    handle: Any  # tritonclient.utils.shared_memory.SharedMemoryRegion

    def write(self, array: np.ndarray[Any, Any]) -> None:
        system_shm.set_shared_memory_region(self.handle, [array])

    def read(self, datatype: str, shape: Sequence[int]) -> np.ndarray[Any, Any]:
        """A copy of the tensor at the start of the region: the region is lent to the next call right after."""
        dtype = np.dtype(triton_to_np_dtype(datatype))
        if math.prod(shape) * dtype.itemsize > self.byte_size:
            raise system_shm.SharedMemoryException(
                f"an output of {list(shape)} {datatype} does not fit region {self.name} ({self.byte_size} bytes)"
            )
        view = system_shm.get_contents_as_numpy(self.handle, dtype, list(shape))
        output = np.array(view, copy=True)
        del view  # a live view of the mapping would make destroying the region fail (exported buffer)
        return output


def create_region(name: str, byte_size: int) -> Region:
    """A new region of `byte_size` bytes, every page allocated; SharedMemoryUnavailable if that fails."""
    key = "/" + name
    try:
        with _TRITONCLIENT_LOCK:
            handle = system_shm.create_shared_memory_region(name, key, byte_size, create_only=True)
    except system_shm.SharedMemoryException as err:
        raise SharedMemoryUnavailable(
            f"cannot create shared memory region {key} ({byte_size} bytes): {err.__cause__ or err}"
        ) from err
    region = Region(name=name, key=key, byte_size=byte_size, handle=handle)
    try:
        _allocate(key, byte_size)
    except OSError as err:
        destroy_region(region)
        raise SharedMemoryUnavailable(f"/dev/shm has no room for {key} ({byte_size} bytes): {err}") from err
    return region


def _allocate(key: str, byte_size: int) -> None:
    # The region is a sparse file on tmpfs: writing a page once /dev/shm is full kills the process with SIGBUS.
    # Allocating every page now turns that into ENOSPC here, and the batch goes inline. Linux keeps POSIX shared
    # memory objects (shm_open's names) as files in /dev/shm.
    fd = os.open(f"/dev/shm{key}", os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, byte_size)
    finally:
        os.close(fd)


def destroy_region(region: Region) -> None:
    """Unmap and unlink the region (Triton must have been told to unregister it, or have lost it)."""
    try:
        with _TRITONCLIENT_LOCK:
            system_shm.destroy_shared_memory_region(region.handle)
    except (system_shm.SharedMemoryException, BufferError, OSError) as err:
        log.warning("could not destroy shared memory region %s: %s", region.key, err)


@dataclass
class RegionPair:
    """The regions one call uses: its input, its output (None until first fitted)."""

    input: Region | None = None
    output: Region | None = None

    def regions(self) -> list[Region]:
        return [r for r in (self.input, self.output) if r is not None]


class RegionPool:
    """At most `max_pairs` registered region pairs, each lent to one call at a time. Thread-safe.

    The Triton client passed to each method is the calling thread's (tritonclient's clients are not thread-safe);
    registrations are server-wide, so any client may unregister what another registered."""

    def __init__(self, prefix: str, max_pairs: int = DEFAULT_REGION_PAIRS) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
        self.prefix = prefix
        self.max_pairs = max_pairs
        self._lock = threading.Lock()
        self._free: list[RegionPair] = []
        self._pairs = 0  # lent and free
        self._serial = 0
        self._largest = {"input": 0, "output": 0}
        self._closed = False

    @property
    def pairs(self) -> int:
        with self._lock:
            return self._pairs

    def acquire(self) -> RegionPair | None:
        """A pair for one call (a new, empty one while fewer than `max_pairs` exist); None if all are lent."""
        with self._lock:
            if self._closed:
                return None
            if self._free:
                return self._free.pop()
            if self._pairs >= self.max_pairs:
                return None
            self._pairs += 1
            return RegionPair()

    def fit(self, pair: RegionPair, client: Any, input_bytes: int, output_bytes: int) -> None:
        """Grow `pair` (registering the new regions) until it holds `input_bytes` in and `output_bytes` out.
        SharedMemoryUnavailable if a region cannot be created or Triton refuses to register it (a Triton that
        does not share this host's /dev/shm); the pair stays consistent, for `discard`."""
        pair.input = self._fitted(pair.input, "input", input_bytes, client)
        pair.output = self._fitted(pair.output, "output", output_bytes, client)

    def _fitted(self, region: Region | None, side: str, needed: int, client: Any) -> Region:
        if region is not None and region.byte_size >= needed:
            return region
        with self._lock:
            size = max(needed, self._largest[side])
            self._largest[side] = size
            self._serial += 1
            name = f"{self.prefix}-{self._serial}-{side}"
        grown = create_region(name, size)
        try:
            client.register_system_shared_memory(grown.name, grown.key, grown.byte_size)
        except InferenceServerException as err:
            destroy_region(grown)
            raise SharedMemoryUnavailable(
                f"Triton could not register shared memory region {grown.key}: {err.message()}"
            ) from err
        if region is not None:  # replaced only once the larger one is registered: the pair is never half-made
            _unregister(client, region)
            destroy_region(region)
        return grown

    def release(self, pair: RegionPair, client: Any) -> None:
        """Take back a pair after its call, for the next one (destroyed instead if the pool is closed)."""
        with self._lock:
            if not self._closed:
                self._free.append(pair)
                return
        self.discard(pair, client)

    def discard(self, pair: RegionPair, client: Any | None) -> None:
        """Unregister (when `client` is given) and destroy a pair, freeing its place in the pool."""
        with self._lock:
            self._pairs -= 1
        for region in pair.regions():
            if client is not None:
                _unregister(client, region)
            destroy_region(region)

    def discard_free(self) -> None:
        """Destroy the pairs not lent, without unregistering them: Triton lost its registrations (it restarted)."""
        with self._lock:
            free, self._free = self._free, []
            self._pairs -= len(free)
        for pair in free:
            for region in pair.regions():
                destroy_region(region)

    def close(self, client: Any | None) -> None:
        """Unregister and destroy every free pair; pairs still lent are destroyed when they come back."""
        with self._lock:
            self._closed = True
        # One pair at a time through `discard`: the same bookkeeping as any other pair leaving the pool.
        while True:
            with self._lock:
                if not self._free:
                    return
                pair = self._free.pop()
            self.discard(pair, client)


def _unregister(client: Any, region: Region) -> None:
    deadline = time.monotonic() + _UNREGISTER_WAIT_S
    delay = 0.005
    while True:
        try:
            client.unregister_system_shared_memory(region.name)
            return
        except InferenceServerException as err:
            message = err.message() or ""
            # Triton releases a request's regions just after its answer is sent, so a region that has just served
            # a call may be "currently in use" for a few milliseconds: wait for that, and only that.
            if "in use" in message and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            # Triton may be gone (shutdown, crash) or have lost the registration already; the region is ours
            # to free either way.
            log.info("could not unregister shared memory region %s from Triton: %s", region.name, message)
            return
        except ValueError as err:
            # grpc's "Cannot invoke RPC on closed channel": TritonModels.close closed this thread's client while
            # its call was in flight; close() has asked Triton to unregister what it could.
            log.info("could not unregister shared memory region %s from Triton: %s", region.name, err)
            return
