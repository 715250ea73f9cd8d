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
from dataclasses import astuple, dataclass, fields
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

    def csv_fields(self) -> list[str]:
        """The row as CSV cells, text cells neutralised for spreadsheets (:func:`spreadsheet_safe`)."""
        return [
            "" if value is None else repr(value) if isinstance(value, float) else spreadsheet_safe(str(value))
            for value in astuple(self)
        ]

    @classmethod
    def from_csv_fields(cls, record: Sequence[str]) -> PredictionRow:
        path, score, label, threshold, name, crop, width, height, file_format, backbone, error = record
        path, label, name, crop, file_format, backbone, error = map(
            from_spreadsheet_safe, (path, label, name, crop, file_format, backbone, error)
        )
        return cls(
            path,
            float(score) if score else None,
            label,
            float(threshold),
            name,
            crop,
            int(width) if width else None,
            int(height) if height else None,
            file_format,
            backbone,
            error,
        )

    def json_record(self) -> dict[str, Any]:
        return dict(zip(PREDICTION_COLUMNS, astuple(self), strict=True))

    @classmethod
    def from_json_record(cls, record: dict[str, Any]) -> PredictionRow:
        return cls(**{name: record[name] for name in PREDICTION_COLUMNS})


PREDICTION_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(PredictionRow))


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


HEADER_LINE = csv_line(PREDICTION_COLUMNS)


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

    def __init__(self, path: Path | None, stream: TextIO | None = None) -> None:
        self.path = path
        self._kept: list[PredictionRow] = []
        if path is None:
            self._handle = stream or sys.stdout
            self._handle.write(HEADER_LINE)
            return
        kept = ""
        with disk_errors_explained(path):
            if path.is_file() and path.stat().st_size:
                kept, self._kept = self._read(path)
            self._handle = open_for_append(path, kept)
            if not kept:
                self._handle.write(HEADER_LINE)
                sync(self._handle)

    @staticmethod
    def _read(path: Path) -> tuple[str, list[PredictionRow]]:
        text = complete_text(path)
        reader = csv.reader(io.StringIO(text, newline=""))
        records: list[list[str]] = []
        try:
            records.extend(reader)
        except csv.Error:  # a record torn inside a quoted newline
            pass
        if not records or records[0] != list(PREDICTION_COLUMNS):
            raise OutputError(
                f"{path}: not an output of `pipeline predict` (expected the header {HEADER_LINE.strip()})"
            )
        rows = []
        for line, record in enumerate(records[1:], start=2):
            try:
                rows.append(PredictionRow.from_csv_fields(record))
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
            self._handle.write("".join(csv_line(row.csv_fields()) for row in rows))
            sync(self._handle)

    def close(self) -> None:
        with disk_errors_explained(self.path):
            if self.path is not None:
                self._handle.close()
            else:
                self._handle.flush()


class JsonlPredictionWriter:
    """One JSON object per line; resumable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._kept: list[PredictionRow] = []
        kept = ""
        with disk_errors_explained(path):
            if path.is_file():
                kept = complete_text(path)
            self._handle = open_for_append(path, kept)
        for line, text in enumerate(kept.splitlines(), start=1):
            try:
                self._kept.append(PredictionRow.from_json_record(json.loads(text)))
            except (ValueError, TypeError, KeyError) as error:
                raise OutputError(f"{path}: line {line}: not a prediction row ({error!r})") from None

    def existing_rows(self) -> Iterator[PredictionRow]:
        return iter(self._kept)

    def write(self, rows: Sequence[PredictionRow]) -> None:
        with disk_errors_explained(self.path):
            self._handle.write("".join(json.dumps(row.json_record()) + "\n" for row in rows))
            sync(self._handle)

    def close(self) -> None:
        with disk_errors_explained(self.path):
            self._handle.close()


class ParquetPredictionWriter:
    """Rows collected in a partial JSONL file, written as one Parquet file by :meth:`close`."""

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise OutputError(
                f"{path}: writing Parquet needs pyarrow (pip install pyarrow), or use .csv/.jsonl"
            ) from None
        self.path = path
        self._finished: list[PredictionRow] = []
        if path.is_file():
            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as error:  # pyarrow's errors derive from these
                raise OutputError(f"{path}: not a readable Parquet file ({error})") from None
            if tuple(table.column_names) != PREDICTION_COLUMNS:
                raise OutputError(f"{path}: not an output of `pipeline predict` (columns {table.column_names})")
            self._finished = [PredictionRow.from_json_record(record) for record in table.to_pylist()]
        self.partial = path.with_name(f".{path.name}.partial.jsonl")
        self._partial = JsonlPredictionWriter(self.partial)

    def existing_rows(self) -> Iterator[PredictionRow]:
        yield from self._finished
        yield from self._partial.existing_rows()

    def write(self, rows: Sequence[PredictionRow]) -> None:
        self._partial.write(rows)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._partial.close()
        rows = self._finished + list(JsonlPredictionWriter(self.partial).existing_rows())
        if self.path.is_file() and len(rows) == len(self._finished):
            self.partial.unlink(missing_ok=True)
            return
        columns = {name: [getattr(row, name) for row in rows] for name in PREDICTION_COLUMNS}
        columns["path"] = [printable(path) for path in columns["path"]]
        table = pa.table(columns, schema=parquet_schema())
        with disk_errors_explained(self.path), atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        self.partial.unlink(missing_ok=True)


def parquet_schema() -> Any:
    import pyarrow as pa

    types = {"score": pa.float64(), "threshold": pa.float64(), "width": pa.int64(), "height": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in PREDICTION_COLUMNS])


def printable(path: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes as backslash escapes), as Parquet strings require.

    Also the key by which a resumed run knows the images an output holds, whatever its format.
    """
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def open_prediction_writer(out: Path | None, stream: TextIO | None = None) -> PredictionWriter:
    """The writer for ``out``'s suffix (CSV to ``stream`` when ``out`` is None)."""
    if out is None:
        return CsvPredictionWriter(None, stream)
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        return JsonlPredictionWriter(out)
    if suffix == ".parquet":
        return ParquetPredictionWriter(out)
    if suffix == ".csv":
        return CsvPredictionWriter(out)
    raise OutputError(f"{out}: unknown output format {suffix!r}; use one of {', '.join(OUTPUT_FORMATS)}")
