"""What every table of the report is made of: a ``Table`` (or a ``SkippedOutput`` saying why not), score rows beside the authors', and one way of writing each kind of number. Percentages have one decimal; ``avg`` columns follow ``pipeline.results.mean_datasets`` and ``excluded_from_avg`` names the sets left out."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from ..files import atomic_path
from ..names import LIST_SEPARATOR, PAPER_DATASETS
from ..results import HeadConfig, mean_datasets, nan_mean
from ..results.bootstrap import Interval
from .inputs import RunResult, Scores
from .numbers import percent

PUBLISHED = "published"
OURS, AUTHORS = "ours", "authors"


FULL = "full"


ABLATION_ORDER: tuple[str, ...] = (FULL, "without_intermediate", "without_tie", "without_contrastive")


METRICS: tuple[str, ...] = ("acc", "ap")


@dataclass(frozen=True)
class SkippedOutput:
    name: str
    reason: str


@dataclass(frozen=True)
class Table:
    name: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


class RowKey:
    """The columns that say which model a score row is: a dataclass whose fields are the table's key header."""

    @classmethod
    def header(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def cells(self) -> tuple[str, ...]:
        return tuple(format_cell(getattr(self, f.name)) for f in fields(self))


@dataclass(frozen=True)
class ScoreKey(RowKey):
    """Key of acc.csv / ap.csv: a selected config of ours, or the authors' published one."""

    source: str
    backbone: str
    tap: str
    n_classes: int | None
    setting: str
    selection: str
    run: str
    contrastive_factor: float
    proj_layers: int
    proj_dim: int
    seeds: str = ""


@dataclass(frozen=True)
class StudyKey(RowKey):
    """Key of the study tables (epochs.csv, fractions.csv, ldm.csv)."""

    source: str
    backbone: str
    tap: str
    n_classes: int | None
    train: str
    contrastive_factor: float
    proj_layers: int
    proj_dim: int
    epochs: int
    train_fraction: float
    run: str


def format_cell(value: object) -> str:
    """Key cells: '' for None, %g for floats (0.1, not 0.1000000000000000055), text otherwise."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class ScoreRow:
    """One model's scores per test set, with the columns that say which model it is."""

    key: RowKey  # the table's key columns
    scores: Mapping[str, Scores]


def write_table(out: Path, table: Table) -> Path:
    """Write a table atomically (temporary name, then rename)."""
    path = out / table.name
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(table.header)
        writer.writerows(table.rows)
    return path


def order_datasets(names: Iterable[str]) -> list[str]:
    """Paper order first (only those present), then any other test sets sorted."""
    present = set(names)
    return [name for name in PAPER_DATASETS if name in present] + sorted(present - set(PAPER_DATASETS))


format_percent = percent  # a fraction as a percentage with one decimal (pipeline.report.numbers)


def format_float(value: float) -> str:
    """Full precision (repr), 'nan' for NaN."""
    return "nan" if math.isnan(value) else repr(float(value))


def format_hyper(config: HeadConfig) -> tuple[str, str, str]:
    return (f"{config.contrastive_factor:g}", str(config.proj_layers), str(config.proj_dim))


def format_n_classes(n_classes: int | None) -> str:
    return "" if n_classes is None else str(n_classes)


def group_sort_key(backbone: str, n_classes: int | None) -> tuple[str, bool, int]:
    return (backbone, n_classes is None, n_classes or 0)


def scores_from_reference(pairs: Mapping[str, tuple[float, float]]) -> dict[str, Scores]:
    return {dataset: Scores(acc, ap) for dataset, (acc, ap) in pairs.items()}


def averaged(scores: Mapping[str, Scores], metric: str) -> tuple[float | None, tuple[str, ...]]:
    """(mean of ``metric`` over the sets that form a mean, the sets left out); None without scores."""
    if not scores:
        return None, ()
    included, excluded = mean_datasets(scores)
    return nan_mean(getattr(scores[name], metric) for name in included), excluded


def score_table(name: str, key: type[RowKey], rows: Sequence[ScoreRow], metrics: Sequence[str]) -> Table:
    """Key columns, then (with several metrics) a ``metric`` column, one column per test set, ``avg``, ``excluded_from_avg``."""
    datasets = order_datasets(dataset for row in rows for dataset in row.scores)
    metric_header = ("metric",) if len(metrics) > 1 else ()
    header = (*key.header(), *metric_header, *datasets, "avg", "excluded_from_avg")
    out = []
    for metric in metrics:
        for row in rows:
            values = {dataset: getattr(scores, metric) for dataset, scores in row.scores.items()}
            mean, excluded = averaged(row.scores, metric)
            out.append(
                (
                    *row.key.cells(),
                    *((metric,) if metric_header else ()),
                    *(format_percent(values.get(d)) for d in datasets),
                    format_percent(mean),
                    LIST_SEPARATOR.join(excluded),
                )
            )
    return Table(name, header, tuple(out))


def mean_over_runs(runs: Sequence[RunResult], variant: str = "center") -> dict[str, Scores]:
    """Dataset -> ACC and AP averaged over ``runs`` (the seeds of a config), NaN skipped."""
    per_dataset: dict[str, list[Scores]] = {}
    for run in runs:
        for dataset, scores in run.test.get(variant, {}).items():
            per_dataset.setdefault(dataset, []).append(scores)
    return {
        dataset: Scores(nan_mean(s.acc for s in scores), nan_mean(s.ap for s in scores))
        for dataset, scores in per_dataset.items()
    }


INTERVAL_COLUMNS = ("acc_ci_low_pct", "acc_ci_high_pct", "ap_ci_low_pct", "ap_ci_high_pct")


def format_intervals(intervals: tuple[Interval, Interval] | None) -> tuple[str, ...]:
    """(ACC low, ACC high, AP low, AP high) in percent with one decimal; empty when not computed."""
    if intervals is None:
        return ("",) * 4
    return tuple(format_percent(value) for interval in intervals for value in (interval.low, interval.high))
