"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager (the Job controller,
the garbage collector, the node lifecycle controller) and kube-scheduler, on free loopback ports in a temp directory.

The binaries are built once from Debian's `kubernetes` source package by `make kube-control-plane`
(scripts/build_kube_control_plane.sh) and cached outside the repo; a missing binary is an error naming that target,
never a skip. Nodes are the tests' business: see tests/standin_kubelet.py.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from visiontune.devstack.lifetime import die_with_parent, log_tail
from visiontune.devstack.ports import free_port

KUBE_VERSION = "v1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


def binary_dir() -> Path:
    """Where `make kube-control-plane` leaves the binaries (the build script's cache)."""
    explicit = os.environ.get("VISIONTUNE_KUBE_CACHE")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "visiontune" / f"kube-{KUBE_VERSION}"


class ControlPlaneError(RuntimeError):
    pass


class KubeControlPlane:
    """Start with `start()` (or as a context manager); `kubeconfig` is an admin's; `stop()` ends every process."""

    def __init__(self) -> None:
        missing = [b for b in BINARIES if not (binary_dir() / b).exists()]
        if missing:
            raise ControlPlaneError(
                f"{', '.join(missing)} not found in {binary_dir()}: run `make kube-control-plane` (builds them once "
                "from Debian's kubernetes source package, about 9 minutes)"
            )
        if shutil.which("etcd") is None:
            raise ControlPlaneError("etcd not found: run `make kube-control-plane` (installs etcd-server)")
        self.root = Path(tempfile.mkdtemp(prefix="visiontune-kube-"))
        self.token = secrets.token_urlsafe(24)
        self.port = 0
        self.kubeconfig = self.root / "kubeconfig"
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.started_in_s = 0.0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> KubeControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 90.0) -> None:
        began = time.monotonic()
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - began

    def _start(self, timeout_s: float) -> None:
        root, bins = self.root, binary_dir()
        etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                "etcd", "--name", "t", "--data-dir", str(root / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"t=http://127.0.0.1:{peer_port}",
            ],
        )  # fmt: skip
        # The service-account signing key pair.
        subprocess.run(["openssl", "genrsa", "-out", str(root / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(root / "sa.key"), "-pubout", "-out", str(root / "sa.pub")],
            check=True,
            capture_output=True,
        )
        (root / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self.port = free_port()
        self._spawn(
            "kube-apiserver",
            [
                str(bins / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
                f"--cert-dir={root / 'certs'}", "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={root / 'sa.pub'}",
                f"--service-account-signing-key-file={root / 'sa.key'}", "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=Node,RBAC", f"--token-auth-file={root / 'tokens.csv'}",
                "--insecure-port=0",
            ],
        )  # fmt: skip
        ca = root / "certs" / "apiserver.crt"
        self._wait_ready(ca, time.monotonic() + timeout_s)
        self._write_kubeconfig(ca)
        self._spawn(
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                f"--service-account-private-key-file={root / 'sa.key'}", f"--root-ca-file={ca}",
                "--use-service-account-credentials=false", "--port=0", "--secure-port=0",
                # Pods of a node that stops reporting are evicted after this long (the stand-in keeps reporting).
                "--node-monitor-grace-period=40s",
            ],
        )  # fmt: skip
        self._spawn(
            "kube-scheduler",
            [
                str(bins / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                "--port=0", "--secure-port=0",
                f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            ],
        )  # fmt: skip
        self._wait_for_default_service_account(time.monotonic() + timeout_s)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(os.getpid(), signal.SIGKILL),
            )  # fmt: skip
        self._procs.append((name, proc, log_path))

    def _check_alive(self) -> None:
        for name, proc, log_path in self._procs:
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}: {log_tail(log_path)}")

    def _wait_ready(self, ca: Path, deadline: float) -> None:
        while True:
            self._check_alive()
            if ca.exists():
                request = urllib.request.Request(
                    f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
                )
                try:
                    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=2):
                        return
                except (OSError, ssl.SSLError):
                    pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver not ready: {log_tail(self.root / 'kube-apiserver.log')}")
            time.sleep(0.3)

    def _write_kubeconfig(self, ca: Path) -> None:
        ca_data = base64.b64encode(ca.read_bytes()).decode()
        self.kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.server}", certificate-authority-data: "{ca_data}"}}
users:
- name: admin
  user: {{token: "{self.token}"}}
contexts:
- name: test
  context: {{cluster: test, user: admin}}
current-context: test
"""
        )

    def _wait_for_default_service_account(self, deadline: float) -> None:
        """The controller-manager is up once it has made `default`'s ServiceAccount (pods need one to be admitted)."""
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            while True:
                self._check_alive()
                if any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account("default").items):
                    return
                if time.monotonic() > deadline:
                    raise ControlPlaneError(
                        f"kube-controller-manager not ready: {log_tail(self.root / 'kube-controller-manager.log')}"
                    )
                time.sleep(0.3)

    def api_client(self) -> k8s.ApiClient:
        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    def stop(self) -> None:
        for _, proc, _ in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
