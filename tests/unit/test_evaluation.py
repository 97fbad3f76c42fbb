"""Tests of the evaluation metrics on hand-computed small cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from trainer_service.engine.evaluation import (
    ClassificationReport,
    aggregate,
    auroc,
    calibrate_threshold,
    classification_report,
    false_positive_rate,
    open_set_report,
    open_set_scores,
    true_positive_rate,
)
from trainer_service.spec.config import OpenSetScore

# Six examples, three classes; class "c" is never predicted. Rows are softmax probabilities.
PROBABILITIES = [
    [0.7, 0.2, 0.1],  # true a, predicted a
    [0.6, 0.3, 0.1],  # true a, predicted a
    [0.9, 0.05, 0.05],  # true b, predicted a (mistake, confidence 0.9)
    [0.2, 0.7, 0.1],  # true b, predicted b
    [0.5, 0.3, 0.2],  # true c, predicted a (mistake, confidence 0.5)
    [0.1, 0.6, 0.3],  # true c, predicted b (mistake, confidence 0.6)
]
TARGETS = [0, 0, 1, 1, 2, 2]
LABELS = ["a", "b", "c"]


def _report(max_misclassified: int = 50) -> ClassificationReport:
    logits = torch.tensor(PROBABILITIES, dtype=torch.float64).log()  # softmax(log p) = p
    return classification_report(logits, torch.tensor(TARGETS), LABELS, max_misclassified=max_misclassified)


# -- classification report ------------------------------------------------------------------------------------


def test_accuracy_and_loss() -> None:
    report = _report()
    assert report.count == 6
    assert report.accuracy == pytest.approx(3 / 6)
    expected_loss = -(math.log(0.7) + math.log(0.6) + math.log(0.05) + math.log(0.7) + math.log(0.2) + math.log(0.3))
    assert report.loss == pytest.approx(expected_loss / 6, rel=1e-6)


def test_confusion_matrix_rows_are_true_labels() -> None:
    assert _report().confusion_matrix == [
        [2, 0, 0],
        [1, 1, 0],
        [1, 1, 0],
    ]
    # One example, true class 0 predicted as 1: the count is at [true][predicted] = [0][1].
    report = classification_report(torch.tensor([[0.0, 5.0]]), torch.tensor([0]), ["x", "y"])
    assert report.confusion_matrix == [[0, 1], [0, 0]]


def test_per_class_metrics_with_a_class_never_predicted() -> None:
    report = _report()
    # a: 2 of 4 predictions right, both true a found. b: 1 of 2, 1 of 2. c: never predicted.
    assert report.precision == pytest.approx([0.5, 0.5, 0.0])
    assert report.recall == pytest.approx([1.0, 0.5, 0.0])
    assert report.f1 == pytest.approx([2 / 3, 0.5, 0.0])
    assert report.support == [2, 2, 2]
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert all(not math.isnan(v) for v in report.precision + report.recall + report.f1)


def test_class_absent_from_targets_and_predictions_is_zero_and_left_out_of_macro_f1() -> None:
    logits = torch.tensor(PROBABILITIES, dtype=torch.float64).log()
    logits = torch.cat([logits, torch.full((6, 1), -30.0, dtype=torch.float64)], dim=1)  # class "d": never seen
    report = classification_report(logits, torch.tensor(TARGETS), [*LABELS, "d"])
    assert report.precision[3] == 0.0
    assert report.recall[3] == 0.0
    assert report.f1[3] == 0.0
    assert report.support[3] == 0
    assert report.macro_f1 == pytest.approx(_report().macro_f1)  # same three classes averaged


def test_class_with_predictions_but_no_support() -> None:
    # True labels are all 0; one example is predicted 1: precision(1) = 0/1, recall(1) undefined -> 0.
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    report = classification_report(logits, torch.tensor([0, 0, 0]), ["x", "y"])
    assert report.precision == pytest.approx([1.0, 0.0])
    assert report.recall == pytest.approx([2 / 3, 0.0])
    assert report.f1 == pytest.approx([0.8, 0.0])
    assert report.support == [3, 0]
    assert report.macro_f1 == pytest.approx(0.4)  # class y was predicted, so it counts


def test_misclassified_most_confident_first_and_capped() -> None:
    mistakes = _report().misclassified
    assert [m.index for m in mistakes] == [2, 5, 4]
    assert [m.confidence for m in mistakes] == pytest.approx([0.9, 0.6, 0.5])
    first = mistakes[0]
    assert (first.true_class, first.predicted_class) == (1, 0)
    assert (first.true_label, first.predicted_label) == ("b", "a")
    assert [m.index for m in _report(max_misclassified=2).misclassified] == [2, 5]
    assert _report(max_misclassified=0).misclassified == []


def test_misclassified_ties_keep_index_order() -> None:
    logits = torch.tensor([[0.0, 1.0]] * 4)  # all predicted 1 with the same confidence
    report = classification_report(logits, torch.tensor([0, 1, 0, 0]), ["x", "y"])
    assert [m.index for m in report.misclassified] == [0, 2, 3]


def test_top5_accuracy() -> None:
    # 7 classes, logits descending by class index: class 4 is 5th best (in top-5), class 5 is 6th (not).
    row = torch.arange(7, 0, -1, dtype=torch.float32)
    logits = row.repeat(4, 1)
    report = classification_report(logits, torch.tensor([0, 4, 5, 6]), [str(i) for i in range(7)])
    assert report.accuracy == pytest.approx(0.25)
    assert report.top5_accuracy == pytest.approx(0.5)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_top5_with_at_most_five_classes_is_always_one(num_classes: int) -> None:
    logits = torch.randn(20, num_classes, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, num_classes, (20,), generator=torch.Generator().manual_seed(1))
    report = classification_report(logits, targets, [str(i) for i in range(num_classes)])
    assert report.top5_accuracy == 1.0


def test_scalar_metrics() -> None:
    report = _report()
    assert report.scalar_metrics() == {
        "accuracy": report.accuracy,
        "top5_accuracy": report.top5_accuracy,
        "loss": report.loss,
        "macro_f1": report.macro_f1,
    }


def test_classification_report_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="logits"):
        classification_report(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="targets"):
        classification_report(torch.zeros(2, 2), torch.tensor([0]), ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        classification_report(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        classification_report(torch.zeros(1, 2), torch.tensor([2]), ["a", "b"])


# -- open-set scores ------------------------------------------------------------------------------------------


def test_max_softmax_and_energy_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert open_set_scores(logits, OpenSetScore.MAX_SOFTMAX).tolist() == pytest.approx([0.5, 0.75])
    assert open_set_scores(logits, OpenSetScore.ENERGY).tolist() == pytest.approx([math.log(2.0), math.log(4.0)])
    three = torch.tensor([[1.0, 2.0, 3.0]])
    expected = math.log(math.e + math.e**2 + math.e**3)
    assert open_set_scores(three, OpenSetScore.ENERGY).item() == pytest.approx(expected)


@pytest.mark.parametrize("score", list(OpenSetScore))
def test_scores_grow_with_the_winning_logit(score: OpenSetScore) -> None:
    # Raising the top logit, the others fixed, makes the image look more "known" under both scores.
    logits = torch.tensor([[top, 1.0, 0.5] for top in (1.0, 2.0, 4.0, 8.0)])
    values = open_set_scores(logits, score).tolist()
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_energy_keeps_the_magnitude_softmax_drops() -> None:
    # Same softmax (logits differ by a constant), but energy rises with the logits' level.
    logits = torch.tensor([[10.0, 0.0], [1.0, -9.0]])
    softmax = open_set_scores(logits, OpenSetScore.MAX_SOFTMAX)
    energy = open_set_scores(logits, OpenSetScore.ENERGY)
    assert softmax[0].item() == pytest.approx(softmax[1].item())
    assert energy[0].item() - energy[1].item() == pytest.approx(9.0)


# -- threshold calibration ------------------------------------------------------------------------------------


def test_threshold_on_0_to_99_accepts_95_of_100() -> None:
    scores = list(range(100))
    random.Random(0).shuffle(scores)  # order does not matter
    threshold = calibrate_threshold(scores, 0.95)
    assert threshold == 5.0
    assert sum(s >= threshold for s in scores) == 95
    assert true_positive_rate(scores, threshold) == pytest.approx(0.95)


@pytest.mark.parametrize(("target", "threshold"), [(0.07, 93.0), (0.5, 50.0), (0.99, 1.0), (1.0, 0.0), (0.001, 99.0)])
def test_threshold_is_the_k_th_largest_score(target: float, threshold: float) -> None:
    scores = np.arange(100, dtype=np.float64)
    assert calibrate_threshold(scores, target) == threshold
    assert true_positive_rate(scores, threshold) >= target


def test_threshold_on_a_normal_distribution() -> None:
    scores = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    threshold = calibrate_threshold(scores, 0.9)
    tpr = true_positive_rate(scores, threshold)
    assert 0.9 <= tpr < 0.9 + 1 / 10_000 + 1e-12  # the highest threshold meeting the target
    assert threshold == pytest.approx(-1.2816, abs=0.05)  # the 10% quantile of N(0, 1)


def test_threshold_with_ties_and_tiny_sets() -> None:
    assert calibrate_threshold([0.3], 0.95) == 0.3
    assert calibrate_threshold([0.1, 0.9], 0.5) == 0.9  # k = 1
    assert calibrate_threshold([0.1, 0.9], 0.51) == 0.1  # k = 2
    ties = [1.0, 1.0, 1.0, 1.0, 2.0]
    threshold = calibrate_threshold(ties, 0.5)  # k = 3: the 3rd largest is a tied 1.0
    assert threshold == 1.0
    assert true_positive_rate(ties, threshold) == 1.0  # ties all accepted: above the target, never below


def test_threshold_rejects_bad_input() -> None:
    for target in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="target_tpr"):
            calibrate_threshold([1.0, 2.0], target)
    with pytest.raises(ValueError, match="without known scores"):
        calibrate_threshold([], 0.95)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([1.0, float("nan")], 0.95)


def test_false_and_true_positive_rates_accept_scores_at_the_threshold() -> None:
    assert false_positive_rate([0.0, 1.0, 2.0, 3.0], 2.0) == 0.5
    assert true_positive_rate(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2.0) == 0.5
    assert false_positive_rate(np.array([0.0, 1.0]), 5.0) == 0.0
    with pytest.raises(ValueError, match="empty"):
        false_positive_rate([], 0.5)


def test_float32_scores_compare_exactly_with_their_threshold() -> None:
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(3))  # float32
    threshold = calibrate_threshold(scores, 0.95)
    assert int((scores >= threshold).sum()) == 950


# -- AUROC ----------------------------------------------------------------------------------------------------


def test_auroc_perfect_inverted_and_identical() -> None:
    assert auroc([0.9, 0.8, 0.7], [0.1, 0.2]) == 1.0
    assert auroc([0.1, 0.2], [0.9, 0.8, 0.7]) == 0.0
    same = [0.1, 0.5, 0.5, 0.9]
    assert auroc(same, same) == pytest.approx(0.5)
    assert auroc([0.4, 0.4], [0.4, 0.4, 0.4]) == pytest.approx(0.5)  # every pair a tie


def test_auroc_partial_overlap_by_hand() -> None:
    # Pairs won by the known score: 0.9 beats all 3; 0.8 beats 0.5 and 0.3 and ties 0.8 (2.5); 0.4 beats 0.3.
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.3, 0.8]) == pytest.approx(6.5 / 9)


def test_auroc_matches_pair_counting_with_ties() -> None:
    rng = random.Random(7)
    known = [float(rng.randint(0, 5)) for _ in range(40)]
    unknown = [float(rng.randint(0, 4)) for _ in range(30)]
    wins = sum(1.0 if k > u else 0.5 if k == u else 0.0 for k in known for u in unknown)
    assert auroc(known, unknown) == pytest.approx(wins / (len(known) * len(unknown)))


def test_auroc_rejects_empty_sets() -> None:
    with pytest.raises(ValueError, match="AUROC"):
        auroc([], [0.1])
    with pytest.raises(ValueError, match="AUROC"):
        auroc([0.1], [])


# -- open-set report ------------------------------------------------------------------------------------------


def test_open_set_report_without_unknowns() -> None:
    val_logits = torch.tensor([[float(i), 0.0] for i in range(20)])
    report = open_set_report(val_logits, OpenSetScore.ENERGY, 0.9)
    known = open_set_scores(val_logits, OpenSetScore.ENERGY)
    assert report.score is OpenSetScore.ENERGY
    assert report.threshold == calibrate_threshold(known, 0.9)
    assert report.target_tpr == 0.9
    assert report.validation_tpr == pytest.approx(0.9)
    assert report.fpr_at_threshold is None
    assert report.auroc is None
    assert report.unknown_count == 0
    empty = open_set_report(val_logits, OpenSetScore.ENERGY, 0.9, torch.zeros(0, 2))
    assert (empty.fpr_at_threshold, empty.auroc, empty.unknown_count) == (None, None, 0)


def test_open_set_report_with_unknowns() -> None:
    # Known images are confident (max softmax near 1); unknown ones are near uniform, one is confident.
    val_logits = torch.tensor([[8.0, 0.0], [0.0, 9.0], [10.0, 0.0], [0.0, 7.0]])
    unknown_logits = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.0, 12.0], [0.3, 0.0]])
    report = open_set_report(val_logits, OpenSetScore.MAX_SOFTMAX, 0.75, unknown_logits)
    # k = 3 of 4 known: threshold = the 3rd most confident known = softmax of a 8-logit margin.
    assert report.threshold == pytest.approx(1 / (1 + math.exp(-8.0)))
    assert report.validation_tpr == 0.75
    assert report.fpr_at_threshold == 0.25  # the confident unknown is accepted
    # Every known beats the three uniform-ish unknowns; the confident unknown beats every known: 12/16.
    assert report.auroc == pytest.approx(12 / 16)
    assert report.unknown_count == 4


# -- repeats --------------------------------------------------------------------------------------------------


def test_aggregate_mean_and_sample_std_over_common_keys() -> None:
    runs = [{"accuracy": 0.8, "loss": 1.0}, {"accuracy": 0.9, "loss": 1.0, "extra": 5.0}]
    result = aggregate(runs)
    assert list(result) == ["accuracy", "loss"]  # "extra" is missing from the first run
    assert result["accuracy"][0] == pytest.approx(0.85)
    assert result["accuracy"][1] == pytest.approx(math.sqrt(0.005))  # ddof=1: ((0.05^2)*2)/1
    assert result["loss"] == (1.0, 0.0)
    four = aggregate([{"x": v} for v in (1.0, 2.0, 3.0, 4.0)])
    assert four["x"][0] == pytest.approx(2.5)
    assert four["x"][1] == pytest.approx(math.sqrt(5 / 3))


def test_aggregate_single_run_and_no_runs() -> None:
    assert aggregate([{"accuracy": 0.7}]) == {"accuracy": (0.7, 0.0)}
    assert aggregate([]) == {}
