"""How the best run is chosen: per-run means (the 20-set rule), configs over their seeds, and the two selection rules; ``selection.csv``'s rows. Format: docs/results-format.md."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..names import BEST_BY_TEST, BEST_BY_VAL, LIST_SEPARATOR, PAPER_DATASETS, SELECTION_RULES, VAL_SPLIT
from .rows import HEAD_COLUMNS, HEAD_VALUES, OK, SETTING_COLUMNS, SETTING_FIELDS, ResultRow, Setting, format_value


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def mean_datasets(datasets: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(datasets that form a mean, datasets left out of it): the paper's 20 when any is present, else all."""
    present = set(datasets)
    paper = tuple(name for name in PAPER_DATASETS if name in present)
    if paper:
        return paper, tuple(sorted(present - set(paper)))
    return tuple(sorted(present)), ()


def mean_scores(scores: Mapping[str, tuple[float, float]]) -> tuple[float, float, tuple[str, ...], tuple[str, ...]]:
    """(mean ACC, mean AP, averaged datasets, excluded datasets) of dataset -> (acc, ap)."""
    averaged, excluded = mean_datasets(scores)
    mean_acc = nan_mean(scores[name][0] for name in averaged)
    mean_ap = nan_mean(scores[name][1] for name in averaged)
    return mean_acc, mean_ap, averaged, excluded


@dataclass(frozen=True)
class RunSummary:
    """One ok run: its first row (setting and config) and its means."""

    row: ResultRow
    val_acc: float
    val_ap: float
    mean_acc: float
    mean_ap: float
    mean_sets: tuple[str, ...]
    excluded_from_mean: tuple[str, ...]

    @property
    def run(self) -> str:
        return self.row.run


def summarize_runs(rows: Iterable[ResultRow]) -> dict[str, RunSummary]:
    """Run id -> its means (val over the val split; test over unperturbed test rows, the 20-set rule)."""
    first: dict[str, ResultRow] = {}
    val: dict[str, list[tuple[float, float]]] = {}
    test: dict[str, dict[str, tuple[float, float]]] = {}
    for row in rows:
        if row.status != OK:
            continue
        first.setdefault(row.run, row)
        pair = (row.metric("acc"), row.metric("ap"))
        if row.split == VAL_SPLIT:
            val.setdefault(row.run, []).append(pair)
        elif not row.is_perturbed:
            test.setdefault(row.run, {})[row.dataset or ""] = pair
    summaries = {}
    for run, row in first.items():
        mean_acc, mean_ap, averaged, excluded = mean_scores(test.get(run, {}))
        pairs = val.get(run, [])
        summaries[run] = RunSummary(
            row, nan_mean(a for a, _ in pairs), nan_mean(p for _, p in pairs), mean_acc, mean_ap, averaged, excluded
        )
    return summaries


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def nan_std(values: Iterable[float]) -> float:
    """Sample standard deviation (ddof 1) of the non-NaN values; NaN for fewer than two."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def setting_without_seed(setting: Setting, across: Sequence[str] = ()) -> tuple:
    """What runs that differ only in their seed (and in the fields ``across``) share: the selection's group."""
    return tuple(getattr(setting, name) for name in SETTING_FIELDS if name != "seed" and name not in across)


@dataclass(frozen=True)
class ConfigSummary:
    """One config (training setting without the seed, and head config) over the seeds it was run with.

    ``val_*`` and ``mean_*`` are means over the seeds (NaN skipped); ``*_std``
    their sample standard deviations (NaN with one seed). The representative
    run, which selection.csv names, is the one of the lowest seed.
    """

    runs: tuple[RunSummary, ...]  # in seed order

    @property
    def representative(self) -> RunSummary:
        return self.runs[0]

    @property
    def run(self) -> str:
        return self.representative.run

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(summary.row.setting.seed for summary in self.runs)

    def mean(self, name: str) -> float:
        return nan_mean(getattr(summary, name) for summary in self.runs)

    def std(self, name: str) -> float:
        return nan_std(getattr(summary, name) for summary in self.runs)

    @property
    def val_acc(self) -> float:
        return self.mean("val_acc")

    @property
    def val_ap(self) -> float:
        return self.mean("val_ap")

    @property
    def mean_acc(self) -> float:
        return self.mean("mean_acc")

    @property
    def mean_ap(self) -> float:
        return self.mean("mean_ap")


def config_key(row: ResultRow) -> tuple:
    """Runs with the same key differ only in their seed."""
    return (setting_without_seed(row.setting), row.head)


def summarize_configs(summaries: Iterable[RunSummary]) -> list[ConfigSummary]:
    """Group run summaries by config (everything but the seed), each group in seed order, then run id."""
    groups: dict[tuple, list[RunSummary]] = {}
    for summary in summaries:
        groups.setdefault(config_key(summary.row), []).append(summary)
    return [ConfigSummary(tuple(sorted(group, key=lambda s: (s.row.setting.seed, s.run)))) for group in groups.values()]


def acc_ap_rank(mean_acc: float, mean_ap: float) -> float:
    """The paper's model choice: mean test ACC + mean test AP, NaN ranked lowest."""
    return _nan_low(mean_acc + mean_ap)


def rule_score(rule: str, summary: RunSummary | ConfigSummary) -> tuple[float, ...]:
    """The key a rule maximises (ties go to the larger run id, so the choice is deterministic)."""
    if rule == BEST_BY_VAL:
        return (_nan_low(summary.val_acc), _nan_low(summary.val_ap))
    if rule == BEST_BY_TEST:
        return (acc_ap_rank(summary.mean_acc, summary.mean_ap),)
    raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")


def best_run(summaries: Iterable[RunSummary], rule: str = BEST_BY_TEST) -> RunSummary:
    return max(summaries, key=lambda summary: (rule_score(rule, summary), summary.run))


@dataclass(frozen=True)
class Selection:
    """A rule's choice in one setting: a config over its seeds, named by its representative run."""

    rule: str
    config: ConfigSummary

    @property
    def summary(self) -> RunSummary:
        return self.config.representative


def select_runs(summaries: Iterable[RunSummary], across: Sequence[str] = ()) -> list[Selection]:
    """Per training setting (without the seed), the best config by each rule of SELECTION_RULES, on seed means.

    ``across``: setting fields (``SELECT_ACROSS_FIELDS``) compared like the head config instead of
    separating settings, e.g. ``("epochs",)``: one best over every epoch count, as the authors pick their LDM
    model (over all 24 runs of 1, 3 and 5 epochs).
    """
    by_setting: dict[tuple, list[ConfigSummary]] = {}
    across = (*across, *HEAD_VALUES)  # k and C are chosen like xi, q, d'
    for config in summarize_configs(summaries):
        by_setting.setdefault(setting_without_seed(config.representative.row.setting, across), []).append(config)
    selections = []
    for key in sorted(by_setting, key=lambda key: tuple(format_value(value) for value in key)):
        for rule in SELECTION_RULES:
            best = max(by_setting[key], key=lambda config: (rule_score(rule, config), config.run))
            selections.append(Selection(rule, best))
    return selections


SELECTION_COLUMNS: tuple[str, ...] = (
    ("selection", "run", "grid", "model", "tap", "train", "head", "features", "k", "C")
    + HEAD_COLUMNS
    + SETTING_COLUMNS
    + ("val_acc", "val_ap", "mean_acc", "mean_ap", "n_mean_sets", "excluded_from_mean")
    + ("n_seeds", "seeds", "mean_acc_std", "mean_ap_std")
)


def selection_record(selection: Selection) -> dict[str, str]:
    """A selection.csv row."""
    config, summary = selection.config, selection.summary
    written = summary.row.to_csv()
    values = {column: written[column] for column in SELECTION_COLUMNS if column in written}
    values.update(
        selection=selection.rule,
        val_acc=format_value(config.val_acc),
        val_ap=format_value(config.val_ap),
        mean_acc=format_value(config.mean_acc),
        mean_ap=format_value(config.mean_ap),
        n_mean_sets=str(len(summary.mean_sets)),
        excluded_from_mean=LIST_SEPARATOR.join(summary.excluded_from_mean),
        n_seeds=str(len(config.runs)),
        seeds=format_value(config.seeds),
        mean_acc_std=format_value(config.std("mean_acc")),
        mean_ap_std=format_value(config.std("mean_ap")),
    )
    return values
