"""The output of ``pipeline predict``: one row per image (``PREDICTION_COLUMNS``), written batch by batch.

CSV, JSONL or Parquet by the suffix of ``--out``; each batch is appended, flushed and synced before the next;
opening an existing file keeps its complete rows (a record torn by a kill is cut), so a resumed run ends with
the file an uninterrupted run writes. Columns and formats: docs/scoring.md.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TextIO

from ..errors import PipelineError
from ..files import atomic_path, disk_errors_explained, fsync_directory
from ..names import OUTPUT_FORMATS

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # file names need not be valid UTF-8


class OutputError(PipelineError, RuntimeError):
    """An output file that cannot be written or resumed; the message names it."""


@dataclass(frozen=True)
class PredictionRow:
    """One image's line of the output."""

    path: str
    score: float | None
    label: str
    threshold: float
    threshold_name: str
    crop: str
    width: int | None
    height: int | None
    format: str
    backbone: str
    error: str
    score_min: float | None = None  # predict --robust only (ROBUST_COLUMNS)
    score_max: float | None = None
    verdict: str = ""

    def csv_fields(self, columns: Sequence[str] = ()) -> list[str]:
        """The row as CSV cells, text cells neutralised for spreadsheets (:func:`spreadsheet_safe`)."""
        values = [getattr(self, name) for name in columns or PREDICTION_COLUMNS]
        return [
            "" if value is None else repr(value) if isinstance(value, float) else spreadsheet_safe(str(value))
            for value in values
        ]

    @classmethod
    def from_csv_fields(cls, record: Sequence[str], columns: Sequence[str] = ()) -> PredictionRow:
        columns = columns or PREDICTION_COLUMNS
        if len(record) != len(columns):
            raise ValueError(f"{len(record)} fields, not {len(columns)}")
        text = {name: from_spreadsheet_safe(value) for name, value in zip(columns, record, strict=True)}
        typed: dict[str, Any] = dict(text)
        for name in ("score", "threshold", "score_min", "score_max"):
            if name in text:
                typed[name] = float(text[name]) if text[name] else None
        for name in ("width", "height"):
            typed[name] = int(text[name]) if text[name] else None
        return cls(**typed)

    def json_record(self, columns: Sequence[str] = ()) -> dict[str, Any]:
        """The row as JSON (JSONL, Parquet): a missing value (no score, no error, ...) is null."""
        return {name: None if (value := getattr(self, name)) == "" else value for name in columns or PREDICTION_COLUMNS}

    @classmethod
    def from_json_record(cls, record: dict[str, Any]) -> PredictionRow:
        names = PREDICTION_COLUMNS + tuple(name for name in ROBUST_COLUMNS if name in record)
        return cls(**{name: "" if record[name] is None and name in TEXT_COLUMNS else record[name] for name in names})


ROBUST_COLUMNS: tuple[str, ...] = ("score_min", "score_max", "verdict")  # appended by predict --robust
PREDICTION_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(PredictionRow) if f.name not in ROBUST_COLUMNS)
TEXT_COLUMNS = frozenset(f.name for f in fields(PredictionRow) if f.type == "str")  # "" in a row, null in JSON


def output_columns(robust: bool) -> tuple[str, ...]:
    """The columns of an output: ``PREDICTION_COLUMNS``, then ``ROBUST_COLUMNS`` with ``--robust``."""
    return PREDICTION_COLUMNS + ROBUST_COLUMNS if robust else PREDICTION_COLUMNS


class PredictionWriter(Protocol):
    def existing_rows(self) -> Iterator[PredictionRow]:
        """Rows already in the file (a torn last record removed)."""

    def write(self, rows: Sequence[PredictionRow]) -> None:
        """Append, flush and sync."""

    def close(self) -> None: ...


# OWASP's CSV injection advice: a cell a spreadsheet could run as a formula starts with a single quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_ESCAPE = "'"


def spreadsheet_safe(text: str) -> str:
    """``text`` with a ``'`` put before a formula's first character (and before a leading ``'``, so it reverses)."""
    return _ESCAPE + text if text.startswith((*FORMULA_STARTS, _ESCAPE)) else text


def from_spreadsheet_safe(cell: str) -> str:
    return cell[1:] if cell.startswith(_ESCAPE) else cell


def csv_line(fields_: Sequence[str]) -> str:
    """One CSV record; every cell quoted when one holds a carriage return (csv quotes only ``\n`` by itself)."""
    buffer = io.StringIO()
    quoting = csv.QUOTE_ALL if any("\r" in field for field in fields_) else csv.QUOTE_MINIMAL
    csv.writer(buffer, lineterminator="\n", quoting=quoting).writerow(fields_)
    return buffer.getvalue()


def sync(handle: TextIO) -> None:
    """Flush; for a file also fsync, so a batch once written survives a crash (streams are only flushed)."""
    handle.flush()
    if isinstance(handle, io.TextIOWrapper) and handle.name not in ("<stdout>", "<stderr>"):
        os.fsync(handle.fileno())


def complete_text(path: Path) -> str:
    """The file's text up to its last newline (a kill may tear the record after it)."""
    with path.open(newline="", **ENCODING) as handle:
        text = handle.read()
    return text[: text.rfind("\n") + 1]


def open_for_append(path: Path, keep_chars: str) -> TextIO:
    """Open ``path`` for appending after cutting it to ``keep_chars`` (its kept text); a new file is made durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    handle = path.open("a", newline="", **ENCODING)
    if new:
        fsync_directory(path.parent)
    size = len(keep_chars.encode(**ENCODING))
    if handle.tell() != size:
        handle.truncate(size)
        handle.seek(size)
    return handle


class CsvPredictionWriter:
    """CSV rows to a file (resumable) or to a stream such as stdout."""

    def __init__(
        self, path: Path | None, stream: TextIO | None = None, columns: tuple[str, ...] = PREDICTION_COLUMNS
    ) -> None:
        self.path = path
        self.columns = columns
        self._kept: list[PredictionRow] = []
        if path is None:
            self._handle = stream or sys.stdout
            self._handle.write(csv_line(columns))
            return
        kept = ""
        with disk_errors_explained(path):
            if path.is_file() and path.stat().st_size:
                kept, self._kept = self._read(path)
            self._handle = open_for_append(path, kept)
            if not kept:
                self._handle.write(csv_line(columns))
                sync(self._handle)

    def _read(self, path: Path) -> tuple[str, list[PredictionRow]]:
        text = complete_text(path)
        reader = csv.reader(io.StringIO(text, newline=""))
        records: list[list[str]] = []
        try:
            records.extend(reader)
        except csv.Error:  # a record torn inside a quoted newline
            pass
        if not records or records[0] != list(self.columns):
            other = " (of a run with another --robust)" if records and records[0] in robust_variants() else ""
            raise OutputError(
                f"{path}: not an output of `pipeline predict` with these options{other} (expected the header "
                f"{csv_line(self.columns).strip()})"
            )
        rows = []
        for line, record in enumerate(records[1:], start=2):
            try:
                rows.append(PredictionRow.from_csv_fields(record, self.columns))
            except ValueError as error:
                raise OutputError(f"{path}: record {line}: not a prediction row ({error})") from None
        kept = "".join(csv_line(record) for record in records)
        if not text.startswith(kept):
            raise OutputError(
                f"{path}: not laid out as `pipeline predict` writes it (re-saved by another program?); "
                "cannot resume it safely"
            )
        return kept, rows

    def existing_rows(self) -> Iterator[PredictionRow]:
        return iter(self._kept)

    def write(self, rows: Sequence[PredictionRow]) -> None:
        with disk_errors_explained(self.path):
            self._handle.write("".join(csv_line(row.csv_fields(self.columns)) for row in rows))
            sync(self._handle)

    def close(self) -> None:
        with disk_errors_explained(self.path):
            if self.path is not None:
                self._handle.close()
            else:
                self._handle.flush()


class JsonlPredictionWriter:
    """One JSON object per line; resumable."""

    def __init__(self, path: Path, columns: tuple[str, ...] = PREDICTION_COLUMNS) -> None:
        self.path = path
        self.columns = columns
        self._kept: list[PredictionRow] = []
        kept = ""
        with disk_errors_explained(path):
            if path.is_file():
                kept = complete_text(path)
            self._handle = open_for_append(path, kept)
        for line, text in enumerate(kept.splitlines(), start=1):
            try:
                record = json.loads(text)
                if list(record) != list(columns):
                    raise ValueError(f"its keys are not {', '.join(columns)} (a run with another --robust?)")
                self._kept.append(PredictionRow.from_json_record(record))
            except (ValueError, TypeError, KeyError) as error:
                raise OutputError(f"{path}: line {line}: not a prediction row ({error!r})") from None

    def existing_rows(self) -> Iterator[PredictionRow]:
        return iter(self._kept)

    def write(self, rows: Sequence[PredictionRow]) -> None:
        with disk_errors_explained(self.path):
            self._handle.write("".join(json.dumps(row.json_record(self.columns)) + "\n" for row in rows))
            sync(self._handle)

    def close(self) -> None:
        with disk_errors_explained(self.path):
            self._handle.close()


class ParquetPredictionWriter:
    """Rows collected in a partial JSONL file, written as one Parquet file by :meth:`close`."""

    def __init__(self, path: Path, columns: tuple[str, ...] = PREDICTION_COLUMNS) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise OutputError(
                f"{path}: writing Parquet needs pyarrow (pip install pyarrow), or use .csv/.jsonl"
            ) from None
        self.path = path
        self.columns = columns
        self._finished: list[PredictionRow] = []
        if path.is_file():
            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as error:  # pyarrow's errors derive from these
                raise OutputError(f"{path}: not a readable Parquet file ({error})") from None
            if tuple(table.column_names) != columns:
                raise OutputError(f"{path}: not an output of `pipeline predict` (columns {table.column_names})")
            self._finished = [PredictionRow.from_json_record(record) for record in table.to_pylist()]
        self.partial = path.with_name(f".{path.name}.partial.jsonl")
        self._partial = JsonlPredictionWriter(self.partial, columns)

    def existing_rows(self) -> Iterator[PredictionRow]:
        yield from self._finished
        yield from self._partial.existing_rows()

    def write(self, rows: Sequence[PredictionRow]) -> None:
        self._partial.write(rows)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._partial.close()
        rows = self._finished + list(JsonlPredictionWriter(self.partial, self.columns).existing_rows())
        if self.path.is_file() and len(rows) == len(self._finished):
            self.partial.unlink(missing_ok=True)
            return
        records = [row.json_record(self.columns) for row in rows]
        columns = {name: [record[name] for record in records] for name in self.columns}
        columns["path"] = [printable(path) for path in columns["path"]]
        table = pa.table(columns, schema=parquet_schema(self.columns))
        with disk_errors_explained(self.path), atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        self.partial.unlink(missing_ok=True)


def parquet_schema(columns: Sequence[str] = PREDICTION_COLUMNS) -> Any:
    import pyarrow as pa

    floats = ("score", "threshold", "score_min", "score_max")
    types = {**dict.fromkeys(floats, pa.float64()), "width": pa.int64(), "height": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in columns])


def printable(path: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes as backslash escapes), as Parquet strings require.

    Also the key by which a resumed run knows the images an output holds, whatever its format.
    """
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def robust_variants() -> list[list[str]]:
    return [list(output_columns(robust)) for robust in (False, True)]


def open_prediction_writer(
    out: Path | None, stream: TextIO | None = None, columns: tuple[str, ...] = PREDICTION_COLUMNS
) -> PredictionWriter:
    """The writer for ``out``'s suffix (CSV to ``stream`` when ``out`` is None), with ``columns``."""
    if out is None:
        return CsvPredictionWriter(None, stream, columns=columns)
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        return JsonlPredictionWriter(out, columns)
    if suffix == ".parquet":
        return ParquetPredictionWriter(out, columns)
    if suffix == ".csv":
        return CsvPredictionWriter(out, columns=columns)
    raise OutputError(f"{out}: unknown output format {suffix!r}; use one of {', '.join(OUTPUT_FORMATS)}")
