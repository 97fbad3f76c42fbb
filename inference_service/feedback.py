"""Ground truth after the fact: what each recent prediction was, and what a feedback report makes of it.

The service keeps the predictions of the last `capacity` requests in memory (a bounded LRU: memory
stays flat under any load). A report about a request that has aged out, or that this replica never
answered, is NOT_FOUND with a message saying so. A second report about the same image is answered as a
duplicate with the first report's outcome and is not counted again.
"""

from __future__ import annotations

import collections
import enum
import threading
from dataclasses import dataclass, field
from typing import Final

DEFAULT_CAPACITY: Final = 100_000


class Outcome(enum.StrEnum):
    CORRECT = "correct"  # known image, accepted, right label
    MISCLASSIFIED = "misclassified"  # known image, accepted, wrong label
    FALSE_REJECTION = "false_rejection"  # known image rejected as unknown
    FALSE_POSITIVE = "false_positive"  # unknown image accepted as a known class
    TRUE_REJECTION = "true_rejection"  # unknown image rejected as unknown


def outcome(*, predicted_label: str, predicted_unknown: bool, true_label: str | None) -> Outcome:
    """What a prediction was, given the truth: `true_label` None means the image was of an unknown class."""
    if true_label is None:
        return Outcome.TRUE_REJECTION if predicted_unknown else Outcome.FALSE_POSITIVE
    if predicted_unknown:
        return Outcome.FALSE_REJECTION
    return Outcome.CORRECT if predicted_label == true_label else Outcome.MISCLASSIFIED


@dataclass(frozen=True)
class ImagePrediction:
    label: str  # the top-1 label (also when the verdict is unknown)
    unknown: bool


@dataclass
class RequestRecord:
    model: str
    version: str
    labels: frozenset[str]
    images: tuple[ImagePrediction, ...]
    reported: dict[int, Outcome] = field(default_factory=dict)


class FeedbackError(LookupError):
    """The report refers to nothing this replica knows; `kind` is "request", "index" or "label"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class FeedbackResult:
    outcome: Outcome
    duplicate: bool
    model: str
    version: str


class PredictionLog:
    """request id -> what was predicted, for the last `capacity` requests. Thread-safe."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._records: collections.OrderedDict[str, RequestRecord] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def add(self, request_id: str, record: RequestRecord) -> bool:
        """Record a request's predictions; False (nothing recorded) when the id is already taken."""
        with self._lock:
            if request_id in self._records:
                return False
            self._records[request_id] = record
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)
            return True

    def report(self, request_id: str, index: int, true_label: str | None) -> FeedbackResult:
        """Judge image `index` of request `request_id` against the truth; raises FeedbackError."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None:
                raise FeedbackError(
                    f"no prediction with request id {request_id!r} on this replica: unknown, or older than the "
                    f"last {self.capacity} requests it keeps",
                    "request",
                )
            if not 0 <= index < len(record.images):
                raise FeedbackError(
                    f"request {request_id!r} classified {len(record.images)} image(s); index {index} is out of range",
                    "index",
                )
            if true_label is not None and true_label not in record.labels:
                raise FeedbackError(
                    f"true_label {true_label!r} is not a label of models/{record.model}/versions/{record.version} "
                    f"(labels: {', '.join(sorted(record.labels))}); report an image of another class as unknown",
                    "label",
                )
            earlier = record.reported.get(index)
            if earlier is not None:
                return FeedbackResult(earlier, True, record.model, record.version)
            predicted = record.images[index]
            result = outcome(
                predicted_label=predicted.label, predicted_unknown=predicted.unknown, true_label=true_label
            )
            record.reported[index] = result
            return FeedbackResult(result, False, record.model, record.version)
