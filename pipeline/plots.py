"""Draw the report's figures as PNG files with matplotlib's Agg canvas (no pyplot, no global backend state).

Each function takes plain numbers (percentages) prepared by ``pipeline.report``
and writes one figure atomically (temporary name, then rename); it knows
nothing about results.csv.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .files import atomic_path

DPI = 100
ACC_COLOR = "tab:olive"
AP_COLOR = "goldenrod"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def wrap_title(title: str, width: int = 80) -> str:
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def save_png(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def plot_per_dataset(
    path: Path, title: str, datasets: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
) -> Path:
    """Grouped bars per test set, one bar per series (label -> (ACC %, AP %)); ACC panel above AP panel."""
    figure = new_figure(max(8.0, 0.3 * len(datasets) * max(1, len(series)) + 3), 7.5)
    axes = figure.subplots(2, 1, sharex=True)
    positions = np.arange(len(datasets))
    width = 0.8 / max(1, len(series))
    for axis, metric, index in ((axes[0], "ACC", 0), (axes[1], "AP", 1)):
        for k, (label, values) in enumerate(series.items()):
            heights = np.asarray(values[index], dtype=float)
            present = heights[np.isfinite(heights)]
            average = f"avg {present.mean():.1f} over {present.size} sets" if present.size else "no values"
            axis.bar(positions + (k - (len(series) - 1) / 2) * width, heights, width, label=f"{label} ({average})")
        axis.set_ylabel(f"{metric} (%)")
        axis.set_ylim(0, 122)  # room for the legend above the 100 % line
        axis.set_yticks(range(0, 101, 20))
        axis.grid(axis="y", alpha=0.4)
        axis.legend(loc="upper center", ncol=len(series), fontsize="small")
    axes[1].set_xticks(positions, datasets, rotation=40, ha="right")
    axes[1].set_xlabel("test set")
    figure.suptitle(wrap_title(title), fontsize="medium")
    return save_png(figure, path)


def plot_hyperparam_boxes(
    path: Path, title: str, panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]
) -> Path:
    """One panel per hyper-parameter: for each value, a box of ACC % and a box of AP % over runs."""
    figure = new_figure(4.5 * len(panels), 4.8)
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    width = 0.35
    for axis, (label, per_value) in zip(axes, panels.items()):
        positions = np.arange(len(per_value))
        for offset, index, color in ((-width / 2, 0, ACC_COLOR), (width / 2, 1, AP_COLOR)):
            data = [list(values[index]) for values in per_value.values()]
            boxes = axis.boxplot(data, positions=positions + offset, widths=width * 0.9, patch_artist=True)
            for box in boxes["boxes"]:
                box.set_facecolor(color)
        axis.set_xticks(positions, list(per_value))
        axis.set_xlabel(label)
        axis.grid(axis="y", alpha=0.4)
    axes[0].set_ylabel("mean over test sets (%)")
    legend = [Patch(facecolor=ACC_COLOR, label="ACC"), Patch(facecolor=AP_COLOR, label="AP")]
    axes[0].legend(handles=legend, loc="lower left")
    figure.suptitle(wrap_title(title), fontsize="medium")
    return save_png(figure, path)


def plot_study(
    path: Path, title: str, xlabel: str, groups: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]
) -> Path:
    """One panel per group: mean and max over runs of ACC % and AP % at each x value."""
    figure = new_figure(7.0, 3.6 * len(groups) + 0.6)
    axes = np.atleast_1d(figure.subplots(len(groups), 1, squeeze=False)[:, 0])
    for axis, (label, per_value) in zip(axes, groups.items()):
        positions = np.arange(len(per_value))
        for index, metric, color, marker in ((0, "ACC", ACC_COLOR, "o"), (1, "AP", AP_COLOR, "d")):
            values = [np.asarray(v[index], dtype=float) for v in per_value.values()]
            axis.plot(positions, [v.max() for v in values], marker=marker, color=color, label=f"{metric} (max)")
            axis.plot(positions, [v.mean() for v in values], linestyle="--", color=color, label=f"{metric} (mean)")
        axis.set_xticks(positions, list(per_value))
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mean over test sets (%)")
        axis.set_title(label, fontsize="medium")
        axis.grid(alpha=0.4)
        axis.legend(fontsize="small")
    figure.suptitle(wrap_title(title), fontsize="medium")
    return save_png(figure, path)
