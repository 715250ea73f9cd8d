"""Bootstrap intervals (pipeline.results.bootstrap) against scikit-learn on explicitly resampled copies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score

from pipeline.results.bootstrap import (
    BootstrapConfig,
    bootstrap_set,
    bootstrap_sets,
    mean_replicates,
    percentile_interval,
    resample_weights,
    weighted_metrics,
)


def scored_set(n: int, seed: int, separation: float = 0.8, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = 1 / (1 + np.exp(-rng.normal((2 * labels - 1) * separation, 1.0)))
    return labels, (np.round(scores, decimals) if decimals is not None else scores)


def test_weighted_metrics_equal_sklearn_on_the_resampled_copies_ties_included() -> None:
    labels, scores = scored_set(200, seed=0, decimals=2)  # rounding makes many ties
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    weights = resample_weights(np.random.default_rng(1), labels.size, 40)
    assert (weights.sum(axis=1) == labels.size).all()
    acc, ap = weighted_metrics(labels, scores, weights)
    for row in range(len(weights)):
        copy = np.repeat(np.arange(labels.size), weights[row])  # the resampled set, row by row
        assert acc[row] == pytest.approx(accuracy_score(labels[copy], scores[copy] > 0.5), abs=1e-12)
        assert ap[row] == pytest.approx(average_precision_score(labels[copy], scores[copy]), abs=1e-12)
        assert ap[row] == pytest.approx(average_precision_score(labels, scores, sample_weight=weights[row]), abs=1e-12)
    with pytest.raises(ValueError, match="sorted in decreasing order"):
        weighted_metrics(labels[::-1], scores[::-1], weights)


def test_intervals_are_reproducible_for_a_seed_and_contain_the_point_estimate() -> None:
    config = BootstrapConfig(resamples=500, seed=3)
    for seed in range(6):
        labels, scores = scored_set(int(np.random.default_rng(seed).integers(20, 400)), seed=seed)
        first = bootstrap_set(labels, scores, "progan", config)
        again = bootstrap_set(labels, scores, "progan", config)
        np.testing.assert_array_equal(first.acc, again.acc)
        np.testing.assert_array_equal(first.ap, again.ap)
        assert first.acc.shape == first.ap.shape == (500,)
        acc, ap = accuracy_score(labels, scores > 0.5), average_precision_score(labels, scores)
        assert first.interval("acc").contains(acc) and first.interval("ap").contains(ap)
        assert first.interval("acc").high - first.interval("acc").low > 0
    other_seed = bootstrap_set(labels, scores, "progan", BootstrapConfig(resamples=500, seed=4))
    assert not np.array_equal(other_seed.acc, first.acc)


def test_resamples_are_stratified_by_label() -> None:
    """One fake among 60 reals: plain resampling loses it in ~37 % of replicates (AP undefined); stratified never."""
    labels = np.zeros(61, dtype=int)
    labels[-1] = 1
    scores = np.linspace(0.01, 0.99, 61)
    replicates = bootstrap_set(labels, scores, "one_fake", BootstrapConfig(resamples=300))
    assert not np.isnan(replicates.ap).any()
    assert set(np.unique(replicates.ap)) == {1.0}  # the fake has the top score in every replicate
    without_fakes = bootstrap_set(np.zeros(10, dtype=int), np.linspace(0, 1, 10), "reals", BootstrapConfig(100))
    assert np.isnan(without_fakes.ap).all() and math.isnan(without_fakes.interval("ap").low)


def test_a_set_draws_from_its_own_stream_and_the_mean_is_taken_per_replicate() -> None:
    sets = {name: scored_set(80 + 10 * i, seed=i) for i, name in enumerate(("progan", "dalle", "guided"))}
    config = BootstrapConfig(resamples=200, seed=0)
    together = bootstrap_sets(sets, config)
    alone = bootstrap_set(*sets["dalle"], "dalle", config)
    np.testing.assert_array_equal(together["dalle"].ap, alone.ap)  # independent of the other sets
    mean = mean_replicates(list(together.values()))
    np.testing.assert_allclose(mean.acc, np.mean([r.acc for r in together.values()], axis=0))
    point = np.mean([accuracy_score(labels, scores > 0.5) for labels, scores in sets.values()])
    assert mean.interval("acc").contains(point)
    with_nan = mean_replicates([together["dalle"], bootstrap_set(np.zeros(5, int), np.full(5, 0.2), "r", config)])
    np.testing.assert_allclose(with_nan.ap, together["dalle"].ap)  # a set without AP is skipped, as nan_mean does


def test_percentile_interval_and_config_checks() -> None:
    values = np.random.default_rng(0).normal(size=1000)
    interval = percentile_interval(values, 0.9)
    assert (interval.low, interval.high) == tuple(np.percentile(values, (5, 95)))
    with pytest.raises(ValueError, match="resamples"):
        BootstrapConfig(resamples=-1)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapConfig(confidence=1.0)
    assert not BootstrapConfig(resamples=0).enabled
