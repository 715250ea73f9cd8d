"""Binary detection metrics for one test set: accuracy at 0.5, AP, AUC, per-class and thresholded accuracies.

Labels: 0 = real, 1 = fake. Scores are fake probabilities in [0, 1] (a sigmoid
output, or the sigmoid of the mean ten-crop logit). Two threshold conventions, both documented:

* ``acc``, ``real_acc``, ``fake_acc`` predict fake when ``score > 0.5`` (strictly), as
  the authors' evaluation does (``accuracy_score(y_true, y_score > 0.5)``).
* ``best_threshold`` and the calibrated threshold predict fake when
  ``score >= threshold``; best thresholds are midpoints between neighbouring distinct
  scores (or -inf / +inf for "all fake" / "all real"), so no score of the set they
  were chosen on sits exactly on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of one scored set; accuracies are fractions in [0, 1], NaN where undefined."""

    n: int
    n_real: int
    n_fake: int
    acc: float  # fake iff score > 0.5
    ap: float  # average_precision_score with fake = 1; NaN without fakes
    auc: float  # roc_auc_score; NaN when a class is absent
    real_acc: float  # fraction of reals with score <= 0.5; NaN without reals
    fake_acc: float  # fraction of fakes with score > 0.5; NaN without fakes
    oracle_acc: float  # best accuracy over all cuts of this set
    oracle_threshold: float  # the cut reaching it (fake iff score >= threshold)
    calibrated_acc: float  # accuracy at the caller's threshold (fake iff score >= threshold); NaN if none
    calibrated_threshold: float  # the caller's threshold; NaN if none


METRIC_NAMES: tuple[str, ...] = (
    "acc",
    "ap",
    "auc",
    "real_acc",
    "fake_acc",
    "oracle_acc",
    "oracle_threshold",
    "calibrated_acc",
    "calibrated_threshold",
)


def compute_metrics(labels: np.ndarray, scores: np.ndarray, calibrated_threshold: float | None = None) -> BinaryMetrics:
    """Return every metric of ``scores`` against ``labels``; ``calibrated_threshold`` usually comes from validation."""
    labels, scores = validate_inputs(labels, scores)
    is_fake = labels == 1
    n_fake = int(is_fake.sum())
    n_real = int(labels.size - n_fake)
    predicted_fake = scores > DEFAULT_THRESHOLD
    oracle_threshold, oracle_acc = best_threshold(labels, scores)
    if calibrated_threshold is None:
        calibrated_acc, calibrated = math.nan, math.nan
    else:
        calibrated = float(calibrated_threshold)
        calibrated_acc = float(np.mean((scores >= calibrated) == is_fake))
    return BinaryMetrics(
        n=int(labels.size),
        n_real=n_real,
        n_fake=n_fake,
        acc=float(np.mean(predicted_fake == is_fake)),
        ap=float(average_precision_score(labels, scores)) if n_fake else math.nan,
        auc=float(roc_auc_score(labels, scores)) if n_fake and n_real else math.nan,
        real_acc=float(np.mean(~predicted_fake[~is_fake])) if n_real else math.nan,
        fake_acc=float(np.mean(predicted_fake[is_fake])) if n_fake else math.nan,
        oracle_acc=oracle_acc,
        oracle_threshold=oracle_threshold,
        calibrated_acc=calibrated_acc,
        calibrated_threshold=calibrated,
    )


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Return (threshold, accuracy) of the cut with the highest accuracy, fake iff ``score >= threshold``.

    Candidate cuts: -inf (all fake), the midpoint between each pair of neighbouring
    distinct scores, +inf (all real). Ties go to the lowest threshold.
    """
    labels, scores = validate_inputs(labels, scores)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_fake = scores[order], labels[order] == 1
    # A cut after k sorted samples calls the first k real and the rest fake.
    reals_below = np.concatenate(([0], np.cumsum(~sorted_fake)))
    fakes_above = sorted_fake.sum() - np.concatenate(([0], np.cumsum(sorted_fake)))
    correct = reals_below + fakes_above
    valid_cuts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_scores) > 0) + 1, [scores.size]))
    best_cut = int(valid_cuts[np.argmax(correct[valid_cuts])])
    if best_cut == 0:
        threshold = -math.inf
    elif best_cut == scores.size:
        threshold = math.inf
    else:
        below, above = sorted_scores[best_cut - 1], sorted_scores[best_cut]
        midpoint = (below + above) / 2
        threshold = float(midpoint if midpoint > below else above)  # adjacent floats: the midpoint may round down
    return threshold, float(correct[best_cut] / scores.size)


def validate_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as int64 and scores as float64 after checking shape, label values and score range."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {labels.shape} and {scores.shape}")
    if labels.size == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), found {sorted(set(np.unique(labels).tolist()))}")
    if not (np.isfinite(scores).all() and scores.min() >= 0.0 and scores.max() <= 1.0):
        raise ValueError("scores must be probabilities in [0, 1] (pass sigmoid outputs, not logits) without NaN")
    return labels.astype(np.int64), scores
