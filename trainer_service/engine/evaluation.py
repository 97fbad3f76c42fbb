"""Evaluation metrics: classification report, open-set scores and threshold, aggregation over repeats.

Pure functions over tensors and arrays (no I/O, no global state); they feed `JobResult` in job.proto
(`ClassMetrics`, `Misclassified`, the confusion matrix, `OpenSetResult`, `MetricSummary`).

Conventions:
- Logits are `[N, C]`, targets `[N]` class indices into `labels`.
- Open-set scores are "higher = more known" for every `OpenSetScore`; an image is accepted as known when
  its score is `>= threshold`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from visiontune.openset import open_set_scores

from trainer_service.spec.config import OpenSetScore

# Anything that holds a 1-D collection of scores.
Scores = torch.Tensor | npt.NDArray[Any] | Sequence[float]

# ceil(target * n) must not round 0.95 * 100 = 95.00000000000001 up to 96.
_CEIL_EPSILON = 1e-9


# -- closed-set classification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MisclassifiedExample:
    index: int  # row of the evaluated batch: the caller maps it back to the image URI
    true_class: int
    predicted_class: int
    true_label: str
    predicted_label: str
    confidence: float  # softmax probability of the predicted class


@dataclass(frozen=True)
class ClassificationReport:
    labels: list[str]
    count: int  # number of evaluated examples
    accuracy: float
    top5_accuracy: float  # top-k with k = min(5, number of classes)
    loss: float  # mean cross-entropy (no label smoothing)
    precision: list[float]  # per class, aligned with labels
    recall: list[float]
    f1: list[float]
    support: list[int]  # true examples per class
    macro_f1: float
    confusion_matrix: list[list[int]]  # rows: true label, columns: predicted label
    misclassified: list[MisclassifiedExample]  # most confident mistakes first

    def scalar_metrics(self) -> dict[str, float]:
        """The scalar metrics, ready for `aggregate` over repeats."""
        return {
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5_accuracy,
            "loss": self.loss,
            "macro_f1": self.macro_f1,
        }


def classification_report(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: Sequence[str],
    max_misclassified: int = 50,
) -> ClassificationReport:
    """Accuracy, top-5, loss, per-class P/R/F1, confusion matrix and the most confident mistakes.

    Precision of a class never predicted, recall of a class without support and F1 where both are 0 are 0
    (never NaN). Macro F1 averages over the classes that occur in the targets or the predictions — the
    classes where F1 is defined, as scikit-learn's `f1_score(average="macro")` does without `labels=`.
    """
    num_classes = len(labels)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be [N, {num_classes}], got {list(logits.shape)}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must be [{logits.shape[0]}], got {list(targets.shape)}")
    count = int(logits.shape[0])
    if count == 0:
        raise ValueError("cannot evaluate an empty set")
    if max_misclassified < 0:
        raise ValueError("max_misclassified must be >= 0")

    logits = logits.detach().to(device="cpu", dtype=torch.float32)
    targets = targets.detach().to(device="cpu", dtype=torch.long)
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(f"targets must be class indices in [0, {num_classes})")

    probabilities = logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = predicted == targets
    k = min(5, num_classes)
    in_top_k = (logits.topk(k, dim=1).indices == targets.unsqueeze(1)).any(dim=1)
    loss = float(F.cross_entropy(logits, targets))

    confusion = torch.bincount(targets * num_classes + predicted, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    matrix = confusion.to(torch.float64)
    true_positives = matrix.diagonal()
    support = matrix.sum(dim=1)  # row sums: true examples per class
    predicted_count = matrix.sum(dim=0)  # column sums: predictions per class
    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted_count > 0)
    macro_f1 = float(f1[present].mean())  # never empty: count > 0 means some class is present

    return ClassificationReport(
        labels=list(labels),
        count=count,
        accuracy=float(correct.double().mean()),
        top5_accuracy=float(in_top_k.double().mean()),
        loss=loss,
        precision=[float(v) for v in precision],
        recall=[float(v) for v in recall],
        f1=[float(v) for v in f1],
        support=[int(v) for v in confusion.sum(dim=1)],
        macro_f1=macro_f1,
        confusion_matrix=confusion.tolist(),
        misclassified=_most_confident_mistakes(confidence, predicted, targets, labels, max_misclassified),
    )


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Element-wise numerator / denominator, 0 where the denominator is 0 (an undefined ratio, not NaN)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def _most_confident_mistakes(
    confidence: torch.Tensor,
    predicted: torch.Tensor,
    targets: torch.Tensor,
    labels: Sequence[str],
    limit: int,
) -> list[MisclassifiedExample]:
    wrong = (predicted != targets).nonzero().flatten()
    # Stable sort: equal confidences keep ascending index order, so the result is deterministic.
    order = torch.sort(confidence[wrong], descending=True, stable=True).indices
    mistakes = []
    for index in wrong[order][:limit].tolist():
        true_class, predicted_class = int(targets[index]), int(predicted[index])
        mistakes.append(
            MisclassifiedExample(
                index=index,
                true_class=true_class,
                predicted_class=predicted_class,
                true_label=labels[true_class],
                predicted_label=labels[predicted_class],
                confidence=float(confidence[index]),
            )
        )
    return mistakes


# -- open set ------------------------------------------------------------------------------------------------


def calibrate_threshold(known_scores: Scores, target_tpr: float) -> float:
    """The highest threshold that accepts (score >= threshold) at least `target_tpr` of the known scores.

    With n scores, k = ceil(target_tpr * n) of them must be accepted; the threshold is the k-th largest
    score. Any higher value would accept fewer than k, so this rejects as many unknowns as the target allows.
    Ties at the threshold are all accepted, so the achieved rate can exceed the target (never fall short).
    Deterministic, no interpolation: the threshold is always one of the observed scores. Example: scores
    0..99 with target 0.95 give k = 95 and threshold 5, accepting exactly 95 of the 100.
    """
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"target_tpr must be in (0, 1], got {target_tpr}")
    values = _as_finite_array(known_scores, "known_scores")
    if values.size == 0:
        raise ValueError("cannot calibrate a threshold without known scores")
    n = values.size
    k = min(n, max(1, math.ceil(target_tpr * n - _CEIL_EPSILON)))
    descending = np.sort(values)[::-1]
    return float(descending[k - 1])


def true_positive_rate(known_scores: Scores, threshold: float) -> float:
    """The fraction of known images accepted as known (score >= threshold)."""
    return _accepted_fraction(known_scores, threshold, "known_scores")


def false_positive_rate(unknown_scores: Scores, threshold: float) -> float:
    """The fraction of unknown images accepted as known (score >= threshold): FPR at the threshold."""
    return _accepted_fraction(unknown_scores, threshold, "unknown_scores")


def auroc(known_scores: Scores, unknown_scores: Scores) -> float:
    """Area under the ROC curve of known (positive) vs unknown (negative) images.

    The Mann-Whitney U statistic over n_known * n_unknown pairs: a pair counts 1 when the known image scores
    higher, 1/2 when they tie (average ranks), 0 otherwise. 1.0 is perfect separation, 0.5 chance (and
    exactly 0.5 for identical sets), 0.0 perfectly inverted. O((n + m) log(n + m)).
    """
    known = _as_finite_array(known_scores, "known_scores")
    unknown = _as_finite_array(unknown_scores, "unknown_scores")
    if known.size == 0 or unknown.size == 0:
        raise ValueError("AUROC needs at least one known and one unknown score")
    combined = np.concatenate([known, unknown])
    # Average 1-based rank per distinct value: a run of c tied values ending at rank r has rank r - (c-1)/2.
    _, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    n_known, n_unknown = known.size, unknown.size
    u_known = float(ranks[:n_known].sum()) - n_known * (n_known + 1) / 2.0
    return u_known / (n_known * n_unknown)


@dataclass(frozen=True)
class OpenSetReport:
    score: OpenSetScore
    threshold: float  # images scoring below it are "unknown"
    target_tpr: float
    validation_tpr: float  # measured on the validation set the threshold was calibrated on
    fpr_at_threshold: float | None  # None without an unknown-class set
    auroc: float | None
    unknown_count: int


def open_set_report(
    val_logits: torch.Tensor,
    score: OpenSetScore,
    target_tpr: float,
    unknown_logits: torch.Tensor | None = None,
) -> OpenSetReport:
    """Calibrates the threshold on validation logits; with unknown-class logits, measures FPR and AUROC.

    An empty `unknown_logits` is treated like None (no FPR or AUROC can be measured).
    """
    known = open_set_scores(val_logits, score)
    threshold = calibrate_threshold(known, target_tpr)
    fpr: float | None = None
    area: float | None = None
    unknown_count = 0
    if unknown_logits is not None and unknown_logits.shape[0] > 0:
        unknown = open_set_scores(unknown_logits, score)
        unknown_count = int(unknown.shape[0])
        fpr = false_positive_rate(unknown, threshold)
        area = auroc(known, unknown)
    return OpenSetReport(
        score=score,
        threshold=threshold,
        target_tpr=target_tpr,
        validation_tpr=true_positive_rate(known, threshold),
        fpr_at_threshold=fpr,
        auroc=area,
        unknown_count=unknown_count,
    )


def _as_finite_array(scores: Scores, name: str) -> npt.NDArray[np.float64]:
    """Scores as a 1-D float64 array (float32 values are exact in float64, so thresholds compare the same)."""
    if isinstance(scores, torch.Tensor):
        values = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def _accepted_fraction(scores: Scores, threshold: float, name: str) -> float:
    values = _as_finite_array(scores, name)
    if values.size == 0:
        raise ValueError(f"{name} is empty")
    return float(np.count_nonzero(values >= threshold)) / values.size


# -- repeats -------------------------------------------------------------------------------------------------


def aggregate(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) of each metric found in every run.

    Keys keep the first run's order; a key missing from any run is left out rather than averaged over fewer.
    """
    if not runs:
        return {}
    common = [key for key in runs[0] if all(key in run for run in runs[1:])]
    result: dict[str, tuple[float, float]] = {}
    for key in common:
        values = [float(run[key]) for run in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        result[key] = (statistics.fmean(values), std)
    return result
