"""Read and validate grid output folders (results.csv, selection.csv, run folders) into typed records.

The formats are those of ``pipeline.results`` (docs/results-format.md);
every problem names the file (and line) and what is wrong.
:func:`find_grid_dirs` finds the grid folders under ``runs/`` when the
report is given none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError
from ..names import BEST_BY_TEST, CENTER, DEFAULT_HEAD, SELECTION_RULES, VAL_SPLIT
from ..results import (
    OK,
    SELECTION_COLUMNS,
    HeadConfig,
    ResultRow,
    ResultsFormatError,
    RunSummary,
    Setting,
    config_key,
    read_csv_records,
    read_result_rows,
    summarize_runs,
)
from ..results import reference as ref
from ..results.run_folder import RunFolder

LDM_MARK = "ldm"  # a training split whose name holds it is the LDM training setting (paper mode: train_ldm)


class ReportError(PipelineError, RuntimeError):
    """The report cannot be made from the given grid folders (missing or malformed inputs)."""


@dataclass(frozen=True)
class Scores:
    """ACC and AP (fractions) of one test set."""

    acc: float
    ap: float


@dataclass(frozen=True)
class RunResult:
    """One ok run of a grid folder, with its scores per split kind and its means (pipeline.results rules)."""

    grid_dir: Path
    summary: RunSummary
    val: Mapping[str, Scores]  # dataset -> scores of the val split
    test: Mapping[str, Mapping[str, Scores]]  # variant -> dataset -> scores over all test splits
    splits: Mapping[str, str]  # every scored split (val and test entries) -> its variant
    split_sets: Mapping[str, tuple[str, ...]]  # every scored split -> its datasets

    def scores_of(self, split: str, dataset: str) -> Scores:
        """ACC and AP of one dataset of one scored split."""
        return self.val[dataset] if split == VAL_SPLIT else self.test[self.splits[split]][dataset]

    @property
    def row(self) -> ResultRow:
        return self.summary.row

    @property
    def run(self) -> str:
        return self.summary.run

    @property
    def folder(self) -> Path:
        return self.run_folder.path

    @property
    def run_folder(self) -> RunFolder:
        return RunFolder.of(self.grid_dir, self.run)

    @property
    def setting(self) -> Setting:
        return self.row.setting

    @property
    def head_config(self) -> HeadConfig:
        return self.row.head

    @property
    def n_classes(self) -> int | None:
        return self.row.setting.n_classes

    @property
    def backbone(self) -> str:
        """The authors' name of the backbone (ViT-L/14, ...), or the model id when it is not one of theirs."""
        return ref.backbone_name(self.setting.model) or self.setting.model

    @property
    def is_ldm(self) -> bool:
        """Trained on the LDM training set (its training split's name holds 'ldm')."""
        return LDM_MARK in self.setting.train.lower()

    @property
    def ablation(self) -> str | None:
        """without_intermediate | without_tie | without_contrastive for a single-ablation run; None otherwise."""
        kinds = [
            kind
            for kind, flagged in (
                ("without_intermediate", self.setting.head_blocks == "last"),
                ("without_tie", self.setting.aggregation == "mean"),
                ("without_contrastive", self.head_config.contrastive_factor == 0),
            )
            if flagged
        ]
        return kinds[0] if len(kinds) == 1 and self.is_rine else None

    @property
    def is_full_architecture(self) -> bool:
        """A RINE head on all blocks with TIE (the contrastive factor may be 0)."""
        return self.is_rine and self.setting.head_blocks == "all" and self.setting.aggregation == "tie"

    @property
    def is_rine(self) -> bool:
        """A RINE head (the paper's tables are about these; the other heads are in detectors.csv)."""
        return self.setting.head == DEFAULT_HEAD

    @property
    def is_full_model(self) -> bool:
        """All blocks, TIE and a contrastive term: the model the grid searches."""
        return self.is_full_architecture and self.head_config.contrastive_factor != 0

    @property
    def center(self) -> Mapping[str, Scores]:
        return self.test.get(CENTER, {})

    @property
    def mean_acc(self) -> float:
        return self.summary.mean_acc

    @property
    def mean_ap(self) -> float:
        return self.summary.mean_ap

    @property
    def has_test_mean(self) -> bool:
        return not math.isnan(self.mean_acc)


@dataclass(frozen=True)
class Selection:
    rule: str  # one of pipeline.results.SELECTION_RULES
    run: RunResult  # the config's run of the lowest seed (the one selection.csv names)
    seed_runs: tuple[RunResult, ...] = ()  # every ok run of the config, one per seed, in seed order

    @property
    def runs(self) -> tuple[RunResult, ...]:
        return self.seed_runs or (self.run,)


@dataclass(frozen=True)
class GridResults:
    path: Path
    runs: Mapping[str, RunResult]
    selections: tuple[Selection, ...]
    ok_rows: tuple[Mapping[str, str], ...]  # as written, for metrics.csv


def read_grid_dir(path: Path) -> GridResults:
    """Read one grid folder's results.csv (ok rows) and selection.csv into typed records."""
    if not path.is_dir():
        raise ReportError(f"{path}: no such grid folder")
    results = path / "results.csv"
    if not results.is_file():
        raise ReportError(f"{path}: no results.csv — run `pipeline fit --grid ...` first")
    selection = path / "selection.csv"
    if not selection.is_file():
        raise ReportError(
            f"{path}: results.csv without selection.csv — the grid did not finish; rerun `pipeline fit --grid ...`"
        )
    try:
        rows = [(line, row) for line, row in read_result_rows(results) if row.status == OK]
        records = read_csv_records(selection, SELECTION_COLUMNS)
    except ResultsFormatError as error:
        raise ReportError(str(error)) from None
    runs = build_runs(path, results, rows)
    selections = read_selections(selection, records, runs)
    return GridResults(path=path, runs=runs, selections=selections, ok_rows=tuple(row.to_csv() for _, row in rows))


def build_runs(grid_dir: Path, results: Path, rows: Sequence[tuple[int, ResultRow]]) -> dict[str, RunResult]:
    """Group ok rows by run; one test set may appear once per variant over all test splits."""
    first: dict[str, tuple[int, ResultRow]] = {}
    val: dict[str, dict[str, Scores]] = {}
    test: dict[str, dict[str, dict[str, Scores]]] = {}
    splits: dict[str, dict[str, str]] = {}
    split_sets: dict[str, dict[str, list[str]]] = {}
    seen_in_split: dict[tuple[str, str, str], str] = {}
    for line, row in rows:
        first_line, first_row = first.setdefault(row.run, (line, row))
        if (row.setting, row.head, row.grid) != (first_row.setting, first_row.head, first_row.grid):
            raise ReportError(f"{results}:{line}: run {row.run} has another config than on line {first_line}")
        scores = Scores(row.metric("acc"), row.metric("ap"))
        split, variant, dataset = row.split or "", row.variant or "", row.dataset or ""
        splits.setdefault(row.run, {})[split] = variant
        split_sets.setdefault(row.run, {}).setdefault(split, []).append(dataset)
        if split == VAL_SPLIT:
            if variant == CENTER:
                val.setdefault(row.run, {})[dataset] = scores
            continue
        earlier = seen_in_split.setdefault((row.run, variant, dataset), split)
        if earlier != split or dataset in test.get(row.run, {}).get(variant, {}):
            raise ReportError(
                f"{results}:{line}: run {row.run} scores test set {dataset!r} (variant {variant}) twice "
                f"(splits {earlier!r} and {split!r}); the report cannot tell which to use"
            )
        test.setdefault(row.run, {}).setdefault(variant, {})[dataset] = scores
    summaries = summarize_runs(row for _, row in rows)
    return {
        run: RunResult(
            grid_dir=grid_dir,
            summary=summaries[run],
            val=val.get(run, {}),
            test=test.get(run, {}),
            splits=splits[run],
            split_sets={split: tuple(sets) for split, sets in split_sets[run].items()},
        )
        for run in first
    }


def read_selections(
    path: Path, records: Sequence[tuple[int, Mapping[str, str]]], runs: Mapping[str, RunResult]
) -> tuple[Selection, ...]:
    """The rows of selection.csv, each resolved to its ok run and the runs of the same config with other seeds."""
    by_config = {config_key(group[0].row): group for group in seed_groups(runs.values())}
    selections = []
    for line, record in records:
        run = runs.get(record["run"])
        if run is None:
            raise ReportError(f"{path}:{line}: run {record['run']!r} is not an ok run of {path.parent / 'results.csv'}")
        if record["selection"] not in SELECTION_RULES:
            raise ReportError(f"{path}:{line}: selection {record['selection']!r} is not one of {list(SELECTION_RULES)}")
        written = run.row.to_csv()
        mismatched = [
            column for column in ("model", "tap", "train", "epochs", "classes") if record[column] != written[column]
        ]
        if mismatched:
            raise ReportError(f"{path}:{line}: {mismatched} differ from run {run.run} in results.csv")
        selections.append(Selection(rule=record["selection"], run=run, seed_runs=by_config[config_key(run.row)]))
    return tuple(selections)


def seed_groups(runs: Iterable[RunResult]) -> list[tuple[RunResult, ...]]:
    """Runs grouped by config (``pipeline.results.config_key``: all but the seed), each group in seed order."""
    groups: dict[tuple, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(config_key(run.row), []).append(run)
    return [tuple(sorted(group, key=lambda run: (run.setting.seed, run.run))) for group in groups.values()]


def find_grid_dirs(runs_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(grid folders under ``runs_dir`` with results.csv and selection.csv, [(unfinished folder, why)])."""
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: no such folder — name the grid folders, or run `pipeline fit --grid ...` first")
    found, unfinished = [], []
    for folder in sorted(path for path in runs_dir.iterdir() if path.is_dir()):
        if (folder / "results.csv").is_file() and (folder / "selection.csv").is_file():
            found.append(folder)
        elif (folder / "results.csv").is_file():
            unfinished.append((folder, "results.csv without selection.csv: the grid did not finish"))
    if not found:
        raise ReportError(
            f"{runs_dir}: no grid folder (a folder with results.csv and selection.csv) — run `pipeline fit --grid ...`"
        )
    return found, unfinished


def all_runs(grids: Sequence[GridResults]) -> list[RunResult]:
    return [run for grid in grids for run in grid.runs.values()]


def all_selections(grids: Sequence[GridResults], rule: str | None = None) -> list[Selection]:
    return [s for grid in grids for s in grid.selections if rule is None or s.rule == rule]


def best_by_test_full_models(grids: Sequence[GridResults]) -> list[RunResult]:
    """Each setting's best_by_test run when it is a full model (the runs the figures show), once each."""
    runs = [s.run for s in all_selections(grids, BEST_BY_TEST) if s.run.is_full_model]
    return list({(run.grid_dir, run.run): run for run in runs}.values())
