"""Binary detection metrics for one scored set: the paper's two, ranking, operating points and calibration.

Labels 0 real, 1 fake; scores are probabilities of fake. ``acc``, ``real_acc`` and ``fake_acc`` predict fake
when ``score > 0.5`` (as the authors); every other threshold predicts fake when ``score >= threshold``, and
thresholds chosen from scores are cuts between distinct scores. ``compute_metrics`` gives ACC, AP, AUC, EER,
Brier, ECE and the operating points of ``THRESHOLD_RULES`` chosen on the set itself (``oracle*``) and on val
(``calibrated``, ``val_*``). Every definition: docs/results-format.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import sklearn
from sklearn.metrics import average_precision_score, roc_auc_score

from ..names import DEFAULT_THRESHOLD, FPR_TARGETS, THRESHOLD_RULES

ECE_BINS = 15
# Result columns: point -> the rule whose threshold it uses (oracle: chosen on the set; the others: chosen on val).
ORACLE_POINTS: dict[str, str] = {"oracle": "val", "oracle_eer": "eer", "oracle_fpr1": "fpr1", "oracle_fpr5": "fpr5"}
VAL_POINTS: dict[str, str] = {"calibrated": "val", "val_eer": "eer", "val_fpr1": "fpr1", "val_fpr5": "fpr5"}
POINT_FIELDS: tuple[str, ...] = ("threshold", "acc", "real_acc", "fake_acc")


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold (fake iff score >= threshold) and the accuracies it gives on a set; NaN where undefined."""

    threshold: float
    acc: float
    real_acc: float  # 1 - false-positive rate; NaN without reals
    fake_acc: float  # true-positive rate; NaN without fakes

    @property
    def fpr(self) -> float:
        return 1.0 - self.real_acc

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in POINT_FIELDS}


NO_POINT = OperatingPoint(math.nan, math.nan, math.nan, math.nan)


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
    eer: float  # equal error rate on this set; NaN when a class is absent
    brier: float
    ece: float
    points: Mapping[str, OperatingPoint]  # ORACLE_POINTS and VAL_POINTS names -> point (NaN without val thresholds)

    def columns(self) -> dict[str, float]:
        """Metric name -> value, in ``METRIC_NAMES`` order (what results.csv holds)."""
        values = {name: getattr(self, name) for name in SCALAR_METRICS}
        for point in (*ORACLE_POINTS, *VAL_POINTS):
            values.update({f"{point}_{field}": value for field, value in self.points[point].as_dict().items()})
        return {name: values[name] for name in METRIC_NAMES}


SCALAR_METRICS: tuple[str, ...] = ("acc", "ap", "auc", "real_acc", "fake_acc", "eer", "brier", "ece")
# The first nine are the columns of the first results.csv format, in their order.
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
    "oracle_real_acc",
    "oracle_fake_acc",
    "calibrated_real_acc",
    "calibrated_fake_acc",
    "eer",
    "brier",
    "ece",
    *(f"{point}_{field}" for point in ("oracle_eer", "oracle_fpr1", "oracle_fpr5") for field in POINT_FIELDS),
    *(f"{point}_{field}" for point in ("val_eer", "val_fpr1", "val_fpr5") for field in POINT_FIELDS),
)


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, val_thresholds: Mapping[str, float] | None = None
) -> BinaryMetrics:
    """Every metric of ``scores`` against ``labels``; ``val_thresholds`` (rule -> threshold) come from validation."""
    labels, scores = validate_inputs(labels, scores)
    is_fake = labels == 1
    n_fake = int(is_fake.sum())
    n_real = int(labels.size - n_fake)
    predicted_fake = scores > DEFAULT_THRESHOLD
    with sklearn.config_context(skip_parameter_validation=True):  # inputs checked above; saves ~30 % of these calls
        ap = float(average_precision_score(labels, scores)) if n_fake else math.nan
        auc = float(roc_auc_score(labels, scores)) if n_fake and n_real else math.nan
    cuts = score_cuts(labels, scores)
    points = {name: cuts.point(rule) for name, rule in ORACLE_POINTS.items()}
    for name, rule in VAL_POINTS.items():
        points[name] = NO_POINT if val_thresholds is None else operating_point(labels, scores, val_thresholds[rule])
    return BinaryMetrics(
        n=int(labels.size),
        n_real=n_real,
        n_fake=n_fake,
        acc=float(np.mean(predicted_fake == is_fake)),
        ap=ap,
        auc=auc,
        real_acc=float(np.mean(~predicted_fake[~is_fake])) if n_real else math.nan,
        fake_acc=float(np.mean(predicted_fake[is_fake])) if n_fake else math.nan,
        eer=cuts.equal_error_rate(),
        brier=brier_score(labels, scores),
        ece=expected_calibration_error(labels, scores),
        points=points,
    )


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> OperatingPoint:
    """Accuracies when fake iff ``score >= threshold``."""
    labels, scores = validate_inputs(labels, scores)
    is_fake = labels == 1
    called_fake = scores >= threshold
    return OperatingPoint(
        threshold=float(threshold),
        acc=float(np.mean(called_fake == is_fake)),
        real_acc=float(np.mean(~called_fake[~is_fake])) if (~is_fake).any() else math.nan,
        fake_acc=float(np.mean(called_fake[is_fake])) if is_fake.any() else math.nan,
    )


@dataclass(frozen=True)
class ScoreCuts:
    """Every distinct way to cut a scored set: cut k calls the k lowest scores real, the rest fake.

    ``thresholds`` ascend (-inf, midpoints between neighbouring distinct scores,
    +inf); ``reals_below`` / ``fakes_above`` count the correct calls at each.
    """

    thresholds: np.ndarray
    reals_below: np.ndarray
    fakes_above: np.ndarray
    n_real: int
    n_fake: int

    def fpr(self) -> np.ndarray:
        return 1.0 - self.reals_below / self.n_real if self.n_real else np.full(len(self.thresholds), math.nan)

    def fnr(self) -> np.ndarray:
        return 1.0 - self.fakes_above / self.n_fake if self.n_fake else np.full(len(self.thresholds), math.nan)

    def at(self, k: int) -> OperatingPoint:
        real_acc = self.reals_below[k] / self.n_real if self.n_real else math.nan
        fake_acc = self.fakes_above[k] / self.n_fake if self.n_fake else math.nan
        accuracy = (self.reals_below[k] + self.fakes_above[k]) / (self.n_real + self.n_fake)
        return OperatingPoint(float(self.thresholds[k]), float(accuracy), float(real_acc), float(fake_acc))

    def best_accuracy_cut(self) -> int:
        return int(np.argmax(self.reals_below + self.fakes_above))  # the first maximum: the lowest threshold

    def equal_error_cut(self) -> int | None:
        if not (self.n_real and self.n_fake):
            return None
        return int(np.argmin(np.abs(self.fpr() - self.fnr())))

    def fpr_cut(self, max_fpr: float) -> int | None:
        """The lowest threshold whose false-positive rate is at most ``max_fpr`` (None without reals)."""
        if not self.n_real:
            return None
        allowed = math.floor(max_fpr * self.n_real + 1e-9)  # false positives, counted exactly
        return int(np.flatnonzero(self.n_real - self.reals_below <= allowed)[0])  # +inf (none) always qualifies

    def point(self, rule: str) -> OperatingPoint:
        """The operating point a rule of ``THRESHOLD_RULES`` chooses on this set (NaN when it cannot)."""
        if rule == "val":
            cut = self.best_accuracy_cut()
        elif rule == "eer":
            cut = self.equal_error_cut()
        elif rule in FPR_TARGETS:
            cut = self.fpr_cut(FPR_TARGETS[rule])
        else:
            raise ValueError(f"unknown threshold rule {rule!r}; known: {', '.join(THRESHOLD_RULES)}")
        return NO_POINT if cut is None else self.at(cut)

    def equal_error_rate(self) -> float:
        cut = self.equal_error_cut()
        return math.nan if cut is None else float((self.fpr()[cut] + self.fnr()[cut]) / 2)


def score_cuts(labels: np.ndarray, scores: np.ndarray) -> ScoreCuts:
    """The cuts of a scored set (see :class:`ScoreCuts`)."""
    labels, scores = validate_inputs(labels, scores)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_fake = scores[order], labels[order] == 1
    # A cut after k sorted samples calls the first k real and the rest fake.
    reals_below = np.concatenate(([0], np.cumsum(~sorted_fake)))
    fakes_above = sorted_fake.sum() - np.concatenate(([0], np.cumsum(sorted_fake)))
    inner = np.flatnonzero(np.diff(sorted_scores) > 0) + 1
    below, above = sorted_scores[inner - 1], sorted_scores[inner]
    midpoints = (below + above) / 2
    midpoints = np.where(midpoints > below, midpoints, above)  # adjacent floats: the midpoint may round down
    valid = np.concatenate(([0], inner, [scores.size]))
    n_fake = int(sorted_fake.sum())
    return ScoreCuts(
        thresholds=np.concatenate(([-math.inf], midpoints, [math.inf])),
        reals_below=reals_below[valid],
        fakes_above=fakes_above[valid],
        n_real=int(scores.size - n_fake),
        n_fake=n_fake,
    )


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) of the cut with the highest accuracy, fake iff ``score >= threshold``; ties: lowest."""
    point = score_cuts(labels, scores).point("val")
    return point.threshold, point.acc


def choose_thresholds(labels: np.ndarray, scores: np.ndarray) -> dict[str, OperatingPoint]:
    """Rule of ``THRESHOLD_RULES`` -> the operating point it chooses on this (validation) set."""
    cuts = score_cuts(labels, scores)
    return {rule: cuts.point(rule) for rule in THRESHOLD_RULES}


def brier_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean squared difference between the probability of fake and the label."""
    labels, scores = validate_inputs(labels, scores)
    return float(np.mean((scores - labels) ** 2))


def reliability_bins(
    labels: np.ndarray, scores: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of the score: (count, mean score, fraction of fakes); NaN means in empty bins.

    Bin b holds scores in (b / n, (b + 1) / n]; the first bin also holds 0.
    """
    labels, scores = validate_inputs(labels, scores)
    bins = np.clip(np.ceil(scores * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(bins, weights=scores, minlength=n_bins) / counts
        fake_fraction = np.bincount(bins, weights=labels, minlength=n_bins) / counts
    return counts, mean_score, fake_fraction


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Count-weighted mean over bins of |mean score - fraction of fakes| (see :func:`reliability_bins`)."""
    counts, mean_score, fake_fraction = reliability_bins(labels, scores, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(mean_score[filled] - fake_fraction[filled])) / counts.sum())


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
