"""Bootstrap intervals of a run's ACC and AP per scored set and of its test mean (``pipeline.results.bootstrap``).

Computed from the run's ``scores_<split>.csv`` files; the mean's interval
averages, per replicate, exactly the sets that form the run's test mean
(``pipeline.results``: unperturbed evaluation, the paper's 20 sets when any
is present).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..names import UNPERTURBED_VARIANTS, VAL_SPLIT
from ..results.bootstrap import BootstrapConfig, Interval, Replicates, bootstrap_set, mean_replicates
from .inputs import RunResult
from .scores import read_run_scores

MetricIntervals = tuple[Interval, Interval]  # (ACC, AP)


@dataclass(frozen=True)
class RunIntervals:
    run: str
    per_set: Mapping[tuple[str, str], MetricIntervals]  # (split, dataset) -> intervals
    mean: MetricIntervals | None  # of the test mean; None when the run has no test mean or a file is missing
    missing: tuple[str, ...]  # splits without a scores file

    def of(self, split: str, dataset: str) -> MetricIntervals | None:
        return self.per_set.get((split, dataset))


def run_intervals(run: RunResult, config: BootstrapConfig) -> RunIntervals:
    """Intervals of every scored set of ``run`` (val included) and of its test mean."""
    scored, missing = read_run_scores(run, include_val=True)
    per_set: dict[tuple[str, str], MetricIntervals] = {}
    unperturbed: dict[str, Replicates] = {}
    for split in scored:
        for dataset in split.dataset_names():
            replicates = bootstrap_set(*split.of_dataset(dataset), dataset, config)
            per_set[(split.split, dataset)] = intervals_of(replicates, config)
            if split.split != VAL_SPLIT and split.variant in UNPERTURBED_VARIANTS:
                unperturbed[dataset] = replicates
    mean_sets = run.summary.mean_sets
    mean = None
    if mean_sets and all(dataset in unperturbed for dataset in mean_sets):
        mean = intervals_of(mean_replicates([unperturbed[dataset] for dataset in mean_sets]), config)
    return RunIntervals(run.run, per_set, mean, tuple(missing))


def intervals_of(replicates: Replicates, config: BootstrapConfig) -> MetricIntervals:
    return replicates.interval("acc", config.confidence), replicates.interval("ap", config.confidence)
