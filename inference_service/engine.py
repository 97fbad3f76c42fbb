"""The inference engine: deploy model versions into Triton, classify images, take feedback.

Plain typed Python over a `TritonModels` client, an `ArtifactStore` and `InferenceMetrics`; the gRPC
servicer is a thin translation layer on top. Failures are `visiontune.errors` classes (InvalidRequest for bad
fields), each with the status code the client sees. One Classify request:

1. route: a ready version of the model, chosen by traffic weight (or the pinned version), leased so it
   cannot be unloaded mid-request;
2. preprocess: decode and resize every image exactly as the trainer did (the manifest's preprocessing,
   `visiontune.preprocessing`), as uint8 for a version whose network normalises (its input_format), else
   normalised float32 (versions exported before); any bad image fails the request with every bad image named;
3. infer: one Triton call per `max_batch_size` images; Triton's dynamic batcher merges concurrent requests;
4. decide: softmax, top-k, the open-set score against the manifest's threshold (or the request's);
5. record the predictions for feedback (one INSERT into the prediction store every replica shares), and the
   metrics.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import numpy as np
import torch
from visiontune.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VisionTuneError,
)
from visiontune.jpeg_on_device import DeviceJpegDecoder
from visiontune.names import ModelVersionName
from visiontune.openset import is_known, open_set_scores
from visiontune.outages import NO_WAIT
from visiontune.preprocessing import MAX_IMAGE_PIXELS, ImageRejected, center_crop, decode_hwc, normalize
from visiontune.store import ArtifactStore, ObjectNotFound, StoreError, sha256_file

from inference_service import deployments as dep
from inference_service.deployments import Deployment, DeploymentRegistry, DeploymentState, DeploySettings
from inference_service.errors import InvalidRequest
from inference_service.feedback import (
    FeedbackError,
    FeedbackResult,
    ImagePrediction,
    Outcome,
    PredictionStore,
    PredictionsUnavailable,
    RequestRecord,
)
from inference_service.metrics import VERDICT_KNOWN, VERDICT_UNKNOWN, InferenceMetrics
from inference_service.placement import Placement
from inference_service.served_model import ManifestInvalid, ServedModel, from_manifest, parse_manifest
from inference_service.triton.repository import TritonModelConfig, remove_model, triton_model_name, write_model
from inference_service.triton.server import TRITON_DATATYPES, TritonError, TritonModels

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES: Final = 64
DEFAULT_MAX_IMAGE_BYTES: Final = 16 * 1024 * 1024
DEFAULT_TOP_K: Final = 5
DRAIN_TIMEOUT_S: Final = 30.0
_REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class Limits:
    max_images: int = DEFAULT_MAX_IMAGES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ClassifyInput:
    model: str
    version: str | None  # None: split by traffic weight
    images: Sequence[bytes]
    client_ids: Sequence[str]
    top_k: int | None = None
    threshold: float | None = None
    request_id: str = ""


@dataclass(frozen=True)
class ImageResult:
    index: int
    client_id: str
    top_k: tuple[tuple[str, float], ...]
    unknown: bool
    score: float
    threshold: float


@dataclass(frozen=True)
class ClassifyOutput:
    request_id: str
    name: ModelVersionName
    results: tuple[ImageResult, ...]
    latency_s: float


class InferenceEngine:
    def __init__(
        self,
        store: ArtifactStore,
        triton: TritonModels,
        workdir: Path,
        metrics: InferenceMetrics,
        predictions: PredictionStore,
        *,
        placement: Placement | None = None,  # None: the CPU
        limits: Limits = Limits(),
        registry: DeploymentRegistry | None = None,
        decode_threads: int | None = None,
        jpeg_decoder: DeviceJpegDecoder | None = None,  # large JPEGs on the GPU; None: every image on the CPU
    ) -> None:
        # Requests (DeployModel, UndeployModel) must not hang on an S3 outage: they fail at once, UNAVAILABLE with
        # the store's one-line cause, and the client retries. So does a restore's deploy, which holds the version's
        # deploy lock that a request may wait on. Only reading the records at start-up, which no request waits for,
        # waits through an outage (the store's window, VISIONTUNE_OUTAGE_WINDOW_S).
        self.store = store.with_outage(NO_WAIT)
        self._records_store = store
        self.triton = triton
        self.metrics = metrics
        self.placement = placement or Placement()
        self.limits = limits
        self.repository = workdir / "triton" / "models"
        self.weights_dir = workdir / "weights"
        self.predictions = predictions
        self.registry = registry or DeploymentRegistry()
        self.jpeg_decoder = jpeg_decoder
        self._decoder = ThreadPoolExecutor(
            max_workers=decode_threads or os.cpu_count() or 1, thread_name_prefix="decode"
        )
        self._deploy_locks: dict[ModelVersionName, threading.Lock] = {}
        self._deploy_locks_guard = threading.Lock()

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # -- deployments ------------------------------------------------------------------------------------

    def _deploy_lock(self, name: ModelVersionName) -> threading.Lock:
        with self._deploy_locks_guard:
            return self._deploy_locks.setdefault(name, threading.Lock())

    def deploy(self, name: ModelVersionName, settings: DeploySettings, *, restoring: bool = False) -> Deployment:
        """Make `name` live with `settings`; returns once Triton has it ready (or raises a VisionTuneError).

        A version that is already live keeps serving: a new traffic weight applies at once, new batching
        settings reload it in Triton (which answers with the old instance until the new one is ready)."""
        with self._deploy_lock(name):
            current = self.registry.get(name)
            live = current is not None and current.state == DeploymentState.READY
            if live and current is not None and current.settings.batching() == settings.batching():
                updated = self.registry.update(name, settings=settings)
                self._save_record(name, settings, current.deploy_time)
                self._publish_weights()
                log.info("%s: traffic weight now %d", name, settings.traffic_weight)
                return updated
            deploy_time = current.deploy_time if current is not None and restoring else dep.now()
            if current is None:
                self.registry.put(
                    Deployment(
                        name=name,
                        settings=settings,
                        triton_model=triton_model_name(name),
                        device=self.placement.device,
                        deploy_time=deploy_time,
                    )
                )
            try:
                served = self._load(name, settings)
            except VisionTuneError as err:
                if current is not None and current.state == DeploymentState.READY:
                    log.error("%s: reload with new settings failed, the old one keeps serving: %s", name, err)
                elif restoring:
                    self.registry.update(name, state=DeploymentState.FAILED, error=err.message)
                else:
                    self.registry.remove(name)
                raise
            updated = self.registry.update(
                name, settings=settings, served=served, state=DeploymentState.READY, error=""
            )
            if not restoring:
                self._save_record(name, settings, updated.deploy_time)
            self._publish_weights()
            log.info(
                "%s is live as Triton model %s (weight %d, batch <= %d, %d instance(s), %s)",
                name,
                updated.triton_model,
                settings.traffic_weight,
                settings.max_batch_size,
                settings.instance_count,
                updated.device,
            )
            return updated

    def _load(self, name: ModelVersionName, settings: DeploySettings) -> ServedModel:
        served = self._read_manifest(name)
        weights = self._fetch_weights(served)
        config = TritonModelConfig(
            name=triton_model_name(name),
            input_name=served.input_name,
            input_dims=(3, served.crop_size, served.crop_size),
            output_name=served.output_name,
            output_dims=(len(served.labels),),
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=round(settings.max_queue_delay_s * 1e6),
            instance_count=settings.instance_count,
            gpus=self.placement.gpus,
            torch_threads=0 if self.placement.gpu else max(1, (os.cpu_count() or 1) // settings.instance_count),
            input_datatype=TRITON_DATATYPES[input_dtype(served)],
            precision=self.placement.precision.value,
        )
        write_model(self.repository, config, weights)
        try:
            self.triton.load(config.name)
        except TritonError as err:
            raise FailedPrecondition(f"{name}: {err}") from err
        return served

    def _read_manifest(self, name: ModelVersionName) -> ServedModel:
        try:
            data = self.store.get_manifest(name.model, name.version)
        except ObjectNotFound as err:
            raise NotFound(f"{name} does not exist in the bucket (no committed manifest)") from err
        except StoreError as err:
            raise Unavailable(f"cannot read the manifest of {name}: {err}") from err
        try:
            return from_manifest(parse_manifest(data, name), name)
        except ManifestInvalid as err:
            raise FailedPrecondition(str(err)) from err

    def _fetch_weights(self, served: ServedModel) -> Path:
        """The version's weights on local disk, sha256 verified (a cached copy is re-verified, not trusted)."""
        path = self.weights_dir / served.name.model / served.name.version / Path(served.weights_path).name
        if path.is_file() and sha256_file(path) == served.weights_sha256:
            return path
        try:
            self.store.download_file(served.weights_key, path)
        except ObjectNotFound as err:
            raise FailedPrecondition(
                f"{served.name}: its manifest names {served.weights_path}, which is missing"
            ) from err
        except StoreError as err:
            raise Unavailable(f"cannot download the weights of {served.name}: {err}") from err
        digest = sha256_file(path)
        if digest != served.weights_sha256:
            path.unlink(missing_ok=True)
            raise FailedPrecondition(
                f"{served.name}: the weights' sha256 is {digest}, the manifest says {served.weights_sha256}; "
                "refusing a corrupt or tampered file"
            )
        return path

    def undeploy(self, name: ModelVersionName) -> Deployment:
        """Stop routing to `name`, let its in-flight requests finish, then unload it from Triton."""
        with self._deploy_lock(name):
            removed = self.registry.remove(name)
            if removed is None:
                raise NotFound(f"{name} is not deployed")
            self._delete_record(name)
            self._publish_weights()
            if not DeploymentRegistry.wait_drained(removed, DRAIN_TIMEOUT_S):
                log.warning(
                    "%s: %d request(s) still running after %.0f s; unloading anyway",
                    name,
                    removed.in_flight,
                    DRAIN_TIMEOUT_S,
                )
            try:
                self.triton.unload(removed.triton_model)
            except TritonError as err:
                log.warning("%s: %s", name, err)
            remove_model(self.repository, removed.triton_model)
            self.metrics.forget_version(name.model, name.version)
            log.info("%s undeployed", name)
            return removed.snapshot()

    def list_deployments(self, model: str | None = None) -> list[Deployment]:
        return self.registry.list(model)

    def restore(self) -> None:
        """Redeploy every version recorded in the bucket (run at start-up, in the background)."""
        try:
            saved, problems = dep.load_records(self._records_store)
        except StoreError as err:
            log.error("cannot list the recorded deployments: %s", err)
            return
        for problem in problems:
            log.error("skipping an unreadable deployment record: %s", problem)
        for record in saved:
            self.registry.put(
                Deployment(
                    name=record.name,
                    settings=record.settings,
                    triton_model=triton_model_name(record.name),
                    device=self.placement.device,
                    deploy_time=record.deploy_time,
                )
            )
        self._publish_weights()
        for record in saved:
            try:
                self.deploy(record.name, record.settings, restoring=True)
            except VisionTuneError as err:
                log.error("could not restore %s: %s", record.name, err.message)

    def mark_all_loading(self, reason: str) -> None:
        """Take every deployment out of routing (Triton lost them); `reload_all` brings them back."""
        for deployment in self.registry.list():
            self.registry.update(deployment.name, state=DeploymentState.LOADING, error=reason)
        self._publish_weights()

    def reload_all(self) -> None:
        """Load every registered deployment into a (restarted) Triton again."""
        for deployment in self.registry.list():
            try:
                self.deploy(deployment.name, deployment.settings, restoring=True)
            except VisionTuneError as err:
                log.error("could not reload %s: %s", deployment.name, err.message)

    def _save_record(self, name: ModelVersionName, settings: DeploySettings, deploy_time: datetime) -> None:
        try:
            dep.save_record(self.store, name, settings, deploy_time)
        except StoreError as err:
            raise Unavailable(
                f"{name} is live but its record could not be saved (a restart would lose it): {err}"
            ) from err

    def _delete_record(self, name: ModelVersionName) -> None:
        try:
            dep.delete_record(self.store, name)
        except StoreError as err:
            log.error("%s: could not delete its deployment record (a restart would bring it back): %s", name, err)

    def _publish_weights(self) -> None:
        self.metrics.set_deployments(self.registry.weights(), {d.name.model for d in self.registry.list()})

    # -- classify ---------------------------------------------------------------------------------------

    def classify(self, request: ClassifyInput) -> ClassifyOutput:
        started = time.perf_counter()
        labels = {"model": request.model, "version": request.version or ""}
        try:
            output = self._classify(request, labels, started)
        except VisionTuneError as err:
            self.metrics.requests.labels(labels["model"], labels["version"], err.code).inc()
            if labels["version"]:
                self.metrics.request_seconds.labels(labels["model"], labels["version"]).observe(
                    time.perf_counter() - started
                )
            raise
        self.metrics.requests.labels(labels["model"], labels["version"], "OK").inc()
        self.metrics.request_seconds.labels(labels["model"], labels["version"]).observe(output.latency_s)
        return output

    def _check_request(self, request: ClassifyInput) -> str:
        if not request.images:
            raise InvalidRequest([FieldViolation("images", "at least one image is required")])
        if len(request.images) > self.limits.max_images:
            raise ResourceExhausted(
                f"{len(request.images)} images in one request; the limit is {self.limits.max_images}"
            )
        for i, content in enumerate(request.images):
            if len(content) > self.limits.max_image_bytes:
                raise ResourceExhausted(
                    f"images[{i}] is {len(content)} bytes; the limit is {self.limits.max_image_bytes}"
                )
        request_id = request.request_id or f"req-{secrets.token_hex(8)}"
        if not _REQUEST_ID_RE.match(request_id):
            raise InvalidRequest([FieldViolation("request_id", "1-128 characters of letters, digits and ._:-")])
        return request_id

    def _classify(self, request: ClassifyInput, labels: dict[str, str], started: float) -> ClassifyOutput:
        request_id = self._check_request(request)
        # NotDeployed (NOT_FOUND) or NotReady (UNAVAILABLE) when no version can answer.
        with self.registry.lease(request.model, request.version) as deployment:
            labels["version"] = deployment.name.version
            served = deployment.served
            assert served is not None  # READY deployments have their manifest
            top_k, threshold = self._decision_settings(request, served)
            batch = self._preprocess(request.images, served, labels)
            logits = self._infer(deployment, served, batch, labels)
        results = _decide(logits, served, top_k, threshold, request.client_ids)
        self._record(request_id, deployment.name, served, results)
        unknown = sum(r.unknown for r in results)
        mv = (deployment.name.model, deployment.name.version)
        self.metrics.images.labels(*mv).inc(len(results))
        if unknown:
            self.metrics.predictions.labels(*mv, VERDICT_UNKNOWN).inc(unknown)
        if len(results) - unknown:
            self.metrics.predictions.labels(*mv, VERDICT_KNOWN).inc(len(results) - unknown)
        return ClassifyOutput(request_id, deployment.name, results, time.perf_counter() - started)

    def _record(
        self, request_id: str, name: ModelVersionName, served: ServedModel, results: tuple[ImageResult, ...]
    ) -> None:
        """Record the predictions for feedback. The store's insert is what keeps a request id unique across
        replicas (no read before it: one round trip per request). A store that cannot be reached does not fail
        the request: it is answered, and counted as unrecorded (feedback on it will be NOT_FOUND)."""
        record = RequestRecord(
            model=name.model,
            version=name.version,
            labels=served.labels,
            images=tuple(ImagePrediction(r.top_k[0][0], r.unknown) for r in results),
        )
        try:
            recorded = self.predictions.record(request_id, record)
        except PredictionsUnavailable as err:
            self.metrics.unrecorded_requests.labels(name.model, name.version).inc()
            log.warning("%s: request %s answered without its feedback record: %s", name, request_id, err)
            return
        if not recorded:
            raise AlreadyExists(f"request id {request_id!r} was already used; leave it empty to get a fresh one")

    def _decision_settings(self, request: ClassifyInput, served: ServedModel) -> tuple[int, float]:
        violations = []
        n_labels = len(served.labels)
        top_k = request.top_k if request.top_k is not None else min(DEFAULT_TOP_K, n_labels)
        if not 1 <= top_k <= n_labels:
            violations.append(FieldViolation("top_k", f"must be in [1, {n_labels}] (the model's labels)"))
        threshold = served.threshold
        if request.threshold is not None:
            low, high = served.threshold_bounds()
            if not (math.isfinite(request.threshold) and low <= request.threshold <= high):
                violations.append(
                    FieldViolation(
                        "unknown_threshold", f"must be in [{low:g}, {high:g}] for the {served.score.value} score"
                    )
                )
            threshold = request.threshold
        if violations:
            raise InvalidRequest(violations)
        return top_k, threshold

    def _preprocess(self, images: Sequence[bytes], served: ServedModel, labels: dict[str, str]) -> np.ndarray:
        started = time.perf_counter()

        size, max_pixels = served.resize_size, self.limits.max_image_pixels

        def one(content: bytes) -> np.ndarray | str:
            try:
                if self.jpeg_decoder is not None:
                    on_device = self.jpeg_decoder.decode(content, size, max_pixels=max_pixels)
                    if on_device is not None:
                        return on_device
                return decode_hwc(content, size, max_pixels=max_pixels)
            except ImageRejected as err:
                return str(err)

        decoded = [one(images[0])] if len(images) == 1 else list(self._decoder.map(one, images))
        violations = [FieldViolation(f"images[{i}].content", d) for i, d in enumerate(decoded) if isinstance(d, str)]
        if violations:
            raise InvalidRequest(violations)
        chw = torch.from_numpy(np.stack([d for d in decoded if not isinstance(d, str)])).permute(0, 3, 1, 2)
        batch = network_input(center_crop(chw, served.crop_size).contiguous(), served)
        self.metrics.preprocess_seconds.labels(labels["model"], labels["version"]).observe(
            time.perf_counter() - started
        )
        return batch

    def _infer(
        self, deployment: Deployment, served: ServedModel, batch: np.ndarray, labels: dict[str, str]
    ) -> np.ndarray:
        started = time.perf_counter()
        step = deployment.settings.max_batch_size
        try:
            parts = [
                self.triton.infer(deployment.triton_model, served.input_name, served.output_name, batch[i : i + step])
                for i in range(0, len(batch), step)
            ]
        except TritonError as err:
            raise Unavailable(f"{deployment.name}: {err}") from err
        self.metrics.triton_seconds.labels(labels["model"], labels["version"]).observe(time.perf_counter() - started)
        return np.concatenate(parts)

    # -- feedback ---------------------------------------------------------------------------------------

    def report_feedback(self, request_id: str, index: int, true_label: str | None) -> FeedbackResult:
        try:
            result = self.predictions.report(request_id, index, true_label)
        except FeedbackError as err:
            if err.kind == "request":
                raise NotFound(str(err)) from err
            field = "index" if err.kind == "index" else "true_label"
            raise InvalidRequest([FieldViolation(field, str(err))]) from err
        if result.duplicate:
            return result
        mv = (result.model, result.version)
        self.metrics.feedback.labels(*mv, result.outcome.value).inc()
        if result.outcome == Outcome.FALSE_POSITIVE:
            self.metrics.false_positives.labels(*mv).inc()
        elif result.outcome == Outcome.FALSE_REJECTION:
            self.metrics.false_rejections.labels(*mv).inc()
        if true_label is None:
            self.metrics.record_unknown_feedback(*mv, accepted=result.outcome == Outcome.FALSE_POSITIVE)
        return result


def input_dtype(served: ServedModel) -> np.dtype[np.generic]:
    """What `served`'s network takes: uint8 pixels, or float32 the service normalised."""
    return np.dtype(np.uint8) if served.uint8_input else np.dtype(np.float32)


def network_input(crops: torch.Tensor, served: ServedModel) -> np.ndarray:
    """uint8 [N, 3, S, S] crops -> what `served`'s network takes (`input_dtype`): the crops themselves for a
    network that normalises inside, else float32 normalised with the manifest's mean and std."""
    if served.uint8_input:
        return crops.numpy()
    return normalize(crops, served.mean, served.std).numpy()


def _decide(
    logits: np.ndarray, served: ServedModel, top_k: int, threshold: float, client_ids: Sequence[str]
) -> tuple[ImageResult, ...]:
    """Softmax, top-k and the open-set verdict for each row of `logits` [N, C]."""
    tensor = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    probabilities = tensor.softmax(dim=1)
    scores = open_set_scores(tensor, served.score)
    known = is_known(scores, threshold)
    top = probabilities.topk(top_k, dim=1)
    results = []
    for i in range(tensor.shape[0]):
        pairs = tuple((served.labels[int(j)], float(p)) for p, j in zip(top.values[i], top.indices[i], strict=True))
        results.append(
            ImageResult(
                index=i,
                client_id=client_ids[i] if i < len(client_ids) else "",
                top_k=pairs,
                unknown=not bool(known[i]),
                score=float(scores[i]),
                threshold=threshold,
            )
        )
    return tuple(results)
