"""The rows of ``results.csv``, typed (``ResultRow``: run, setting, head config, scored split, metrics), its columns, and the CSV reading and writing every table of the project uses. Format: docs/results-format.md."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import PipelineError
from ..files import write_text_atomic
from ..names import (
    BLOCKS_FEATURES,
    DEFAULT_HEAD,
    DEFAULT_KNN_K,
    DEFAULT_LOGREG_C,
    LIST_SEPARATOR,
    UNPERTURBED_VARIANTS,
)
from ..params import cell_parsers
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
    head: str = field(default=DEFAULT_HEAD, kw_only=True)  # rine, linear, knn, logreg
    features: str = field(default=BLOCKS_FEATURES, kw_only=True)  # blocks, block:K, embedding
    k: int = field(default=DEFAULT_KNN_K, kw_only=True)  # knn's neighbours (selection compares across it)
    C: float = field(default=DEFAULT_LOGREG_C, kw_only=True)  # logreg's C (selection compares across it)
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
    protocol: str = "standard"
    train_datasets: str = "all"  # the datasets of the training split it trained on, joined with '+'

    def label(self, without: Sequence[str] = ("model", "tap")) -> str:
        """``key=value`` pairs, e.g. for titles; ``without`` leaves fields out (and head and features when they
        are RINE's, as before the other heads existed)."""
        if self.head == DEFAULT_HEAD:
            without = (*without, "head", "features")
        without = (*without, *(name for name, head in HEAD_VALUES.items() if self.head != head))
        return " ".join(f"{name}={format_value(getattr(self, name))}" for name in SETTING_FIELDS if name not in without)


SETTING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Setting))
HEAD_VALUES: dict[str, str] = {"k": "knn", "C": "logreg"}  # setting fields searched like xi, q, d' -> their head


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
            metrics = {name: parse_column(name, row, float) for name in METRIC_NAMES}
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
    "protocol": "standard",
    "train_datasets": "all",
    "head": DEFAULT_HEAD,
    "features": BLOCKS_FEATURES,
    "k": str(DEFAULT_KNN_K),
    "C": repr(DEFAULT_LOGREG_C),
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


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text == "" else parse(text)


_ROW_PARSERS: dict[str, Callable[[str], Any]] = {
    **{name: str for name in ("run", "status", "error", "grid", "model", "tap", "train")},
    **cell_parsers(),  # the run config's parameters, as declared once (pipeline.params)
    "n_classes": _optional(int),
    **{name: _optional(int) for name in ("n_params", "views_used", "views_reused", "n", "n_invalid")},
    "fit_seconds": _optional(float),
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
                "(format: docs/results-format.md)"
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
