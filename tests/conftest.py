"""Shared fixtures: one real S3 server per test session, a fresh bucket per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3ServerProcess]:
    """A real S3 server (SeaweedFS, or MinIO where installed) on a free loopback port, random credentials."""
    server = S3ServerProcess(
        tmp_path_factory.mktemp("s3"),
        access_key="test-" + secrets.token_hex(4),
        secret_key=secrets.token_urlsafe(24),
    )
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(s3_server: S3ServerProcess) -> ArtifactStore:
    """An ArtifactStore on a bucket of its own, created empty for this test."""
    artifact_store = ArtifactStore.connect(s3_server.settings("test-" + secrets.token_hex(6)))
    artifact_store.ensure_bucket()
    return artifact_store
