"""Complete-or-absent, durable writes; the lock that serialises a store's metadata updates; stray temporaries.

Every atomic write of the package goes through here (:func:`atomic_path`, :func:`write_text_atomic`,
:func:`replace_files_atomically`, and :func:`write_bytes_durable` for every file of a feature store: temporary
name, fsync, rename, folder fsync). Temporary names ``.<name>.<host>-<pid>.<random>.tmp`` let
:func:`remove_stray_temporaries` tell a killed writer's leftovers from a write in progress; :func:`locked` holds
an ``fcntl.flock`` for short critical sections of processes that may share a file system.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import PipelineError

HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
ZARR_PARTIAL_NAME = re.compile(r"^.+\.[0-9a-f]{32}\.partial$")  # zarr's own temporary names
STRAY_AFTER_SECONDS = 3600.0  # no write of this package takes this long; older temporaries are leftovers
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class WriteError(PipelineError, OSError):
    """A write the disk refused (full, read-only, no permission), naming the file."""

    def __str__(self) -> str:  # the message alone: OSError's "[Errno N]" says nothing a user needs
        return self.strerror or super().__str__()


def explain_os_error(error: OSError, path: Path | str | None = None) -> str | None:
    """``<file>: <why> ...`` for a disk error a user can fix (full, read-only, denied), else None."""
    if error.errno not in _DISK_ERRNOS:
        return None
    where = error.filename or path or "?"
    hint = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
    }.get(error.errno, "check the permissions or write elsewhere")
    return f"{where}: cannot write ({error.strerror or os.strerror(error.errno)}); {hint}"


@contextmanager
def disk_errors_explained(path: Path | str | None = None) -> Iterator[None]:
    """Turn a disk error a user can fix into a :class:`WriteError` naming the file."""
    try:
        yield
    except PipelineError:
        raise
    except OSError as error:
        message = explain_os_error(error, path)
        if message is None:
            raise
        raise WriteError(error.errno, message) from None


def _temporary_sibling(path: Path) -> Path:
    """A hidden name next to ``path``, unique per machine, process and call."""
    return path.with_name(f".{path.name}.{HOST_TAG}-{os.getpid()}.{secrets.token_hex(4)}.tmp")


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
        remove_path(tmp)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree (not following a link), if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_durable(path: Path, data: bytes | memoryview) -> int:
    """Write ``data`` to ``path`` whole or not at all, and durably: temporary name, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "xb") as handle:
            written = handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error  # a full disk at write or fsync: name the file
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return written


def fsync_directory(folder: Path) -> None:
    """Make the renames inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def is_stray_temporary(path: Path, now: float | None = None) -> bool:
    """A temporary file or folder left by a killed writer: its process is gone from this machine, or it is old."""
    match = TEMPORARY_NAME.match(path.name)
    if match is None and ZARR_PARTIAL_NAME.match(path.name) is None:
        return False
    if match is not None and match["host"] == HOST_TAG and not process_alive(int(match["pid"])):
        return True
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > STRAY_AFTER_SECONDS


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stray_temporaries(folder: Path, *, recursive: bool) -> list[Path]:
    """Remove the leftovers of killed writes in ``folder`` (and below, when ``recursive``); the paths removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    walk = os.walk(folder) if recursive else [(str(folder), [], [e.name for e in os.scandir(folder)])]
    for here, _, names in walk:
        for name in names:
            path = Path(here) / name
            if is_stray_temporary(path):
                remove_path(path)
                removed.append(path)
    return removed


@contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if need be) for the block; waits for other holders."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            raise WriteError(
                error.errno,
                f"{lock}: cannot lock ({error.strerror}); the file system must support flock "
                "(local disks and NFSv4 do; mount Lustre with -o flock)",
            ) from None
        yield
    finally:
        os.close(fd)


def check_split_name(split: str) -> None:
    """A split name becomes a file stem (``manifests/<split>.csv``, ``<split>.zarr``): refuse anything else."""
    if not split or split.startswith(".") or any(c in split for c in "/\\\0\n\r"):
        raise ValueError(
            f"split name must be a plain file stem (not empty, no '/', '\\' or leading '.'), got {split!r}"
        )
