"""Upload a local ImageFolder tree (`DIR/{label}/{image}`) to an S3 prefix (`visiontune dataset push`, the tests)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from visiontune.imagefolder import label_of
from visiontune.store import ArtifactStore


@dataclass(frozen=True)
class UploadPlan:
    files: list[tuple[Path, str]]  # (local path, key)
    labels: dict[str, int]  # images per label
    skipped: list[Path]  # not an image by suffix, or not inside a label folder

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p, _ in self.files)


def plan_upload(root: Path, prefix: str) -> UploadPlan:
    """Which files go where. Decoding is the trainer's job; here only the layout is checked."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    files: list[tuple[Path, str]] = []
    labels: dict[str, int] = {}
    skipped: list[Path] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        # Hidden files and folders (.DS_Store, .git/) are no part of the dataset: not even reported as skipped.
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        label = label_of(rel.parts)
        if label is None:
            skipped.append(path)
            continue
        labels[label] = labels.get(label, 0) + 1
        files.append((path, f"{prefix}{rel.as_posix()}"))
    if not files:
        raise ValueError(f"{root} holds no images in label folders: expected {root}/LABEL/IMAGE")
    return UploadPlan(files, labels, skipped)


def upload(
    store: ArtifactStore, plan: UploadPlan, *, workers: int = 4, on_file: Callable[[int], None] = lambda _n: None
) -> int:
    """Upload in parallel; `on_file(bytes)` is called after each file. Returns the number uploaded."""

    def put(item: tuple[Path, str]) -> int:
        path, key = item
        store.put_file(key, path)
        return path.stat().st_size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for size in pool.map(put, plan.files):
            on_file(size)
    return len(plan.files)
