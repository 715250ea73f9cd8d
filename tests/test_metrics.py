"""Tests for pipeline.results.metrics against hand computations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from pipeline.results.metrics import (
    METRIC_NAMES,
    best_threshold,
    choose_thresholds,
    compute_metrics,
    expected_calibration_error,
    operating_point,
)

# labels 0 = real, 1 = fake
LABELS = np.array([0, 0, 1, 1, 0, 1])
SCORES = np.array([0.1, 0.6, 0.7, 0.4, 0.5, 0.5])


def test_metric_names_keep_the_first_format_first_and_match_the_columns() -> None:
    first_format = ("acc", "ap", "auc", "real_acc", "fake_acc", "oracle_acc", "oracle_threshold", "calibrated_acc",
                    "calibrated_threshold")  # fmt: skip
    assert METRIC_NAMES[: len(first_format)] == first_format
    assert tuple(compute_metrics(LABELS, SCORES).columns()) == METRIC_NAMES
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)


def test_hand_case_accuracies_and_oracle() -> None:
    m = compute_metrics(LABELS, SCORES)
    assert (m.n, m.n_real, m.n_fake) == (6, 3, 3)
    # fake iff score > 0.5: predictions R F F R R R -> right on samples 0, 2, 4
    assert m.acc == pytest.approx(3 / 6)
    assert m.real_acc == pytest.approx(2 / 3)  # reals 0.1, 0.6, 0.5 -> 0.1 and 0.5 called real
    assert m.fake_acc == pytest.approx(1 / 3)  # fakes 0.7, 0.4, 0.5 -> only 0.7 called fake
    # Cuts: -inf 3/6, 0.25 4/6, 0.45 3/6, 0.55 3/6, 0.65 4/6, +inf 3/6; the tie goes to the lowest.
    columns = m.columns()
    assert columns["oracle_acc"] == pytest.approx(4 / 6)
    assert columns["oracle_threshold"] == pytest.approx(0.25)
    # at 0.25 every fake and the reals 0.6, 0.5 are called fake
    assert (columns["oracle_real_acc"], columns["oracle_fake_acc"]) == (pytest.approx(1 / 3), 1.0)
    assert all(math.isnan(columns[f"{point}_{field}"]) for point in ("calibrated", "val_eer", "val_fpr1", "val_fpr5")
               for field in ("threshold", "acc", "real_acc", "fake_acc"))  # fmt: skip


def test_ap_and_auc_agree_with_sklearn_and_its_documented_example() -> None:
    m = compute_metrics(LABELS, SCORES)
    assert m.ap == pytest.approx(average_precision_score(LABELS, SCORES))
    assert m.auc == pytest.approx(roc_auc_score(LABELS, SCORES))
    # scikit-learn's documented example: AP 0.8333..., ROC AUC 0.75
    example = compute_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert example.ap == pytest.approx(0.8333333333)
    assert example.auc == pytest.approx(0.75)


def val_thresholds(value: float) -> dict[str, float]:
    return {"val": value, "eer": value, "fpr1": value, "fpr5": value}


def test_val_thresholds_use_greater_or_equal() -> None:
    m = compute_metrics(LABELS, SCORES, {"val": 0.65, "eer": 0.45, "fpr1": 0.8, "fpr5": 0.55}).columns()
    assert m["calibrated_threshold"] == 0.65
    assert m["calibrated_acc"] == pytest.approx(4 / 6)  # only 0.7 called fake
    assert (m["calibrated_real_acc"], m["calibrated_fake_acc"]) == (1.0, pytest.approx(1 / 3))
    # 0.45: 0.5, 0.5, 0.6, 0.7 called fake -> reals 0.1 right; fakes 0.7, 0.5 right
    assert (m["val_eer_threshold"], m["val_eer_acc"]) == (0.45, pytest.approx(3 / 6))
    assert (m["val_eer_real_acc"], m["val_eer_fake_acc"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert (m["val_fpr1_real_acc"], m["val_fpr1_fake_acc"]) == (1.0, 0.0)  # nothing reaches 0.8
    assert (m["val_fpr5_real_acc"], m["val_fpr5_fake_acc"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    edge = compute_metrics(np.array([0, 1]), np.array([0.2, 0.5]), val_thresholds(0.5))
    assert edge.acc == pytest.approx(0.5)  # 0.5 is not > 0.5: called real, as the authors' code does
    assert edge.columns()["calibrated_acc"] == pytest.approx(1.0)  # 0.5 >= 0.5: called fake


def test_only_reals() -> None:
    m = compute_metrics(np.array([0, 0, 0]), np.array([0.2, 0.7, 0.4]))
    assert (m.n_real, m.n_fake) == (3, 0)
    assert math.isnan(m.ap) and math.isnan(m.auc) and math.isnan(m.fake_acc)
    assert m.acc == pytest.approx(2 / 3) and m.real_acc == pytest.approx(2 / 3)
    columns = m.columns()
    assert (columns["oracle_threshold"], columns["oracle_acc"]) == (math.inf, 1.0)
    assert math.isnan(m.eer) and math.isnan(columns["oracle_fpr1_fake_acc"])
    assert columns["oracle_fpr1_threshold"] == math.inf  # 1 % of 3 reals allows none: above the highest score
    assert columns["oracle_fpr5_real_acc"] == 1.0


def test_only_fakes() -> None:
    m = compute_metrics(np.array([1, 1]), np.array([0.2, 0.9]), val_thresholds(0.1))
    assert math.isnan(m.auc) and math.isnan(m.real_acc) and math.isnan(m.eer)
    assert m.ap == pytest.approx(1.0)
    assert m.fake_acc == pytest.approx(0.5) and m.acc == pytest.approx(0.5)
    columns = m.columns()
    assert (columns["oracle_threshold"], columns["oracle_acc"]) == (-math.inf, 1.0)
    assert columns["calibrated_acc"] == pytest.approx(1.0)
    assert math.isnan(columns["oracle_fpr1_threshold"])  # no reals: no false-positive rate to hold


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


# ----------------------------------------------------------------------------- operating points, calibration


def random_sets(count: int = 60, seed: int = 1):
    """Scored sets with ties (few distinct scores) and without (continuous scores), both classes present."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        size = int(rng.integers(4, 300))
        labels = rng.integers(0, 2, size)
        labels[:2] = (0, 1)
        logits = rng.normal((2 * labels - 1) * rng.uniform(0, 2), 1.0)
        scores = 1 / (1 + np.exp(-logits))
        if index % 2:
            scores = np.round(scores * 8) / 8  # ties
        yield labels, scores


def sklearn_eer(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) from scikit-learn's ROC: the point where FPR and FNR are closest, ties to the lowest threshold."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    gap = np.abs(fpr - (1 - tpr))
    index = np.flatnonzero(gap == gap.min())[-1]  # roc_curve's thresholds descend
    return float((fpr[index] + 1 - tpr[index]) / 2), float(thresholds[index])


def test_eer_and_oracle_tpr_at_fpr_agree_with_sklearn_roc_curve() -> None:
    for labels, scores in random_sets():
        columns = compute_metrics(labels, scores).columns()
        eer, roc_threshold = sklearn_eer(labels, scores)
        assert columns["eer"] == pytest.approx(eer)
        # the same cut: our threshold sits just below roc_curve's (a score), above the next lower score
        assert columns["oracle_eer_threshold"] <= roc_threshold
        assert not np.any((scores >= columns["oracle_eer_threshold"]) & (scores < roc_threshold))
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        for name, target in (("fpr1", 0.01), ("fpr5", 0.05)):
            assert columns[f"oracle_{name}_fake_acc"] == pytest.approx(tpr[fpr <= target].max())
            reals = scores[labels == 0]
            assert np.sum(reals >= columns[f"oracle_{name}_threshold"]) <= math.floor(target * len(reals) + 1e-9)


def test_fpr_thresholds_count_false_positives_exactly() -> None:
    """100 reals: 1 % allows exactly one real above the threshold; 5 % five."""
    reals = np.linspace(0.01, 0.5, 100)
    fakes = np.array([0.3, 0.45, 0.49, 0.6, 0.9])
    labels = np.concatenate([np.zeros(100, int), np.ones(5, int)])
    points = choose_thresholds(labels, np.concatenate([reals, fakes]))
    assert np.sum(reals >= points["fpr1"].threshold) == 1
    assert np.sum(reals >= points["fpr5"].threshold) == 5
    assert points["fpr1"].real_acc == pytest.approx(0.99) and points["fpr5"].real_acc == pytest.approx(0.95)
    assert points["fpr1"].fake_acc == pytest.approx(2 / 5)  # 0.6 and 0.9 sit above the second-highest real
    assert points["fpr5"].fake_acc == pytest.approx(3 / 5)  # 0.49 sits above the sixth-highest real (0.4505)


def test_chosen_thresholds_reproduce_their_metrics() -> None:
    for labels, scores in random_sets(20, seed=3):
        for rule, point in choose_thresholds(labels, scores).items():
            assert operating_point(labels, scores, point.threshold) == point, rule
        assert choose_thresholds(labels, scores)["val"].threshold == best_threshold(labels, scores)[0]


def independent_ece(labels: np.ndarray, scores: np.ndarray, n_bins: int = 15) -> float:
    """ECE written out bin by bin: scores in (lo, hi], the first bin [0, hi]."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, s in enumerate(scores) if (lo < s <= hi) or (b == 0 and s == 0.0)]
        if members:
            confidence = sum(scores[i] for i in members) / len(members)
            frequency = sum(labels[i] for i in members) / len(members)
            total += len(members) / len(scores) * abs(confidence - frequency)
    return total


def test_brier_matches_sklearn_and_ece_matches_an_independent_computation() -> None:
    for labels, scores in random_sets(30, seed=5):
        m = compute_metrics(labels, scores)
        assert m.brier == pytest.approx(brier_score_loss(labels, scores))
        assert m.ece == pytest.approx(independent_ece(labels, scores))
    # bin edges: 1/15 belongs to the first bin, 0 and 1 are kept
    edges = np.array([0.0, 1 / 15, 1.0])
    assert expected_calibration_error(np.array([0, 1, 1]), edges) == pytest.approx(independent_ece([0, 1, 1], edges))
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0
