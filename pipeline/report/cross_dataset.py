"""The cross-dataset matrix: ``cross_dataset_acc.csv`` / ``cross_dataset_ap.csv`` and their heatmap.

One row per protocol cell (the config selected by val in each training setting, ``selection.csv``), one column
per test set (center crop), each value the run's metric as in ``results.csv`` (in percent with one decimal, as
every wide per-set table) with its bootstrap interval, and the mean over the test sets the row did not train on
("off the diagonal"). Made when a report holds runs trained on a
subset of their split (``protocol``, ``train_datasets``). Format: docs/reports.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..names import ALL_DATASETS, BEST_BY_VAL, CENTER, LIST_SEPARATOR, STANDARD_PROTOCOL, VAL_SPLIT
from ..results.bootstrap import BootstrapConfig, Interval, Replicates, bootstrap_set, mean_replicates
from .inputs import GridResults, RunResult
from .numbers import percent
from .scores import read_run_scores
from .table import SkippedOutput, Table

MATRIX_METRICS: tuple[str, ...] = ("acc", "ap")
MATRIX_NAMES = {metric: f"cross_dataset_{metric}.csv" for metric in MATRIX_METRICS}
HEATMAP_NAME = "cross_dataset_acc.png"
OFF_DIAGONAL = "mean_off_diagonal"
KEY_HEADER: tuple[str, ...] = ("grid", "protocol", "train_datasets", "run")


@dataclass(frozen=True)
class MatrixRow:
    """One protocol cell: its run and, per test set, (metric value, interval or None)."""

    grid: str
    run: RunResult
    values: dict[str, dict[str, tuple[float, Interval | None]]]  # metric -> column -> (value, interval)

    @property
    def protocol(self) -> str:
        return self.run.setting.protocol

    @property
    def train_datasets(self) -> str:
        return self.run.setting.train_datasets

    @property
    def label(self) -> str:
        """The row's name on the heatmap: the datasets trained on (with the protocol when not standard)."""
        trained = self.train_datasets.replace(LIST_SEPARATOR, ", ")
        return trained if self.protocol == STANDARD_PROTOCOL else f"{trained} ({self.protocol})"

    def trained_on(self) -> set[str]:
        return set() if self.train_datasets == ALL_DATASETS else set(self.train_datasets.split(LIST_SEPARATOR))


def is_protocol_run(run: RunResult) -> bool:
    return run.setting.protocol != STANDARD_PROTOCOL or run.setting.train_datasets != ALL_DATASETS


def matrix_runs(grids: Sequence[GridResults]) -> list[tuple[str, RunResult]]:
    """(grid name, run) of every val-selected config of a grid that trains on subsets of its split."""
    chosen = []
    for grid in grids:
        for selection in grid.selections:
            if selection.rule == BEST_BY_VAL and is_protocol_run(selection.run):
                chosen.append((selection.run.row.grid, selection.run))
    return sorted(chosen, key=lambda item: (item[0], item[1].setting.protocol, item[1].setting.train_datasets))


def center_replicates(run: RunResult, config: BootstrapConfig) -> dict[str, Replicates]:
    """Test set -> bootstrap replicates of the run's center-crop scores (empty when intervals are off)."""
    if not config.enabled:
        return {}
    scored, _ = read_run_scores(run)
    return {
        dataset: bootstrap_set(*split.of_dataset(dataset), dataset, config)
        for split in scored
        if split.split != VAL_SPLIT and split.variant == CENTER
        for dataset in split.dataset_names()
    }


def matrix_row(grid: str, run: RunResult, config: BootstrapConfig) -> MatrixRow:
    replicates = center_replicates(run, config)
    row = MatrixRow(grid, run, {})
    off = [dataset for dataset in run.center if dataset not in row.trained_on()]
    for metric in MATRIX_METRICS:
        cells: dict[str, tuple[float, Interval | None]] = {}
        for dataset, scores in run.center.items():
            interval = replicates[dataset].interval(metric, config.confidence) if dataset in replicates else None
            cells[dataset] = (getattr(scores, metric), interval)
        off_values = [cells[dataset][0] for dataset in off]
        mean = float(np.mean(off_values)) if off_values else math.nan
        interval = None
        if off and all(dataset in replicates for dataset in off):
            interval = mean_replicates([replicates[dataset] for dataset in off]).interval(metric, config.confidence)
        cells[OFF_DIAGONAL] = (mean, interval)
        row.values[metric] = cells
    return row


def matrix_rows(grids: Sequence[GridResults], config: BootstrapConfig) -> list[MatrixRow]:
    return [matrix_row(grid, run, config) for grid, run in matrix_runs(grids)]


def set_columns(rows: Sequence[MatrixRow]) -> list[str]:
    return sorted({column for row in rows for column in row.values[MATRIX_METRICS[0]]} - {OFF_DIAGONAL})


def _bound(interval: Interval | None, side: str) -> str:
    return "" if interval is None else percent(getattr(interval, side))


def matrix_table(rows: Sequence[MatrixRow], metric: str) -> Table:
    columns = [*set_columns(rows), OFF_DIAGONAL]
    header = KEY_HEADER + tuple(f"{column}{suffix}" for column in columns for suffix in ("", "_low", "_high"))
    body = []
    for row in rows:
        cells = [row.grid, row.protocol, row.train_datasets, row.run.run]
        for column in columns:
            value, interval = row.values[metric].get(column, (math.nan, None))
            cells += [percent(value), _bound(interval, "low"), _bound(interval, "high")]
        body.append(tuple(cells))
    return Table(MATRIX_NAMES[metric], header, tuple(body))


def cross_dataset_tables(grids: Sequence[GridResults], config: BootstrapConfig, out: Path) -> list[Table]:
    """The two matrices; none (and no stale copy left in ``out``) for a report without protocol cells, where
    there is no matrix to make rather than one missing."""
    rows = matrix_rows(grids, config)
    if not rows:
        for name in (*MATRIX_NAMES.values(), HEATMAP_NAME):
            (out / name).unlink(missing_ok=True)
        return []
    return [matrix_table(rows, metric) for metric in MATRIX_METRICS]


def heatmap_job(grids: Sequence[GridResults], out: Path) -> list[tuple[str, Callable[[], Path]] | SkippedOutput]:
    """The ACC heatmap (rows: cells, columns: test sets), drawn by matplotlib; none without a matrix."""
    rows = matrix_rows(grids, BootstrapConfig(resamples=0))
    return [(HEATMAP_NAME, lambda: draw_heatmap(rows, out / HEATMAP_NAME))] if rows else []


def draw_heatmap(rows: Sequence[MatrixRow], path: Path) -> Path:
    from .figures import new_figure, save_png  # matplotlib only when there is a matrix to draw

    columns = [*set_columns(rows), OFF_DIAGONAL]
    values = np.array([[row.values["acc"].get(column, (math.nan, None))[0] for column in columns] for row in rows])
    figure = new_figure(1.0 + 0.8 * len(columns), 1.2 + 0.45 * len(rows))
    axes = figure.subplots()
    image = axes.imshow(100 * values, cmap="viridis", vmin=50, vmax=100, aspect="auto")
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            if not math.isnan(values[i, j]):
                trained = column in row.trained_on()
                text = f"{100 * values[i, j]:.1f}" + ("*" if trained else "")
                axes.text(
                    j, i, text, ha="center", va="center", fontsize=7, color="white" if values[i, j] < 0.8 else "black"
                )
    axes.set_xticks(range(len(columns)), [column.replace(OFF_DIAGONAL, "mean off-diag.") for column in columns])
    axes.set_yticks(range(len(rows)), [row.label for row in rows])
    axes.tick_params(axis="x", labelrotation=45)
    axes.set_xlabel("test set")
    axes.set_ylabel("trained on")
    axes.set_title("Cross-dataset ACC (%)")
    figure.colorbar(image, ax=axes, fraction=0.04)
    return save_png(figure, path)
