"""Shared fixtures: one real S3 server and one real PostgreSQL per test session, a fresh bucket / database per test."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from visiontune.devstack.postgres import PostgresProcess
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProcess]:
    """A real PostgreSQL (Debian's `postgresql` package, which `.ci/run` installs) on a free loopback port.

    Its directory is a fresh one under /tmp rather than pytest's: when the tests run as root the server runs as
    the `postgres` user, which cannot enter pytest's private temp root.
    """
    root = Path(tempfile.mkdtemp(prefix="visiontune-pg-"))
    server = PostgresProcess(root)
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresProcess) -> str:
    """The URL of a database of its own, created empty for this test."""
    return postgres_server.create_database("t_" + secrets.token_hex(6))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store's database, once per backend: an embedded SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
