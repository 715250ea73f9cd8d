"""Complete-or-absent writes: a temporary sibling, renamed into place.

Every atomic write of the package goes through here: :func:`atomic_path`
for one file or new folder written by any library (grid, head, report and
plot files; a feature store's skeleton, the demo backbone),
:func:`write_text_atomic` for text, :func:`replace_files_atomically` for a
set of small files that belong together (a manifest and its sidecar). Zarr
writes each chunk file of a store through its own temporary name and rename.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def _temporary_sibling(path: Path) -> Path:
    """A hidden name next to ``path``, unique per process, thread and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block finishes.

    The block may write a file or create a folder there; a file or folder
    under its final name is therefore always whole, and a resume can trust
    what exists. (A folder cannot replace a non-empty folder: ``path`` must
    not exist then.) The temporary path is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_files_atomically(contents: Mapping[Path, bytes]) -> None:
    """Write several files so that each is whole under its final name.

    Every file is first written in full (and synced to disk) under a
    temporary name; only when all are staged are they renamed into place, in
    the given order. A failure while staging leaves every final file as it
    was; each rename is atomic, so a crash between renames leaves whole files
    (some new, some old), never a partial one. No temporary file is left
    behind.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for final, data in contents.items():
            final = Path(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = _temporary_sibling(final)
            staged.append((temporary, final))
            with open(temporary, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
