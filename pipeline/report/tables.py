"""The report's tables: typed grid results -> rows of text, beside the authors' published numbers.

Each builder returns a ``Table`` or a ``SkippedOutput`` saying why it has no
inputs. Percentages have one decimal; ``avg`` columns follow
``pipeline.results.mean_datasets`` (the paper's 20 test sets when any is
present, else every set) and ``excluded_from_avg`` names the sets left out.
A selection whose config ran with several seeds is shown by the mean over
its seeds (``seeds`` column). ``metrics.csv`` and ``grid.csv`` carry the
bootstrap intervals of the runs the analysis covered
(``pipeline.report.analysis``), empty for the others.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..files import atomic_path
from ..names import BEST_BY_TEST, LIST_SEPARATOR, PAPER_DATASETS, PERTURBATIONS, UNPERTURBED_VARIANTS
from ..results import RESULT_COLUMNS, HeadConfig, best_run, format_value, mean_datasets, nan_mean
from ..results import reference as ref
from ..results.bootstrap import Interval
from ..results.run_folder import HEAD_FILE
from ..variants import VariantKind, VariantSpec
from .inputs import GridResults, RunResult, Scores, Selection, all_runs, all_selections, best_by_test_full_models

if TYPE_CHECKING:
    from .analysis import ReportAnalysis

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


@dataclass(frozen=True)
class ScoreRow:
    """One model's scores per test set, with the columns that say which model it is."""

    key: tuple[str, ...]  # values of the table's key columns
    scores: Mapping[str, Scores]


def write_table(out: Path, table: Table) -> Path:
    """Write a table atomically (temporary name, then rename)."""
    path = out / table.name
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(table.header)
        writer.writerows(table.rows)
    return path


# ----------------------------------------------------------------------------- formatting


def order_datasets(names: Iterable[str]) -> list[str]:
    """Paper order first (only those present), then any other test sets sorted."""
    present = set(names)
    return [name for name in PAPER_DATASETS if name in present] + sorted(present - set(PAPER_DATASETS))


def format_percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal ('91.5'); '' for no value, 'nan' for NaN."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    return f"{round(100 * value, 1):.1f}"


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


def score_table(name: str, key_header: Sequence[str], rows: Sequence[ScoreRow], metrics: Sequence[str]) -> Table:
    """Key columns, then (with several metrics) a ``metric`` column, one column per test set, ``avg``, ``excluded_from_avg``."""
    datasets = order_datasets(dataset for row in rows for dataset in row.scores)
    metric_header = ("metric",) if len(metrics) > 1 else ()
    header = (*key_header, *metric_header, *datasets, "avg", "excluded_from_avg")
    out = []
    for metric in metrics:
        for row in rows:
            values = {dataset: getattr(scores, metric) for dataset, scores in row.scores.items()}
            mean, excluded = averaged(row.scores, metric)
            out.append(
                (
                    *row.key,
                    *((metric,) if metric_header else ()),
                    *(format_percent(values.get(d)) for d in datasets),
                    format_percent(mean),
                    LIST_SEPARATOR.join(excluded),
                )  # fmt: skip
            )
    return Table(name, header, tuple(out))


# ----------------------------------------------------------------------------- Tables 2/3, 1, grid, metrics


SCORE_KEY = ("source", "backbone", "tap", "n_classes", "setting", "selection", "run", "contrastive_factor",
             "proj_layers", "proj_dim", "seeds")  # fmt: skip


def score_key(source: str, backbone: str, tap: str, n_classes: int | None, setting: str, selection: str, run: str,
              config: HeadConfig, seeds: str = "") -> tuple[str, ...]:  # fmt: skip
    return (source, backbone, tap, format_n_classes(n_classes), setting, selection, run, *format_hyper(config), seeds)


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
            key = score_key(AUTHORS, backbone, ref.AUTHORS_TAP, n_classes, "", label, "", config)
            rows.append(ScoreRow(key, scores_from_reference(scores)))
    return rows


def collect_score_rows(grids: Sequence[GridResults]) -> list[ScoreRow]:
    """Ours (every selection of a full-architecture setting, center test sets), each (backbone, n_classes) group then the authors'.

    Settings of the architecture ablations (last block only, mean instead of
    TIE) belong to ablations.csv; runs without center-crop test sets (the LDM
    setting, scored on Synthbuster by ten crops) to ldm.csv. A config run
    with several seeds shows the mean over them (the setting label without
    the seed; ``seeds`` lists them).
    """
    ours = []
    for s in all_selections(grids):
        run = s.run
        if not (run.is_full_architecture and run.center):
            continue
        several = len(s.runs) > 1
        setting = run.setting.label(without=("model", "tap", "seed") if several else ("model", "tap"))
        seeds = format_value(tuple(r.setting.seed for r in s.runs))
        key = score_key(OURS, run.backbone, run.setting.tap, run.n_classes, setting, s.rule, run.run, run.head_config,
                        seeds)  # fmt: skip
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
    return score_table(name, SCORE_KEY, rows, (metric,))


INTERVAL_COLUMNS = ("acc_ci_low", "acc_ci_high", "ap_ci_low", "ap_ci_high")


def format_intervals(intervals: tuple[Interval, Interval] | None) -> tuple[str, ...]:
    """(ACC low, ACC high, AP low, AP high) at full precision; empty when not computed."""
    if intervals is None:
        return ("",) * 4
    return tuple(format_float(value) for interval in intervals for value in (interval.low, interval.high))


def build_metrics_table(grids: Sequence[GridResults], analysis: ReportAnalysis | None = None) -> Table | SkippedOutput:
    """Every ok results.csv row of every grid folder, values as written, with the folder in front and the intervals."""
    columns = tuple(column for column in RESULT_COLUMNS if column not in ("status", "error"))
    rows = []
    for grid in grids:
        for row in grid.ok_rows:
            intervals = analysis.intervals.get((grid.path, row["run"])) if analysis else None
            per_set = intervals.of(row["split"], row["dataset"]) if intervals else None
            rows.append((str(grid.path), *(row[column] for column in columns), *format_intervals(per_set)))
    if not rows:
        return SkippedOutput("metrics.csv", "no ok rows in any results.csv")
    return Table("metrics.csv", ("grid_dir", *columns, *INTERVAL_COLUMNS), tuple(rows))


def build_grid_table(grids: Sequence[GridResults], analysis: ReportAnalysis | None = None) -> Table | SkippedOutput:
    """One row per ok run: config, size, time, val and mean test ACC/AP (fractions, full precision), their intervals."""
    config_columns = ("grid", "model", "tap", "train", "contrastive_factor", "proj_layers", "proj_dim", "epochs",
                      "batch_size", "lr", "lr_milestones", "classes", "n_classes", "train_fraction", "head_blocks",
                      "aggregation", "seed", "amp", "n_params", "fit_seconds", "views_used", "views_reused")  # fmt: skip
    header = ("grid_dir", "run", *config_columns, "backbone", "val_acc", "val_ap", "mean_acc", "mean_ap",
              "n_mean_sets", "excluded_from_mean", *(f"mean_{column}" for column in INTERVAL_COLUMNS))  # fmt: skip
    rows = []
    for run in all_runs(grids):
        written, summary = run.row.to_csv(), run.summary
        means = (summary.val_acc, summary.val_ap, summary.mean_acc, summary.mean_ap)
        intervals = analysis.intervals_of(run) if analysis else None
        rows.append(
            (
                str(run.grid_dir),
                run.run,
                *(written[column] for column in config_columns),
                run.backbone,
                *(format_float(value) for value in means),
                str(len(summary.mean_sets)),
                LIST_SEPARATOR.join(summary.excluded_from_mean),
                *format_intervals(intervals.mean if intervals else None),
            )  # fmt: skip
        )
    if not rows:
        return SkippedOutput("grid.csv", "no ok runs in any results.csv")
    return Table("grid.csv", header, tuple(rows))


def build_best_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Paper Table 1: each selected config with its parameter count and fit time, and the authors' config."""
    header = ("setting", "backbone", "tap", "train", "n_classes", "selection", "contrastive_factor", "proj_layers",
              "proj_dim", "n_params", "fit_seconds", "run", "grid_dir",
              "published_contrastive_factor", "published_proj_layers", "published_proj_dim")  # fmt: skip
    rows = []
    for selection in all_selections(grids):
        run = selection.run
        published = ref.PUBLISHED_BEST.get((run.backbone, run.n_classes)) if run.n_classes is not None else None
        rows.append(
            (
                run.setting.label(),
                run.backbone,
                run.setting.tap,
                run.setting.train,
                format_n_classes(run.n_classes),
                selection.rule,
                *format_hyper(run.head_config),
                str(run.row.n_params),
                str(run.row.fit_seconds),
                run.run,
                str(run.grid_dir),
                *(format_hyper(published) if published else ("", "", "")),
            )  # fmt: skip
        )
    if not rows:
        return SkippedOutput("best.csv", "no rows in any selection.csv")
    return Table("best.csv", header, tuple(rows))


# ----------------------------------------------------------------------------- Table 4: ablations


@dataclass(frozen=True)
class AblationRow:
    backbone: str
    n_classes: int | None
    setting: str
    variant: str
    source: str
    run: str
    hyper: tuple[str, str, str]
    scores: Mapping[str, Scores]
    note: str


def ablation_group(run: RunResult) -> tuple:
    """What a full model and its ablations share: the setting without the architecture switches."""
    setting = run.setting
    return (setting.model, setting.tap, setting.train, setting.classes, setting.epochs, setting.batch_size, setting.lr,
            setting.lr_milestones, setting.train_fraction, setting.seed, setting.amp)  # fmt: skip


def best_of(runs: Sequence[RunResult]) -> RunResult:
    """Highest mean test ACC + AP (the paper's rule; ties to the larger run id)."""
    chosen = best_run(run.summary for run in runs)
    return next(run for run in runs if run.summary is chosen)


def choose_full_run(
    key: tuple, candidates: Sequence[RunResult], selections: Sequence[Selection]
) -> tuple[RunResult | None, str]:
    """The full model an ablation is compared with: the setting's best_by_test selection if it is a full model."""
    for selection in selections:
        run = selection.run
        if selection.rule == BEST_BY_TEST and run.is_full_model and ablation_group(run) == key:
            return run, f"{BEST_BY_TEST} selection of its setting"
    if not candidates:
        return None, ""
    note = f"no {BEST_BY_TEST} selection is a full model; best of {len(candidates)} full runs by mean test ACC+AP"
    return best_of(candidates), note


def choose_ablation_run(variant: str, candidates: Sequence[RunResult], full: RunResult | None) -> tuple[RunResult, str]:
    """The ablation run with the full model's xi/q/d' (q/d' for without_contrastive), else the best one."""
    without_contrastive = variant == "without_contrastive"
    if full is not None:
        target = full.head_config._replace(contrastive_factor=0.0) if without_contrastive else full.head_config
        same = [run for run in candidates if run.head_config.matches(target)]
        if same:
            return best_of(same), "same hyper-params as the full model" + (" (xi=0)" if without_contrastive else "")
        reason = "no run with the full model's hyper-params"
    else:
        reason = "no full-model run of this setting"
    return best_of(candidates), f"{reason}; best of {len(candidates)} by mean test ACC+AP"


def ours_ablation_rows(grids: Sequence[GridResults]) -> list[AblationRow]:
    runs = [run for run in all_runs(grids) if run.center]
    selections = all_selections(grids)
    keys = list(dict.fromkeys(ablation_group(run) for run in runs if run.ablation))
    rows = []
    for key in keys:
        members = [run for run in runs if ablation_group(run) == key]
        full, full_note = choose_full_run(key, [run for run in members if run.is_full_model], selections)
        chosen: list[tuple[str, RunResult, str]] = [(FULL, full, full_note)] if full is not None else []
        for variant in ABLATION_ORDER[1:]:
            candidates = [run for run in members if run.ablation == variant]
            if candidates:
                chosen.append((variant, *choose_ablation_run(variant, candidates, full)))
        rows += [
            AblationRow(
                run.backbone,
                run.n_classes,
                run.setting.label(),
                variant,
                OURS,
                run.run,
                format_hyper(run.head_config),
                run.center,
                note,
            )  # fmt: skip
            for variant, run, note in chosen
        ]
    return rows


def authors_ablation_rows(backbone: str, n_classes: int | None) -> list[AblationRow]:
    """The official ablations (ViT-L/14) and the full model from the official grid at the same config."""
    if backbone != ref.AUTHORS_BACKBONE_OF_ABLATIONS or n_classes is None:
        return []
    ablations = ref.reference_ablation_scores(n_classes)
    if not ablations:
        return []
    rows = []
    config = next(iter(ablations.values()))[0]
    full = ref.reference_scores(backbone, n_classes, config)
    if full:
        rows.append(AblationRow(backbone, n_classes, "", FULL, AUTHORS, "", format_hyper(config),
                                scores_from_reference(full), f"{ref.GRID_FILE} at the ablations' config"))  # fmt: skip
    for variant in ABLATION_ORDER[1:]:
        if variant in ablations:
            variant_config, scores = ablations[variant]
            rows.append(AblationRow(backbone, n_classes, "", variant, AUTHORS, "", format_hyper(variant_config),
                                    scores_from_reference(scores), ref.ABLATIONS_FILE))  # fmt: skip
    return rows


def build_ablations_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Paper Table 4: full model vs each ablation, mean ACC/AP over all and over non-GAN test sets (percent)."""
    ours = ours_ablation_rows(grids)
    if not ours:
        return SkippedOutput(
            "ablations.csv",
            "no ablation runs (head_blocks=last, aggregation=mean or contrastive_factor=0) in the results",
        )
    groups = sorted({(row.backbone, row.n_classes) for row in ours}, key=lambda key: group_sort_key(*key))
    ordered: list[AblationRow] = []
    for backbone, n_classes in groups:
        ordered += [row for row in ours if (row.backbone, row.n_classes) == (backbone, n_classes)]
        ordered += authors_ablation_rows(backbone, n_classes)
    header = ("backbone", "n_classes", "setting", "variant", "source", "run", "contrastive_factor", "proj_layers",
              "proj_dim", "acc_all", "ap_all", "acc_non_gan", "ap_non_gan", "excluded_from_avg", "note")  # fmt: skip
    rows = []
    for row in ordered:
        included, excluded = mean_datasets(row.scores)
        non_gan = [row.scores[d] for d in included if d in ref.NON_GAN_DATASETS]
        every = [row.scores[d] for d in included]
        means = [
            nan_mean(getattr(s, metric) for s in group) if group else None
            for group in (every, non_gan)
            for metric in METRICS
        ]
        rows.append(
            (
                row.backbone,
                format_n_classes(row.n_classes),
                row.setting,
                row.variant,
                row.source,
                row.run,
                *row.hyper,
                *(format_percent(mean) for mean in means),
                LIST_SEPARATOR.join(excluded),
                row.note,
            )  # fmt: skip
        )
    return Table("ablations.csv", header, tuple(rows))


# ----------------------------------------------------------------------------- Table 5: robustness


def split_variant(variant: str) -> tuple[str, str]:
    """'jpeg-official' -> ('jpeg', 'official'); a variant this version does not know -> (name, '')."""
    try:
        spec = VariantSpec.from_name(variant)
    except ValueError:
        return (variant, "")
    return (spec.perturbation or variant, spec.preset or "")


def is_perturbation(variant: str) -> bool:
    """A paper Table 5 perturbation (not the unperturbed evaluation, not format-align, which has its own table)."""
    if variant in UNPERTURBED_VARIANTS:
        return False
    try:
        return VariantSpec.from_name(variant).kind is VariantKind.PERTURB
    except ValueError:
        return True  # a variant this version does not know: shown with the perturbations rather than lost


def perturbation_sort_key(perturbation: str) -> tuple[int, str]:
    order = PERTURBATIONS.index(perturbation) if perturbation in PERTURBATIONS else len(PERTURBATIONS)
    return (order, perturbation)


def build_robustness_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Paper Table 5: per perturbation, ACC and AP per test set (percent) of each setting's best_by_test run.

    All acc rows, then all ap rows (a ``metric`` column), so the table reads as
    the paper's two blocks; within a block, per (backbone, n_classes) and
    perturbation, ours first, then the authors' (released ViT-L/14 checkpoints
    of 1, 2 and 4 classes, official preset).
    """
    entries: list[tuple[tuple, ScoreRow]] = []
    for selection in all_selections(grids, BEST_BY_TEST):
        run = selection.run
        for variant, scores in run.test.items():
            if is_perturbation(variant):
                perturbation, preset = split_variant(variant)
                key = (
                    run.backbone,
                    format_n_classes(run.n_classes),
                    run.setting.label(),
                    run.run,
                    perturbation,
                    preset,
                    OURS,
                )
                order = (group_sort_key(run.backbone, run.n_classes), perturbation_sort_key(perturbation), 0, preset)
                entries.append((order, ScoreRow(key, scores)))
    if not entries:
        return SkippedOutput("robustness.csv", "no perturbed test variants in the results of any best_by_test run")
    groups = {(row.key[0], row.key[1]) for _, row in entries}
    for backbone, n_classes_text in groups:
        n_classes = int(n_classes_text) if n_classes_text else None
        if backbone == ref.AUTHORS_BACKBONE_OF_PERTURBATIONS and n_classes is not None:
            for perturbation, pairs in ref.reference_perturbation_scores(n_classes).items():
                key = (backbone, n_classes_text, "", "", perturbation, ref.AUTHORS_PERTURBATION_PRESET, AUTHORS)
                order = (group_sort_key(backbone, n_classes), perturbation_sort_key(perturbation), 1, key[5])
                entries.append((order, ScoreRow(key, scores_from_reference(pairs))))
    entries.sort(key=lambda item: item[0])
    header = ("backbone", "n_classes", "setting", "run", "perturbation", "preset", "source")
    return score_table("robustness.csv", header, [row for _, row in entries], METRICS)


# ----------------------------------------------------------------------------- studies: epochs, fractions, LDM


STUDY_KEY = ("source", "backbone", "tap", "n_classes", "train", "contrastive_factor", "proj_layers", "proj_dim",
             "epochs", "train_fraction", "run")  # fmt: skip


def study_key(source: str, backbone: str, tap: str, n_classes: int | None, train: str, config: HeadConfig,
              epochs: int, fraction: float, run: str) -> tuple[str, ...]:  # fmt: skip
    return (
        source,
        backbone,
        tap,
        format_n_classes(n_classes),
        train,
        *format_hyper(config),
        str(epochs),
        f"{fraction:g}",
        run,
    )


def study_runs(grids: Sequence[GridResults], column: str) -> list[RunResult]:
    """Full-model ProGAN-setting runs whose setting and head config recur with two or more values of ``column``."""
    groups: dict[tuple, list[RunResult]] = {}
    for run in all_runs(grids):
        if run.is_full_model and not run.is_ldm and run.center:
            setting = run.setting
            others = tuple(getattr(setting, name) for name in setting.__dataclass_fields__ if name != column)
            groups.setdefault((others, run.head_config), []).append(run)
    runs = [run for group in groups.values() if len({getattr(r.setting, column) for r in group}) > 1 for run in group]
    return sorted(runs, key=lambda r: (group_sort_key(r.backbone, r.n_classes), tuple(r.head_config), r.setting.epochs,
                                       r.setting.train_fraction, r.run))  # fmt: skip


def our_study_row(run: RunResult, scores: Mapping[str, Scores]) -> ScoreRow:
    setting = run.setting
    key = study_key(OURS, run.backbone, setting.tap, run.n_classes, setting.train, run.head_config, setting.epochs,
                    setting.train_fraction, run.run)  # fmt: skip
    return ScoreRow(key, scores)


def authors_study_rows(
    runs: Mapping[ref.ReferenceRunKey, Mapping[str, tuple[float, float]]], group: tuple[str, int | None] | None = None
) -> list[ScoreRow]:
    """The authors' runs of a study, those of one (backbone, n_classes) group or all."""
    rows = []
    for key, pairs in runs.items():
        if group is None or (key.backbone, key.n_classes) == group:
            row_key = study_key(AUTHORS, key.backbone, ref.AUTHORS_TAP, key.n_classes, "", key.head_config, key.epochs,
                                key.train_fraction, "")  # fmt: skip
            rows.append(ScoreRow(row_key, scores_from_reference(pairs)))
    return rows


def build_study_table(
    grids: Sequence[GridResults],
    name: str,
    column: str,
    authors: Mapping[ref.ReferenceRunKey, Mapping[str, tuple[float, float]]],
) -> Table | SkippedOutput:
    """Ours per setting and head config at each value of ``column``, then the authors' runs of the same study."""
    runs = study_runs(grids, column)
    if not runs:
        return SkippedOutput(name, f"no full-model runs that differ only in {column} within a setting")
    groups = sorted({(run.backbone, run.n_classes) for run in runs}, key=lambda key: group_sort_key(*key))
    rows: list[ScoreRow] = []
    for group in groups:
        rows += [our_study_row(run, run.center) for run in runs if (run.backbone, run.n_classes) == group]
        rows += authors_study_rows(authors, group)
    return score_table(name, STUDY_KEY, rows, METRICS)


def build_epochs_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """epochs.csv: the training-length study beside the authors' (their three best configs per setting, 1 to 15 epochs)."""
    return build_study_table(grids, "epochs.csv", "epochs", ref.reference_epochs_study())


def build_fractions_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """fractions.csv: the training-set size study beside the authors' (20/50/80/100 %)."""
    return build_study_table(
        grids, "fractions.csv", "train_fraction", ref.group_reference_runs(ref.load_reference_fractions())
    )


def build_ldm_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """ldm.csv: runs trained on the LDM training set, scored without perturbation, beside the authors' LDM runs."""
    runs = [run for run in all_runs(grids) if run.is_ldm and run.is_full_model]
    if not runs:
        return SkippedOutput(
            "ldm.csv", "no full-model runs whose training split is the LDM setting (name holding 'ldm')"
        )
    runs.sort(key=lambda r: (r.backbone, tuple(r.head_config), r.setting.epochs, r.run))
    rows = []
    for run in runs:
        unperturbed = [by_set for variant, by_set in run.test.items() if variant in UNPERTURBED_VARIANTS]
        rows.append(our_study_row(run, {dataset: s for by_set in unperturbed for dataset, s in by_set.items()}))
    rows += authors_study_rows(ref.group_reference_runs(ref.load_reference_ldm()))
    return score_table("ldm.csv", STUDY_KEY, rows, METRICS)


# ----------------------------------------------------------------------------- TIE block importance


def block_importance(head_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(store block indices, softmax(alpha) over blocks averaged over the projection dims) of a saved TIE head."""
    from safetensors import safe_open

    with safe_open(str(head_file), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        alpha = handle.get_tensor("alpha").astype(np.float64)[0]  # (n_blocks, proj_dim)
    weights = np.exp(alpha - alpha.max(axis=0, keepdims=True))
    weights /= weights.sum(axis=0, keepdims=True)
    blocks = np.asarray(json.loads(metadata["store_blocks"]) if "store_blocks" in metadata else range(len(alpha)))
    return blocks, weights.mean(axis=1)


def tie_runs(grids: Sequence[GridResults]) -> list[RunResult]:
    """Each setting's best_by_test full model that has its head file."""
    return [run for run in best_by_test_full_models(grids) if (run.folder / HEAD_FILE).is_file()]


def build_tie_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """tie.csv: the TIE block importance (softmax(alpha) per block, mean over proj dims) of each setting's selected run."""
    runs = tie_runs(grids)
    if not runs:
        return SkippedOutput("tie.csv", f"no best_by_test full-model run with a {HEAD_FILE} in its run folder")
    header = ("backbone", "tap", "n_classes", "setting", "run", "block", "weight")
    rows = []
    for run in runs:
        blocks, weights = block_importance(run.folder / HEAD_FILE)
        rows += [
            (
                run.backbone,
                run.setting.tap,
                format_n_classes(run.n_classes),
                run.setting.label(),
                run.run,
                str(int(block)),
                repr(float(weight)),
            )  # fmt: skip
            for block, weight in zip(blocks, weights)
        ]
    return Table("tie.csv", header, tuple(rows))


def build_tables(grids: Sequence[GridResults], analysis: ReportAnalysis | None = None) -> list[Table | SkippedOutput]:
    from .analysis_tables import build_errors_table, build_format_align_table, build_seeds_table

    score_rows = collect_score_rows(grids)
    return [
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
    ]
