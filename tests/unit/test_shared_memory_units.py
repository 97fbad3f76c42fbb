"""Triton system shared memory's plain parts, without Triton: which batches use it, the output size from model
metadata, and the region pool (real POSIX regions in /dev/shm; a recording stand-in registers them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inference_service.triton.server import TritonModels
from inference_service.triton.shared_memory import (
    RegionPool,
    SharedMemoryUnavailable,
    create_region,
    destroy_region,
    output_byte_size,
    region_prefix,
    uses_shared_memory,
)
from tritonclient.utils import InferenceServerException

DEV_SHM = Path("/dev/shm")


@pytest.mark.parametrize(
    ("nbytes", "min_bytes", "expected"),
    [
        (10 << 20, None, False),
        (10 << 20, 0, False),
        ((1 << 20) - 1, 1 << 20, False),
        (1 << 20, 1 << 20, True),
        (1, 1, True),
    ],
)
def test_a_batch_goes_through_shared_memory_from_the_threshold_on(
    nbytes: int, min_bytes: int | None, expected: bool
) -> None:
    assert uses_shared_memory(nbytes, min_bytes) is expected


def test_output_size_comes_from_the_metadata_shape_and_datatype() -> None:
    assert output_byte_size([-1, 3], "FP32", 5) == 5 * 3 * 4
    assert output_byte_size([-1, 2, 4], "UINT8", 7) == 7 * 8
    assert output_byte_size([-1, 10], "FP16", 1) == 20
    assert output_byte_size([4, 3], "FP32", 9) == 48  # no batch dimension (max_batch_size 0): the shape is all
    assert output_byte_size([-1, -1], "FP32", 2) is None  # a variable dimension besides the batch
    assert output_byte_size([-1, 3], "BYTES", 2) is None  # variable-length strings


def test_region_names_are_unique_per_process_and_client() -> None:
    first, second = region_prefix(), region_prefix()
    assert first != second
    assert first.startswith(f"visiontune-{os.getpid()}-")


def test_the_threshold_must_not_be_negative_and_zero_is_off() -> None:
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        TritonModels("127.0.0.1:1", -1)
    off = TritonModels("127.0.0.1:1", 0)
    assert off.shared_memory_min_bytes is None
    assert off.shared_memory_prefix is None
    on = TritonModels("127.0.0.1:1", 1 << 20)
    assert on.shared_memory_prefix is not None
    on.close()


def test_a_region_round_trips_an_array_and_is_unlinked_when_destroyed() -> None:
    region = create_region(region_prefix() + "-unit", 4096)
    try:
        assert (DEV_SHM / region.name).is_file()
        assert region.key == "/" + region.name
        data = np.arange(12, dtype=np.float32).reshape(3, 4)
        region.write(data)
        out = region.read("FP32", [3, 4])
        region.write(np.zeros_like(data))  # the copy read out is not the region
        assert np.array_equal(out, data)
    finally:
        destroy_region(region)
    assert not (DEV_SHM / region.name).exists()


class RecordingTriton:
    """Stands in for a Triton client: records what is registered; `refuse` makes registering fail."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.registered: dict[str, int] = {}

    def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        if self.refuse:
            raise InferenceServerException(f"Unable to open shared memory region: '{key}'")
        assert (DEV_SHM / key.lstrip("/")).is_file()
        self.registered[name] = byte_size

    def unregister_system_shared_memory(self, name: str) -> None:
        del self.registered[name]


def _files(prefix: str) -> list[str]:
    return sorted(p.name for p in DEV_SHM.glob(prefix + "-*"))


def test_the_pool_lends_at_most_its_pairs_and_grows_them_to_the_largest_batch() -> None:
    triton: Any = RecordingTriton()
    pool = RegionPool(region_prefix(), max_pairs=2)
    first, second = pool.acquire(), pool.acquire()
    assert first is not None
    assert second is not None
    assert pool.acquire() is None  # both lent: that call goes inline
    pool.fit(first, triton, 1000, 40)
    assert first.input is not None
    assert sorted(triton.registered.values()) == [40, 1000]
    pool.fit(second, triton, 500, 20)  # smaller, but made as large as the largest seen
    assert second.input is not None
    assert second.input.byte_size == 1000

    small = first.input
    pool.fit(first, triton, 3000, 120)  # grows: the larger region replaces the old one, in Triton too
    assert first.input.byte_size == 3000
    assert small.name not in triton.registered
    assert not (DEV_SHM / small.name).exists()
    unchanged = first.input
    pool.fit(first, triton, 2000, 80)  # fits already: reused
    assert first.input is unchanged

    pool.release(first, triton)
    assert pool.acquire() is first  # reused by the next call
    pool.release(first, triton)
    pool.close(triton)
    assert len(triton.registered) == 2  # the lent pair stays until it comes back
    pool.release(second, triton)
    assert triton.registered == {}
    assert _files(pool.prefix) == []
    assert pool.pairs == 0
    assert pool.acquire() is None  # closed


def test_a_region_triton_refuses_is_destroyed_and_the_pair_stays_whole() -> None:
    triton: Any = RecordingTriton()
    pool = RegionPool(region_prefix(), max_pairs=1)
    pair = pool.acquire()
    assert pair is not None
    pool.fit(pair, triton, 100, 10)
    before = pair.input
    triton.refuse = True
    with pytest.raises(SharedMemoryUnavailable, match=r"Triton could not register .* Unable to open"):
        pool.fit(pair, triton, 200, 10)
    assert pair.input is before  # the old, registered region: still usable, or discarded whole
    assert len(_files(pool.prefix)) == 2  # the refused one is gone
    pool.discard(pair, triton)
    assert _files(pool.prefix) == []
    assert triton.registered == {}
    assert pool.pairs == 0
