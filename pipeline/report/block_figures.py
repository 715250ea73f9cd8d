"""``which_block.png``, "which block knows most": per backbone, the val and mean test AP of a logreg probe on
each block's token beside RINE's TIE weight of that block (``detectors.block_series``). Imports matplotlib."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from .detectors import PROBE_HEAD, BlockSeries, block_series
from .figures import ACC_COLOR, AP_COLOR, PALETTE, block_ticks, new_figure, save_png
from .inputs import GridResults
from .table import SkippedOutput

FIGURE_NAME = "which_block.png"
TIE_COLOR = PALETTE[2]  # bluish green: apart from the AP lines in hue and in grey


def plot_which_block(path: Path, series: Sequence[BlockSeries]) -> Path:
    """One panel per backbone: probe AP per block (left axis, %), TIE weight per block (right axis)."""
    figure = new_figure(8.0, 3.4 * len(series) + 0.8)
    axes = figure.subplots(len(series), 1, squeeze=False)[:, 0]
    for axis, one in zip(axes, series):
        blocks = [point.block for point in one.points]
        axis.plot(blocks, [100 * p.val_ap for p in one.points], marker="o", color=ACC_COLOR, label="probe val AP")
        axis.plot(blocks, [100 * p.mean_ap for p in one.points], marker="d", color=AP_COLOR, label="probe test AP")
        axis.set_xlabel("block")
        axis.set_ylabel("AP (%)")
        block_ticks(axis, blocks)
        axis.grid(alpha=0.4)
        axis.set_title(one.label, fontsize="medium")
        handles, labels = axis.get_legend_handles_labels()
        if one.tie:
            twin = axis.twinx()
            twin.plot(
                [b for b, _ in one.tie],
                [w for _, w in one.tie],
                linestyle="--",
                color=TIE_COLOR,
                label="RINE TIE weight",
            )
            twin.set_ylabel("TIE weight")
            more_handles, more_labels = twin.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
            twin.set_ylim(bottom=0)
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    figure.suptitle("Which block knows most", fontsize="medium")
    return save_png(figure, path)


def plot_preparers(
    grids: Sequence[GridResults], out: Path
) -> tuple[tuple[str, Callable[[], list[tuple[str, Callable[[], Path]] | SkippedOutput]]], ...]:
    """(label, prepare) of this module's figure, for ``report.write_figures``."""

    def prepare() -> list[tuple[str, Callable[[], Path]] | SkippedOutput]:
        series = block_series(grids)
        if not series:
            return [SkippedOutput(FIGURE_NAME, f"no selected per-block probe (head: {PROBE_HEAD}, features: block:K)")]
        return [(FIGURE_NAME, functools.partial(plot_which_block, out / FIGURE_NAME, series))]

    return ((FIGURE_NAME, prepare),)
