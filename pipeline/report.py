"""Turn stage two's grid folders into the paper's tables (CSV), next to the authors' published numbers, then plots.

Reads ``<grid>/results.csv`` and ``<grid>/selection.csv`` (format: .notes/FORMATS.md)
and writes into ``out``:

* ``acc.csv``, ``ap.csv`` (paper Tables 2/3): one row per selected run (center
  variant, test splits) with the per-test-set value and ``avg``, in percent with
  one decimal; per (backbone, n_classes) also the authors' published config
  (``selection=published``) and, if it differs, their own best-by-test config.
* ``best.csv`` (Table 1): the selected configs with parameter count and fit time.
* ``ablations.csv`` (Table 4), ``robustness.csv`` (Table 5): see the builders.
* ``grid.csv``: every ok run with its means (fractions, full precision).
* ``metrics.csv``: every ok row of every results.csv, with a ``grid_dir`` column.

Means ("avg", mean_acc, ...) skip NaN values, as stage two's selection does.
All tables are written before any plot; plots (``pipeline.plots``, imported
only here, lazily) never stop the tables, and each failure is reported.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import reference as ref
from .files import atomic_path
from .reference import HeadConfig

RESULTS_COLUMNS: tuple[str, ...] = (
    "run", "status", "error", "grid", "model", "tap", "setting",
    "contrastive_factor", "proj_layers", "proj_dim", "epochs", "batch_size", "lr", "classes", "n_classes",
    "train_fraction", "blocks", "aggregation", "seed", "amp",
    "n_params", "fit_seconds", "split", "variant", "dataset", "n", "n_invalid",
    "acc", "ap", "auc", "real_acc", "fake_acc", "oracle_acc", "oracle_threshold", "calibrated_acc",
    "calibrated_threshold",
)  # fmt: skip
# Columns that describe the run, identical on all its rows.
CONFIG_COLUMNS: tuple[str, ...] = RESULTS_COLUMNS[RESULTS_COLUMNS.index("grid"):RESULTS_COLUMNS.index("split")]
# Training-setting columns shared by a full model and its ablations (not setting/grid, which differ).
SHARED_SETTING_COLUMNS: tuple[str, ...] = (
    "model", "tap", "classes", "n_classes", "epochs", "batch_size", "lr", "train_fraction", "seed", "amp",
)  # fmt: skip
SELECTION_REQUIRED_COLUMNS: tuple[str, ...] = ("selection", "setting", "run", "model", "tap")

VAL_SPLIT = "val"
CENTER = "center"
BEST_BY_TEST = "best_by_test_mean_acc_ap"
PUBLISHED = "published"
OURS, AUTHORS = "ours", "authors"
FULL = "full"
ABLATION_ORDER: tuple[str, ...] = (FULL, "without_intermediate", "without_tie", "without_contrastive")
PERTURBATION_ORDER: tuple[str, ...] = ("blur", "crop", "jpeg", "noise", "combined")


class ReportError(RuntimeError):
    """The report cannot be made from the given grid folders (missing or malformed inputs)."""


@dataclass(frozen=True)
class ReportConfig:
    grid_dirs: tuple[Path, ...]
    out: Path = Path("reports")
    plots: bool = True


@dataclass(frozen=True)
class SkippedOutput:
    name: str
    reason: str


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    written: tuple[Path, ...]
    skipped: tuple[SkippedOutput, ...]

    def report(self) -> str:
        """Human-readable lines: where the files went and what was skipped, and why."""
        lines = [f"wrote {len(self.written)} file(s) to {self.out}"]
        lines += [f"  {path.name}" for path in self.written]
        lines += [f"skipped {item.name}: {item.reason}" for item in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class Scores:
    """ACC and AP (fractions) of one test set."""

    acc: float
    ap: float


@dataclass(frozen=True)
class RunResult:
    """One ok run of a grid folder, with its scores per split kind."""

    grid_dir: Path
    run: str
    config: Mapping[str, str]  # CONFIG_COLUMNS -> value as written by stage two
    head_config: HeadConfig
    n_classes: int | None
    val: Mapping[str, Scores]  # dataset -> scores of the val split
    test: Mapping[str, Mapping[str, Scores]]  # variant -> dataset -> scores over all test splits

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def tap(self) -> str:
        return self.config["tap"]

    @property
    def setting(self) -> str:
        return self.config["setting"]

    @property
    def backbone(self) -> str:
        """The authors' name of the backbone (ViT-L/14, ...), or the model id when it is not one of theirs."""
        return ref.backbone_name(self.model) or self.model

    @property
    def ablation(self) -> str | None:
        """without_intermediate | without_tie | without_contrastive for a single-ablation run; None otherwise."""
        kinds = [
            kind
            for kind, flagged in (
                ("without_intermediate", self.config["blocks"] == "last"),
                ("without_tie", self.config["aggregation"] == "mean"),
                ("without_contrastive", self.head_config.contrastive_factor == 0),
            )
            if flagged
        ]
        return kinds[0] if len(kinds) == 1 else None

    @property
    def is_full_model(self) -> bool:
        """All blocks, TIE and a contrastive term: the model the grid searches."""
        config = self.config
        with_contrastive = self.head_config.contrastive_factor != 0
        return config["blocks"] != "last" and config["aggregation"] != "mean" and with_contrastive

    @property
    def center(self) -> Mapping[str, Scores]:
        return self.test.get(CENTER, {})

    @property
    def mean_acc(self) -> float:
        return nan_mean(s.acc for s in self.center.values())

    @property
    def mean_ap(self) -> float:
        return nan_mean(s.ap for s in self.center.values())

    @property
    def val_acc(self) -> float:
        return nan_mean(s.acc for s in self.val.values())

    @property
    def val_ap(self) -> float:
        return nan_mean(s.ap for s in self.val.values())

    def shared_key(self, without: str = "") -> tuple[str, ...]:
        """The values of SHARED_SETTING_COLUMNS, except ``without``."""
        return tuple(self.config[column] for column in SHARED_SETTING_COLUMNS if column != without)


@dataclass(frozen=True)
class Selection:
    rule: str  # best_by_val | best_by_test_mean_acc_ap
    run: RunResult


@dataclass(frozen=True)
class GridResults:
    path: Path
    runs: Mapping[str, RunResult]
    selections: tuple[Selection, ...]
    ok_rows: tuple[Mapping[str, str], ...]


@dataclass(frozen=True)
class Table:
    name: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ScoreRow:
    """A row of acc.csv / ap.csv / the per-dataset plot: one model's scores per test set."""

    source: str
    backbone: str
    tap: str
    n_classes: int | None
    setting: str
    selection: str
    run: str
    hyper: tuple[str, str, str]  # contrastive_factor, proj_layers, proj_dim as text
    scores: Mapping[str, Scores]


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


@dataclass(frozen=True)
class PerturbedRow:
    """One model's scores on one perturbed variant of the test sets (a row pair of robustness.csv)."""

    backbone: str
    n_classes: int | None
    setting: str
    run: str
    perturbation: str
    preset: str
    source: str
    scores: Mapping[str, Scores]


# ----------------------------------------------------------------------------- reading


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def read_csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file whose header must contain ``required``."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [column for column in required if column not in header]
        if missing:
            raise ReportError(f"{path}: missing column(s) {missing}; is it a stage-two file (.notes/FORMATS.md)?")
        return [(reader.line_num, row) for row in reader]


def parse_number(path: Path, line: int, row: Mapping[str, str], column: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(row[column])
    except (TypeError, ValueError):
        raise ReportError(f"{path}:{line}: column {column}: {row[column]!r} is not a valid {kind.__name__}") from None


def parse_n_classes(path: Path, line: int, row: Mapping[str, str]) -> int | None:
    return None if row["n_classes"] == "" else parse_number(path, line, row, "n_classes", int)


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
    ok_rows = []
    for line, row in read_csv_rows(results, RESULTS_COLUMNS):
        if row["status"] not in ("ok", "error"):
            raise ReportError(f"{results}:{line}: status {row['status']!r} is neither 'ok' nor 'error'")
        if row["status"] == "ok":
            ok_rows.append((line, row))
    runs = build_runs(path, results, ok_rows)
    selections = read_selections(selection, runs)
    return GridResults(path=path, runs=runs, selections=selections, ok_rows=tuple(row for _, row in ok_rows))


def build_runs(grid_dir: Path, results: Path, ok_rows: Sequence[tuple[int, dict[str, str]]]) -> dict[str, RunResult]:
    """Group ok rows by run; one test set may appear once per variant over all test splits."""
    first_rows: dict[str, tuple[int, dict[str, str]]] = {}
    val: dict[str, dict[str, Scores]] = {}
    test: dict[str, dict[str, dict[str, Scores]]] = {}
    seen_in_split: dict[tuple[str, str, str], str] = {}
    for line, row in ok_rows:
        run_id = row["run"]
        first_line, first = first_rows.setdefault(run_id, (line, row))
        changed = [column for column in CONFIG_COLUMNS if row[column] != first[column]]
        if changed:
            raise ReportError(f"{results}:{line}: run {run_id} has other {changed} than on line {first_line}")
        scores = Scores(parse_number(results, line, row, "acc", float), parse_number(results, line, row, "ap", float))
        split, variant, dataset = row["split"], row["variant"], row["dataset"]
        if split == VAL_SPLIT:
            if variant == CENTER:
                val.setdefault(run_id, {})[dataset] = scores
            continue
        earlier = seen_in_split.setdefault((run_id, variant, dataset), split)
        if earlier != split or dataset in test.get(run_id, {}).get(variant, {}):
            raise ReportError(
                f"{results}:{line}: run {run_id} scores test set {dataset!r} (variant {variant}) twice "
                f"(splits {earlier!r} and {split!r}); the report cannot tell which to use"
            )
        test.setdefault(run_id, {}).setdefault(variant, {})[dataset] = scores
    runs = {}
    for run_id, (line, row) in first_rows.items():
        runs[run_id] = RunResult(
            grid_dir=grid_dir,
            run=run_id,
            config={column: row[column] for column in CONFIG_COLUMNS},
            head_config=HeadConfig(
                parse_number(results, line, row, "contrastive_factor", float),
                parse_number(results, line, row, "proj_layers", int),
                parse_number(results, line, row, "proj_dim", int),
            ),
            n_classes=parse_n_classes(results, line, row),
            val=val.get(run_id, {}),
            test=test.get(run_id, {}),
        )
    return runs


def read_selections(path: Path, runs: Mapping[str, RunResult]) -> tuple[Selection, ...]:
    """The rows of selection.csv, each resolved to its ok run."""
    selections = []
    for line, row in read_csv_rows(path, SELECTION_REQUIRED_COLUMNS):
        run = runs.get(row["run"])
        if run is None:
            raise ReportError(f"{path}:{line}: run {row['run']!r} is not an ok run of {path.parent / 'results.csv'}")
        mismatched = [column for column in ("setting", "model", "tap") if row[column] != run.config[column]]
        if mismatched:
            raise ReportError(f"{path}:{line}: {mismatched} differ from run {run.run} in results.csv")
        selections.append(Selection(rule=row["selection"], run=run))
    return tuple(selections)


# ----------------------------------------------------------------------------- formatting helpers


def order_datasets(names: Iterable[str]) -> list[str]:
    """Paper order first (only those present), then any other test sets sorted."""
    present = set(names)
    return [name for name in ref.PAPER_DATASETS if name in present] + sorted(present - set(ref.PAPER_DATASETS))


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


def run_hyper(run: RunResult) -> tuple[str, str, str]:
    return (run.config["contrastive_factor"], run.config["proj_layers"], run.config["proj_dim"])


def format_n_classes(n_classes: int | None) -> str:
    return "" if n_classes is None else str(n_classes)


def group_sort_key(backbone: str, n_classes: int | None) -> tuple[str, bool, int]:
    return (backbone, n_classes is None, n_classes or 0)


def rank_value(run: RunResult) -> float:
    """Mean test ACC + mean test AP, NaN ranked lowest (the paper's selection rule)."""
    value = run.mean_acc + run.mean_ap
    return -math.inf if math.isnan(value) else value


def best_run(runs: Sequence[RunResult]) -> RunResult:
    return max(runs, key=lambda run: (rank_value(run), run.run))


def scores_from_reference(pairs: Mapping[str, tuple[float, float]]) -> dict[str, Scores]:
    return {dataset: Scores(acc, ap) for dataset, (acc, ap) in pairs.items()}


def write_table(out: Path, table: Table) -> Path:
    """Write a table atomically (temporary name, then rename)."""
    path = out / table.name
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(table.header)
        writer.writerows(table.rows)
    return path


# ----------------------------------------------------------------------------- tables


def all_runs(grids: Sequence[GridResults]) -> list[RunResult]:
    return [run for grid in grids for run in grid.runs.values()]


def all_selections(grids: Sequence[GridResults]) -> list[Selection]:
    return [selection for grid in grids for selection in grid.selections]


def build_metrics_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Every ok results.csv row of every grid folder, values as written, with the folder in front."""
    columns = tuple(column for column in RESULTS_COLUMNS if column not in ("status", "error"))
    rows = tuple((str(grid.path), *(row[column] for column in columns)) for grid in grids for row in grid.ok_rows)
    if not rows:
        return SkippedOutput("metrics.csv", "no ok rows in any results.csv")
    return Table("metrics.csv", ("grid_dir", *columns), rows)


def build_grid_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """One row per ok run: config, size, time, val and mean test ACC/AP (fractions, full precision)."""
    config_columns = tuple(column for column in CONFIG_COLUMNS if column not in ("n_params", "fit_seconds"))
    header = ("grid_dir", "run", *config_columns, "backbone", "n_params", "fit_seconds",
              "val_acc", "val_ap", "mean_acc", "mean_ap")  # fmt: skip
    rows = tuple(
        (
            str(run.grid_dir),
            run.run,
            *(run.config[column] for column in config_columns),
            run.backbone,
            run.config["n_params"],
            run.config["fit_seconds"],
            *(format_float(value) for value in (run.val_acc, run.val_ap, run.mean_acc, run.mean_ap)),
        )
        for run in all_runs(grids)
    )
    if not rows:
        return SkippedOutput("grid.csv", "no ok runs in any results.csv")
    return Table("grid.csv", header, rows)


def build_best_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Paper Table 1: each selected config with its parameter count and fit time, and the authors' config."""
    header = ("setting", "backbone", "tap", "n_classes", "selection", "contrastive_factor", "proj_layers", "proj_dim",
              "n_params", "fit_seconds", "run", "grid_dir",
              "published_contrastive_factor", "published_proj_layers", "published_proj_dim")  # fmt: skip
    rows = []
    for selection in all_selections(grids):
        run = selection.run
        published = ref.PUBLISHED_BEST.get((run.backbone, run.n_classes)) if run.n_classes is not None else None
        rows.append(
            (
                run.setting, run.backbone, run.tap, format_n_classes(run.n_classes), selection.rule, *run_hyper(run),
                run.config["n_params"], run.config["fit_seconds"], run.run, str(run.grid_dir),
                *(format_hyper(published) if published else ("", "", "")),
            )  # fmt: skip
        )
    if not rows:
        return SkippedOutput("best.csv", "no rows in any selection.csv")
    return Table("best.csv", header, tuple(rows))


def authors_score_rows(backbone: str, n_classes: int | None) -> list[ScoreRow]:
    """The authors' published config of a setting, and their best-by-test config if it differs."""
    if n_classes is None or (backbone, n_classes) not in ref.PUBLISHED_BEST:
        return []
    published = ref.PUBLISHED_BEST[(backbone, n_classes)]
    configs = [(PUBLISHED, published)]
    best = ref.best_reference_config(backbone, n_classes)
    if best is not None and not best.matches(published):
        configs.append((BEST_BY_TEST, best))
    rows = []
    for label, config in configs:
        scores = ref.reference_scores(backbone, n_classes, config)
        if scores:
            rows.append(
                ScoreRow(AUTHORS, backbone, ref.AUTHORS_TAP, n_classes, "", label, "", format_hyper(config),
                         scores_from_reference(scores))  # fmt: skip
            )
    return rows


def collect_score_rows(grids: Sequence[GridResults]) -> list[ScoreRow]:
    """Ours (every selection, center test sets) grouped by (backbone, n_classes), each group then the authors'.

    Settings of the architecture ablations (last block only, mean instead of
    TIE) belong to ablations.csv, not to the paper's Tables 2 and 3.
    """
    ours = [
        ScoreRow(OURS, s.run.backbone, s.run.tap, s.run.n_classes, s.run.setting, s.rule, s.run.run, run_hyper(s.run),
                 s.run.center)  # fmt: skip
        for s in all_selections(grids)
        if s.run.config["blocks"] != "last" and s.run.config["aggregation"] != "mean"
    ]
    groups = sorted({(row.backbone, row.n_classes) for row in ours}, key=lambda key: group_sort_key(*key))
    rows: list[ScoreRow] = []
    for backbone, n_classes in groups:
        rows += [row for row in ours if (row.backbone, row.n_classes) == (backbone, n_classes)]
        rows += authors_score_rows(backbone, n_classes)
    return rows


def build_score_table(name: str, metric: str, rows: Sequence[ScoreRow]) -> Table | SkippedOutput:
    """acc.csv / ap.csv: one column per test set in paper order, then the row mean."""
    if not rows:
        return SkippedOutput(name, "no rows in any selection.csv")
    datasets = order_datasets(dataset for row in rows for dataset in row.scores)
    header = ("source", "backbone", "tap", "n_classes", "setting", "selection", "run",
              "contrastive_factor", "proj_layers", "proj_dim", *datasets, "avg")  # fmt: skip
    table_rows = []
    for row in rows:
        values = {dataset: getattr(scores, metric) for dataset, scores in row.scores.items()}
        table_rows.append(
            (
                row.source, row.backbone, row.tap, format_n_classes(row.n_classes), row.setting, row.selection,
                row.run, *row.hyper, *(format_percent(values.get(dataset)) for dataset in datasets),
                format_percent(nan_mean(values.values()) if values else None),
            )  # fmt: skip
        )
    return Table(name, header, tuple(table_rows))


def choose_full_run(
    key: tuple[str, ...], candidates: Sequence[RunResult], selections: Sequence[Selection]
) -> tuple[RunResult | None, str]:
    """The full model an ablation is compared with: the setting's best_by_test selection if it is a full model."""
    for selection in selections:
        run = selection.run
        if selection.rule == BEST_BY_TEST and run.is_full_model and run.shared_key() == key:
            return run, f"{BEST_BY_TEST} selection of its setting"
    if not candidates:
        return None, ""
    note = f"no {BEST_BY_TEST} selection is a full model; best of {len(candidates)} full runs by mean test ACC+AP"
    return best_run(candidates), note


def choose_ablation_run(variant: str, candidates: Sequence[RunResult], full: RunResult | None) -> tuple[RunResult, str]:
    """The ablation run with the full model's xi/q/d' (q/d' for without_contrastive), else the best one.

    "Best" is by mean test ACC + AP; the returned note says which rule applied.
    """
    without_contrastive = variant == "without_contrastive"
    if full is not None:
        if without_contrastive:
            target = full.head_config._replace(contrastive_factor=0.0)
        else:
            target = full.head_config
        same = [run for run in candidates if run.head_config.matches(target)]
        if same:
            return best_run(same), "same hyper-params as the full model" + (" (xi=0)" if without_contrastive else "")
        reason = "no run with the full model's hyper-params"
    else:
        reason = "no full-model run of this setting"
    return best_run(candidates), f"{reason}; best of {len(candidates)} by mean test ACC+AP"


def ours_ablation_rows(grids: Sequence[GridResults]) -> list[AblationRow]:
    runs = all_runs(grids)
    selections = all_selections(grids)
    keys = list(dict.fromkeys(run.shared_key() for run in runs if run.ablation))
    rows = []
    for key in keys:
        members = [run for run in runs if run.shared_key() == key]
        full, full_note = choose_full_run(key, [run for run in members if run.is_full_model], selections)
        chosen: list[tuple[str, RunResult, str]] = []
        if full is not None:
            chosen.append((FULL, full, full_note))
        for variant in ABLATION_ORDER[1:]:
            candidates = [run for run in members if run.ablation == variant]
            if candidates:
                chosen.append((variant, *choose_ablation_run(variant, candidates, full)))
        rows += [
            AblationRow(
                run.backbone, run.n_classes, run.setting, variant, OURS, run.run, run_hyper(run), run.center, note
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
            "ablations.csv", "no ablation runs (blocks=last, aggregation=mean or contrastive_factor=0) in the results"
        )
    groups = sorted({(row.backbone, row.n_classes) for row in ours}, key=lambda key: group_sort_key(*key))
    ordered: list[AblationRow] = []
    for backbone, n_classes in groups:
        ordered += [row for row in ours if (row.backbone, row.n_classes) == (backbone, n_classes)]
        ordered += authors_ablation_rows(backbone, n_classes)
    header = ("backbone", "n_classes", "setting", "variant", "source", "run", "contrastive_factor", "proj_layers",
              "proj_dim", "acc_all", "ap_all", "acc_non_gan", "ap_non_gan", "note")  # fmt: skip
    rows = []
    for row in ordered:
        non_gan = [scores for dataset, scores in row.scores.items() if dataset in ref.NON_GAN_DATASETS]
        every = list(row.scores.values())
        means = [
            nan_mean(getattr(s, metric) for s in group) if group else None
            for group in (every, non_gan)
            for metric in ("acc", "ap")
        ]
        rows.append(
            (row.backbone, format_n_classes(row.n_classes), row.setting, row.variant, row.source, row.run, *row.hyper,
             *(format_percent(mean) for mean in means), row.note)  # fmt: skip
        )
    return Table("ablations.csv", tuple(header), tuple(rows))


def split_variant(variant: str) -> tuple[str, str]:
    """'jpeg-official' -> ('jpeg', 'official'); a name without a preset -> (name, '')."""
    perturbation, dash, preset = variant.rpartition("-")
    return (perturbation, preset) if dash else (variant, "")


def perturbation_sort_key(perturbation: str) -> tuple[int, str]:
    order = PERTURBATION_ORDER.index(perturbation) if perturbation in PERTURBATION_ORDER else len(PERTURBATION_ORDER)
    return (order, perturbation)


def build_robustness_table(grids: Sequence[GridResults]) -> Table | SkippedOutput:
    """Paper Table 5: per perturbation, ACC and AP per test set (percent) of each setting's best_by_test run.

    One row per metric (a ``metric`` column): all acc rows, then all ap rows, so
    the table reads as the paper's two blocks; within a block, per perturbation,
    ours first, then the authors' (released ViT-L/14 checkpoints, official preset).
    """
    entries: list[PerturbedRow] = []
    for selection in all_selections(grids):
        run = selection.run
        if selection.rule != BEST_BY_TEST:
            continue
        for variant, scores in run.test.items():
            if variant != CENTER:
                perturbation, preset = split_variant(variant)
                entries.append(
                    PerturbedRow(run.backbone, run.n_classes, run.setting, run.run, perturbation, preset, OURS, scores)
                )
    if not entries:
        return SkippedOutput("robustness.csv", "no perturbed test variants in the results of any best_by_test run")
    groups = sorted({(e.backbone, e.n_classes) for e in entries}, key=lambda key: group_sort_key(*key))
    for backbone, n_classes in groups:
        if backbone == ref.AUTHORS_BACKBONE_OF_PERTURBATIONS and n_classes is not None:
            for perturbation, pairs in ref.reference_perturbation_scores(n_classes).items():
                entries.append(
                    PerturbedRow(backbone, n_classes, "", "", perturbation, ref.AUTHORS_PERTURBATION_PRESET, AUTHORS,
                                 scores_from_reference(pairs))
                )  # fmt: skip
    datasets = order_datasets(dataset for entry in entries for dataset in entry.scores)
    header = ("backbone", "n_classes", "setting", "run", "perturbation", "preset", "source", "metric", *datasets, "avg")
    rows = []
    for backbone, n_classes in groups:
        group = [e for e in entries if (e.backbone, e.n_classes) == (backbone, n_classes)]
        group.sort(key=lambda e: (perturbation_sort_key(e.perturbation), e.source != OURS, e.preset, e.setting))
        for metric in ("acc", "ap"):
            for e in group:
                values = {dataset: getattr(scores, metric) for dataset, scores in e.scores.items()}
                rows.append(
                    (backbone, format_n_classes(n_classes), e.setting, e.run, e.perturbation, e.preset, e.source, metric,
                     *(format_percent(values.get(d)) for d in datasets), format_percent(nan_mean(values.values())))
                )  # fmt: skip
    return Table("robustness.csv", header, tuple(rows))


def build_tables(grids: Sequence[GridResults]) -> list[Table | SkippedOutput]:
    score_rows = collect_score_rows(grids)
    return [
        build_score_table("acc.csv", "acc", score_rows),
        build_score_table("ap.csv", "ap", score_rows),
        build_best_table(grids),
        build_ablations_table(grids),
        build_grid_table(grids),
        build_metrics_table(grids),
        build_robustness_table(grids),
    ]


# ----------------------------------------------------------------------------- plots


PlotJob = tuple[str, Callable[[], Path]]


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def per_dataset_plot_name(run: RunResult, common_tokens: set[str]) -> str:
    """per_dataset_<backbone>-<tap>-<n>class-<setting parts that differ between plotted runs>-<hash>.png"""
    digest = hashlib.sha1("\n".join((run.grid_dir.name, run.model, run.tap, run.setting)).encode()).hexdigest()[:6]
    distinct = " ".join(token for token in run.setting.split() if token not in common_tokens)
    classes = f"{run.n_classes}class" if run.n_classes is not None else ""
    readable = slugify(f"{run.backbone} {run.tap} {classes} {distinct}")[:80].rstrip("-")
    return f"per_dataset_{readable}-{digest}.png"


def percent_lists(scores: Mapping[str, Scores], datasets: Sequence[str]) -> tuple[list[float], list[float]]:
    return (
        [100 * scores[d].acc if d in scores else math.nan for d in datasets],
        [100 * scores[d].ap if d in scores else math.nan for d in datasets],
    )


def per_dataset_jobs(grids: Sequence[GridResults], out: Path, plots: ModuleType) -> list[PlotJob]:
    """One figure per full-model setting (its best_by_test run) next to the authors' published config.

    Ablation settings are left out: ablations.csv compares them with their full model.
    """
    runs = [s.run for s in all_selections(grids) if s.rule == BEST_BY_TEST and s.run.is_full_model]
    common_tokens = set.intersection(*(set(run.setting.split()) for run in runs)) if runs else set()
    jobs = []
    for run in runs:
        series = {f"ours, xi/q/d' = {'/'.join(run_hyper(run))}": run.center}
        published = ref.PUBLISHED_BEST.get((run.backbone, run.n_classes)) if run.n_classes is not None else None
        if published is not None:
            pairs = ref.reference_scores(run.backbone, run.n_classes, published)
            series[f"authors (published), xi/q/d' = {'/'.join(format_hyper(published))}"] = scores_from_reference(pairs)
        datasets = order_datasets(d for scores in series.values() for d in scores)
        name = per_dataset_plot_name(run, common_tokens)
        classes = f"{run.n_classes}-class" if run.n_classes is not None else "classes=" + run.config["classes"]
        title = f"{run.backbone} ({run.tap}), {classes}, run {run.run} (best by mean test ACC+AP)\n{run.setting}"
        bars = {label: percent_lists(scores, datasets) for label, scores in series.items()}
        jobs.append((name, functools.partial(plots.plot_per_dataset, out / name, title, datasets, bars)))
    return jobs


def numeric_order(values: Iterable[str]) -> list[str]:
    def key(value: str) -> tuple[int, float, str]:
        try:
            return (0, float(value), value)
        except ValueError:
            return (1, 0.0, value)

    return sorted(set(values), key=key)


def hyperparam_job(grids: Sequence[GridResults], out: Path, plots: ModuleType) -> PlotJob | SkippedOutput:
    runs = [run for run in all_runs(grids) if run.is_full_model and not math.isnan(run.mean_acc)]
    name = "hyperparams_box.png"
    if not runs:
        return SkippedOutput(name, "no full-model runs with test results")
    panels = {}
    labels = {
        "contrastive_factor": r"contrastive factor $\xi$",
        "proj_layers": r"projection layers $q$",
        "proj_dim": r"projection dim $d'$",
    }
    for column, label in labels.items():
        panels[label] = {
            value: (
                [100 * run.mean_acc for run in runs if run.config[column] == value],
                [100 * run.mean_ap for run in runs if run.config[column] == value],
            )
            for value in numeric_order(run.config[column] for run in runs)
        }
    title = f"Mean test ACC / AP per hyper-parameter value ({len(runs)} runs, all settings pooled)"
    return (name, functools.partial(plots.plot_hyperparam_boxes, out / name, title, panels))


def study_job(
    grids: Sequence[GridResults], out: Path, plots: ModuleType, column: str, name: str, xlabel: str
) -> PlotJob | SkippedOutput:
    """Mean ACC/AP against ``column`` for full-model runs that differ only in it (and in xi/q/d')."""
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for run in all_runs(grids):
        if run.is_full_model and not math.isnan(run.mean_acc):
            groups.setdefault(run.shared_key(without=column), []).append(run)
    studies = {}
    for runs in groups.values():
        values = numeric_order(run.config[column] for run in runs)
        if len(values) < 2:
            continue
        first = runs[0]
        label = f"{first.backbone} {first.tap} classes={first.config['classes']}"
        if label in studies:
            label = f"{label} #{len(studies) + 1}"
        studies[label] = {
            value: (
                [100 * run.mean_acc for run in runs if run.config[column] == value],
                [100 * run.mean_ap for run in runs if run.config[column] == value],
            )
            for value in values
        }
    if not studies:
        return SkippedOutput(name, f"no runs that differ only in {column} within a setting")
    title = f"Mean test ACC / AP vs {xlabel} (mean and max over head configs)"
    return (name, functools.partial(plots.plot_study, out / name, title, xlabel, studies))


def write_plots(grids: Sequence[GridResults], out: Path) -> tuple[list[Path], list[SkippedOutput]]:
    """Prepare and draw every plot in its own try: a failure is reported, never raised."""
    try:
        from . import plots
    except ImportError as error:
        return [], [SkippedOutput("plots", f"matplotlib is not available ({error}); tables only")]
    except Exception as error:  # noqa: BLE001 - a broken matplotlib must not take the tables down
        return [], [SkippedOutput("plots", f"matplotlib failed to load ({type(error).__name__}: {error}); tables only")]
    preparers: tuple[tuple[str, Callable[[], list[PlotJob | SkippedOutput]]], ...] = (
        ("per_dataset_*.png", lambda: list(per_dataset_jobs(grids, out, plots))),
        ("hyperparams_box.png", lambda: [hyperparam_job(grids, out, plots)]),
        ("epochs.png", lambda: [study_job(grids, out, plots, "epochs", "epochs.png", "epochs")]),
        ("fraction.png", lambda: [study_job(grids, out, plots, "train_fraction", "fraction.png", "train_fraction")]),
    )
    written: list[Path] = []
    skipped: list[SkippedOutput] = []
    for label, prepare in preparers:
        try:
            jobs = prepare()
        except Exception as error:  # noqa: BLE001
            skipped.append(SkippedOutput(label, f"plot failed: {type(error).__name__}: {error}"))
            continue
        for job in jobs:
            if isinstance(job, SkippedOutput):
                skipped.append(job)
                continue
            name, draw = job
            try:
                written.append(draw())
            except Exception as error:  # noqa: BLE001 - a plot must never take the tables down
                skipped.append(SkippedOutput(name, f"plot failed: {type(error).__name__}: {error}"))
    return written, skipped


# ----------------------------------------------------------------------------- entry point


def run_report(config: ReportConfig) -> ReportSummary:
    """Read the grid folders, write every table whose inputs exist, then the plots."""
    if not config.grid_dirs:
        raise ReportError("no grid folders given")
    grids = [read_grid_dir(Path(path)) for path in config.grid_dirs]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[SkippedOutput] = []
    for outcome in build_tables(grids):
        if isinstance(outcome, SkippedOutput):
            (out / outcome.name).unlink(missing_ok=True)  # no stale copy of a table this report did not make
            skipped.append(outcome)
        else:
            written.append(write_table(out, outcome))
    if config.plots:
        plot_paths, plot_skipped = write_plots(grids, out)
        written += plot_paths
        skipped += plot_skipped
    return ReportSummary(out=out, written=tuple(written), skipped=tuple(skipped))
