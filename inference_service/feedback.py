"""Ground truth after the fact: what each prediction was, and what a feedback report makes of it.

Plain Python, no SQL: the vocabulary (outcomes, a request's predictions, a report's result, the errors) and the
interface the engine records and scores through (`PredictionStore`). The implementation is the SQL prediction
store (`inference_service.predictions.store`), which every inference replica shares: a report is scored once,
by whichever replica receives it, however many replicas there are and however often they restart. A second
report about the same image is answered as a duplicate with the first report's outcome and is not counted again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Protocol

from visiontune import errors


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


@dataclass(frozen=True)
class RequestRecord:
    """What one Classify request predicted, as feedback needs it."""

    model: str
    version: str
    labels: tuple[str, ...]  # the version's labels: a report's true_label must be one of them
    images: tuple[ImagePrediction, ...]


FeedbackErrorKind = Literal["request", "index", "label"]


class FeedbackError(LookupError):
    """The report refers to nothing the prediction store knows; `kind` says which part of the report."""

    def __init__(self, message: str, kind: FeedbackErrorKind) -> None:
        super().__init__(message)
        self.kind: FeedbackErrorKind = kind


class PredictionsUnavailable(errors.Unavailable):
    """The prediction store cannot be reached now (its database is down or closed); the message is one line."""


@dataclass(frozen=True)
class FeedbackResult:
    outcome: Outcome
    duplicate: bool  # the image had been reported before (on any replica): not counted again
    model: str
    version: str


class PredictionStore(Protocol):
    """Where Classify records its predictions and ReportFeedback scores them. Thread-safe."""

    def record(self, request_id: str, record: RequestRecord) -> bool:
        """Record a request's predictions; False (nothing recorded) when the id is already taken.
        Raises PredictionsUnavailable when the store cannot be reached."""
        ...

    def report(self, request_id: str, index: int, true_label: str | None) -> FeedbackResult:
        """Judge image `index` of request `request_id` against the truth (`true_label` None: an unknown class),
        once: a repeated report is a duplicate with the first outcome. Raises FeedbackError or
        PredictionsUnavailable."""
        ...
