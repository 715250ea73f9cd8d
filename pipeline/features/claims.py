"""Claims on shards: how processes sharing a store (ranks, or uncoordinated runs) split the work.

A claim is a file created with ``O_CREAT | O_EXCL`` per (variant, shard) in the store's claims folder, refreshed
while its owner works and removed once the shard is committed; a claim whose owner is gone from this machine,
or not refreshed for ``stale_after`` seconds, is taken over. Claims only divide the work: a shard's bytes are
the same whoever computes them and files are replaced whole, so a shard done twice still leaves a correct store.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from ..errors import PipelineError
from ..files import HOST_TAG, process_alive
from ..names import DEFAULT_CLAIM_TIMEOUT


class ClaimError(PipelineError, RuntimeError):
    """Something in a store's claims folder that is not a claim."""


class ShardClaims:
    """The claims one process holds; a context manager that refreshes them and releases them on exit."""

    def __init__(self, rank: int = 0, stale_after: float = DEFAULT_CLAIM_TIMEOUT) -> None:
        self.owner = f"{HOST_TAG} {os.getpid()} {rank}\n"
        self.stale_after = stale_after
        self._held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._refresh_until_stopped, name="claims", daemon=True)

    def __enter__(self) -> ShardClaims:
        self._heartbeat.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._heartbeat.join()
        self.release(list(self._held))

    def try_claim(self, paths: Iterable[Path]) -> bool:
        """Claim every path, or none of them (then False: another live process holds one)."""
        taken: list[Path] = []
        for path in sorted(paths):
            if not self._create(path):
                self.release(taken)
                return False
            taken.append(path)
        return True

    def release(self, paths: Iterable[Path]) -> None:
        for path in paths:
            with self._lock:
                self._held.discard(path)
            path.unlink(missing_ok=True)

    def is_stale(self, path: Path) -> bool:
        try:
            owner = path.read_bytes().decode("utf-8", "replace").split()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        except OSError as error:  # a folder, a file this user cannot read ...: not a claim this program wrote
            raise ClaimError(
                f"{path}: not a claim file ({error.strerror or error}); remove it, it holds no data of the store"
            ) from None
        if len(owner) == 3 and owner[0] == HOST_TAG and owner[1].isdigit() and not process_alive(int(owner[1])):
            return True
        return age > self.stale_after or (len(owner) != 3 and age > 1.0)  # unreadable: its creator died mid-write

    def _create(self, path: Path) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self.is_stale(path):
                    return False
                path.unlink(missing_ok=True)  # taken over; if another process was quicker, O_EXCL says so
                continue
            try:
                os.write(fd, self.owner.encode("utf-8"))
            finally:
                os.close(fd)
            with self._lock:
                self._held.add(path)
            return True
        return False

    def _refresh_until_stopped(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            with self._lock:
                held = list(self._held)
            for path in held:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass
