"""Fixtures shared by the integration tests that run a real trainer (the S3 fixtures are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.trainer_helpers import Trainer, start_trainer, upload_shapes
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore


@pytest.fixture
def shapes(store: ArtifactStore, tmp_path: Path) -> ArtifactStore:
    """The test's bucket with the tiny shapes dataset uploaded."""
    upload_shapes(store, tmp_path / "shapes")
    return store


@pytest.fixture
def trainer(shapes: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path) -> Iterator[Trainer]:
    """A trainer of the test's own on the shapes bucket (one job at a time)."""
    (tmp_path / "state").mkdir()
    running = start_trainer(shapes, s3_server, tmp_path / "state")
    yield running
    running.stop()
