"""Prometheus metrics of the inference service, on their own registry (no process-global state).

Every series is labelled by `model` and `version` (the version id, e.g. the job id). Latencies are in
seconds with buckets from 0.5 ms to 10 s, which resolve millisecond serving on a GPU and still place a
slow CPU request. The unknown-class false-positive accounting comes from ReportFeedback: only a client
knows that an image was of none of the model's classes.

Every replica counts what it did itself: the Classify calls it answered and the feedback reports it scored (a
report is scored once, by the replica that received it first; the prediction store sees to that). The counters
of all replicas add up to the fleet's, so fleet-wide rates and ratios are sums over instances
(`sum(rate(a[1h])) / sum(rate(b[1h]))`, deploy/monitoring). The rolling false-positive rate is a gauge of the
replica's own last N reports, for looking at one replica.

Series (all prefixed `visiontune_inference_`):

| name | type | labels | meaning |
|---|---|---|---|
| request_duration_seconds | histogram | model, version | Classify end to end, as the server sees it |
| preprocess_duration_seconds | histogram | model, version | decoding + resizing + normalising one request |
| triton_duration_seconds | histogram | model, version | the Triton inference call of one request |
| requests_total | counter | model, version, code | Classify calls by gRPC status code |
| images_total | counter | model, version | images classified |
| predictions_total | counter | model, version, verdict | images by verdict: known / unknown |
| feedback_total | counter | model, version, outcome | feedback reports by outcome |
| unknown_false_positives_total | counter | model, version | unknown-class images accepted as a known class |
| false_rejections_total | counter | model, version | known-class images rejected as unknown |
| unrecorded_requests_total | counter | model, version | Classify answered without a prediction record |
| unknown_false_positive_rate | gauge | model, version | false positives / unknown-class reports, last N, this replica |
| unknown_feedback_window | gauge | model, version | how many reports that rate is over (<= N) |
| deployed_versions | gauge | model | versions that are live (ready); 0 once none is |
| traffic_weight | gauge | model, version | a live version's traffic weight |
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX: Final = "visiontune_inference"
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
DEFAULT_RATE_WINDOW: Final = 100

VERDICT_KNOWN: Final = "known"
VERDICT_UNKNOWN: Final = "unknown"


class InferenceMetrics:
    """The service's series; thread-safe (prometheus_client's metrics are, and the rolling window locks)."""

    def __init__(self, *, rate_window: int = DEFAULT_RATE_WINDOW, registry: CollectorRegistry | None = None) -> None:
        if rate_window < 1:
            raise ValueError(f"rate_window must be >= 1, got {rate_window}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._rate_window = rate_window
        mv = ("model", "version")
        r = self.registry
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Classify latency end to end, as the server sees it.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            f"{PREFIX}_preprocess_duration_seconds",
            "Decoding, resizing and normalising the images of one request.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.triton_seconds = Histogram(
            f"{PREFIX}_triton_duration_seconds",
            "The Triton inference call of one request.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(f"{PREFIX}_requests", "Classify calls by gRPC status code.", (*mv, "code"), registry=r)
        self.images = Counter(f"{PREFIX}_images", "Images classified.", mv, registry=r)
        self.predictions = Counter(
            f"{PREFIX}_predictions", "Classified images by verdict (known / unknown).", (*mv, "verdict"), registry=r
        )
        self.feedback = Counter(f"{PREFIX}_feedback", "Feedback reports by outcome.", (*mv, "outcome"), registry=r)
        self.false_positives = Counter(
            f"{PREFIX}_unknown_false_positives",
            "Images of an unknown class classified as a known class (from feedback).",
            mv,
            registry=r,
        )
        self.false_rejections = Counter(
            f"{PREFIX}_false_rejections", "Images of a known class rejected as unknown (from feedback).", mv, registry=r
        )
        self.unrecorded_requests = Counter(
            f"{PREFIX}_unrecorded_requests",
            "Classify requests answered without their prediction record (the prediction database was unavailable): "
            "feedback on them is NOT_FOUND.",
            mv,
            registry=r,
        )
        self.false_positive_rate = Gauge(
            f"{PREFIX}_unknown_false_positive_rate",
            f"Unknown-class false positives over the last {rate_window} unknown-class feedback reports.",
            mv,
            registry=r,
        )
        self.rate_window_size = Gauge(
            f"{PREFIX}_unknown_feedback_window",
            "How many unknown-class feedback reports the false-positive rate is over.",
            mv,
            registry=r,
        )
        self.deployed_versions = Gauge(
            f"{PREFIX}_deployed_versions", "Live (ready) versions of a model.", ("model",), registry=r
        )
        self.traffic_weight = Gauge(f"{PREFIX}_traffic_weight", "Traffic weight of a live version.", mv, registry=r)
        self._lock = threading.Lock()
        self._unknown_outcomes: dict[tuple[str, str], collections.deque[bool]] = {}
        self._models: set[str] = set()  # every model that had a deployment: its count stays, at 0 if need be

    def record_unknown_feedback(self, model: str, version: str, *, accepted: bool) -> float:
        """An unknown-class image was reported; `accepted` = it had been classified as known (a false
        positive). Updates the rolling rate and returns it."""
        with self._lock:
            window = self._unknown_outcomes.setdefault((model, version), collections.deque(maxlen=self._rate_window))
            window.append(accepted)
            rate = sum(window) / len(window)
            size = len(window)
        self.false_positive_rate.labels(model, version).set(rate)
        self.rate_window_size.labels(model, version).set(size)
        return rate

    def set_deployments(self, weights: dict[tuple[str, str], int], models: set[str] | None = None) -> None:
        """Replace the deployment gauges: `{(model, version): traffic weight}` of the live versions, and the
        models that have any deployment (live or not). A model once seen keeps `deployed_versions` (at 0
        when nothing of it is live), so "clients ask for a model with no live version" is visible."""
        live = collections.Counter(model for model, _ in weights)
        with self._lock:
            self._models |= set(live) | (models or set())
            self.traffic_weight.clear()
            for (model, version), weight in weights.items():
                self.traffic_weight.labels(model, version).set(weight)
            for model in self._models:
                self.deployed_versions.labels(model).set(live.get(model, 0))

    def forget_version(self, model: str, version: str) -> None:
        """Drop an undeployed version's rolling false-positive rate (its counters stay: they are history)."""
        with self._lock:
            self._unknown_outcomes.pop((model, version), None)
            for gauge in (self.false_positive_rate, self.rate_window_size):
                with contextlib.suppress(KeyError):  # it never had unknown-class feedback
                    gauge.remove(model, version)

    def exposition(self) -> bytes:
        """The text exposition format of every series (what a scrape returns)."""
        return generate_latest(self.registry)
