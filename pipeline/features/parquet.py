"""Images stored as rows of Parquet files (the Hugging Face ``datasets`` image layout): list them, read their bytes.

A Parquet row's manifest path is ``<file>#<row>`` (the file relative to the data root, the row counted from 0 in
that file) and its ``sha256`` column the hash of the image's bytes. :func:`list_parquet_rows` lists the files of a
root for the ``parquet`` layout; :class:`ParquetReader` reads one row's bytes from its row group (only the image
column, a few row groups cached), never unpacking to files. Needs pyarrow (the ``parquet`` extra). Format and
options: docs/data.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..names import DEFAULT_PARQUET_IMAGE_COLUMN, DEFAULT_PARQUET_LABEL_COLUMN
from .images import ImageDecodeError
from .manifest import ManifestError, ManifestRow

PARQUET_SUFFIX = ".parquet"
ROW_SEPARATOR = "#"
_PARQUET_PATH = re.compile(r"(?P<file>.+\.parquet)#(?P<row>0|[1-9][0-9]*)")
# Label values of a label column, besides the integers 0 and 1 and booleans.
LABEL_WORDS = {"real": 0, "fake": 1}
ROW_GROUP_CACHE = 4  # row groups of image bytes a reader keeps (the loop reads rows in order, a few batches ahead)


@dataclass(frozen=True)
class ParquetColumns:
    """The column names of a Parquet image set; ``generator`` None: every row's dataset is the root's name."""

    image: str = DEFAULT_PARQUET_IMAGE_COLUMN  # a struct with a ``bytes`` field, or a binary column
    label: str = DEFAULT_PARQUET_LABEL_COLUMN  # 0/1, false/true, or 'real'/'fake'
    generator: str | None = None


def parquet_row_path(file: str, row: int) -> str:
    """The manifest path of row ``row`` of ``file`` (relative POSIX path of the file)."""
    return f"{file}{ROW_SEPARATOR}{row}"


def parse_parquet_path(path: str) -> tuple[str, int] | None:
    """(file, row) of a Parquet row's manifest path, None for the path of an image file."""
    match = _PARQUET_PATH.fullmatch(path)
    return None if match is None else (match["file"], int(match["row"]))


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ManifestError("reading Parquet files needs pyarrow (pip install 'rine-pipeline[parquet]')") from None
    return pq


def find_parquet_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``*.parquet`` files at any depth under ``root`` (hidden entries skipped), sorted."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative = Path(folder).relative_to(root)
        found += [
            (relative / name).as_posix() for name in files if name.endswith(PARQUET_SUFFIX) and not name.startswith(".")
        ]
    return sorted(found)


def image_bytes_of(column: Any, where: str) -> list[bytes | None]:
    """The image bytes of a pyarrow column: a struct's ``bytes`` field (None where the row or its bytes is null)."""
    import pyarrow as pa

    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if pa.types.is_struct(array.type):
        if array.type.get_field_index("bytes") < 0:
            raise ManifestError(f"{where}: the image column is a struct without a 'bytes' field ({array.type})")
        values = array.field("bytes").to_pylist()
        nulls = array.is_null().to_pylist()
        return [None if null else value for value, null in zip(values, nulls)]
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return array.to_pylist()
    raise ManifestError(f"{where}: the image column must hold a struct with 'bytes' or binary values, not {array.type}")


def parse_label(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise ManifestError(f"{where}: label {value!r} is not 0/1, false/true or real/fake")


def list_parquet_rows(
    root: Path, columns: ParquetColumns, generators: tuple[str, ...] | None = None
) -> tuple[list[ManifestRow], list[tuple[str, str]]]:
    """(rows, skipped) of every Parquet file under ``root``: one row per table row, with its bytes' hash.

    Rows without image bytes (a null image, or a path only) are skipped with
    the reason. A missing column, a bad label or a null generator is an
    error naming the file and row.
    """
    pq = _pyarrow()
    files = find_parquet_files(root)
    if not files:
        raise ManifestError(f"no *.parquet file under {root}")
    rows: list[ManifestRow] = []
    skipped: list[tuple[str, str]] = []
    for file in files:
        for row, image, label, generator in iter_parquet_file(pq, root / file, file, columns):
            where = f"{root / file} row {row}"
            if image is None:
                skipped.append((parquet_row_path(file, row), "no image bytes in the row (null, or a path only)"))
                continue
            if columns.generator is None:
                dataset = root.name
            elif generator is None or str(generator) == "":
                raise ManifestError(f"{where}: empty generator (column '{columns.generator}')")
            else:
                dataset = str(generator)
            if generators is not None and dataset not in generators:
                continue
            rows.append(
                ManifestRow(
                    parquet_row_path(file, row),
                    parse_label(label, where),
                    dataset,
                    sha256=hashlib.sha256(image).hexdigest(),
                )
            )
    if generators is not None:
        missing = sorted(set(generators) - {row.dataset for row in rows})
        if missing:
            raise ManifestError(f"{root}: no rows of generator(s) {', '.join(missing)}")
    return rows, skipped


def iter_parquet_file(
    pq: Any, path: Path, file: str, columns: ParquetColumns
) -> Iterator[tuple[int, bytes | None, Any, Any]]:
    """(row, image bytes, label, generator) of every row of one file, a row group at a time."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise ManifestError(f"{path}: not a readable Parquet file ({error})") from None
    names = parquet.schema_arrow.names
    wanted = [columns.image, columns.label] + ([columns.generator] if columns.generator else [])
    for option, name in zip(("--image-column", "--label-column", "--generator-column"), wanted):
        if name not in names:
            raise ManifestError(f"{path}: no column '{name}' ({option}); the file has {', '.join(names)}")
    start = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=wanted)
        images = image_bytes_of(table.column(columns.image), f"{path} row group {group}")
        labels = table.column(columns.label).to_pylist()
        generators = table.column(columns.generator).to_pylist() if columns.generator else [None] * len(labels)
        for offset, (image, label, generator) in enumerate(zip(images, labels, generators)):
            yield start + offset, image, label, generator
        start += table.num_rows


class ParquetReader:
    """One row's image bytes, read from its row group (the image column only); the last few row groups cached.

    Thread-safe (the decode threads of the loop share one). A missing file is
    an :class:`ImageDecodeError` ('missing file', the row becomes invalid, as
    a missing image file does); a row past the end of its file is a
    :class:`ManifestError` (the file changed since the manifest).
    """

    def __init__(self, image_column: str, capacity: int = ROW_GROUP_CACHE) -> None:
        self.image_column = image_column
        self.capacity = capacity
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[Any, np.ndarray]] = {}  # path -> (ParquetFile, first row of each group + end)
        self._groups: OrderedDict[tuple[Path, int], list[bytes | None]] = OrderedDict()
        self.reads = 0  # row groups read (a cache miss each)

    def read(self, path: Path, row: int) -> bytes | None:
        """The bytes of row ``row`` of the file ``path`` (None: a null image)."""
        with self._lock:
            parquet, starts = self._open(path)
            if row >= starts[-1]:
                raise ManifestError(
                    f"{path}: no row {row} (the file has {starts[-1]} rows); it changed since the manifest was built"
                )
            group = int(np.searchsorted(starts, row, side="right")) - 1
            key = (path, group)
            if key not in self._groups:
                table = parquet.read_row_group(group, columns=[self.image_column])
                self._groups[key] = image_bytes_of(table.column(self.image_column), f"{path} row group {group}")
                self.reads += 1
                while len(self._groups) > self.capacity:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(key)
            return self._groups[key][row - int(starts[group])]

    def _open(self, path: Path) -> tuple[Any, np.ndarray]:
        if path not in self._files:
            pq = _pyarrow()
            if not path.is_file():
                raise ImageDecodeError("missing file", path)
            try:
                parquet = pq.ParquetFile(path)
            except (OSError, ValueError) as error:
                raise ImageDecodeError(f"not a readable Parquet file ({error})", path) from None
            if self.image_column not in parquet.schema_arrow.names:
                raise ManifestError(f"{path}: no column '{self.image_column}' (the manifest's image column)")
            counts = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            self._files[path] = (parquet, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
        return self._files[path]
