"""Which model versions are live, with what traffic weight, and which one answers a request.

A `Deployment` is a model version loaded into Triton as its own Triton model, so deploying a new version
never touches the one serving traffic: the new version joins the routing table only once Triton reports
it ready, and an undeployed version leaves the routing table first, then is unloaded once the requests
it is answering have finished (`Lease`). That is what makes a hot swap lose no request.

Deployments are recorded in the artifact bucket (`deployments/{model}/{version}.json`: the deploy
parameters, not the state), so a restarted service, or another replica on the same bucket, restores them.
"""

from __future__ import annotations

import enum
import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from visiontune.errors import NotFound, Unavailable, VisionTuneError
from visiontune.names import ModelVersionName, parse_model_version_name
from visiontune.store import ArtifactStore, ObjectNotFound

from inference_service.served_model import ServedModel

RECORD_PREFIX: Final = "deployments/"

DEFAULT_TRAFFIC_WEIGHT: Final = 100
MAX_TRAFFIC_WEIGHT: Final = 10_000
DEFAULT_MAX_BATCH_SIZE: Final = 32
MAX_BATCH_SIZE_LIMIT: Final = 1024
DEFAULT_MAX_QUEUE_DELAY_S: Final = 0.002
MAX_QUEUE_DELAY_S: Final = 1.0
DEFAULT_INSTANCE_COUNT: Final = 1
MAX_INSTANCE_COUNT: Final = 16


class DeploymentState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class DeploySettings:
    """What a client chooses when deploying a version (validated ranges: see the constants above)."""

    traffic_weight: int = DEFAULT_TRAFFIC_WEIGHT
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_s: float = DEFAULT_MAX_QUEUE_DELAY_S
    instance_count: int = DEFAULT_INSTANCE_COUNT

    def batching(self) -> tuple[int, float, int]:
        """The settings that need Triton to reload the model when they change (the weight does not)."""
        return self.max_batch_size, self.max_queue_delay_s, self.instance_count


@dataclass
class Deployment:
    name: ModelVersionName
    settings: DeploySettings
    triton_model: str
    device: str  # "cpu" or "cuda"
    deploy_time: datetime
    state: DeploymentState = DeploymentState.LOADING
    served: ServedModel | None = None  # set once the manifest has been read
    error: str = ""
    in_flight: int = 0
    drained: threading.Condition = field(default_factory=lambda: threading.Condition(threading.Lock()))

    def snapshot(self) -> Deployment:
        """A copy safe to hand out of the registry's lock (the condition is shared, never waited on)."""
        return replace(self)


class NoLiveVersion(VisionTuneError):
    """No version of the model can answer: none deployed (`deployed` False) or none ready yet."""

    deployed: bool


class NotDeployed(NoLiveVersion, NotFound):
    """Nothing is deployed to answer: the client must deploy first."""

    deployed = False


class NotReady(NoLiveVersion, Unavailable):
    """Versions are deployed but none is ready to answer (loading, failed, or at weight 0): try again later."""

    deployed = True


class DeploymentRegistry:
    """The routing table: deployments by name, weighted choice among a model's ready versions."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._deployments: dict[ModelVersionName, Deployment] = {}
        self._rng = rng or random.Random()

    def get(self, name: ModelVersionName) -> Deployment | None:
        with self._lock:
            found = self._deployments.get(name)
            return found.snapshot() if found else None

    def put(self, deployment: Deployment) -> None:
        with self._lock:
            self._deployments[deployment.name] = deployment

    def update(self, name: ModelVersionName, **changes: Any) -> Deployment:
        with self._lock:
            current = self._deployments[name]
            for key, value in changes.items():
                setattr(current, key, value)
            return current.snapshot()

    def remove(self, name: ModelVersionName) -> Deployment | None:
        """Take `name` out of the routing table; requests already holding a lease finish normally."""
        with self._lock:
            return self._deployments.pop(name, None)

    def list(self, model: str | None = None) -> list[Deployment]:
        with self._lock:
            found = [d.snapshot() for d in self._deployments.values() if model is None or d.name.model == model]
        return sorted(found, key=lambda d: (d.name.model, d.name.version))

    def weights(self) -> dict[tuple[str, str], int]:
        """{(model, version): traffic weight} of the ready versions (for the metrics gauges)."""
        with self._lock:
            return {
                (d.name.model, d.name.version): d.settings.traffic_weight
                for d in self._deployments.values()
                if d.state == DeploymentState.READY
            }

    def _choose(self, model: str) -> Deployment:
        versions = [d for d in self._deployments.values() if d.name.model == model]
        if not versions:
            raise NotDeployed(f"models/{model} has no deployed version; deploy one with DeployModel")
        ready = [d for d in versions if d.state == DeploymentState.READY and d.settings.traffic_weight > 0]
        if not ready:
            states = ", ".join(
                f"{d.name.version}: {d.state.value}"
                + (f" (weight {d.settings.traffic_weight})" if d.state == DeploymentState.READY else "")
                for d in versions
            )
            raise NotReady(f"models/{model} has no ready version with traffic weight > 0 ({states})")
        total = sum(d.settings.traffic_weight for d in ready)
        pick = self._rng.uniform(0, total)
        for deployment in ready:
            pick -= deployment.settings.traffic_weight
            if pick <= 0:
                return deployment
        return ready[-1]

    @contextmanager
    def lease(self, model: str, version: str | None = None) -> Iterator[Deployment]:
        """Route one request: a ready version of `model` (weighted by traffic), or exactly `version`.
        While the lease is held the version is not unloaded. Raises NotDeployed or NotReady."""
        with self._lock:
            if version is None:
                chosen = self._choose(model)
            else:
                chosen_or_none = self._deployments.get(ModelVersionName(model, version))
                if chosen_or_none is None:
                    raise NotDeployed(f"models/{model}/versions/{version} is not deployed")
                if chosen_or_none.state != DeploymentState.READY:
                    raise NotReady(f"models/{model}/versions/{version} is {chosen_or_none.state.value}")
                chosen = chosen_or_none
            chosen.in_flight += 1
            handed_out = chosen.snapshot()
        try:
            yield handed_out
        finally:
            with chosen.drained:
                with self._lock:
                    chosen.in_flight -= 1
                    idle = chosen.in_flight == 0
                if idle:
                    chosen.drained.notify_all()

    @staticmethod
    def wait_drained(deployment: Deployment, timeout: float) -> bool:
        """Wait until no request holds a lease on `deployment` (already removed from the table)."""
        with deployment.drained:
            return deployment.drained.wait_for(lambda: deployment.in_flight == 0, timeout)


# -- records in the bucket ------------------------------------------------------------------------------


def record_key(name: ModelVersionName) -> str:
    return f"{RECORD_PREFIX}{name.model}/{name.version}.json"


def save_record(store: ArtifactStore, name: ModelVersionName, settings: DeploySettings, deploy_time: datetime) -> None:
    body = {
        "model_version": str(name),
        "traffic_weight": settings.traffic_weight,
        "max_batch_size": settings.max_batch_size,
        "max_queue_delay_s": settings.max_queue_delay_s,
        "instance_count": settings.instance_count,
        "deploy_time": deploy_time.isoformat(),
    }
    store.put_bytes(record_key(name), json.dumps(body, indent=2).encode(), "application/json")


def delete_record(store: ArtifactStore, name: ModelVersionName) -> None:
    store.delete(record_key(name))


@dataclass(frozen=True)
class SavedDeployment:
    name: ModelVersionName
    settings: DeploySettings
    deploy_time: datetime


def load_records(store: ArtifactStore) -> tuple[list[SavedDeployment], list[str]]:
    """The recorded deployments, and one problem line per record that cannot be read (skipped, kept)."""
    saved: list[SavedDeployment] = []
    problems: list[str] = []
    for info in store.list(RECORD_PREFIX, recursive=True):
        if not info.key.endswith(".json"):
            continue
        try:
            body = json.loads(store.get_bytes(info.key))
            saved.append(
                SavedDeployment(
                    name=parse_model_version_name(body["model_version"]),
                    settings=DeploySettings(
                        traffic_weight=int(body["traffic_weight"]),
                        max_batch_size=int(body["max_batch_size"]),
                        max_queue_delay_s=float(body["max_queue_delay_s"]),
                        instance_count=int(body["instance_count"]),
                    ),
                    deploy_time=datetime.fromisoformat(body["deploy_time"]),
                )
            )
        except ObjectNotFound:
            continue  # undeployed while we listed
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"{info.key}: {type(err).__name__}: {err}")
    return saved, problems


def now() -> datetime:
    return datetime.now(UTC)
