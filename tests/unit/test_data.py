"""Tests of the datasets package without S3: splitting, decoding, warnings, the decoded set and its cache."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_service.datasets.cache import materialize
from trainer_service.datasets.listing import DatasetError, ImageItem
from trainer_service.datasets.splits import count_labels, label_warnings, stratified_split
from visiontune.preprocessing import PREPROCESSING, decode_image, preprocessing

RED = (220, 20, 30)
BLUE = (10, 40, 230)


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (24, 20), mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def _close(tensor: torch.Tensor, color: tuple[int, ...], tolerance: int = 8) -> bool:
    mean = tensor.double().mean(dim=(1, 2))
    return bool((mean - torch.tensor(color, dtype=torch.double)).abs().max() <= tolerance)


# -- stratified_split -------------------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_complete() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 7 + [3] * 2 + [4]
    train, val = stratified_split(labels, 0.2, seed=1)
    assert sorted(train + val) == list(range(len(labels)))
    assert not set(train) & set(val)
    assert train == sorted(train)
    assert val == sorted(val)
    val_counts = np.bincount([labels[i] for i in val], minlength=5).tolist()
    # 0.2 * 50 = 10, 0.2 * 30 = 6, 0.2 * 7 = 1.4 -> 1, 0.2 * 2 = 0.4 -> at least 1, a single image stays in train.
    assert val_counts == [10, 6, 1, 1, 0]


def test_split_rounds_half_up_and_keeps_one_for_training() -> None:
    _, val = stratified_split([0] * 5 + [1] * 5, 0.3, seed=0)  # 1.5 -> 2 per label
    assert len(val) == 4
    _, val = stratified_split([0] * 3 + [1] * 3, 0.9, seed=0)  # 2.7 -> 3, capped at n - 1 = 2
    assert len(val) == 4


def test_split_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    labels = [i % 3 for i in range(300)]
    assert stratified_split(labels, 0.2, seed=7) == stratified_split(labels, 0.2, seed=7)
    assert stratified_split(labels, 0.2, seed=7)[1] != stratified_split(labels, 0.2, seed=8)[1]


def test_split_of_one_label_does_not_depend_on_the_others() -> None:
    base = [0] * 40 + [1] * 40
    _, val = stratified_split(base, 0.25, seed=3)
    _, val_more = stratified_split([*base, 2, 2, 2, 2], 0.25, seed=3)
    assert [i for i in val_more if i < 80] == val


def test_split_edge_cases() -> None:
    assert stratified_split([0, 0, 1, 1], 0.0, seed=0) == ([0, 1, 2, 3], [])
    assert stratified_split([], 0.2, seed=0) == ([], [])
    assert stratified_split([0, 1], 0.5, seed=0) == ([0, 1], [])  # single images stay in training
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="validation fraction"):
            stratified_split([0, 1], bad, seed=0)


# -- decode_image -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("GIF", {}), ("TIFF", {})],
)
def test_decode_common_formats(fmt: str, options: dict[str, object]) -> None:
    tensor = decode_image(_encode(_solid(RED), fmt, **options), 16)
    assert tensor is not None
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (3, 16, 16)
    assert _close(tensor, RED, tolerance=12 if fmt == "GIF" else 8)


def test_decode_resizes_straight_to_a_square() -> None:
    wide = _solid(BLUE, size=(64, 16))
    for size in (16, 32, 48):
        tensor = decode_image(_encode(wide, "PNG"), size)
        assert tensor is not None
        assert tuple(tensor.shape) == (3, size, size)


def test_decode_large_jpeg_is_drafted_and_reduced_yet_correct() -> None:
    # Left half red, right half blue, 1600 x 1200: decoded at a fraction of its size, the halves survive.
    img = Image.new("RGB", (1600, 1200), RED)
    img.paste(Image.new("RGB", (800, 1200), BLUE), (800, 0))
    tensor = decode_image(_encode(img, "JPEG", quality=90), 32)
    assert tensor is not None
    assert tuple(tensor.shape) == (3, 32, 32)
    assert _close(tensor[:, :, :14], RED)
    assert _close(tensor[:, :, 18:], BLUE)


def test_decode_greyscale_palette_rgba_and_la() -> None:
    grey = decode_image(_encode(Image.new("L", (20, 20), 77), "PNG"), 16)
    assert grey is not None
    assert _close(grey, (77, 77, 77), tolerance=0)

    palette = decode_image(_encode(_solid(RED).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), 16)
    assert palette is not None
    assert _close(palette, RED, tolerance=4)

    # Alpha is dropped, not composited: a half-transparent red stays red.
    rgba = Image.new("RGBA", (20, 20), (*RED, 128))
    decoded = decode_image(_encode(rgba, "PNG"), 16)
    assert decoded is not None
    assert _close(decoded, RED, tolerance=0)

    la = decode_image(_encode(Image.new("LA", (40, 40), (90, 10)), "PNG"), 16)
    assert la is not None
    assert _close(la, (90, 90, 90), tolerance=0)


def test_decode_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (24, 24), (0, 255, 255, 0))  # pure red in CMYK
    tensor = decode_image(_encode(cmyk, "JPEG", quality=95), 16)
    assert tensor is not None
    assert _close(tensor, (255, 0, 0), tolerance=10)


def test_decode_16_bit_png_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    assert img.mode == "I;16"
    tensor = decode_image(_encode(img, "PNG"), 16)
    assert tensor is not None
    assert _close(tensor, (40000 >> 8,) * 3, tolerance=0)


def test_decode_applies_exif_orientation() -> None:
    # Stored: left half red, right half blue (32 x 16). Orientation 6 = "rotate 90° clockwise to view":
    # upright, the left half is on top.
    img = Image.new("RGB", (32, 16), RED)
    img.paste(Image.new("RGB", (16, 16), BLUE), (16, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    tensor = decode_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()), 16)
    assert tensor is not None
    assert _close(tensor[:, :6, :], RED)
    assert _close(tensor[:, 10:, :], BLUE)
    plain = decode_image(_encode(img, "JPEG", quality=95), 16)
    assert plain is not None
    assert _close(plain[:, :, :6], RED)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_bytes_decode_to_none() -> None:
    jpeg = _encode(_solid(RED, size=(64, 64)), "JPEG")
    png = _encode(_solid(RED, size=(64, 64)), "PNG")
    bad = {
        "empty": b"",
        "text": b"label,file\ncat,1.jpg\n",
        "random": os.urandom(4096),
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "truncated png": png[: len(png) // 2],
        "jpeg header only": jpeg[:20],
        "bomb": _png_header_only(100_000, 100_000),  # 10 gigapixels announced in 60 bytes
    }
    for name, data in bad.items():
        assert decode_image(data, 16) is None, name


def test_pixel_limit_is_a_parameter() -> None:
    png = _encode(_solid(RED, size=(64, 64)), "PNG")
    assert decode_image(png, 16, max_pixels=64 * 64) is not None
    assert decode_image(png, 16, max_pixels=64 * 64 - 1) is None


def test_preprocessing_record() -> None:
    record = preprocessing(224)
    assert record["size"] == 224
    assert record["resize"] == "bilinear"
    assert record["mode"] == "RGB"
    assert "size" not in PREPROCESSING


# -- warnings ---------------------------------------------------------------------------------------------


def test_label_warnings_one_line_per_small_label() -> None:
    lines = label_warnings({"cat": 25, "dog": 5, "owl": 40}, {"cat": 20, "dog": 2, "owl": 3})
    assert len(lines) == 2
    assert lines[0].startswith("label 'dog'")
    assert "5 training" in lines[0]
    assert "2 validation" in lines[0]
    assert lines[1].startswith("label 'owl'")
    assert "training" not in lines[1]
    assert "3 validation" in lines[1]
    assert all("\n" not in line for line in lines)
    assert label_warnings({"a": 20}, {"a": 15}) == []
    assert label_warnings({"a": 3}, {"a": 3}, min_train=3, min_val=3) == []
    assert len(label_warnings({"a": 30}, {})) == 1  # no validation images at all


def test_count_labels_includes_empty_labels() -> None:
    assert count_labels([0, 2, 2], ["a", "b", "c"]) == {"a": 1, "b": 0, "c": 2}


# -- materialize on an in-memory object source ------------------------------------------------------------


class DictReader:
    """Objects from a dict; counts reads. Stands in for an ArtifactStore (the tests with S3 use a real one)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.reads = 0

    def get_bytes(self, key: str) -> bytes:
        self.reads += 1
        return self.objects[key]


def _source(n: int = 8) -> tuple[DictReader, list[ImageItem]]:
    objects: dict[str, bytes] = {}
    items = []
    for i in range(n):
        key = f"ds/{'ab'[i % 2]}/{i}.png"
        objects[key] = _encode(_solid((i * 20, 100, 200 - i * 20)), "PNG")
        items.append(ImageItem(key, i % 2, len(objects[key]), f"etag{i}"))
    return DictReader(objects), items


def test_decoded_set_pickles_and_reopens_lazily(tmp_path: Path) -> None:
    reader, items = _source()
    with materialize(reader, items, 16, tmp_path, cache_max_mb=16, workers=2) as decoded:
        assert len(decoded) == 8
        assert decoded.images.shape == (8, 3, 16, 16)
        assert decoded.labels.tolist() == [0, 1] * 4

        copy = pickle.loads(pickle.dumps(decoded))
        assert copy._images is None  # reopened lazily
        assert np.array_equal(copy.images[[1, 3, 5]], decoded.images[[1, 3, 5]])
        path = decoded.path
        copy.close()  # a copy never deletes the file: it belongs to the process that made it
        assert path.exists()
    assert not path.exists()  # the private link goes with the set; the cache entry stays
    assert len(list((tmp_path / "decoded").iterdir())) == 1


def test_all_corrupt_is_a_dataset_error_and_leaves_nothing(tmp_path: Path) -> None:
    reader = DictReader({"ds/a/1.jpg": b"nope", "ds/b/2.jpg": b"nope"})
    items = [ImageItem("ds/a/1.jpg", 0, 4, "e1"), ImageItem("ds/b/2.jpg", 1, 4, "e2")]
    for bound in (0, 16):
        with pytest.raises(DatasetError, match="none of the 2 images"):
            materialize(reader, items, 16, tmp_path, cache_max_mb=bound)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(dead.stdout)
    (tmp_path / "decoded" / f".abc.{pid}.beef.tmp").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / f"{pid}-cafe.u8").write_bytes(b"x")
    mine = tmp_path / "private" / f"{os.getpid()}-f00d.u8"
    mine.write_bytes(b"x")
    reader, items = _source(2)
    materialize(reader, items, 16, tmp_path, cache_max_mb=16).close()
    assert not (tmp_path / "decoded" / f".abc.{pid}.beef.tmp").exists()
    assert not (tmp_path / "private" / f"{pid}-cafe.u8").exists()
    assert mine.exists()  # a live process's file stays


def test_a_damaged_cache_entry_is_discarded_and_rebuilt(tmp_path: Path) -> None:
    reader, items = _source(4)
    with materialize(reader, items, 16, tmp_path, cache_max_mb=16) as first:
        expected = np.array(first.images)
    (entry,) = (tmp_path / "decoded").iterdir()
    with open(entry / "images.u8", "r+b") as f:  # torn by something outside our control
        f.truncate(100)
    with materialize(reader, items, 16, tmp_path, cache_max_mb=16) as second:
        assert not second.from_cache
        assert np.array_equal(second.images, expected)
    assert reader.reads == 8
    with materialize(reader, items, 16, tmp_path, cache_max_mb=16) as third:
        assert third.from_cache
    (entry / "meta.json").write_text("[1, 2")
    with materialize(reader, items, 16, tmp_path, cache_max_mb=16) as fourth:
        assert not fourth.from_cache
    assert reader.reads == 12
    assert not list(tmp_path.rglob("*.tmp"))
