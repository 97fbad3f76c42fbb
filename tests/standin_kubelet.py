"""The tests' one fake: a stand-in kubelet for the real control plane of tests/kube_cluster.py.

There is no container runtime on the test machines (and no image can be pulled), so nodes cannot be real. The
stand-in registers a Node (with the CPU, memory and GPUs it is told to have), keeps it Ready, and for every pod the
REAL kube-scheduler binds to it runs each container's `command` + `args` as a local process — this machine is the
image — with the environment a kubelet would give it: its own plus the container's `env` (values, and `valueFrom`
secretKeyRef / configMapKeyRef / fieldRef) and `envFrom`. It writes pod status as a kubelet does (Running, then
Succeeded or Failed with the exit code — 128 + N for signal N — the reason and the termination message), so the real
Job controller drives Job status from it. What it cannot do, and does instead:
- it mounts nothing: an emptyDir's mountPath, and the container's terminationMessagePath, are replaced by a
  per-pod directory / per-container file wherever they appear as a path in argv or env values;
- it pulls nothing: images in `images` are "present", any other gives ErrImagePull then ImagePullBackOff;
- it serves no logs (`read_namespaced_pod_log` has nothing): the termination message carries the last words, with
  FallbackToLogsOnError taking the output's tail, as a kubelet does.
Test controls: `kill` (a signal to a container), `oom_kill` (as the kernel's OOM killer looks), `evict` (as a kubelet
under node pressure does).
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
_TAIL_LINES = 80
_TAIL_BYTES = 2048


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Container:
    pod: str
    namespace: str
    name: str
    proc: subprocess.Popen[bytes]
    output: Path
    message_file: Path
    policy: str
    started_at: str
    reason_override: str | None = None
    pod_reason: tuple[str, str] | None = None  # (reason, message) for the pod, e.g. Evicted


@dataclass
class _Pod:
    uid: str
    containers: list[_Container] = field(default_factory=list)
    dir: Path | None = None
    stopping: bool = False


class StandInKubelet:
    """Registers `node` and runs the pods bound to it as local processes (see the module's docstring)."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        node: str = "standin-node",
        images: frozenset[str] | set[str] = frozenset(),
        gpus: int = 0,
        gpu_resource: str = "nvidia.com/gpu",
        cpu: str = "16",
        memory: str = "64Gi",
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
    ) -> None:
        self._core = k8s.CoreV1Api(api)
        self.node = node
        self.images = set(images)
        self._capacity = {"cpu": cpu, "memory": memory, "pods": "110", gpu_resource: str(gpus)}
        self._labels = {"kubernetes.io/hostname": node, **(labels or {})}
        self._taints = taints or []
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = k8s_watch.Watch()
        self._threads: list[threading.Thread] = []
        self._root = Path(tempfile.mkdtemp(prefix="standin-kubelet-"))

    # -- lifecycle

    def start(self) -> StandInKubelet:
        body = {
            "metadata": {"name": self.node, "labels": self._labels},
            "spec": {"taints": self._taints} if self._taints else {},
        }
        self._core.create_node(body)
        self._report_node()
        for target in (self._heartbeat, self._watch_pods):
            thread = threading.Thread(target=target, daemon=True, name=f"standin-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()
        with self._lock:
            containers = [c for pod in self._pods.values() for c in pod.containers]
        for c in containers:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        try:
            self._core.delete_node(self.node)
        except ApiException as err:
            if err.status != 404:
                raise
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> StandInKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _report_node(self) -> None:
        now = _now()
        conditions = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "stand-in kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ]
        status = {
            "capacity": self._capacity,
            "allocatable": self._capacity,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "nodeInfo": {
                "kubeletVersion": "v1.20.2-standin",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "standin://0",
                "kernelVersion": os.uname().release,
                "osImage": "stand-in",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self._core.patch_node_status(self.node, {"status": status})

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._report_node()
            except (ApiException, OSError) as err:
                log.warning("stand-in node heartbeat failed: %s", err)

    # -- pods

    def _watch_pods(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    listing = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}")
                    version = listing.metadata.resource_version
                    for pod in listing.items:
                        self._on_pod(self._core.api_client.sanitize_for_serialization(pod))
                for event in self._watch.stream(
                    self._core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node}",
                    resource_version=version,
                    timeout_seconds=30,
                    deserialize=False,
                ):
                    if self._stop.is_set():
                        return
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "DELETED":
                        self._on_pod(obj)
            except ApiException as err:
                if err.status == 410:
                    version = ""
                    continue
                if not self._stop.is_set():
                    log.warning("stand-in pod watch failed: %s", err)
                    self._stop.wait(0.5)
            except Exception as err:  # noqa: BLE001 - a test fake: keep watching, say why
                if not self._stop.is_set():
                    log.warning("stand-in pod watch failed: %s", err)
                    self._stop.wait(0.5)

    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            known = self._pods.get(key)
            if known is not None and known.uid != meta["uid"]:
                known = None
            if known is None:
                if meta.get("deletionTimestamp"):
                    pass
                elif pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                else:
                    known = self._pods[key] = _Pod(meta["uid"])
                    threading.Thread(target=self._run_pod, args=(pod, known), daemon=True).start()
                    return
            if meta.get("deletionTimestamp") and (known is None or not known.stopping):
                if known is not None:
                    known.stopping = True
                grace = int(pod["spec"].get("terminationGracePeriodSeconds") or 30)
                threading.Thread(target=self._delete_pod, args=(key, known, grace), daemon=True).start()

    def _run_pod(self, pod: dict[str, Any], state: _Pod) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name = meta["namespace"], meta["name"]
        state.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self._root))
        missing = [c["image"] for c in spec["containers"] if c["image"] not in self.images]
        if missing:
            self._image_pull_failure(ns, name, spec, missing[0])
            return
        try:
            volumes = {v["name"]: v for v in spec.get("volumes") or []}
            started = _now()
            statuses = []
            for c in spec["containers"]:
                state.containers.append(self._start_container(pod, c, volumes, state.dir, started))
                statuses.append(
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": f"standin://{c['image']}",
                        "ready": True,
                        "restartCount": 0,
                        "started": True,
                        "state": {"running": {"startedAt": started}},
                    }
                )
        except (OSError, ApiException, KeyError) as err:
            self._patch_status(ns, name, {"phase": "Failed", "reason": "StandInError", "message": str(err)})
            return
        self._patch_status(
            ns,
            name,
            {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": started,
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": started}
                    for t in ("Initialized", "Ready", "ContainersReady")
                ],
                "containerStatuses": statuses,
            },
        )
        for c in state.containers:
            threading.Thread(target=self._wait_container, args=(state, c), daemon=True).start()

    def _image_pull_failure(self, ns: str, name: str, spec: dict[str, Any], image: str) -> None:
        started = _now()
        for reason in ("ErrImagePull", "ImagePullBackOff"):
            message = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": not found'
                if reason == "ErrImagePull"
                else f'Back-off pulling image "{image}"'
            )
            statuses = [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
                for c in spec["containers"]
            ]
            self._patch_status(
                ns,
                name,
                {"phase": "Pending", "hostIP": "127.0.0.1", "startTime": started, "containerStatuses": statuses},
            )
            if self._stop.wait(1.0):
                return

    def _start_container(
        self, pod: dict[str, Any], c: dict[str, Any], volumes: dict[str, Any], pod_dir: Path, started: str
    ) -> _Container:
        meta = pod["metadata"]
        rewrites: dict[str, str] = {}
        for mount in c.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            if "emptyDir" in volume:
                local = pod_dir / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                rewrites[mount["mountPath"]] = str(local)
        message_path = c.get("terminationMessagePath") or "/dev/termination-log"
        message_file = pod_dir / f"{c['name']}.termination-log"
        message_file.touch()
        rewrites[message_path] = str(message_file)
        # The image's environment (this machine's) as it is; the pod's own values with their paths rewritten.
        env = {**os.environ, **{k: _rewrite(v, rewrites) for k, v in self._environment(meta, c).items()}}
        argv = [_rewrite(a, rewrites) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
        output = pod_dir / f"{c['name']}.out"
        with open(output, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=c.get("workingDir") or None,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return _Container(
            meta["name"],
            meta["namespace"],
            c["name"],
            proc,
            output,
            message_file,
            c.get("terminationMessagePolicy") or "File",
            started,
        )

    def _environment(self, meta: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
        ns = meta["namespace"]
        env: dict[str, str] = {}
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._core.read_namespaced_secret(source["secretRef"]["name"], ns).data or {}
                env.update({prefix + k: base64.b64decode(v).decode() for k, v in data.items()})
            if "configMapRef" in source:
                data = self._core.read_namespaced_config_map(source["configMapRef"]["name"], ns).data or {}
                env.update({prefix + k: v for k, v in data.items()})
        for item in c.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item.get("valueFrom", {})
            if "secretKeyRef" in ref:
                data = self._core.read_namespaced_secret(ref["secretKeyRef"]["name"], ns).data or {}
                env[item["name"]] = base64.b64decode(data[ref["secretKeyRef"]["key"]]).decode()
            elif "configMapKeyRef" in ref:
                data = self._core.read_namespaced_config_map(ref["configMapKeyRef"]["name"], ns).data or {}
                env[item["name"]] = data[ref["configMapKeyRef"]["key"]]
            elif "fieldRef" in ref:
                fields = {"metadata.name": meta["name"], "metadata.namespace": ns, "spec.nodeName": self.node}
                env[item["name"]] = fields.get(ref["fieldRef"]["fieldPath"], "")
        return env

    def _wait_container(self, state: _Pod, c: _Container) -> None:
        code = c.proc.wait()
        exit_code = 128 - code if code < 0 else code
        message = c.message_file.read_text(errors="replace")[:4096]
        if not message.strip() and exit_code != 0 and c.policy == "FallbackToLogsOnError":
            message = _tail(c.output)
        reason = c.reason_override or ("Completed" if exit_code == 0 else "Error")
        status: dict[str, Any] = {
            "phase": "Succeeded" if exit_code == 0 and c.pod_reason is None else "Failed",
            "conditions": [
                {"type": t, "status": "False", "lastTransitionTime": _now()} for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {
                    "name": c.name,
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": reason,
                            "message": message,
                            "startedAt": c.started_at,
                            "finishedAt": _now(),
                        }
                    },
                }
            ],
        }
        if c.pod_reason is not None:
            status["reason"], status["message"] = c.pod_reason
        try:
            self._patch_status(c.namespace, c.pod, status)
        except ApiException as err:
            if err.status != 404:
                raise

    def _delete_pod(self, key: tuple[str, str], state: _Pod | None, grace: int) -> None:
        if state is not None:
            for c in state.containers:
                if c.proc.poll() is None:
                    os.killpg(c.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for c in state.containers:
                try:
                    c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                    c.proc.wait()
            time.sleep(0.3)  # let the terminated status land first, as a kubelet reports before it deletes
        try:
            self._core.delete_namespaced_pod(key[1], key[0], grace_period_seconds=0)
        except ApiException as err:
            if err.status != 404:
                log.warning("stand-in could not delete pod %s/%s: %s", key[0], key[1], err)
        with self._lock:
            if self._pods.get(key) is state:
                self._pods.pop(key, None)

    def _patch_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self._core.patch_namespaced_pod_status(name, ns, {"status": status})

    # -- test controls

    def _container(self, pod: str, namespace: str) -> _Container:
        deadline = time.monotonic() + 30
        while True:
            with self._lock:
                state = self._pods.get((namespace, pod))
                if state is not None and state.containers:
                    return state.containers[0]
            if time.monotonic() > deadline:
                raise LookupError(f"no running container of pod {namespace}/{pod} on {self.node}")
            time.sleep(0.1)

    def kill(self, pod: str, namespace: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the container's process group: the pod fails with exit code 128 + sig."""
        os.killpg(self._container(pod, namespace).proc.pid, sig)

    def oom_kill(self, pod: str, namespace: str) -> None:
        container = self._container(pod, namespace)
        container.reason_override = "OOMKilled"
        os.killpg(container.proc.pid, signal.SIGKILL)

    def evict(self, pod: str, namespace: str, message: str = "The node was low on resource: memory.") -> None:
        container = self._container(pod, namespace)
        container.pod_reason = ("Evicted", message)
        os.killpg(container.proc.pid, signal.SIGKILL)

    def running_pods(self) -> list[tuple[str, str]]:
        with self._lock:
            return [key for key, pod in self._pods.items() if any(c.proc.poll() is None for c in pod.containers)]

    def output(self, pod: str, namespace: str) -> str:
        return self._container(pod, namespace).output.read_text(errors="replace")


def _rewrite(value: str, rewrites: dict[str, str]) -> str:
    for path, local in rewrites.items():
        if value == path or value.startswith(path.rstrip("/") + "/"):
            return local + value[len(path) :]
        if f"={path}" in value:  # --flag=/path
            value = value.replace(f"={path}", f"={local}")
    return value


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
    except OSError:
        return ""
    return "\n".join(lines)[-_TAIL_BYTES:]
