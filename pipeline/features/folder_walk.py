"""Walking dataset folders without opening an image: label folders (``0_real``/``1_fake``), image names, entries
that cannot be images (broken links, loops, FIFOs) kept as :class:`Unusable`, and the errors that name what is missing.
The layouts of ``layouts.py`` are built from these.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .images import IMAGE_EXTENSIONS
from .manifest import ManifestError, ManifestRow

LABEL_FOLDERS = {"0_real": 0, "1_fake": 1}


def require_folder(root: Path, relative: str, expected: str) -> Path:
    folder = root.joinpath(*relative.split("/"))
    if not folder.is_dir():
        raise ManifestError(f"no folder {relative}/ under {root}: expected {expected}")
    return folder


def list_subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden folders (links followed) directly in ``folder``, sorted."""
    return sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith(".") and entry.is_dir())


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class Unusable(str):
    """A walked path that cannot be a row (``problem`` says why): ``build_manifest`` records it as skipped."""

    problem: str

    def __new__(cls, path: str, problem: str) -> Unusable:
        entry = super().__new__(cls, path)
        entry.problem = problem
        return entry


def entry_problem(entry: os.DirEntry) -> str:
    """Why an image-named entry that is not a regular file cannot be one (broken link, loop, FIFO, device ...)."""
    try:
        os.stat(entry.path)
    except FileNotFoundError:
        return "broken symbolic link" if entry.is_symlink() else "vanished while the folder was listed"
    except OSError as error:
        return f"symbolic link loop ({error.strerror})" if error.errno == errno.ELOOP else f"unreadable ({error})"
    return "not a regular file (a FIFO, socket or device)"


def walk_images(
    folder: Path,
    relative: str,
    *,
    recursive: bool,
    ancestors: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[str]:
    """Relative POSIX paths (prefixed by ``relative``) of the images in ``folder``.

    When ``recursive``, sub-folders are walked too; a ``0_real``/``1_fake``
    folder below is an error (the label would be ambiguous). Entries that
    cannot be images -- broken links, link loops (a file link to itself, a
    folder link back to a folder being walked), FIFOs, devices -- come as
    :class:`Unusable` paths, recorded as skipped.
    """
    stat = folder.stat()
    ancestors = ancestors | {(stat.st_dev, stat.st_ino)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        entry_relative = join_relative(relative, entry.name)
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link loop: not a folder, see below
            is_dir = False
        if is_dir:
            if not recursive:
                continue
            if entry.name in LABEL_FOLDERS:
                raise ManifestError(
                    f"{entry.path}: a {entry.name}/ folder inside another label folder "
                    f"({folder}); the label would be ambiguous"
                )
            target = os.stat(entry.path)
            if (target.st_dev, target.st_ino) in ancestors:
                yield Unusable(entry_relative, "symbolic link loop back to a parent folder")
                continue
            yield from walk_images(Path(entry.path), entry_relative, recursive=True, ancestors=ancestors)
        elif is_image_name(entry.name):
            try:
                is_file = entry.is_file()
            except OSError:
                is_file = False
            yield entry_relative if is_file else Unusable(entry_relative, entry_problem(entry))


def list_label_folder(root: Path, relative: str, dataset: str, class_name: str | None) -> list[ManifestRow]:
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


def select_names(found: Sequence[str], wanted: Sequence[str] | None, what: str, where: Path) -> list[str]:
    """``found`` restricted to ``wanted`` (all when None); an unknown wanted name is an error."""
    if wanted is None:
        return list(found)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ManifestError(
            f"{where}: no {what} {', '.join(repr(name) for name in missing)} (found: {', '.join(found) or 'none'})"
        )
    return [name for name in found if name in set(wanted)]


def join_relative(prefix: str, name: str) -> str:
    """``prefix/name``, or ``name`` when the prefix is the root itself ('.')."""
    return name if prefix in ("", ".") else f"{prefix}/{name}"


def list_files(folder: Path) -> list[str]:
    """Names of the non-hidden files directly in ``folder``, sorted; a folder inside is an error."""
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise ManifestError(f"{entry.path}: a folder where only image files are expected")
        if not entry.is_file():
            raise ManifestError(f"{entry.path}: broken symbolic link")
        names.append(entry.name)
    return names
