"""Tests for pipeline.metrics against hand computations and scikit-learn."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.metrics import METRIC_NAMES, BinaryMetrics, best_threshold, compute_metrics

# labels 0 = real, 1 = fake
LABELS = np.array([0, 0, 1, 1, 0, 1])
SCORES = np.array([0.1, 0.6, 0.7, 0.4, 0.5, 0.5])


def test_metric_names_are_the_float_fields_in_order() -> None:
    assert METRIC_NAMES == tuple(f.name for f in fields(BinaryMetrics) if f.name not in ("n", "n_real", "n_fake"))


def test_hand_case_accuracies_and_oracle() -> None:
    m = compute_metrics(LABELS, SCORES)
    assert (m.n, m.n_real, m.n_fake) == (6, 3, 3)
    # fake iff score > 0.5: predictions R F F R R R -> right on samples 0, 2, 4
    assert m.acc == pytest.approx(3 / 6)
    assert m.real_acc == pytest.approx(2 / 3)  # reals 0.1, 0.6, 0.5 -> 0.1 and 0.5 called real
    assert m.fake_acc == pytest.approx(1 / 3)  # fakes 0.7, 0.4, 0.5 -> only 0.7 called fake
    # Cuts: -inf 3/6, 0.25 4/6, 0.45 3/6, 0.55 3/6, 0.65 4/6, +inf 3/6; the tie goes to the lowest.
    assert m.oracle_acc == pytest.approx(4 / 6)
    assert m.oracle_threshold == pytest.approx(0.25)
    assert math.isnan(m.calibrated_acc) and math.isnan(m.calibrated_threshold)


def test_ap_and_auc_agree_with_sklearn_and_its_documented_example() -> None:
    m = compute_metrics(LABELS, SCORES)
    assert m.ap == pytest.approx(average_precision_score(LABELS, SCORES))
    assert m.auc == pytest.approx(roc_auc_score(LABELS, SCORES))
    # scikit-learn's documented example: AP 0.8333..., ROC AUC 0.75
    example = compute_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert example.ap == pytest.approx(0.8333333333)
    assert example.auc == pytest.approx(0.75)


def test_calibrated_threshold_uses_greater_or_equal() -> None:
    m = compute_metrics(LABELS, SCORES, calibrated_threshold=0.65)
    assert m.calibrated_threshold == 0.65
    assert m.calibrated_acc == pytest.approx(4 / 6)  # only 0.7 called fake
    edge = compute_metrics(np.array([0, 1]), np.array([0.2, 0.5]), calibrated_threshold=0.5)
    assert edge.acc == pytest.approx(0.5)  # 0.5 is not > 0.5: called real, as the authors' code does
    assert edge.calibrated_acc == pytest.approx(1.0)  # 0.5 >= 0.5: called fake


def test_only_reals() -> None:
    m = compute_metrics(np.array([0, 0, 0]), np.array([0.2, 0.7, 0.4]))
    assert (m.n_real, m.n_fake) == (3, 0)
    assert math.isnan(m.ap) and math.isnan(m.auc) and math.isnan(m.fake_acc)
    assert m.acc == pytest.approx(2 / 3) and m.real_acc == pytest.approx(2 / 3)
    assert (m.oracle_threshold, m.oracle_acc) == (math.inf, 1.0)


def test_only_fakes() -> None:
    m = compute_metrics(np.array([1, 1]), np.array([0.2, 0.9]), calibrated_threshold=0.1)
    assert math.isnan(m.auc) and math.isnan(m.real_acc)
    assert m.ap == pytest.approx(1.0)
    assert m.fake_acc == pytest.approx(0.5) and m.acc == pytest.approx(0.5)
    assert (m.oracle_threshold, m.oracle_acc) == (-math.inf, 1.0)
    assert m.calibrated_acc == pytest.approx(1.0)


def test_identical_scores_offer_only_all_or_nothing() -> None:
    assert best_threshold(np.array([0, 1, 1]), np.array([0.5, 0.5, 0.5])) == (-math.inf, pytest.approx(2 / 3))
    assert best_threshold(np.array([0, 0, 1]), np.array([0.5, 0.5, 0.5])) == (math.inf, pytest.approx(2 / 3))


def test_threshold_between_adjacent_floats_still_separates_them() -> None:
    low = 0.3
    high = float(np.nextafter(low, 1.0))
    threshold, accuracy = best_threshold(np.array([0, 1]), np.array([low, high]))
    assert accuracy == 1.0
    assert low < threshold <= high


def brute_force_best(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    distinct = np.unique(scores)
    candidates = [-math.inf, *((distinct[:-1] + distinct[1:]) / 2), math.inf]
    results = [(float(np.mean((scores >= t) == (labels == 1))), t) for t in candidates]
    best_accuracy = max(accuracy for accuracy, _ in results)
    return min(t for accuracy, t in results if accuracy == best_accuracy), best_accuracy


def test_best_threshold_matches_brute_force_on_random_sets_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        size = int(rng.integers(1, 40))
        labels = rng.integers(0, 2, size)
        scores = rng.integers(0, 8, size) / 8  # few distinct values: many ties
        threshold, accuracy = best_threshold(labels, scores)
        expected_threshold, expected_accuracy = brute_force_best(labels, scores)
        assert accuracy == pytest.approx(expected_accuracy)
        assert threshold == expected_threshold


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.2, 1.7], "probabilities"),
        ([0, 1], [0.2, math.nan], "probabilities"),
        ([0, 2], [0.2, 0.3], "0 \\(real\\) or 1 \\(fake\\)"),
        ([], [], "empty"),
        ([0, 1, 0], [0.2, 0.3], "equal length"),
    ],
)
def test_invalid_inputs_are_refused(labels: list, scores: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(np.array(labels), np.array(scores))
