"""The report's tables: typed grid results -> ``acc.csv``, ``ap.csv`` (Tables 2/3), ``best.csv`` (Table 1),
``metrics.csv`` and ``grid.csv`` (every row and run, with bootstrap intervals where the analysis computed
them), and :func:`build_tables`, which gathers them with the studies' (``studies.py``) and the analysis'
(``analysis_tables.py``). A selection whose config ran with several seeds shows the mean over its seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..names import BEST_BY_TEST, LIST_SEPARATOR
from ..results import RESULT_COLUMNS, format_value
from ..results import reference as ref
from ..results.metrics import METRIC_NAMES
from .inputs import GridResults, Selection, all_runs, all_selections
from .numbers import fraction_column, significant
from .reading import for_reading
from .studies import (
    build_ablations_table,
    build_epochs_table,
    build_fractions_table,
    build_ldm_table,
    build_robustness_table,
    build_tie_table,
)
from .table import (
    AUTHORS,
    INTERVAL_COLUMNS,
    OURS,
    PUBLISHED,
    ScoreKey,
    ScoreRow,
    SkippedOutput,
    Table,
    format_hyper,
    format_intervals,
    format_n_classes,
    format_percent,
    group_sort_key,
    mean_over_runs,
    score_table,
    scores_from_reference,
)

if TYPE_CHECKING:
    from .analysis import ReportAnalysis


def authors_score_rows(backbone: str, n_classes: int | None) -> list[ScoreRow]:
    """The authors' published config of a setting, and their best-by-test config if it differs."""
    if n_classes is None or (backbone, n_classes) not in ref.PUBLISHED_BEST:
        return []
    published = ref.PUBLISHED_BEST[(backbone, n_classes)]
    configs = [(PUBLISHED, published)]
    best = ref.best_reference_configs(backbone, n_classes)
    if best and not best[0].matches(published):
        configs.append((BEST_BY_TEST, best[0]))
    rows = []
    for label, config in configs:
        scores = ref.reference_scores(backbone, n_classes, config)
        if scores:
            key = ScoreKey(AUTHORS, backbone, ref.AUTHORS_TAP, n_classes, "", label, "", *config)
            rows.append(ScoreRow(key, scores_from_reference(scores)))
    return rows


def merged_selections(grids: Sequence[GridResults]) -> list[tuple[str, Selection]]:
    """Each selected run once, with the rules that chose it joined by '+' (two rules, one run: one row)."""
    merged: dict[tuple, list[Selection]] = {}
    for selection in all_selections(grids):
        merged.setdefault((selection.run.grid_dir, selection.run.run), []).append(selection)
    return [(LIST_SEPARATOR.join(s.rule for s in group), group[0]) for group in merged.values()]


def collect_score_rows(grids: Sequence[GridResults]) -> list[ScoreRow]:
    """Ours (every selection of a full-architecture setting, center test sets), each (backbone, n_classes) group then the authors'.

    Settings of the architecture ablations (last block only, mean instead of
    TIE) belong to ablations.csv; runs without center-crop test sets (the LDM
    setting, scored on Synthbuster by ten crops) to ldm.csv. A config run
    with several seeds shows the mean over them (the setting label without
    the seed; ``seeds`` lists them).
    """
    ours = []
    for rules, s in merged_selections(grids):
        run = s.run
        if not (run.is_full_architecture and run.center):
            continue
        several = len(s.runs) > 1
        setting = run.setting.label(without=("model", "tap", "seed") if several else ("model", "tap"))
        seeds = format_value(tuple(r.setting.seed for r in s.runs))
        key = ScoreKey(
            OURS, run.backbone, run.setting.tap, run.n_classes, setting, rules, run.run, *run.head_config, seeds
        )
        ours.append((run, ScoreRow(key, mean_over_runs(s.runs) if several else run.center)))
    groups = sorted({(run.backbone, run.n_classes) for run, _ in ours}, key=lambda key: group_sort_key(*key))
    rows: list[ScoreRow] = []
    for backbone, n_classes in groups:
        rows += [row for run, row in ours if (run.backbone, run.n_classes) == (backbone, n_classes)]
        rows += authors_score_rows(backbone, n_classes)
    return rows


def build_score_table(name: str, metric: str, rows: Sequence[ScoreRow]) -> Table | SkippedOutput:
    """acc.csv / ap.csv: one column per test set in paper order, then the mean."""
    if not rows:
        return SkippedOutput(name, "no selected full-architecture run with center-crop test sets in any selection.csv")
    return score_table(name, ScoreKey, rows, (metric,))


def build_metrics_table(grids: Sequence[GridResults], analysis: ReportAnalysis | None = None) -> Table | SkippedOutput:
    """Every ok results.csv row of every grid folder with the folder and the intervals, metrics in their units.

    ACC and AP first, each followed by its interval, then the other metrics (``numbers.fraction_column``), then
    the columns that say which row it is. results.csv keeps the full precision.
    """
    key_columns = ("dataset", "split", "variant", "run", "n", "n_invalid")
    config = tuple(c for c in RESULT_COLUMNS if c not in (*METRIC_NAMES, *key_columns, "status", "error"))
    metric_header = [fraction_column(name, "")[0] for name in METRIC_NAMES]
    header = (*metric_header[:1], *INTERVAL_COLUMNS[:2], metric_header[1], *INTERVAL_COLUMNS[2:], *metric_header[2:])
    rows = []
    for grid in grids:
        for row in grid.ok_rows:
            intervals = analysis.intervals.get((grid.path, row["run"])) if analysis else None
            per_set = format_intervals(intervals.of(row["split"], row["dataset"]) if intervals else None)
            values = [fraction_column(name, row[name])[1] for name in METRIC_NAMES]
            metrics = (values[0], *per_set[:2], values[1], *per_set[2:], *values[2:])
            described = (fraction_column(c, row[c])[1] if c == "fit_seconds" else row[c] for c in config)
            rows.append((*metrics, *(row[c] for c in key_columns), *described, str(grid.path)))
    if not rows:
        return SkippedOutput("metrics.csv", "no ok rows in any results.csv")
    return Table("metrics.csv", (*header, *key_columns, *config, "grid_dir"), tuple(rows))


def build_grid_table(grids: Sequence[GridResults], analysis: ReportAnalysis | None = None) -> Table | SkippedOutput:
    """One row per ok run: val and mean test ACC/AP with the intervals of the means (percent), then config, size, time."""
    # every column of a run's results.csv rows that describes the run (its config and fit), from the schema
    config_columns = RESULT_COLUMNS[RESULT_COLUMNS.index("grid") : RESULT_COLUMNS.index("split")]
    header = (
        "grid_dir",
        "run",
        *config_columns,
        "backbone",
        "val_acc_pct",
        "val_ap_pct",
        "mean_acc_pct",
        "mean_ap_pct",
        "n_mean_sets",
        "excluded_from_mean",
        *(f"mean_{column}" for column in INTERVAL_COLUMNS),
    )
    rows = []
    for run in all_runs(grids):
        written, summary = run.row.to_csv(), run.summary
        means = (summary.val_acc, summary.val_ap, summary.mean_acc, summary.mean_ap)
        intervals = analysis.intervals_of(run) if analysis else None
        written["fit_seconds"] = fraction_column("fit_seconds", written["fit_seconds"])[1]
        rows.append(
            (
                str(run.grid_dir),
                run.run,
                *(written[column] for column in config_columns),
                run.backbone,
                *(format_percent(value) for value in means),
                str(len(summary.mean_sets)),
                LIST_SEPARATOR.join(summary.excluded_from_mean),
                *format_intervals(intervals.mean if intervals else None),
            )
        )
    if not rows:
        return SkippedOutput("grid.csv", "no ok runs in any results.csv")
    return Table("grid.csv", header, tuple(rows))


def build_best_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Paper Table 1: each selected config with its parameter count and fit time, and the authors' config."""
    header = (
        "setting",
        "backbone",
        "tap",
        "train",
        "n_classes",
        "selection",
        "contrastive_factor",
        "proj_layers",
        "proj_dim",
        "n_params",
        "fit_seconds",
        "run",
        "grid_dir",
        "published_contrastive_factor",
        "published_proj_layers",
        "published_proj_dim",
    )
    rows = []
    for rules, selection in merged_selections(grids):
        run = selection.run
        if not run.is_rine:  # the probes' sizes and numbers are in detectors.csv
            continue
        published = ref.PUBLISHED_BEST.get((run.backbone, run.n_classes)) if run.n_classes is not None else None
        rows.append(
            (
                run.setting.label(),
                run.backbone,
                run.setting.tap,
                run.setting.train,
                format_n_classes(run.n_classes),
                rules,
                *format_hyper(run.head_config),
                str(run.row.n_params),
                significant(run.row.fit_seconds),
                run.run,
                str(run.grid_dir),
                *(format_hyper(published) if published else ("", "", "")),
            )
        )
    if not rows:
        return SkippedOutput("best.csv", "no rows in any selection.csv")
    return Table("best.csv", header, tuple(rows))


def build_tables(grids: Sequence[GridResults], analysis: ReportAnalysis | None = None) -> list[Table | SkippedOutput]:
    from .analysis_tables import build_errors_table, build_format_align_table, build_seeds_table
    from .detectors import detector_tables

    score_rows = collect_score_rows(grids)
    return for_reading(
        [
            build_score_table("acc.csv", "acc", score_rows),
            build_score_table("ap.csv", "ap", score_rows),
            build_best_table(grids),
            build_ablations_table(grids),
            build_grid_table(grids, analysis),
            build_metrics_table(grids, analysis),
            build_seeds_table(grids),
            build_format_align_table(grids),
            build_errors_table(analysis),
            build_robustness_table(grids),
            build_epochs_table(grids),
            build_fractions_table(grids),
            build_ldm_table(grids),
            build_tie_table(grids),
            *detector_tables(grids, analysis),
        ]
    )
