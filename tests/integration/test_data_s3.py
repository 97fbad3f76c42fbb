"""The engine's data layer against a real S3 server (SeaweedFS or MinIO) on loopback: list, decode, cache."""

from __future__ import annotations

import io
import secrets
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from trainer_service.datasets.cache import materialize
from trainer_service.datasets.listing import DatasetError, ImageItem, dataset_fingerprint, list_image_folder
from visiontune.devstack.ports import free_port
from visiontune.settings import S3Settings
from visiontune.store import ArtifactStore, RetryPolicy, StoreError, StoreUnavailable

pytestmark = pytest.mark.integration

PREFIX = "datasets/pets/"
CATS = 6
DOGS = 5


class CountingReader:
    """A thin wrapper over the real store that counts the objects read (and can fail after `fail_after`)."""

    def __init__(self, store: ArtifactStore, fail_after: int | None = None) -> None:
        self.store = store
        self.reads = 0
        self.fail_after = fail_after

    def get_bytes(self, key: str) -> bytes:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise StoreUnavailable(
                f"S3 at {self.store.endpoint} unavailable (test)", endpoint=self.store.endpoint, key=key
            )
        return self.store.get_bytes(key)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _upload_pets(store: ArtifactStore, prefix: str = PREFIX) -> None:
    for i in range(CATS):
        store.put_bytes(f"{prefix}cat/{i:02d}.jpg", _jpeg((200, 10 * i, 10)))
    store.put_bytes(f"{prefix}cat/corrupt.jpg", b"\xff\xd8\xff\xe0 this is not really a JPEG")
    for i in range(DOGS):
        store.put_bytes(f"{prefix}dog/{i:02d}.PNG", _png((10, 10 * i, 200)))
    store.put_bytes(f"{prefix}dog/notes.txt", b"good dogs")
    store.put_bytes(f"{prefix}README.md", b"# pets")
    store.put_bytes(f"{prefix}cat/kittens/deep.jpg", _jpeg((0, 0, 0)))  # not directly in a label folder
    store.put_bytes(f"{prefix}.hidden/x.jpg", _jpeg((0, 0, 0)))


@pytest.fixture
def pets(store: ArtifactStore) -> ArtifactStore:
    _upload_pets(store)
    return store


def _no_temporaries(cache: Path) -> None:
    assert [p for p in cache.rglob("*.tmp")] == []


def _entries(cache: Path) -> set[str]:
    return {p.name for p in (cache / "decoded").iterdir()}


# -- listing ------------------------------------------------------------------------------------------------


def test_list_image_folder(pets: ArtifactStore) -> None:
    listing = list_image_folder(pets, PREFIX.rstrip("/"))
    assert listing.labels == ("cat", "dog")
    assert listing.uri == f"s3://{pets.bucket}/{PREFIX}"
    assert len(listing.items) == CATS + 1 + DOGS  # the corrupt .jpg is an image by name; decoding finds out
    assert listing.label_counts() == {"cat": CATS + 1, "dog": DOGS}
    assert all(item.size > 0 and item.etag for item in listing.items)
    assert [item.key for item in listing.items] == sorted(item.key for item in listing.items)
    assert {item.key for item in listing.items if item.label == 1} == {f"{PREFIX}dog/{i:02d}.PNG" for i in range(DOGS)}
    assert len(listing.skipped) == 4
    assert set(listing.skipped) == {
        f"{PREFIX}dog/notes.txt",
        f"{PREFIX}README.md",
        f"{PREFIX}cat/kittens/deep.jpg",
        f"{PREFIX}.hidden/x.jpg",
    }

    same = list_image_folder(pets, f"s3://{pets.bucket}/{PREFIX}")
    assert same == listing
    assert dataset_fingerprint(same) == dataset_fingerprint(listing)


def test_fingerprint_changes_with_content(pets: ArtifactStore) -> None:
    before = dataset_fingerprint(list_image_folder(pets, PREFIX))
    assert len(before) == 64
    pets.put_bytes(f"{PREFIX}dog/00.PNG", _png((1, 2, 3)))
    changed = dataset_fingerprint(list_image_folder(pets, PREFIX))
    assert changed != before
    pets.put_bytes(f"{PREFIX}dog/notes.txt", b"a skipped file does not count")
    assert dataset_fingerprint(list_image_folder(pets, PREFIX)) == changed


def test_list_a_dataset_in_another_bucket(store: ArtifactStore) -> None:
    other = store.for_bucket("other-" + secrets.token_hex(5))
    assert other.bucket != store.bucket
    assert other.endpoint == store.endpoint
    assert store.for_bucket(store.bucket) is store
    other.ensure_bucket()
    _upload_pets(other, "pets/")
    listing = list_image_folder(store, f"s3://{other.bucket}/pets")
    assert listing.bucket == other.bucket
    assert listing.labels == ("cat", "dog")
    assert list(store.list("")) == []  # nothing in the artifact bucket


def test_one_label_is_enough_where_asked(store: ArtifactStore) -> None:
    store.put_bytes("unknown/other/1.jpg", _jpeg((1, 1, 1)))
    listing = list_image_folder(store, "unknown", min_labels=1)
    assert listing.labels == ("other",)
    assert [item.key for item in listing.items] == ["unknown/other/1.jpg"]


def test_unusable_datasets_are_one_line_errors(store: ArtifactStore) -> None:
    store.put_bytes("datasets/one/cat/1.jpg", _jpeg((1, 1, 1)))
    store.put_bytes("datasets/one/cat/2.jpg", _jpeg((1, 1, 1)))
    store.put_bytes("datasets/none/notes.txt", b"x")
    cases = {
        "datasets/one": r"only 1 label folder\(s\) hold images \(cat\); at least 2",
        "datasets/none": "no images found",
        "datasets/missing": "no images found",
        "http://example.com/x": "only s3://",
    }
    for uri, message in cases.items():
        with pytest.raises(DatasetError, match=message) as err:
            list_image_folder(store, uri)
        assert "\n" not in str(err.value)
        if uri.startswith("datasets/"):
            assert f"s3://{store.bucket}/{uri}/" in str(err.value)


# -- materialize ----------------------------------------------------------------------------------------------


def test_materialize_skips_corrupt_images_and_reuses_the_cache(pets: ArtifactStore, tmp_path: Path) -> None:
    listing = list_image_folder(pets, PREFIX)
    cache = tmp_path / "cache"
    reader = CountingReader(pets)
    progress: list[tuple[int, int]] = []
    first = materialize(
        reader,
        listing.items,
        16,
        cache,
        cache_max_mb=64,
        workers=4,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    n = CATS + DOGS
    assert reader.reads == n + 1
    assert progress[-1] == (n + 1, n + 1)
    assert first.corrupt == [f"{PREFIX}cat/corrupt.jpg"]
    assert len(first) == n
    assert first.images.shape == (n, 3, 16, 16)
    assert first.labels.tolist() == [0] * CATS + [1] * DOGS
    assert first.keys[0] == f"{PREFIX}cat/00.jpg"
    assert f"{PREFIX}cat/corrupt.jpg" not in first.keys
    assert not first.from_cache
    # Rows follow the items: the first dog is blue, the last cat is red with green 50.
    assert np.abs(first.images[CATS].mean(axis=(1, 2)) - (10, 0, 200)).max() < 6
    assert np.abs(first.images[CATS - 1].mean(axis=(1, 2)) - (200, 50, 10)).max() < 6
    _no_temporaries(cache)
    assert len(_entries(cache)) == 1

    second = materialize(reader, listing.items, 16, cache, cache_max_mb=64)
    assert reader.reads == n + 1  # nothing downloaded
    assert second.from_cache
    assert second.corrupt == first.corrupt
    assert second.keys == first.keys
    assert np.array_equal(second.images, first.images)
    assert np.array_equal(second.labels, first.labels)

    # Even with nobody answering at the endpoint, the cache serves the set.
    dead = ArtifactStore.connect(
        S3Settings(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b", bucket=pets.bucket),
        retry=RetryPolicy(attempts=1),
    )
    third = materialize(dead, listing.items, 16, cache, cache_max_mb=64)
    assert np.array_equal(third.images, first.images)

    # Another size is another set.
    materialize(reader, listing.items, 24, cache, cache_max_mb=64).close()
    assert reader.reads == 2 * (n + 1)
    assert len(_entries(cache)) == 2
    for decoded in (first, second, third):
        decoded.close()
    _no_temporaries(cache)
    assert list((cache / "private").iterdir()) == []


def test_least_recently_used_sets_are_evicted(pets: ArtifactStore, tmp_path: Path) -> None:
    items = [item for item in list_image_folder(pets, PREFIX).items if not item.key.endswith("corrupt.jpg")]
    cache = tmp_path / "cache"
    reader = CountingReader(pets)
    # At 128 px a row is 48 KiB: 8 rows are 384 KiB, so two sets fit in 1 MiB and a third does not.
    a, b, c = items[0:8], items[1:9], items[2:10]

    def run(subset: list[ImageItem]) -> bool:
        with materialize(reader, subset, 128, cache, cache_max_mb=1) as decoded:
            return decoded.from_cache

    assert not run(a)
    assert not run(b)
    assert run(a)  # a is now the most recently used
    assert len(_entries(cache)) == 2
    assert not run(c)  # evicts b, the least recently used
    assert len(_entries(cache)) == 2
    reads = reader.reads
    assert run(a)
    assert run(c)
    assert reader.reads == reads
    assert not run(b)
    _no_temporaries(cache)
    total = sum(p.stat().st_size for p in (cache / "decoded").rglob("*") if p.is_file())
    assert total <= 1024 * 1024


def test_cache_disabled_or_too_small_uses_a_private_file(pets: ArtifactStore, tmp_path: Path) -> None:
    items = list_image_folder(pets, PREFIX).items
    cache = tmp_path / "cache"
    reader = CountingReader(pets)
    for bound, size in ((0, 16), (1, 256)):  # 0 disables the cache; 11 x 192 KiB exceed 1 MiB
        with materialize(reader, items, size, cache, cache_max_mb=bound) as decoded:
            assert len(decoded) == CATS + DOGS
            assert not decoded.from_cache
            assert decoded.path.parent == cache / "private"
            assert decoded.path.exists()
            path = decoded.path
        assert not path.exists()
        assert _entries(cache) == set()
    with materialize(reader, items, 16, cache, cache_max_mb=0) as again:
        assert not again.from_cache
    assert reader.reads == 3 * len(items)


def test_a_failed_materialize_leaves_no_torn_entry(pets: ArtifactStore, tmp_path: Path) -> None:
    items = list_image_folder(pets, PREFIX).items
    cache = tmp_path / "cache"
    for bound in (64, 0):
        with pytest.raises(StoreError, match="unavailable"):
            materialize(CountingReader(pets, fail_after=5), items, 16, cache, cache_max_mb=bound, workers=2)
        assert _entries(cache) == set()
        assert list((cache / "private").iterdir()) == []
        _no_temporaries(cache)
    # The next attempt starts clean and commits.
    with materialize(CountingReader(pets), items, 16, cache, cache_max_mb=64) as decoded:
        assert len(decoded) == CATS + DOGS
    assert len(_entries(cache)) == 1
