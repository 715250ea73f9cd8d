"""Splits as validated records, and their CSV files: read and write them.

A split is ``manifests/<split>.csv`` (``path,label,dataset[,class]``, paths relative to a data root remembered
in the sidecar ``<split>.json``); its identity (:meth:`Manifest.sha256`) is the hash of the canonical CSV text,
independent of the data root. Format: docs/data.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import PipelineError
from ..files import check_split_name, disk_errors_explained, replace_files_atomically

REQUIRED_COLUMNS = ("path", "label", "dataset")
CLASS_COLUMN = "class"
SHA256_COLUMN = "sha256"  # the image bytes' hash, for rows read from a container (a Parquet row)
SIDECAR_KEYS = ("data_root", "layout", "options", "skipped")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(PipelineError, ValueError):
    """A manifest (or the data it is built from) that cannot be used.

    The message names the file or folder and, where there is one, the line,
    then the reason.
    """


@dataclass(frozen=True)
class ManifestRow:
    """One image of a split."""

    path: str  # relative POSIX path
    label: int  # 0 real, 1 fake
    dataset: str
    class_name: str | None = None  # CSV column `class`
    sha256: str | None = None  # CSV column `sha256`: hex digest of the image's bytes (Parquet rows)


@dataclass(frozen=True)
class Manifest:
    """A split: its rows in order, and where the data were when it was built.

    ``options`` records what the layout was built with (``root`` and the
    fields of ``layouts.LayoutConfig``); lists are stored as tuples.
    ``skipped`` lists (name, reason) of the files the layout found but could
    not list (names a manifest cannot hold), recorded in the sidecar.
    """

    split: str
    rows: tuple[ManifestRow, ...]
    data_root: Path | None
    layout: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    skipped: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        frozen_options = {
            key: tuple(value) if isinstance(value, list) else value for key, value in self.options.items()
        }
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "options", MappingProxyType(frozen_options))

    def has_classes(self) -> bool:
        return any(row.class_name is not None for row in self.rows)

    def has_hashes(self) -> bool:
        return any(row.sha256 is not None for row in self.rows)

    def sha256(self) -> str:
        """Hash of the canonical CSV text of the rows (not of the data root)."""
        return hashlib.sha256(render_csv(self.rows).encode("utf-8")).hexdigest()

    def resolve(self, row_index: int, data_root: Path | None = None) -> Path:
        """Where one row's image is; ``data_root`` overrides the sidecar's root."""
        row = self.rows[row_index]
        root = data_root if data_root is not None else self.data_root
        if root is None:
            raise ManifestError(
                f"split '{self.split}' row {row_index} ('{row.path}'): no data root given "
                f"and the manifest has none (no data_root in {self.split}.json)"
            )
        return Path(root).joinpath(*row.path.split("/"))

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------- CSV text


def manifest_path(manifests_dir: Path, split: str) -> Path:
    """Where the CSV of ``split`` lives inside ``manifests_dir``."""
    check_split_name(split)
    return Path(manifests_dir) / f"{split}.csv"


def sidecar_path(csv_path: Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def csv_header(with_classes: bool, with_hashes: bool = False) -> list[str]:
    return [
        *REQUIRED_COLUMNS,
        *([CLASS_COLUMN] if with_classes else []),
        *([SHA256_COLUMN] if with_hashes else []),
    ]


def render_csv(rows: Sequence[ManifestRow]) -> str:
    """The canonical CSV text of ``rows``: '\\n' line ends, minimal quoting (no ``sha256`` column unless a row has one)."""
    with_classes = any(row.class_name is not None for row in rows)
    with_hashes = any(row.sha256 is not None for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(with_classes, with_hashes))
    for row in rows:
        fields_out = [row.path, str(row.label), row.dataset]
        if with_classes:
            fields_out.append(row.class_name or "")
        if with_hashes:
            fields_out.append(row.sha256 or "")
        writer.writerow(fields_out)
    return buffer.getvalue()


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a normalised relative POSIX path that a UTF-8 CSV can hold, or None."""
    if path == "":
        return "empty path"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return f"file name is not valid UTF-8: {printable_name(path)}"
    if has_control_character(path):
        return f"path contains a control character (line break, tab, NUL...): {path!r}"
    if "\\" in path:
        return f"path must use '/' separators, got a backslash in '{path}'"
    if path.startswith("/") or _WINDOWS_DRIVE.match(path):
        return f"path must be relative to the data root, got absolute path '{path}'"
    parts = path.split("/")
    if ".." in parts:
        return f"path must not contain '..' components, got '{path}'"
    if "" in parts or "." in parts:
        return f"path must be normalised (no empty or '.' components), got '{path}'"
    return None


def printable_name(path: str) -> str:
    """A file name as text that can be printed and stored: undecodable bytes as \\xNN, control characters escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(char if 32 <= ord(char) != 127 else repr(char)[1:-1] for char in text)


def row_problem(path: str, label: str, dataset: str, class_name: str | None, sha256: str | None = None) -> str | None:
    """Why a row (label as its CSV text) cannot be stored, or None."""
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        return f"sha256 must be 64 lowercase hex digits, got {sha256!r}"
    problem = path_problem(path)
    if problem is not None:
        return problem
    if label not in ("0", "1"):
        return f"label must be 0 or 1, got '{label}'"
    if dataset == "":
        return "empty dataset"
    if has_control_character(dataset):
        return f"dataset contains a control character: {dataset!r}"
    if class_name is not None and has_control_character(class_name):
        return f"class contains a control character: {class_name!r}"
    return None


def has_control_character(text: str) -> bool:
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


def check_rows(rows: Sequence[ManifestRow], csv_path: Path) -> None:
    """Refuse rows that would not read back as the same manifest.

    Errors name the line each row would occupy in ``csv_path``.
    """
    first_line_of: dict[tuple[str, str], int] = {}
    for index, row in enumerate(rows):
        line = index + 2
        label_text = str(row.label) if type(row.label) is int else repr(row.label)
        problem = row_problem(row.path, label_text, row.dataset, row.class_name, row.sha256)
        if problem is None and row.class_name == "":
            problem = "class must be None or a non-empty name, got ''"
        if problem is not None:
            raise ManifestError(f"{csv_path} line {line}: {problem}")
        check_unique(first_line_of, row, line, csv_path)


def check_unique(first_line_of: dict[tuple[str, str], int], row: ManifestRow, line: int, csv_path: Path) -> None:
    key = (row.path, row.dataset)
    if key in first_line_of:
        raise ManifestError(
            f"{csv_path} line {line}: duplicate of line {first_line_of[key]} "
            f"(path '{row.path}', dataset '{row.dataset}')"
        )
    first_line_of[key] = line


# ---------------------------------------------------------------- reading


def read_manifest(csv_path: Path) -> Manifest:
    """Read and validate a split; its name is the file stem, its root from the sidecar."""
    csv_path = Path(csv_path)
    rows = parse_csv(read_csv_text(csv_path), csv_path)
    data_root, layout, options, skipped = read_sidecar(sidecar_path(csv_path))
    return Manifest(
        split=csv_path.stem, rows=rows, data_root=data_root, layout=layout, options=options, skipped=skipped
    )


def read_csv_text(csv_path: Path) -> str:
    if not csv_path.exists():
        raise ManifestError(f"{csv_path}: no such file")
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: not a file")
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ManifestError(f"{csv_path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def parse_csv(text: str, csv_path: Path) -> tuple[ManifestRow, ...]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records = iter_records(reader, csv_path)
    first = next(records, None)
    if first is None:
        raise ManifestError(f"{csv_path} line 1: empty file, expected the header path,label,dataset")
    header = check_header(first[1], csv_path)
    rows: list[ManifestRow] = []
    first_line_of: dict[tuple[str, str], int] = {}
    for line, record in records:
        row = parse_record(record, line, header, csv_path)
        check_unique(first_line_of, row, line, csv_path)
        rows.append(row)
    if not rows:
        raise ManifestError(f"{csv_path}: no rows (header only)")
    return tuple(rows)


def iter_records(reader: Any, csv_path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (first physical line, fields) for every CSV record."""
    while True:
        line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ManifestError(f"{csv_path} line {line}: malformed CSV ({error})") from None
        yield line, record


def check_header(header: list[str], csv_path: Path) -> list[str]:
    """Validate the header (required columns, then ``class`` and ``sha256`` where present); returns it."""
    known = (*REQUIRED_COLUMNS, CLASS_COLUMN, SHA256_COLUMN)
    for name in REQUIRED_COLUMNS:
        if name not in header:
            raise ManifestError(f"{csv_path} line 1: missing required column '{name}'")
    for name in header:
        if name not in known:
            raise ManifestError(f"{csv_path} line 1: unknown column '{name}' (allowed: {','.join(known)})")
        if header.count(name) > 1:
            raise ManifestError(f"{csv_path} line 1: column '{name}' appears twice")
    expected = csv_header(CLASS_COLUMN in header, SHA256_COLUMN in header)
    if header != expected:
        raise ManifestError(
            f"{csv_path} line 1: columns must be in the order {','.join(expected)}, got {','.join(header)}"
        )
    return header


def parse_record(record: list[str], line: int, header: list[str], csv_path: Path) -> ManifestRow:
    if len(record) != len(header):
        raise ManifestError(
            f"{csv_path} line {line}: expected {len(header)} fields ({','.join(header)}), got {len(record)}"
        )
    values = dict(zip(header, record))
    class_name = values.get(CLASS_COLUMN) or None
    sha256 = values.get(SHA256_COLUMN) or None
    problem = row_problem(values["path"], values["label"], values["dataset"], class_name, sha256)
    if problem is not None:
        raise ManifestError(f"{csv_path} line {line}: {problem}")
    return ManifestRow(
        path=values["path"], label=int(values["label"]), dataset=values["dataset"], class_name=class_name, sha256=sha256
    )


def read_sidecar(
    json_path: Path,
) -> tuple[Path | None, str | None, dict[str, Any], tuple[tuple[str, str], ...]]:
    """(data_root, layout, options, skipped) from the sidecar; (None, None, {}, ()) when there is none."""
    if not json_path.exists():
        return None, None, {}, ()
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{json_path} line {error.lineno}: invalid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise ManifestError(f"{json_path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    allowed = ", ".join(SIDECAR_KEYS)
    if not isinstance(content, dict):
        raise ManifestError(f"{json_path}: expected a JSON object with keys {allowed}")
    for key in content:
        if key not in SIDECAR_KEYS:
            raise ManifestError(f"{json_path}: unknown key '{key}' (allowed: {allowed})")
    if "data_root" not in content:
        raise ManifestError(f"{json_path}: missing key 'data_root'")
    return (
        parse_sidecar_root(content["data_root"], json_path),
        parse_sidecar_layout(content.get("layout"), json_path),
        parse_sidecar_options(content.get("options", {}), json_path),
        parse_sidecar_skipped(content.get("skipped", []), json_path),
    )


def parse_sidecar_skipped(value: Any, json_path: Path) -> tuple[tuple[str, str], ...]:
    entries = value if isinstance(value, list) else None
    if entries is None or not all(
        isinstance(e, dict) and set(e) == {"path", "reason"} and all(isinstance(v, str) for v in e.values())
        for e in entries
    ):
        raise ManifestError(f"{json_path}: skipped must be a list of {{path, reason}} objects")
    return tuple((entry["path"], entry["reason"]) for entry in entries)


def parse_sidecar_root(value: Any, json_path: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise ManifestError(f"{json_path}: data_root must be an absolute path or null, got {value!r}")
    return Path(value)


def parse_sidecar_layout(value: Any, json_path: Path) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ManifestError(f"{json_path}: layout must be a string or null, got {value!r}")
    return value


def parse_sidecar_options(value: Any, json_path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{json_path}: options must be a JSON object, got {value!r}")
    return value


# ---------------------------------------------------------------- writing


def write_manifest(manifest: Manifest, csv_path: Path) -> None:
    """Write the CSV and its sidecar, each complete or absent (``files.replace_files_atomically``).

    The rows are validated first, so what is written always reads back as the
    same manifest. ``csv_path`` must be ``<split>.csv``.
    """
    csv_path = Path(csv_path)
    check_split_name(manifest.split)
    if csv_path.name != f"{manifest.split}.csv":
        raise ManifestError(
            f"{csv_path}: split '{manifest.split}' must be written to a file named {manifest.split}.csv"
        )
    if not manifest.rows:
        raise ManifestError(f"{csv_path}: no rows to write")
    check_rows(manifest.rows, csv_path)
    sidecar = {
        "data_root": None if manifest.data_root is None else str(manifest.data_root),
        "layout": manifest.layout,
        "options": {key: list(value) if isinstance(value, tuple) else value for key, value in manifest.options.items()},
    }
    if manifest.skipped:
        sidecar["skipped"] = [{"path": path, "reason": reason} for path, reason in manifest.skipped]
    with disk_errors_explained(csv_path):
        replace_files_atomically(
            {
                csv_path: render_csv(manifest.rows).encode("utf-8"),
                sidecar_path(csv_path): (json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
            }
        )
