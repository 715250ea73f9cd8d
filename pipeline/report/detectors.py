"""The comparison of detectors: ``detectors.csv`` (every selected (backbone, head, features) with per-set ACC/AP,
their bootstrap intervals and the mean) and ``blocks.csv`` ("which block knows most": per-block logreg probes
beside RINE's TIE weights for the same backbone), whose figure ``block_figures`` draws. docs/reports.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..names import BEST_BY_VAL, BLOCK_FEATURES_PREFIX, CENTER, DEFAULT_HEAD, HEADS
from ..results.bootstrap import Interval
from ..results.run_folder import HEAD_FILE
from .analysis import ReportAnalysis
from .inputs import GridResults, RunResult, all_selections
from .numbers import percent, significant
from .studies import block_importance, tie_runs
from .table import SkippedOutput, Table, order_datasets

PROBE_HEAD = "logreg"  # the per-block probe of "which block knows most"


def head_label(run: RunResult) -> str:
    """The head's searched values: xi/q/d' for RINE, k for knn, C for logreg, nothing for linear."""
    head, setting = run.setting.head, run.setting
    if head == DEFAULT_HEAD:
        return run.head_config.label()
    return {"knn": f"k={setting.k}", "logreg": f"C={setting.C:g}"}.get(head, "")


def center_sets(run: RunResult) -> list[tuple[str, str]]:
    """(split, dataset) of every center-crop test set the run was scored on."""
    return [
        (split, dataset)
        for split, variant in run.splits.items()
        if variant == CENTER and split in run.split_sets
        for dataset in run.split_sets[split]
        if dataset in run.center
    ]


METRIC_COLUMNS = ("acc_pct", "acc_ci_low_pct", "acc_ci_high_pct", "ap_pct", "ap_ci_low_pct", "ap_ci_high_pct")


def metric_cells(acc: float | None, ap: float | None, intervals: tuple[Interval, Interval] | None) -> list[str]:
    """ACC and AP (percent) each followed by its 95 % interval's bounds (empty where not computed)."""
    cells = []
    for value, interval in zip((acc, ap), intervals or (None, None)):
        undefined = interval is None or math.isnan(interval.low)
        cells += [
            percent(value),
            "" if undefined else percent(interval.low),
            "" if undefined else percent(interval.high),
        ]
    return cells


def build_detectors_table(grids: Sequence[GridResults], analysis: ReportAnalysis | None) -> Table | SkippedOutput:
    """detectors.csv: one row per selected (backbone, tap, train, head, features) and rule, the per-set ACC and AP
    (percent) of the center crop with their bootstrap intervals, and their means over the test sets."""
    selections = [s for s in all_selections(grids) if s.run.center and s.run.setting.head in HEADS]
    if not selections:
        return SkippedOutput("detectors.csv", "no selected run with center-crop test sets")
    datasets = order_datasets({dataset for s in selections for dataset in s.run.center})
    header = ["backbone", "tap", "train", "head", "features", "hyper", "selection", "run", "grid_dir"]
    for dataset in datasets:
        header += [f"{dataset}_{column}" for column in METRIC_COLUMNS]
    header += [f"mean_{column}" for column in METRIC_COLUMNS]
    order = {head: index for index, head in enumerate(HEADS)}
    selections.sort(
        key=lambda s: (
            s.run.setting.model,
            s.run.setting.tap,
            s.run.setting.train,
            s.rule,
            order[s.run.setting.head],
            feature_order(s.run.setting.features),
        )
    )
    rows = []
    for selection in selections:
        run = selection.run
        intervals = analysis.intervals_of(run) if analysis else None
        by_dataset = {dataset: split for split, dataset in center_sets(run)}
        cells = [run.backbone, run.setting.tap, run.setting.train, run.setting.head, run.setting.features]
        cells += [head_label(run), selection.rule, run.run, str(run.grid_dir)]
        for dataset in datasets:
            scores = run.center.get(dataset)
            per_set = intervals.of(by_dataset[dataset], dataset) if intervals and dataset in by_dataset else None
            cells += metric_cells(scores.acc if scores else None, scores.ap if scores else None, per_set)
        cells += metric_cells(run.mean_acc, run.mean_ap, intervals.mean if intervals else None)
        rows.append(tuple(cells))
    return Table("detectors.csv", tuple(header), tuple(rows))


def feature_order(features: str) -> tuple[int, int]:
    """blocks, then block:K by K, then embedding."""
    if features.startswith(BLOCK_FEATURES_PREFIX):
        return (1, int(features.removeprefix(BLOCK_FEATURES_PREFIX)))
    return (0, 0) if features == "blocks" else (2, 0)


@dataclass(frozen=True)
class BlockPoint:
    block: int  # the backbone block
    val_ap: float
    mean_ap: float  # mean test AP
    run: RunResult


@dataclass(frozen=True)
class BlockSeries:
    """One backbone's per-block probes (best C by val, per block) and the TIE weights of its RINE run, if any."""

    model: str
    tap: str
    train: str
    points: tuple[BlockPoint, ...]
    tie: tuple[tuple[int, float], ...]  # (block, weight) of the setting's best_by_test full RINE model
    tie_run: RunResult | None

    @property
    def label(self) -> str:
        return f"{self.points[0].run.backbone} {self.tap}, train={self.train}"


def probe_block(run: RunResult) -> int | None:
    """The backbone block a ``block:K`` probe read: from its head file (K may count from the end), else K >= 0."""
    head_file = run.folder / HEAD_FILE
    if head_file.is_file():
        from safetensors import safe_open

        with safe_open(str(head_file), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if "store_blocks" in metadata and "position" in metadata:
            return int(json.loads(metadata["store_blocks"])[int(metadata["position"])])
    number = int(run.setting.features.removeprefix(BLOCK_FEATURES_PREFIX))
    return number if number >= 0 else None


def block_series(grids: Sequence[GridResults]) -> list[BlockSeries]:
    """Per (model, tap, train): the val and mean test AP of the best-by-val logreg probe of every block."""
    by_setting: dict[tuple[str, str, str], dict[int, BlockPoint]] = {}
    for selection in all_selections(grids, BEST_BY_VAL):
        run = selection.run
        setting = run.setting
        if setting.head != PROBE_HEAD or not setting.features.startswith(BLOCK_FEATURES_PREFIX):
            continue
        block = probe_block(run)
        if block is None:
            continue
        point = BlockPoint(block, run.summary.val_ap, run.summary.mean_ap, run)
        by_setting.setdefault((setting.model, setting.tap, setting.train), {})[block] = point
    ties = {(run.setting.model, run.setting.tap, run.setting.train): run for run in tie_runs(grids)}
    series = []
    for key, points in sorted(by_setting.items()):
        tie_run = ties.get(key)
        tie: tuple[tuple[int, float], ...] = ()
        if tie_run is not None:
            blocks, weights = block_importance(tie_run.folder / HEAD_FILE)
            tie = tuple((int(b), float(w)) for b, w in zip(blocks, weights))
        ordered = tuple(points[block] for block in sorted(points))
        series.append(BlockSeries(*key, ordered, tie, tie_run))
    return series


def build_blocks_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """blocks.csv: per backbone and block, the per-block probe's val AP and mean test AP, and RINE's TIE weight."""
    series = block_series(grids)
    if not series:
        return SkippedOutput(
            "blocks.csv", f"no selected per-block probe (head: {PROBE_HEAD}, features: {BLOCK_FEATURES_PREFIX}K)"
        )
    header = (
        "backbone",
        "tap",
        "train",
        "block",
        "probe_val_ap_pct",
        "probe_mean_ap_pct",
        "probe_run",
        "tie_weight",
        "rine_run",
    )
    rows = []
    for one in series:
        tie = dict(one.tie)
        for point in one.points:
            weight = tie.get(point.block)
            rows.append(
                (
                    point.run.backbone,
                    one.tap,
                    one.train,
                    str(point.block),
                    percent(point.val_ap),
                    percent(point.mean_ap),
                    point.run.run,
                    "" if weight is None else significant(weight),
                    "" if one.tie_run is None else one.tie_run.run,
                )
            )
    return Table("blocks.csv", header, tuple(rows))


def detector_tables(grids: Sequence[GridResults], analysis: ReportAnalysis | None) -> list[Table | SkippedOutput]:
    """The tables of this module, for ``tables.build_tables``."""
    return [build_detectors_table(grids, analysis), build_blocks_table(grids)]
