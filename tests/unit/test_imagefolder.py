"""The ImageFolder rule shared by the upload and the trainer's listing (visiontune/imagefolder.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from visiontune.devstack.dataset_upload import plan_upload
from visiontune.imagefolder import is_image_name, label_of


@pytest.mark.parametrize(
    ("parts", "label"),
    [
        (("cat", "a.jpg"), "cat"),
        (("cat", "B.JPEG"), "cat"),
        (("cat", "a.txt"), None),  # not an image by its suffix
        (("a.jpg",), None),  # not in a label folder
        (("cat", "young", "a.jpg"), None),  # too deep
        (("", "a.jpg"), None),  # an S3 key with a double slash
        ((".cat", "a.jpg"), None),
        (("cat", ".a.jpg"), None),
    ],
)
def test_label_of(parts: tuple[str, ...], label: str | None) -> None:
    assert label_of(parts) == label


def test_is_image_name_ignores_case_and_folders() -> None:
    assert is_image_name("x/y/photo.WebP")
    assert not is_image_name("photo.webp.bak")


def test_plan_upload_follows_the_rule(tmp_path: Path) -> None:
    for rel in ("cat/a.png", "cat/notes.txt", "dog/b.jpg", "dog/deep/c.jpg", "loose.jpg", ".git/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    plan = plan_upload(tmp_path, "datasets/pets/")
    assert [key for _, key in plan.files] == ["datasets/pets/cat/a.png", "datasets/pets/dog/b.jpg"]
    assert plan.labels == {"cat": 1, "dog": 1}
    # Hidden files are not reported; the others that break the rule are.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in plan.skipped) == [
        "cat/notes.txt",
        "dog/deep/c.jpg",
        "loose.jpg",
    ]
