"""Shared fixtures: one real S3 server, PostgreSQL and Kubernetes control plane per test session (each started when a
test first needs it), a fresh bucket / database / namespace per test."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client as k8s
from visiontune.devstack.postgres import PostgresProcess
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore

from tests.kube_cluster import KubeControlPlane
from tests.standin_kubelet import StandInKubelet


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


@pytest.fixture(scope="session")
def kube_control_plane() -> Iterator[KubeControlPlane]:
    """A real control plane (etcd, kube-apiserver, controller-manager, scheduler) for the session, started lazily."""
    with KubeControlPlane() as plane:
        print(f"kube control plane started in {plane.started_in_s:.1f} s")
        yield plane


@dataclass
class Kube:
    """A test's view of the control plane: a namespace of its own and a stand-in node (see tests/standin_kubelet.py)."""

    plane: KubeControlPlane
    api_client: k8s.ApiClient
    namespace: str
    kubelet: StandInKubelet

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig


STANDIN_IMAGES = frozenset({"visiontune/trainer:test"})


@pytest.fixture
def kube(kube_control_plane: KubeControlPlane, request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A fresh namespace (deleted after) and a stand-in node with 4 GPUs that has `visiontune/trainer:test`; a test
    changes the node with `@pytest.mark.standin(gpus=..., images=...)`."""
    marker = request.node.get_closest_marker("standin")
    options = {"gpus": 4, "images": STANDIN_IMAGES, **(marker.kwargs if marker else {})}
    namespace = "t-" + secrets.token_hex(5)
    with kube_control_plane.api_client() as api:
        core = k8s.CoreV1Api(api)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        kubelet = StandInKubelet(api, node=f"node-{namespace}", **options).start()
        try:
            yield Kube(kube_control_plane, api, namespace, kubelet)
        finally:
            kubelet.stop()
            core.delete_namespace(namespace)
