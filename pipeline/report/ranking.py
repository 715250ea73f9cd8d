"""The ranked view of every config: val ACC (what the best-by-val rule reads) against mean test ACC with its
interval, so a reader sees how the winner was chosen and what the choice cost. Drawn like ``figures.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .analysis import ReportAnalysis, run_key
from .figures import PALETTE, PlotJob, chance_line, new_figure, save_png
from .inputs import GridResults, RunResult, all_runs
from .reading import setting_id
from .table import SkippedOutput

RANKED_NAME = "ranked.png"
MAX_ROWS = 60  # more configs: the best MAX_ROWS by val, and every selected one


def config_label(run: RunResult) -> str:
    setting = run.setting
    architecture = "" if run.is_full_architecture else f" {setting.aggregation}/{setting.head_blocks}"
    return f"{run.head_config.label()}{architecture}  {setting_id(setting.label())}  {run.run}"


def ranked_runs(grids: Sequence[GridResults], selected: set) -> tuple[list[RunResult], int]:
    """Runs with a test mean, best val ACC first (ties: higher val AP); at most MAX_ROWS plus the selected."""
    runs = [run for run in all_runs(grids) if run.has_test_mean]
    runs.sort(key=lambda run: (-run.summary.val_acc, -run.summary.val_ap, run.run))
    kept = [run for index, run in enumerate(runs) if index < MAX_ROWS or run_key(run) in selected]
    return kept, len(runs)


def plot_ranked(path: Path, runs: Sequence[RunResult], total: int, analysis: ReportAnalysis, selected: set) -> Path:
    figure = new_figure(9.0, 1.4 + 0.28 * len(runs))
    axis = figure.subplots()
    rows = np.arange(len(runs))[::-1]  # best by val on top
    val = np.array([100 * run.summary.val_acc for run in runs])
    test = np.array([100 * run.mean_acc for run in runs])
    low, high = [], []
    for run, mean in zip(runs, test):
        intervals = analysis.intervals_of(run)
        interval = intervals.mean[0] if intervals and intervals.mean else None
        low.append(mean - 100 * interval.low if interval else 0.0)
        high.append(100 * interval.high - mean if interval else 0.0)
    axis.scatter(val, rows, marker="o", facecolors="none", edgecolors=PALETTE[5], s=36, label="val ACC", zorder=4)
    axis.errorbar(
        test,
        rows,
        xerr=[low, high],
        fmt="s",
        color=PALETTE[0],
        markersize=5,
        capsize=2,
        label="mean test ACC (95 % interval where computed)",
        zorder=4,
    )
    chance_line(axis, horizontal=False)
    labels = [("\u2605 " if run_key(run) in selected else "") + config_label(run) for run in runs]
    axis.set_yticks(rows, labels, fontsize="x-small", family="monospace")
    for tick, run in zip(axis.get_yticklabels(), runs):
        if run_key(run) in selected:
            tick.set_fontweight("bold")
    axis.set_xlabel("ACC (%)")
    axis.set_xlim(min(40.0, float(np.nanmin([val.min(), test.min()])) - 5), 100)
    axis.grid(axis="x", alpha=0.4)
    shown = f"{len(runs)} of {total}" if total > len(runs) else f"{total}"
    figure.legend(*axis.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    figure.suptitle(f"All configs ranked by val ACC ({shown}; \u2605 selected)", fontsize="medium")
    return save_png(figure, path)


def ranked_job(grids: Sequence[GridResults], analysis: ReportAnalysis, out: Path) -> PlotJob | SkippedOutput:
    selected = {run_key(section.run) for section in analysis.sections}
    runs, total = ranked_runs(grids, selected)
    if not runs:
        return SkippedOutput(RANKED_NAME, "no run with a test mean")
    return (RANKED_NAME, functools.partial(plot_ranked, out / RANKED_NAME, runs, total, analysis, selected))
