"""Splits as validated records: build them from data layouts, read and write them.

A split is a CSV ``manifests/<split>.csv`` with the header ``path,label,dataset``
and, when any row has a class, a fourth column ``class`` (empty for rows
without one). One row per image; ``label`` is 0 for real and 1 for fake;
``path`` is a POSIX path relative to a data root, so a manifest moves between
machines. The root used to build it is remembered in the sidecar
``manifests/<split>.json`` = ``{"data_root": ..., "layout": ..., "options": ...}``;
a caller may give another root when resolving paths.

The identity of a split (:meth:`Manifest.sha256`) is the hash of its canonical
CSV text, which is exactly the bytes :func:`write_manifest` writes. It does not
depend on the data root, so moving the data keeps the identity.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

REQUIRED_COLUMNS = ("path", "label", "dataset")
CLASS_COLUMN = "class"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
LABEL_FOLDERS = {"0_real": 0, "1_fake": 1}
LAYOUTS: tuple[str, ...] = (
    "cnndetection-train",
    "cnndetection-val",
    "cnndetection-test",
    "ufd-diffusion",
    "synthbuster",
    "folder",
)
SIDECAR_KEYS = ("data_root", "layout", "options")
# Test-set folders whose published dataset name differs from the folder name.
GENERATOR_DATASET_NAMES = {"seeingdark": "sitd"}
UFD_DIFFUSION_FOLDER = "diffusion_datasets"
# The real folder each UFD diffusion set is scored against; every set not
# listed here uses UFD_DEFAULT_REAL_FOLDER.
UFD_REAL_FOLDER_OF_SET = {"guided": "imagenet"}
UFD_DEFAULT_REAL_FOLDER = "laion"
UFD_REAL_FOLDERS = ("imagenet", "laion")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class ManifestError(ValueError):
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


@dataclass(frozen=True)
class Manifest:
    """A split: its rows in order, and where the data were when it was built.

    ``options`` records what the layout was built with (root, classes,
    generators, raise_root); lists are stored as tuples.
    """

    split: str
    rows: tuple[ManifestRow, ...]
    data_root: Path | None
    layout: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        frozen_options = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in self.options.items()
        }
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "options", MappingProxyType(frozen_options))

    def has_classes(self) -> bool:
        return any(row.class_name is not None for row in self.rows)

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


def check_split_name(split: str) -> None:
    if not split or split.startswith(".") or any(c in split for c in "/\\\0\n\r"):
        raise ValueError(
            f"split name must be a plain file stem (not empty, no '/', '\\' or leading '.'), "
            f"got {split!r}"
        )


def csv_header(with_classes: bool) -> list[str]:
    return [*REQUIRED_COLUMNS, CLASS_COLUMN] if with_classes else list(REQUIRED_COLUMNS)


def render_csv(rows: Sequence[ManifestRow]) -> str:
    """The canonical CSV text of ``rows``: '\\n' line ends, minimal quoting."""
    with_classes = any(row.class_name is not None for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(with_classes))
    for row in rows:
        fields_out = [row.path, str(row.label), row.dataset]
        if with_classes:
            fields_out.append(row.class_name or "")
        writer.writerow(fields_out)
    return buffer.getvalue()


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a normalised relative POSIX path, or None."""
    if path == "":
        return "empty path"
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


def row_problem(path: str, label: str, dataset: str, class_name: str | None) -> str | None:
    """Why a row (label as its CSV text) cannot be stored, or None."""
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
        problem = row_problem(row.path, label_text, row.dataset, row.class_name)
        if problem is None and row.class_name == "":
            problem = "class must be None or a non-empty name, got ''"
        if problem is not None:
            raise ManifestError(f"{csv_path} line {line}: {problem}")
        check_unique(first_line_of, row, line, csv_path)


def check_unique(
    first_line_of: dict[tuple[str, str], int], row: ManifestRow, line: int, csv_path: Path
) -> None:
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
    data_root, layout, options = read_sidecar(sidecar_path(csv_path))
    return Manifest(
        split=csv_path.stem, rows=rows, data_root=data_root, layout=layout, options=options
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
        raise ManifestError(f"{csv_path}: not valid UTF-8 ({error.reason} at byte {error.start})")


def parse_csv(text: str, csv_path: Path) -> tuple[ManifestRow, ...]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records = iter_records(reader, csv_path)
    first = next(records, None)
    if first is None:
        raise ManifestError(
            f"{csv_path} line 1: empty file, expected the header path,label,dataset"
        )
    with_classes = check_header(first[1], csv_path)
    n_fields = len(csv_header(with_classes))
    rows: list[ManifestRow] = []
    first_line_of: dict[tuple[str, str], int] = {}
    for line, record in records:
        row = parse_record(record, line, n_fields, csv_path)
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
            raise ManifestError(f"{csv_path} line {line}: malformed CSV ({error})")
        yield line, record


def check_header(header: list[str], csv_path: Path) -> bool:
    """Validate the header; True when it has the ``class`` column."""
    known = (*REQUIRED_COLUMNS, CLASS_COLUMN)
    for name in REQUIRED_COLUMNS:
        if name not in header:
            raise ManifestError(f"{csv_path} line 1: missing required column '{name}'")
    for name in header:
        if name not in known:
            raise ManifestError(
                f"{csv_path} line 1: unknown column '{name}' (allowed: {','.join(known)})"
            )
        if header.count(name) > 1:
            raise ManifestError(f"{csv_path} line 1: column '{name}' appears twice")
    with_classes = CLASS_COLUMN in header
    if header != csv_header(with_classes):
        expected = ",".join(csv_header(with_classes))
        raise ManifestError(
            f"{csv_path} line 1: columns must be in the order {expected}, got {','.join(header)}"
        )
    return with_classes


def parse_record(record: list[str], line: int, n_fields: int, csv_path: Path) -> ManifestRow:
    if len(record) != n_fields:
        raise ManifestError(
            f"{csv_path} line {line}: expected {n_fields} fields "
            f"({','.join(csv_header(n_fields == 4))}), got {len(record)}"
        )
    path, label, dataset = record[:3]
    class_name = (record[3] or None) if n_fields == 4 else None
    problem = row_problem(path, label, dataset, class_name)
    if problem is not None:
        raise ManifestError(f"{csv_path} line {line}: {problem}")
    return ManifestRow(path=path, label=int(label), dataset=dataset, class_name=class_name)


def read_sidecar(json_path: Path) -> tuple[Path | None, str | None, dict[str, Any]]:
    """(data_root, layout, options) from the sidecar; (None, None, {}) when there is none."""
    if not json_path.exists():
        return None, None, {}
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{json_path} line {error.lineno}: invalid JSON ({error.msg})")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{json_path}: not valid UTF-8 ({error.reason} at byte {error.start})")
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
    )


def parse_sidecar_root(value: Any, json_path: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise ManifestError(
            f"{json_path}: data_root must be an absolute path or null, got {value!r}"
        )
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
    """Write the CSV and its sidecar, each complete or absent (temp file + os.replace).

    The rows are validated first, so what is written always reads back as the
    same manifest. ``csv_path`` must be ``<split>.csv``.
    """
    csv_path = Path(csv_path)
    check_split_name(manifest.split)
    if csv_path.name != f"{manifest.split}.csv":
        raise ManifestError(
            f"{csv_path}: split '{manifest.split}' must be written to a file named "
            f"{manifest.split}.csv"
        )
    if not manifest.rows:
        raise ManifestError(f"{csv_path}: no rows to write")
    check_rows(manifest.rows, csv_path)
    sidecar = {
        "data_root": None if manifest.data_root is None else str(manifest.data_root),
        "layout": manifest.layout,
        "options": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in manifest.options.items()
        },
    }
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    staged = [
        (stage_bytes(csv_path, render_csv(manifest.rows).encode("utf-8")), csv_path),
        (
            stage_bytes(
                sidecar_path(csv_path),
                (json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
            ),
            sidecar_path(csv_path),
        ),
    ]
    try:
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)


def stage_bytes(final_path: Path, data: bytes) -> Path:
    """Write ``data`` to a new hidden file next to ``final_path``, synced; return its path."""
    temporary = final_path.with_name(f".{final_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


# ---------------------------------------------------------------- building


def build_manifest(
    layout: str,
    root: Path,
    split: str,
    *,
    classes: Sequence[str] | None = None,
    generators: Sequence[str] | None = None,
    raise_root: Path | None = None,
) -> Manifest:
    """List the images of a dataset as downloaded, following one of :data:`LAYOUTS`.

    ``root`` is the top folder of the dataset. Images are files ending in
    png/jpg/jpeg/bmp/webp/tif/tiff (any case); hidden files and folders (name
    starting with '.') are ignored, symbolic links are followed. Below a
    ``0_real``/``1_fake`` folder images are collected at any depth. Rows are
    sorted by (path, dataset). Paths are relative to ``root``, which becomes
    the data root (resolved to an absolute path) -- except for
    ``synthbuster``, whose reals live outside ``root``: there the data root is
    the deepest common parent of ``root`` and ``raise_root`` and paths are
    relative to it (e.g. ``synthbuster/dalle2/x.png`` and ``RAISEpng/r.png``
    under ``/data``).

    Layouts:

    - ``cnndetection-train`` / ``cnndetection-val``:
      ``root/{train,val}/<class>/{0_real,1_fake}``; dataset ``progan``;
      ``classes`` keeps only those classes (all when None).
    - ``cnndetection-test``: ``root/test/<generator>/[<class>/]{0_real,1_fake}``,
      class folders detected per generator; dataset = generator folder name,
      except ``seeingdark`` -> ``sitd``; ``diffusion_datasets`` is skipped;
      ``generators`` keeps only those dataset names.
    - ``ufd-diffusion``: ``root/test/diffusion_datasets/<set>/1_fake`` fakes;
      reals from ``imagenet/0_real`` for ``guided`` and ``laion/0_real`` for
      every other set, listed once per set; ``generators`` keeps only those sets.
    - ``synthbuster``: ``root/<generator>/*`` fakes (images directly in the
      folder; folders without images are skipped), reals directly in
      ``raise_root`` (required), listed once per generator; ``generators``
      keeps only those.
    - ``folder``: every image below any ``0_real``/``1_fake`` folder under
      ``root``; dataset = the folder path between ``root`` and that folder
      (``root``'s own name when the label folder is directly under it).

    Raises ValueError for options the layout does not take and ManifestError
    for data on disk that do not match the layout (naming the missing
    folder), for unknown requested classes/generators, and for a label
    folder without images (so a manifest is never empty).
    """
    check_split_name(split)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (known: {', '.join(LAYOUTS)})")
    check_layout_options(layout, classes, generators, raise_root)
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a folder")
    root = root.resolve()
    data_root = root
    if layout in ("cnndetection-train", "cnndetection-val"):
        rows = list_cnndetection_training(root, layout.removeprefix("cnndetection-"), classes)
    elif layout == "cnndetection-test":
        rows = list_cnndetection_test(root, generators)
    elif layout == "ufd-diffusion":
        rows = list_ufd_diffusion(root, generators)
    elif layout == "synthbuster":
        assert raise_root is not None  # checked by check_layout_options
        data_root, rows = list_synthbuster(root, Path(raise_root), generators)
    else:
        rows = list_label_folders_anywhere(root)
    options = {
        "root": str(root),
        "classes": None if classes is None else sorted(set(classes)),
        "generators": None if generators is None else sorted(set(generators)),
        "raise_root": None if raise_root is None else str(Path(raise_root).resolve()),
    }
    ordered = tuple(sorted(rows, key=lambda row: (row.path, row.dataset)))
    return Manifest(split=split, rows=ordered, data_root=data_root, layout=layout, options=options)


def check_layout_options(
    layout: str,
    classes: Sequence[str] | None,
    generators: Sequence[str] | None,
    raise_root: Path | None,
) -> None:
    takes_classes = layout in ("cnndetection-train", "cnndetection-val")
    takes_generators = layout in ("cnndetection-test", "ufd-diffusion", "synthbuster")
    for name, value, allowed in (
        ("classes", classes, takes_classes),
        ("generators", generators, takes_generators),
    ):
        if value is None:
            continue
        if not allowed:
            raise ValueError(f"layout '{layout}' does not take {name}")
        if isinstance(value, str):
            raise ValueError(f"{name} must be a sequence of names, not the string {value!r}")
        if len(value) == 0:
            raise ValueError(f"{name} must not be empty (use None for all)")
    if layout == "synthbuster" and raise_root is None:
        raise ValueError("layout 'synthbuster' needs raise_root (the folder of RAISE real images)")
    if layout != "synthbuster" and raise_root is not None:
        raise ValueError(f"layout '{layout}' does not take raise_root")


def require_folder(root: Path, relative: str, expected: str) -> Path:
    folder = root.joinpath(*relative.split("/"))
    if not folder.is_dir():
        raise ManifestError(f"no folder {relative}/ under {root}: expected {expected}")
    return folder


def list_subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden folders (links followed) directly in ``folder``, sorted."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if not entry.name.startswith(".") and entry.is_dir()
    )


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(
    folder: Path,
    relative: str,
    *,
    recursive: bool,
    ancestors: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[str]:
    """Relative POSIX paths (prefixed by ``relative``) of the images in ``folder``.

    When ``recursive``, sub-folders are walked too; a ``0_real``/``1_fake``
    folder below is an error (the label would be ambiguous), and so is a
    symbolic link back to a folder being walked.
    """
    stat = folder.stat()
    ancestors = ancestors | {(stat.st_dev, stat.st_ino)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        entry_relative = join_relative(relative, entry.name)
        if entry.is_dir():
            if not recursive:
                continue
            if entry.name in LABEL_FOLDERS:
                raise ManifestError(
                    f"{entry.path}: a {entry.name}/ folder inside another label folder "
                    f"({folder}); the label would be ambiguous"
                )
            target = os.stat(entry.path)
            if (target.st_dev, target.st_ino) in ancestors:
                raise ManifestError(f"{entry.path}: symbolic link loop back to a parent folder")
            yield from walk_images(
                Path(entry.path), entry_relative, recursive=True, ancestors=ancestors
            )
        elif is_image_name(entry.name):
            if entry.is_file():
                yield entry_relative
            elif entry.is_symlink() and not os.path.exists(entry.path):
                raise ManifestError(f"{entry.path}: broken symbolic link")


def list_label_folder(
    root: Path, relative: str, dataset: str, class_name: str | None
) -> list[ManifestRow]:
    """Rows of one ``0_real`` or ``1_fake`` folder (images at any depth below it)."""
    label = LABEL_FOLDERS[relative.rsplit("/", 1)[-1]]
    folder = root.joinpath(*relative.split("/"))
    paths = list(walk_images(folder, relative, recursive=True))
    if not paths:
        raise ManifestError(f"{folder}: no images in this {relative.rsplit('/', 1)[-1]}/ folder")
    return [ManifestRow(path, label, dataset, class_name) for path in paths]


def list_real_and_fake(
    root: Path, relative: str, dataset: str, class_name: str | None, expected: str
) -> list[ManifestRow]:
    """Rows of ``relative/0_real`` and ``relative/1_fake``; both must exist."""
    rows: list[ManifestRow] = []
    for label_folder in LABEL_FOLDERS:
        require_folder(root, f"{relative}/{label_folder}", expected)
        rows += list_label_folder(root, f"{relative}/{label_folder}", dataset, class_name)
    return rows


def select_names(
    found: Sequence[str], wanted: Sequence[str] | None, what: str, where: Path
) -> list[str]:
    """``found`` restricted to ``wanted`` (all when None); an unknown wanted name is an error."""
    if wanted is None:
        return list(found)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ManifestError(
            f"{where}: no {what} {', '.join(repr(name) for name in missing)} "
            f"(found: {', '.join(found) or 'none'})"
        )
    return [name for name in found if name in set(wanted)]


def list_cnndetection_training(
    root: Path, part: str, classes: Sequence[str] | None
) -> list[ManifestRow]:
    expected = f"{part}/<class>/{{0_real,1_fake}}"
    part_folder = require_folder(root, part, expected)
    found = list_subfolders(part_folder)
    if not found:
        raise ManifestError(f"no class folders in {part_folder}: expected {expected}")
    rows: list[ManifestRow] = []
    for class_name in select_names(found, classes, "class", part_folder):
        rows += list_real_and_fake(root, f"{part}/{class_name}", "progan", class_name, expected)
    return rows


def list_cnndetection_test(root: Path, generators: Sequence[str] | None) -> list[ManifestRow]:
    expected = "test/<generator>/[<class>/]{0_real,1_fake}"
    test_folder = require_folder(root, "test", expected)
    folder_of_dataset = {
        GENERATOR_DATASET_NAMES.get(name, name): name
        for name in list_subfolders(test_folder)
        if name != UFD_DIFFUSION_FOLDER
    }
    if not folder_of_dataset:
        raise ManifestError(f"no generator folders in {test_folder}: expected {expected}")
    rows: list[ManifestRow] = []
    for dataset in select_names(sorted(folder_of_dataset), generators, "generator", test_folder):
        rows += list_test_generator(root, f"test/{folder_of_dataset[dataset]}", dataset, expected)
    return rows


def list_test_generator(
    root: Path, relative: str, dataset: str, expected: str
) -> list[ManifestRow]:
    """One generator of the CNNDetection test set, with or without class folders."""
    subfolders = list_subfolders(root.joinpath(*relative.split("/")))
    label_folders = [name for name in subfolders if name in LABEL_FOLDERS]
    if label_folders:
        others = [name for name in subfolders if name not in LABEL_FOLDERS]
        if others:
            raise ManifestError(
                f"{root / relative}: mixes {'/'.join(label_folders)} with other folders "
                f"({', '.join(others)}): expected {expected}"
            )
        return list_real_and_fake(root, relative, dataset, None, expected)
    if not subfolders:
        raise ManifestError(
            f"no folder {relative}/0_real/ (nor class folders) under {root}: expected {expected}"
        )
    rows: list[ManifestRow] = []
    for class_name in subfolders:
        rows += list_real_and_fake(root, f"{relative}/{class_name}", dataset, class_name, expected)
    return rows


def list_ufd_diffusion(root: Path, generators: Sequence[str] | None) -> list[ManifestRow]:
    base = f"test/{UFD_DIFFUSION_FOLDER}"
    expected = f"{base}/<set>/1_fake with reals in {base}/{{imagenet,laion}}/0_real"
    base_folder = require_folder(root, base, expected)
    sets = [name for name in list_subfolders(base_folder) if name not in UFD_REAL_FOLDERS]
    if not sets:
        raise ManifestError(f"no diffusion set folders in {base_folder}: expected {expected}")
    rows: list[ManifestRow] = []
    reals_of_folder: dict[str, list[str]] = {}
    for set_name in select_names(sets, generators, "diffusion set", base_folder):
        require_folder(root, f"{base}/{set_name}/1_fake", expected)
        rows += list_label_folder(root, f"{base}/{set_name}/1_fake", set_name, None)
        real_folder = UFD_REAL_FOLDER_OF_SET.get(set_name, UFD_DEFAULT_REAL_FOLDER)
        if real_folder not in reals_of_folder:
            relative = f"{base}/{real_folder}/0_real"
            require_folder(root, relative, f"the reals of '{set_name}' in {relative}/")
            reals_of_folder[real_folder] = [
                row.path for row in list_label_folder(root, relative, real_folder, None)
            ]
        rows += [ManifestRow(path, 0, set_name) for path in reals_of_folder[real_folder]]
    return rows


def list_synthbuster(
    root: Path, raise_root: Path, generators: Sequence[str] | None
) -> tuple[Path, list[ManifestRow]]:
    """(data root, rows): fakes under ``root``, reals directly in ``raise_root``."""
    if not raise_root.is_dir():
        raise ManifestError(
            f"{raise_root}: raise_root is not a folder (expected RAISE images, e.g. RAISEpng/*.png)"
        )
    raise_root = raise_root.resolve()
    data_root = Path(os.path.commonpath([root, raise_root]))
    root_relative = root.relative_to(data_root).as_posix()
    raise_relative = raise_root.relative_to(data_root).as_posix()
    fakes_of_generator: dict[str, list[str]] = {}
    for name in list_subfolders(root):
        if (root / name).resolve() == raise_root:
            continue
        paths = list(walk_images(root / name, join_relative(root_relative, name), recursive=False))
        if paths:
            fakes_of_generator[name] = paths
    if not fakes_of_generator:
        raise ManifestError(
            f"no generator folders with images in {root}: expected <generator>/*.png"
        )
    reals = list(walk_images(raise_root, raise_relative, recursive=False))
    if not reals:
        raise ManifestError(f"{raise_root}: no images directly in raise_root")
    rows: list[ManifestRow] = []
    chosen = select_names(
        sorted(fakes_of_generator), generators, "generator folder with images", root
    )
    for generator in chosen:
        rows += [ManifestRow(path, 1, generator) for path in fakes_of_generator[generator]]
        rows += [ManifestRow(path, 0, generator) for path in reals]
    return data_root, rows


def join_relative(prefix: str, name: str) -> str:
    """``prefix/name``, or ``name`` when the prefix is the root itself ('.')."""
    return name if prefix in ("", ".") else f"{prefix}/{name}"


def list_label_folders_anywhere(root: Path) -> list[ManifestRow]:
    """Rows of every ``0_real``/``1_fake`` folder at any depth under ``root``."""
    rows: list[ManifestRow] = []
    for relative in find_label_folders(root, "", frozenset()):
        parent = relative.rsplit("/", 1)[0] if "/" in relative else ""
        rows += list_label_folder(root, relative, parent or root.name, None)
    if not rows:
        raise ManifestError(f"no folder named 0_real/ or 1_fake/ under {root}")
    return rows


def find_label_folders(
    folder: Path, relative: str, ancestors: frozenset[tuple[int, int]]
) -> Iterator[str]:
    """Relative paths of the label folders below ``folder`` (not descending into them)."""
    stat = folder.stat()
    ancestors = ancestors | {(stat.st_dev, stat.st_ino)}
    for name in list_subfolders(folder):
        name_relative = join_relative(relative, name)
        if name in LABEL_FOLDERS:
            yield name_relative
            continue
        target = (folder / name).stat()
        if (target.st_dev, target.st_ino) in ancestors:
            raise ManifestError(f"{folder / name}: symbolic link loop back to a parent folder")
        yield from find_label_folders(folder / name, name_relative, ancestors)
