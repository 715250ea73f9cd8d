"""Seeded bootstrap confidence intervals for ACC and AP of scored test sets and of their mean.

A replicate resamples a set stratified by label (its reals and its fakes each with replacement), as integer
weights over the rows; AP follows scikit-learn's exactly, ties included. A set's draws are seeded by
``(seed, crc32(dataset))`` alone, so an interval does not depend on what else is reported and two runs on the
same rows are compared on the same resamples; a mean over sets takes the mean per replicate. Percentile
intervals (95 % by default).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..names import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_THRESHOLD
from .metrics import validate_inputs

_CHUNK_CELLS = 1 << 18  # replicates x rows per block of work: small blocks stay in cache


@dataclass(frozen=True)
class BootstrapConfig:
    resamples: int = DEFAULT_RESAMPLES  # 0: no intervals
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if self.resamples < 0:
            raise ValueError(f"bootstrap resamples must be >= 0, got {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"bootstrap confidence must be in (0, 1), got {self.confidence}")

    @property
    def enabled(self) -> bool:
        return self.resamples > 0


@dataclass(frozen=True)
class Interval:
    """A confidence interval; NaN bounds when the metric is undefined (AP of a set without fakes)."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Replicates:
    """ACC and AP of every bootstrap replicate of one test set (or of a mean over sets)."""

    acc: np.ndarray  # (resamples,)
    ap: np.ndarray

    def interval(self, metric: str, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
        return percentile_interval(getattr(self, metric), confidence)


def dataset_generator(seed: int, dataset: str) -> np.random.Generator:
    """The generator of one test set's resamples: seeded by the seed and the set's name only."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])


def resample_weights(rng: np.random.Generator, n_rows: int, resamples: int) -> np.ndarray:
    """(resamples, n_rows) int32: how often each of ``n_rows`` rows is drawn in ``n_rows`` draws with replacement."""
    if n_rows == 0:
        return np.zeros((resamples, 0), dtype=np.int32)
    draws = rng.integers(0, n_rows, size=(resamples, n_rows))
    draws += np.arange(resamples, dtype=draws.dtype)[:, None] * n_rows
    counts = np.bincount(draws.ravel(), minlength=resamples * n_rows)
    return counts.astype(np.int32).reshape(resamples, n_rows)


def weighted_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ACC (fake iff score > 0.5) and AP of each row of integer ``weights`` (a resampled copy of the set).

    ``scores`` must be sorted in decreasing order (``labels`` and the weight
    columns in the same order). AP = the sum over distinct thresholds t, from
    high to low, of (recall gained at t) x (precision at t): scikit-learn's
    definition; NaN for a weight row without any fake.
    """
    if np.any(np.diff(scores) > 0):
        raise ValueError("weighted_metrics needs scores sorted in decreasing order")
    fake = labels == 1
    correct = (scores > DEFAULT_THRESHOLD) == fake
    totals = weights.sum(axis=1, dtype=np.int64)
    hits = weights[:, correct].sum(axis=1, dtype=np.int64)
    acc = np.divide(hits, totals, out=np.full(totals.shape, np.nan), where=totals > 0)
    true_positives = np.cumsum(np.where(fake, weights, 0), axis=1, dtype=np.int64)
    predicted = np.cumsum(weights, axis=1, dtype=np.int64)
    ends = np.flatnonzero(np.append(np.diff(scores) != 0, True))  # last row of each distinct score
    tp, seen = true_positives[:, ends], predicted[:, ends]
    gained = np.diff(tp, axis=1, prepend=0)
    precision = np.divide(tp, seen, out=np.zeros(tp.shape), where=seen > 0)
    n_fake = tp[:, -1]
    ap = np.divide((gained * precision).sum(axis=1), n_fake, out=np.full(n_fake.shape, np.nan), where=n_fake > 0)
    return acc, ap


def bootstrap_set(
    labels: np.ndarray, scores: np.ndarray, dataset: str, config: BootstrapConfig = BootstrapConfig()
) -> Replicates:
    """ACC and AP of ``config.resamples`` label-stratified resamples of one scored test set."""
    labels, scores = validate_inputs(labels, scores)
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    rng = dataset_generator(config.seed, dataset)
    reals, fakes = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    chunk = max(1, _CHUNK_CELLS // labels.size)
    acc_parts, ap_parts = [], []
    for start in range(0, config.resamples, chunk):
        count = min(chunk, config.resamples - start)
        weights = np.zeros((count, labels.size), dtype=np.int32)
        weights[:, reals] = resample_weights(rng, reals.size, count)
        weights[:, fakes] = resample_weights(rng, fakes.size, count)
        acc, ap = weighted_metrics(labels, scores, weights)
        acc_parts.append(acc)
        ap_parts.append(ap)
    return Replicates(np.concatenate(acc_parts), np.concatenate(ap_parts))


def mean_replicates(sets: Sequence[Replicates]) -> Replicates:
    """Per replicate, the mean over test sets (NaN skipped; NaN where every set is NaN)."""
    if not sets:
        raise ValueError("a mean needs at least one test set")

    def mean(metric: str) -> np.ndarray:
        stacked = np.stack([getattr(s, metric) for s in sets])
        counts = np.sum(~np.isnan(stacked), axis=0)
        sums = np.nansum(stacked, axis=0)
        return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)

    return Replicates(mean("acc"), mean("ap"))


def percentile_interval(values: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The central ``confidence`` percentile interval of ``values``; NaN bounds if any value is NaN."""
    if values.size == 0 or np.isnan(values).any():
        return Interval(math.nan, math.nan)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, (tail, 100 - tail))
    return Interval(float(low), float(high))


def bootstrap_sets(
    scored: Mapping[str, tuple[np.ndarray, np.ndarray]], config: BootstrapConfig = BootstrapConfig()
) -> dict[str, Replicates]:
    """Dataset -> its replicates, for dataset -> (labels, scores)."""
    return {dataset: bootstrap_set(labels, scores, dataset, config) for dataset, (labels, scores) in scored.items()}
