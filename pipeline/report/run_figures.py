"""Figures of one selected run for its section of the HTML page: score histograms, reliability, TIE curve.

Files: ``run_<run id>_scores.png`` (per test set, reals vs fakes, with 0.5
and the thresholds chosen on the run's val scores, ``metrics.THRESHOLD_RULES``),
``run_<run id>_reliability.png`` (``figures.plot_reliability``: val and each
test split) and ``run_<run id>_tie.png`` (a head with TIE only).

Drawn like ``pipeline.report.figures`` (matplotlib's Agg canvas, no pyplot,
complete-or-absent PNG files) and imported only when plots are asked for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..names import CENTER, VAL_SPLIT
from ..results.metrics import choose_thresholds
from ..results.run_folder import HEAD_FILE
from .analysis import RunKey, RunSection, run_key
from .figures import PALETTE, PlotJob, block_ticks, new_figure, plot_reliability, save_png, uniform_line
from .inputs import RunResult
from .scores import ScoredSplit, read_scored_split, scores_path
from .studies import block_importance
from .table import SkippedOutput

HISTOGRAM_BINS = np.linspace(0.0, 1.0, 21)
PANEL_COLUMNS = 5
REAL_COLOR, FAKE_COLOR = PALETTE[0], PALETTE[1]  # reals filled dark blue, fakes an orange outline
THRESHOLD_STYLES = (("black", "-"), (PALETTE[3], "--"), (PALETTE[5], "-."), (PALETTE[2], ":"), (PALETTE[4], "--"))
THRESHOLD_LABELS = {"val": "val best acc", "eer": "val EER", "fpr1": "val 1 % FPR", "fpr5": "val 5 % FPR"}


def plot_score_histograms(
    path: Path, title: str, splits: Sequence[ScoredSplit], thresholds: Mapping[str, float] | None = None
) -> Path:
    """One panel per (test split, dataset): the share of reals and of fakes per score bin.

    Dashed lines: 0.5 and ``thresholds`` (label -> value, those chosen on val).
    """
    panels = [(scored, dataset) for scored in splits for dataset in scored.dataset_names()]
    if not panels:
        raise ValueError("no scored test set to draw")
    columns = min(PANEL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = new_figure(2.6 * columns + 0.4, 2.1 * rows + 0.8)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    legend: dict[str, object] = {}
    for axis, (scored, dataset) in zip(axes, panels):
        labels, scores = scored.of_dataset(dataset)
        for label, name in ((0, "real"), (1, "fake")):
            values = scores[labels == label]
            if values.size:
                weights = np.full(values.size, 1 / values.size)
                style = (
                    {"alpha": 0.6, "color": REAL_COLOR}
                    if label == 0
                    else {"histtype": "step", "linewidth": 1.6, "color": FAKE_COLOR}
                )
                axis.hist(values, bins=HISTOGRAM_BINS, weights=weights, label=name, **style)
        marks = {"0.5": 0.5, **(thresholds or {})}
        for (label, value), (color, line) in zip(marks.items(), THRESHOLD_STYLES):
            if np.isfinite(value):
                axis.axvline(
                    value,
                    color=color,
                    linestyle=line,
                    linewidth=1,
                    label=label if label == "0.5" else f"{label} ({value:.3g})",
                )
        axis.set_xlim(0, 1)
        suffix = "" if len(splits) == 1 else f" [{scored.split}]"
        axis.set_title(f"{dataset}{suffix}, n={labels.size}", fontsize="small")
        axis.tick_params(labelsize="x-small")
        for handle, text in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    figure.supxlabel("score (probability of fake)", fontsize="small")
    figure.supylabel("share of the label's images", fontsize="small")
    figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=6, fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def plot_run_tie(path: Path, title: str, blocks: Sequence[int], weights: Sequence[float]) -> Path:
    """The TIE weight of each block of one run, with the uniform weight for reference."""
    figure = new_figure(5.5, 3.2)
    axis = figure.subplots()
    axis.plot(blocks, weights, marker="o", markersize=4, color=PALETTE[0], label="TIE weight")
    uniform_line(axis, len(weights))
    block_ticks(axis, blocks)
    axis.set_ylim(0, max(max(weights), 1 / len(weights)) * 1.15)
    axis.set_xlabel("block")
    axis.set_ylabel("softmax(alpha), mean over dims")
    axis.grid(alpha=0.4)
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


def run_plot_preparers(
    sections: Sequence[RunSection], out: Path
) -> list[tuple[str, Callable[[], list[PlotJob | SkippedOutput]], RunKey]]:
    """(label, prepare, run) per selected run: its score histograms and, for a TIE head, its block importance."""
    return [
        (f"run_{section.run.run}_*.png", functools.partial(run_jobs, section, out), run_key(section.run))
        for section in sections
    ]


def run_jobs(section: RunSection, out: Path) -> list[PlotJob | SkippedOutput]:
    run = section.run
    jobs: list[PlotJob | SkippedOutput] = []
    name = f"run_{run.run}_scores.png"
    val_file = scores_path(run, VAL_SPLIT)
    val = [read_scored_split(val_file, VAL_SPLIT, run.splits.get(VAL_SPLIT, CENTER))] if val_file.is_file() else []
    thresholds = val_thresholds(val[0]) if val else {}
    if section.test_splits:
        title = f"Scores per test set, run {run.run}"
        plot = functools.partial(plot_score_histograms, out / name, title, section.test_splits, thresholds)
        jobs.append((name, plot))
    else:
        jobs.append(SkippedOutput(name, f"no scores_<split>.csv of a test split in {run.folder}"))
    name = f"run_{run.run}_reliability.png"
    curves = {split.split: (split.labels, split.scores) for split in (*val, *section.test_splits)}
    if curves:
        title = f"Reliability, run {run.run}"
        jobs.append((name, functools.partial(plot_reliability, out / name, title, curves)))
    else:
        jobs.append(SkippedOutput(name, f"no scores_<split>.csv in {run.folder}"))
    if run.is_full_architecture and (run.folder / HEAD_FILE).is_file():  # TIE over every block
        name = f"run_{run.run}_tie.png"
        jobs.append((name, functools.partial(draw_run_tie, out / name, run)))
    return jobs


def val_thresholds(val: ScoredSplit) -> dict[str, float]:
    """Label -> the threshold each rule of ``metrics.THRESHOLD_RULES`` chooses on the val scores."""
    chosen = choose_thresholds(val.labels, val.scores)
    return {label: chosen[rule].threshold for rule, label in THRESHOLD_LABELS.items()}


def draw_run_tie(path: Path, run: RunResult) -> Path:
    blocks, weights = block_importance(run.folder / HEAD_FILE)
    return plot_run_tie(path, f"TIE weights, run {run.run}", blocks.tolist(), weights.tolist())
