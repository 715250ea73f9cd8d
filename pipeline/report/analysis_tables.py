"""The report's analysis tables: the spread over seeds (``seeds.csv``), center vs format-aligned
(``format_align.csv``), and the error analysis (``errors.csv``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..names import CENTER, LIST_SEPARATOR
from ..results import format_value, mean_datasets, nan_mean, nan_std
from ..variants import VariantKind, VariantSpec
from .analysis import ReportAnalysis, selected_runs
from .inputs import GridResults, seed_groups
from .table import (
    METRICS,
    SkippedOutput,
    Table,
    format_hyper,
    format_n_classes,
    format_percent,
    mean_over_runs,
    order_datasets,
)

AVERAGE = "avg"


def build_seeds_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """seeds.csv: mean and standard deviation over seeds per config, test set and the test mean."""
    header = (
        "grid_dir",
        "grid",
        "backbone",
        "tap",
        "n_classes",
        "setting",
        "contrastive_factor",
        "proj_layers",
        "proj_dim",
        "n_seeds",
        "seeds",
        "runs",
        "variant",
        "dataset",
        "acc_mean_pct",
        "acc_std_pct",
        "ap_mean_pct",
        "ap_std_pct",
    )
    rows = []
    for grid in grids:
        for runs in (group for group in seed_groups(grid.runs.values()) if len(group) > 1):
            first = runs[0]
            key = (
                str(grid.path),
                first.row.grid,
                first.backbone,
                first.setting.tap,
                format_n_classes(first.n_classes),
                first.setting.label(without=("model", "tap", "seed")),
                *format_hyper(first.head_config),
                str(len(runs)),
                format_value(tuple(run.setting.seed for run in runs)),
                LIST_SEPARATOR.join(run.run for run in runs),
            )
            for variant in dict.fromkeys(variant for run in runs for variant in run.test):
                for dataset in order_datasets(dataset for run in runs for dataset in run.test.get(variant, {})):
                    present = [run.test[variant][dataset] for run in runs if dataset in run.test.get(variant, {})]
                    values = [[getattr(scores, metric) for scores in present] for metric in METRICS]
                    rows.append((*key, variant, dataset, *spread(values)))
            means = [[run.mean_acc for run in runs], [run.mean_ap for run in runs]]
            rows.append((*key, "", AVERAGE, *spread(means)))
    if not rows:
        return SkippedOutput("seeds.csv", "no config ran with several seeds (a grid key such as seed: [0, 1, 2])")
    return Table("seeds.csv", header, tuple(rows))


def spread(per_metric: Sequence[Sequence[float]]) -> tuple[str, ...]:
    """(mean, std) per metric, in percent with one decimal."""
    return tuple(format_percent(statistic(values)) for values in per_metric for statistic in (nan_mean, nan_std))


def is_format_aligned(variant: str) -> bool:
    try:
        return VariantSpec.from_name(variant).kind is VariantKind.FORMAT_ALIGN
    except ValueError:
        return False


def build_format_align_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """format_align.csv: each selected run's ACC/AP on center and format-aligned test sets, and the change."""
    header = (
        "backbone",
        "n_classes",
        "setting",
        "selection",
        "run",
        "seeds",
        "variant",
        "dataset",
        "acc_center_pct",
        "acc_aligned_pct",
        "acc_change_pts",
        "ap_center_pct",
        "ap_aligned_pct",
        "ap_change_pts",
    )
    rows = []
    for selections in selected_runs(grids).values():
        selection, run = selections[0], selections[0].run
        center = mean_over_runs(selection.runs, CENTER)
        for variant in (variant for variant in run.test if is_format_aligned(variant)):
            aligned = mean_over_runs(selection.runs, variant)
            common = order_datasets(set(center) & set(aligned))
            averaged, _ = mean_datasets(common)
            key = (
                run.backbone,
                format_n_classes(run.n_classes),
                run.setting.label(without=("model", "tap", "seed")),
                LIST_SEPARATOR.join(s.rule for s in selections),
                run.run,
                format_value(tuple(r.setting.seed for r in selection.runs)),
                variant,
            )
            for dataset in [*common, AVERAGE]:
                sets = averaged if dataset == AVERAGE else [dataset]
                values = []
                for metric in METRICS:
                    before = nan_mean(getattr(center[d], metric) for d in sets)
                    after = nan_mean(getattr(aligned[d], metric) for d in sets)
                    values += [format_percent(before), format_percent(after), format_percent(after - before)]
                rows.append((*key, dataset, *values))
    if not rows:
        return SkippedOutput(
            "format_align.csv",
            "no selected run was scored on a format-aligned test entry ({split: ..., variant: format-align-q95} "
            "in the grid, after `pipeline extract --perturb format-align`)",
        )
    return Table("format_align.csv", header, tuple(rows))


def build_errors_table(analysis: ReportAnalysis | None) -> Table | SkippedOutput:
    """errors.csv: the error analysis of every selected run's test splits."""
    header = (
        "error_rate_pct",
        "share_of_errors_pct",
        "share_of_images_pct",
        "dataset",
        "facet",
        "bucket",
        "n",
        "n_errors",
        "split",
        "variant",
        "run",
        "selection",
        "grid_dir",
    )
    rows = [
        (
            format_percent(count.error_rate),
            format_percent(count.share_of_errors),
            format_percent(count.share_of_images),
            count.dataset,
            count.facet,
            count.bucket,
            str(count.n),
            str(count.n_errors),
            count.split,
            count.variant,
            section.run.run,
            LIST_SEPARATOR.join(section.rules),
            str(section.run.grid_dir),
        )
        for section in (analysis.sections if analysis else ())
        for count in section.errors
    ]
    if not rows:
        return SkippedOutput("errors.csv", "no selected run with a scores_<split>.csv of a test split")
    return Table("errors.csv", header, tuple(rows))
