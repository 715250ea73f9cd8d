"""Paired differences of ACC and AP between two runs scored on the same test rows, with bootstrap intervals.

Both runs are judged on the same resamples (drawn as ``bootstrap.bootstrap_set`` draws them: stratified by label,
seeded by the seed and the set's name), so the interval is that of the difference itself, not of two independent
estimates. Used by ``pipeline fit --add-train`` (``delta.csv``, docs/results-format.md).
"""

from __future__ import annotations

import numpy as np

from .bootstrap import BootstrapConfig, Replicates, dataset_generator, resample_weights, weighted_metrics
from .metrics import validate_inputs

_CHUNK = 256  # replicates per block of work


def paired_delta_replicates(
    labels: np.ndarray, before: np.ndarray, after: np.ndarray, dataset: str, config: BootstrapConfig | None = None
) -> Replicates:
    """``after - before`` of ACC and AP on each of ``config.resamples`` label-stratified resamples of the rows."""
    config = config or BootstrapConfig()
    labels, before = validate_inputs(labels, before)
    _, after = validate_inputs(labels, after)
    rng = dataset_generator(config.seed, dataset)
    reals, fakes = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    orders = [np.argsort(-scores, kind="stable") for scores in (before, after)]
    acc_parts, ap_parts = [], []
    for start in range(0, config.resamples, _CHUNK):
        count = min(_CHUNK, config.resamples - start)
        weights = np.zeros((count, labels.size), dtype=np.int32)
        weights[:, reals] = resample_weights(rng, reals.size, count)
        weights[:, fakes] = resample_weights(rng, fakes.size, count)
        (acc_b, ap_b), (acc_a, ap_a) = (
            weighted_metrics(labels[order], scores[order], weights[:, order])
            for order, scores in zip(orders, (before, after))
        )
        acc_parts.append(acc_a - acc_b)
        ap_parts.append(ap_a - ap_b)
    if not acc_parts:
        return Replicates(np.zeros(0), np.zeros(0))
    return Replicates(np.concatenate(acc_parts), np.concatenate(ap_parts))
