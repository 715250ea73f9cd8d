"""What stage two writes (``results.csv``, ``selection.csv``) and how the best run is chosen.

Torch-free: the grid (which writes these files), the report and the reference
data (which read and compare them) all use this module.

``<grid out>/results.csv`` — long: one row per run x evaluated split x
dataset, in ``RESULT_COLUMNS`` order. Values: fractions at full precision
(``repr``), ``nan`` where a metric is undefined, ``""`` where a value does not
apply (an error row has no split or metrics; a store without classes has no
``n_classes``). Tuples are joined with ``+`` (``classes`` is ``all`` or e.g.
``car+cat+chair+horse``; ``lr_milestones`` e.g. ``6+11``).

* ``run``, ``status`` (``ok`` | ``error`` | ``no_valid_rows``: a dataset
  whose rows all failed to decode, with ``n`` 0 and no metrics), ``error``
  (the message, or why no row was valid),
  ``grid`` (its name), ``model``, ``tap``, ``train`` (the training store's
  split name; ``train_ldm`` marks the LDM training setting);
* the searched head config: ``contrastive_factor`` (xi), ``proj_layers``
  (q), ``proj_dim`` (d');
* the training setting (``SETTING_COLUMNS``; every other field of a run's
  config): ``epochs``, ``batch_size``, ``lr``, ``lr_milestones`` (1-based
  epochs at whose start lr /= 10), ``classes``, ``n_classes``,
  ``train_fraction``, ``head_blocks`` (``all`` | ``last``), ``aggregation``
  (``tie`` | ``mean``), ``seed``, ``amp`` (``none`` | ``bf16``: the
  precision the run trained in; scores are float32 either way), ``calibration`` (``none`` |
  ``temperature``);
* the fit: ``n_params``, ``fit_seconds``, ``views_used`` (distinct training
  views read), ``views_reused`` (epochs that read a view an earlier epoch
  had already read: the run had more epochs than the store has views);
* what was scored: ``split`` (``val`` or a test entry's name), ``variant``
  (``center``, ``tencrop`` or a perturbation such as ``jpeg-official``),
  ``dataset``, ``n`` (rows scored), ``n_invalid`` (rows excluded because
  their image could not be read);
* the metrics of ``pipeline.results.metrics.METRIC_NAMES`` (defined there):
  ``acc`` (threshold 0.5), ``ap`` (the paper's two), ``auc``, ``real_acc``,
  ``fake_acc``, ``eer``, ``brier``, ``ece``, and the operating points
  ``<point>_{threshold,acc,real_acc,fake_acc}`` chosen on the set itself
  (``oracle``, ``oracle_eer``, ``oracle_fpr1``, ``oracle_fpr5``) or on val
  (``calibrated``: the threshold that maximises val accuracy, ``val_eer``,
  ``val_fpr1``, ``val_fpr5``).

Columns added after the first format (``ADDED_COLUMNS``) read, from a file
that lacks them, as the value their absence implies (``nan``; ``none`` for
``calibration``).

``<grid out>/selection.csv`` — per training setting (without the fields the
grid's ``select_across`` names, e.g. ``epochs`` for the LDM study), two rows: the best run
by val (``best_by_val``: highest mean val ACC, then val AP; honest) and by
mean test ACC + AP (``best_by_test_mean_acc_ap``: the paper's protocol).
Columns ``SELECTION_COLUMNS``: the rule, the run, its setting and head
config, ``val_acc``, ``val_ap``, ``mean_acc``, ``mean_ap``, ``n_mean_sets``,
``excluded_from_mean``, ``n_seeds``, ``seeds``, ``mean_acc_std`` and
``mean_ap_std``.

**Seeds.** A grid may run each config with several seeds (``seed: [0, 1,
2]``). Selection then groups runs by their setting *without* the seed,
compares configs (setting and head config) by the **mean over their seeds**
of each rule's numbers, and writes the chosen config's seed means in
``val_*``/``mean_*``, their sample standard deviations (ddof 1; ``nan`` with
one seed) in ``mean_acc_std``/``mean_ap_std``, the seeds (``0+1+2``), and
names the run of the lowest seed in ``run`` (and its ``seed``). With one seed
per config this is exactly the per-run selection.

Test means (selection, ``avg`` of the report) are over the unperturbed
evaluation (variants ``center`` and ``tencrop``) and over **the paper's 20
test sets only** when the run was scored on any of them: other datasets (e.g.
``whichfaceisreal``, which CNNDetection's download also holds) keep their own
rows but are left out of every mean and named in ``excluded_from_mean``. A
run scored on none of the 20 (a user's own benchmark, Synthbuster for the
LDM setting) averages over all its test sets. Means skip NaN values.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import PipelineError
from ..files import write_text_atomic
from ..names import (
    BEST_BY_TEST,
    BEST_BY_VAL,
    LIST_SEPARATOR,
    PAPER_DATASETS,
    SELECTION_RULES,
    UNPERTURBED_VARIANTS,
    VAL_SPLIT,
)
from .metrics import METRIC_NAMES

OK, ERROR = "ok", "error"
NO_VALID_ROWS = "no_valid_rows"  # a dataset whose rows all failed to decode: n = 0, no metrics
STATUSES: tuple[str, ...] = (OK, ERROR, NO_VALID_ROWS)


class ResultsFormatError(PipelineError, ValueError):
    """A results.csv / selection.csv value that cannot be read; the message names the column."""


class HeadConfig(NamedTuple):
    """The three searched head hyper-parameters: xi, q, d'."""

    contrastive_factor: float
    proj_layers: int
    proj_dim: int

    def matches(self, other: HeadConfig) -> bool:
        """Same config, comparing the factor with a float tolerance."""
        return (
            math.isclose(self.contrastive_factor, other.contrastive_factor, rel_tol=1e-9, abs_tol=1e-12)
            and self.proj_layers == other.proj_layers
            and self.proj_dim == other.proj_dim
        )

    def label(self) -> str:
        return f"{self.contrastive_factor:g}/{self.proj_layers}/{self.proj_dim}"


@dataclass(frozen=True)
class Setting:
    """A run's training setting: everything its numbers depend on except xi, q, d' (selection groups by it)."""

    model: str
    tap: str
    train: str
    epochs: int
    batch_size: int
    lr: float
    lr_milestones: tuple[int, ...]
    classes: str
    n_classes: int | None
    train_fraction: float
    head_blocks: str
    aggregation: str
    seed: int
    amp: str
    calibration: str = "none"

    def label(self, without: Sequence[str] = ("model", "tap")) -> str:
        """``key=value`` pairs, e.g. for titles; ``without`` leaves fields out."""
        return " ".join(f"{name}={format_value(getattr(self, name))}" for name in SETTING_FIELDS if name not in without)


SETTING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Setting))
HEAD_COLUMNS: tuple[str, ...] = HeadConfig._fields
SETTING_COLUMNS: tuple[str, ...] = SETTING_FIELDS[SETTING_FIELDS.index("epochs") :]


@dataclass(frozen=True)
class ResultRow:
    """One row of results.csv, typed. Error rows have no fit, split or metric values (None)."""

    run: str
    status: str
    error: str
    grid: str
    head: HeadConfig
    setting: Setting
    n_params: int | None = None
    fit_seconds: float | None = None
    views_used: int | None = None
    views_reused: int | None = None
    split: str | None = None
    variant: str | None = None
    dataset: str | None = None
    n: int | None = None
    n_invalid: int | None = None
    metrics: Mapping[str, float] | None = None  # METRIC_NAMES -> value

    @property
    def is_perturbed(self) -> bool:
        return self.variant not in UNPERTURBED_VARIANTS

    def metric(self, name: str) -> float:
        if self.metrics is None:
            raise ValueError(f"run {self.run}: an {self.status} row has no metrics")
        return self.metrics[name]

    def to_csv(self) -> dict[str, str]:
        """Column -> text as written to results.csv."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("head", "setting", "metrics")}
        values.update(self.head._asdict())
        values.update({name: getattr(self.setting, name) for name in SETTING_FIELDS})
        values.update({name: (None if self.metrics is None else self.metrics[name]) for name in METRIC_NAMES})
        return {column: format_value(values[column]) for column in RESULT_COLUMNS}

    @classmethod
    def from_csv(cls, row: Mapping[str, str]) -> ResultRow:
        """Parse a results.csv row (column -> text); raises ResultsFormatError naming the bad column."""
        values = {name: parse_column(name, row) for name in _ROW_PARSERS}
        if values["status"] not in STATUSES:
            raise ResultsFormatError(f"column status: {values['status']!r} is not one of {', '.join(STATUSES)}")
        metrics = None
        if row.get("acc", "") != "":
            metrics = {name: parse_column(name, row, _parse_float) for name in METRIC_NAMES}
        head = HeadConfig(*(values.pop(name) for name in HEAD_COLUMNS))
        setting = Setting(**{name: values.pop(name) for name in SETTING_FIELDS})
        return cls(**values, head=head, setting=setting, metrics=metrics)


RESULT_COLUMNS: tuple[str, ...] = (
    ("run", "status", "error", "grid")
    + SETTING_FIELDS[: SETTING_FIELDS.index("epochs")]  # model, tap, train
    + HEAD_COLUMNS
    + SETTING_COLUMNS
    + tuple(
        f.name
        for f in fields(ResultRow)
        if f.name not in ("run", "status", "error", "grid", "head", "setting", "metrics")
    )
    + METRIC_NAMES
)


# Columns added after the first format, and what a file without them implies.
ADDED_COLUMNS: dict[str, str] = {
    "calibration": "none",
    **{name: "nan" for name in METRIC_NAMES[METRIC_NAMES.index("calibrated_threshold") + 1 :]},
}


def format_value(value: Any) -> str:
    """How every value is written: full-precision floats, 'nan', '' for None, tuples joined with '+'."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, tuple):
        return LIST_SEPARATOR.join(str(item) for item in value)
    return str(value)


def _parse_float(text: str) -> float:
    return float(text)


def _parse_int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(LIST_SEPARATOR)) if text else ()


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text == "" else parse(text)


_ROW_PARSERS: dict[str, Callable[[str], Any]] = {
    **{name: str for name in ("run", "status", "error", "grid", "model", "tap", "train", "classes")},
    **{name: str for name in ("head_blocks", "aggregation", "amp", "calibration")},
    **{name: int for name in ("proj_layers", "proj_dim", "epochs", "batch_size", "seed")},
    **{name: _parse_float for name in ("contrastive_factor", "lr", "train_fraction")},
    "lr_milestones": _parse_int_tuple,
    "n_classes": _optional(int),
    **{name: _optional(int) for name in ("n_params", "views_used", "views_reused", "n", "n_invalid")},
    "fit_seconds": _optional(_parse_float),
    **{name: _optional(str) for name in ("split", "variant", "dataset")},
}


def parse_column(name: str, row: Mapping[str, str], parse: Callable[[str], Any] | None = None) -> Any:
    text = row.get(name)
    if text is None:
        raise ResultsFormatError(f"column {name}: missing")
    try:
        return (parse or _ROW_PARSERS[name])(text)
    except (TypeError, ValueError):
        raise ResultsFormatError(f"column {name}: {text!r} is not a valid value") from None


def read_csv_records(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, column -> text) of a CSV file whose header must hold ``required``.

    Columns of ``ADDED_COLUMNS`` that the file lacks (written by an older
    version) read as the value their absence implies.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        present = reader.fieldnames or []
        missing = [column for column in required if column not in present and column not in ADDED_COLUMNS]
        if missing:
            raise ResultsFormatError(
                f"{path}: missing column(s) {missing}; not a file written by `pipeline fit` of this version "
                "(format: README section 'Results and selection', pipeline/results.py)"
            )
        implied = {column: ADDED_COLUMNS[column] for column in required if column not in present}
        return [(reader.line_num, {**implied, **row}) for row in reader]


def read_result_rows(path: Path) -> list[tuple[int, ResultRow]]:
    """(line number, row) of a results.csv (or a run's metrics.csv); errors name the file and line."""
    rows = []
    for line, record in read_csv_records(path, RESULT_COLUMNS):
        try:
            rows.append((line, ResultRow.from_csv(record)))
        except ResultsFormatError as error:
            raise ResultsFormatError(f"{path}:{line}: {error}") from None
    return rows


def write_csv(path: Path, columns: Sequence[str], records: Iterable[Mapping[str, str]]) -> None:
    """Write records (column -> text) complete-or-absent."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------- means


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def mean_datasets(datasets: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(datasets that form a mean, datasets left out of it): the paper's 20 when any is present, else all."""
    present = set(datasets)
    paper = tuple(name for name in PAPER_DATASETS if name in present)
    if paper:
        return paper, tuple(sorted(present - set(paper)))
    return tuple(sorted(present)), ()


def mean_scores(scores: Mapping[str, tuple[float, float]]) -> tuple[float, float, tuple[str, ...], tuple[str, ...]]:
    """(mean ACC, mean AP, averaged datasets, excluded datasets) of dataset -> (acc, ap)."""
    averaged, excluded = mean_datasets(scores)
    mean_acc = nan_mean(scores[name][0] for name in averaged)
    mean_ap = nan_mean(scores[name][1] for name in averaged)
    return mean_acc, mean_ap, averaged, excluded


# ----------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class RunSummary:
    """One ok run: its first row (setting and config) and its means."""

    row: ResultRow
    val_acc: float
    val_ap: float
    mean_acc: float
    mean_ap: float
    mean_sets: tuple[str, ...]
    excluded_from_mean: tuple[str, ...]

    @property
    def run(self) -> str:
        return self.row.run


def summarize_runs(rows: Iterable[ResultRow]) -> dict[str, RunSummary]:
    """Run id -> its means (val over the val split; test over unperturbed test rows, the 20-set rule)."""
    first: dict[str, ResultRow] = {}
    val: dict[str, list[tuple[float, float]]] = {}
    test: dict[str, dict[str, tuple[float, float]]] = {}
    for row in rows:
        if row.status != OK:
            continue
        first.setdefault(row.run, row)
        pair = (row.metric("acc"), row.metric("ap"))
        if row.split == VAL_SPLIT:
            val.setdefault(row.run, []).append(pair)
        elif not row.is_perturbed:
            test.setdefault(row.run, {})[row.dataset or ""] = pair
    summaries = {}
    for run, row in first.items():
        mean_acc, mean_ap, averaged, excluded = mean_scores(test.get(run, {}))
        pairs = val.get(run, [])
        summaries[run] = RunSummary(
            row, nan_mean(a for a, _ in pairs), nan_mean(p for _, p in pairs), mean_acc, mean_ap, averaged, excluded
        )
    return summaries


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def nan_std(values: Iterable[float]) -> float:
    """Sample standard deviation (ddof 1) of the non-NaN values; NaN for fewer than two."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def setting_without_seed(setting: Setting, across: Sequence[str] = ()) -> tuple:
    """What runs that differ only in their seed (and in the fields ``across``) share: the selection's group."""
    return tuple(getattr(setting, name) for name in SETTING_FIELDS if name != "seed" and name not in across)


@dataclass(frozen=True)
class ConfigSummary:
    """One config (training setting without the seed, and head config) over the seeds it was run with.

    ``val_*`` and ``mean_*`` are means over the seeds (NaN skipped); ``*_std``
    their sample standard deviations (NaN with one seed). The representative
    run, which selection.csv names, is the one of the lowest seed.
    """

    runs: tuple[RunSummary, ...]  # in seed order

    @property
    def representative(self) -> RunSummary:
        return self.runs[0]

    @property
    def run(self) -> str:
        return self.representative.run

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(summary.row.setting.seed for summary in self.runs)

    def mean(self, name: str) -> float:
        return nan_mean(getattr(summary, name) for summary in self.runs)

    def std(self, name: str) -> float:
        return nan_std(getattr(summary, name) for summary in self.runs)

    @property
    def val_acc(self) -> float:
        return self.mean("val_acc")

    @property
    def val_ap(self) -> float:
        return self.mean("val_ap")

    @property
    def mean_acc(self) -> float:
        return self.mean("mean_acc")

    @property
    def mean_ap(self) -> float:
        return self.mean("mean_ap")


def config_key(row: ResultRow) -> tuple:
    """Runs with the same key differ only in their seed."""
    return (setting_without_seed(row.setting), row.head)


def summarize_configs(summaries: Iterable[RunSummary]) -> list[ConfigSummary]:
    """Group run summaries by config (everything but the seed), each group in seed order, then run id."""
    groups: dict[tuple, list[RunSummary]] = {}
    for summary in summaries:
        groups.setdefault(config_key(summary.row), []).append(summary)
    return [ConfigSummary(tuple(sorted(group, key=lambda s: (s.row.setting.seed, s.run)))) for group in groups.values()]


def acc_ap_rank(mean_acc: float, mean_ap: float) -> float:
    """The paper's model choice: mean test ACC + mean test AP, NaN ranked lowest."""
    return _nan_low(mean_acc + mean_ap)


def rule_score(rule: str, summary: RunSummary | ConfigSummary) -> tuple[float, ...]:
    """The key a rule maximises (ties go to the larger run id, so the choice is deterministic)."""
    if rule == BEST_BY_VAL:
        return (_nan_low(summary.val_acc), _nan_low(summary.val_ap))
    if rule == BEST_BY_TEST:
        return (acc_ap_rank(summary.mean_acc, summary.mean_ap),)
    raise ValueError(f"unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")


def best_run(summaries: Iterable[RunSummary], rule: str = BEST_BY_TEST) -> RunSummary:
    return max(summaries, key=lambda summary: (rule_score(rule, summary), summary.run))


@dataclass(frozen=True)
class Selection:
    """A rule's choice in one setting: a config over its seeds, named by its representative run."""

    rule: str
    config: ConfigSummary

    @property
    def summary(self) -> RunSummary:
        return self.config.representative


def select_runs(summaries: Iterable[RunSummary], across: Sequence[str] = ()) -> list[Selection]:
    """Per training setting (without the seed), the best config by each rule of SELECTION_RULES, on seed means.

    ``across``: setting fields (``SELECT_ACROSS_FIELDS``) compared like the head config instead of
    separating settings, e.g. ``("epochs",)``: one best over every epoch count, as the authors pick their LDM
    model (over all 24 runs of 1, 3 and 5 epochs).
    """
    by_setting: dict[tuple, list[ConfigSummary]] = {}
    for config in summarize_configs(summaries):
        by_setting.setdefault(setting_without_seed(config.representative.row.setting, across), []).append(config)
    selections = []
    for key in sorted(by_setting, key=lambda key: tuple(format_value(value) for value in key)):
        for rule in SELECTION_RULES:
            best = max(by_setting[key], key=lambda config: (rule_score(rule, config), config.run))
            selections.append(Selection(rule, best))
    return selections


SELECTION_COLUMNS: tuple[str, ...] = (
    ("selection", "run", "grid", "model", "tap", "train")
    + HEAD_COLUMNS
    + SETTING_COLUMNS
    + ("val_acc", "val_ap", "mean_acc", "mean_ap", "n_mean_sets", "excluded_from_mean")
    + ("n_seeds", "seeds", "mean_acc_std", "mean_ap_std")
)


def selection_record(selection: Selection) -> dict[str, str]:
    """A selection.csv row."""
    config, summary = selection.config, selection.summary
    written = summary.row.to_csv()
    values = {column: written[column] for column in SELECTION_COLUMNS if column in written}
    values.update(
        selection=selection.rule,
        val_acc=format_value(config.val_acc),
        val_ap=format_value(config.val_ap),
        mean_acc=format_value(config.mean_acc),
        mean_ap=format_value(config.mean_ap),
        n_mean_sets=str(len(summary.mean_sets)),
        excluded_from_mean=LIST_SEPARATOR.join(summary.excluded_from_mean),
        n_seeds=str(len(config.runs)),
        seeds=format_value(config.seeds),
        mean_acc_std=format_value(config.std("mean_acc")),
        mean_ap_std=format_value(config.std("mean_ap")),
    )
    return values
