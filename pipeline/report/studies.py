"""The studies' tables beside the authors' runs: ablations (Table 4), robustness (Table 5), training length, training-set size, the LDM setting, and TIE's block weights."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..names import BEST_BY_TEST, LIST_SEPARATOR, PERTURBATIONS, UNPERTURBED_VARIANTS
from ..results import best_run, mean_datasets, nan_mean
from ..results import reference as ref
from ..results.run_folder import HEAD_FILE
from ..variants import VariantKind, VariantSpec
from .inputs import GridResults, RunResult, Scores, Selection, all_runs, all_selections, best_by_test_full_models
from .numbers import significant
from .table import (
    ABLATION_ORDER,
    AUTHORS,
    FULL,
    METRICS,
    OURS,
    RowKey,
    ScoreRow,
    SkippedOutput,
    StudyKey,
    Table,
    format_hyper,
    format_n_classes,
    format_percent,
    group_sort_key,
    score_table,
    scores_from_reference,
)


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
    return (
        setting.model,
        setting.tap,
        setting.train,
        setting.classes,
        setting.epochs,
        setting.batch_size,
        setting.lr,
        setting.lr_milestones,
        setting.train_fraction,
        setting.seed,
        setting.amp,
    )


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
            )
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
        rows.append(
            AblationRow(
                backbone,
                n_classes,
                "",
                FULL,
                AUTHORS,
                "",
                format_hyper(config),
                scores_from_reference(full),
                f"{ref.GRID_FILE} at the ablations' config",
            )
        )
    for variant in ABLATION_ORDER[1:]:
        if variant in ablations:
            variant_config, scores = ablations[variant]
            rows.append(
                AblationRow(
                    backbone,
                    n_classes,
                    "",
                    variant,
                    AUTHORS,
                    "",
                    format_hyper(variant_config),
                    scores_from_reference(scores),
                    ref.ABLATIONS_FILE,
                )
            )
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
    header = (
        "backbone",
        "n_classes",
        "setting",
        "variant",
        "source",
        "run",
        "contrastive_factor",
        "proj_layers",
        "proj_dim",
        "same_hyper_as_full",
        "acc_all_pct",
        "ap_all_pct",
        "acc_non_gan_pct",
        "ap_non_gan_pct",
        "excluded_from_avg",
        "note",
    )
    full_hyper: dict[tuple[str, str], tuple[str, str, str]] = {}
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
        if row.variant == FULL:
            full_hyper[(row.backbone, row.source)] = row.hyper
        rows.append(
            (
                row.backbone,
                format_n_classes(row.n_classes),
                row.setting,
                row.variant,
                row.source,
                row.run,
                *row.hyper,
                same_hyper_text(row, full_hyper.get((row.backbone, row.source))),
                *(format_percent(mean) for mean in means),
                LIST_SEPARATOR.join(excluded),
                row.note,
            )
        )
    return Table("ablations.csv", header, tuple(rows))


def same_hyper_text(row: AblationRow, full: tuple[str, str, str] | None) -> str:
    """'yes' when an ablation used its full model's xi/q/d' (q/d' and xi=0 without the contrastive loss), else 'no'."""
    if full is None:
        return ""
    if row.variant == FULL:
        return "yes"
    same = row.hyper[1:] == full[1:] if row.variant == "without_contrastive" else row.hyper == full
    return "yes" if same else "no"


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


@dataclass(frozen=True)
class RobustnessKey(RowKey):
    """Key of robustness.csv: a setting's best run, or the authors' released head, under one perturbation."""

    backbone: str
    n_classes: int | None
    setting: str
    run: str
    perturbation: str
    preset: str
    source: str


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
                key = RobustnessKey(
                    run.backbone, run.n_classes, run.setting.label(), run.run, perturbation, preset, OURS
                )
                order = (group_sort_key(run.backbone, run.n_classes), perturbation_sort_key(perturbation), 0, preset)
                entries.append((order, ScoreRow(key, scores)))
    if not entries:
        return SkippedOutput("robustness.csv", "no perturbed test variants in the results of any best_by_test run")
    groups = {(row.key.backbone, row.key.n_classes) for _, row in entries}
    for backbone, n_classes in groups:
        if backbone == ref.AUTHORS_BACKBONE_OF_PERTURBATIONS and n_classes is not None:
            preset = ref.AUTHORS_PERTURBATION_PRESET
            for perturbation, pairs in ref.reference_perturbation_scores(n_classes).items():
                key = RobustnessKey(backbone, n_classes, "", "", perturbation, preset, AUTHORS)
                order = (group_sort_key(backbone, n_classes), perturbation_sort_key(perturbation), 1, preset)
                entries.append((order, ScoreRow(key, scores_from_reference(pairs))))
    entries.sort(key=lambda item: item[0])
    return score_table("robustness.csv", RobustnessKey, [row for _, row in entries], METRICS)


def study_runs(grids: Sequence[GridResults], column: str) -> list[RunResult]:
    """Full-model ProGAN-setting runs whose setting and head config recur with two or more values of ``column``."""
    groups: dict[tuple, list[RunResult]] = {}
    for run in all_runs(grids):
        if run.is_full_model and not run.is_ldm and run.center:
            setting = run.setting
            others = tuple(getattr(setting, name) for name in setting.__dataclass_fields__ if name != column)
            groups.setdefault((others, run.head_config), []).append(run)
    runs = [run for group in groups.values() if len({getattr(r.setting, column) for r in group}) > 1 for run in group]
    return sorted(
        runs,
        key=lambda r: (
            group_sort_key(r.backbone, r.n_classes),
            tuple(r.head_config),
            r.setting.epochs,
            r.setting.train_fraction,
            r.run,
        ),
    )


def our_study_row(run: RunResult, scores: Mapping[str, Scores]) -> ScoreRow:
    setting = run.setting
    key = StudyKey(
        OURS,
        run.backbone,
        setting.tap,
        run.n_classes,
        setting.train,
        *run.head_config,
        setting.epochs,
        setting.train_fraction,
        run.run,
    )
    return ScoreRow(key, scores)


def authors_study_rows(
    runs: Mapping[ref.ReferenceRunKey, Mapping[str, tuple[float, float]]], group: tuple[str, int | None] | None = None
) -> list[ScoreRow]:
    """The authors' runs of a study, those of one (backbone, n_classes) group or all."""
    rows = []
    for key, pairs in runs.items():
        if group is None or (key.backbone, key.n_classes) == group:
            row_key = StudyKey(
                AUTHORS,
                key.backbone,
                ref.AUTHORS_TAP,
                key.n_classes,
                "",
                *key.head_config,
                key.epochs,
                key.train_fraction,
                "",
            )
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
    return score_table(name, StudyKey, rows, METRICS)


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
    return score_table("ldm.csv", StudyKey, rows, METRICS)


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
                significant(float(weight)),
            )
            for block, weight in zip(blocks, weights)
        ]
    return Table("tie.csv", header, tuple(rows))
