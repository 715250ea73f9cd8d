"""Complete-or-absent writes: files replaced together, folders appearing whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.files import atomic_path, replace_files_atomically, write_text_atomic


def test_replace_files_atomically_writes_every_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"old a")
    replace_files_atomically({tmp_path / "a.csv": b"new a", tmp_path / "sub" / "b.json": b"new b"})
    assert (tmp_path / "a.csv").read_bytes() == b"new a"
    assert (tmp_path / "sub" / "b.json").read_bytes() == b"new b"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a.csv", "sub", "sub/b.json"]


def test_a_failure_while_staging_changes_no_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.csv").write_bytes(b"old a")
    (tmp_path / "b.json").write_bytes(b"old b")
    synced = []

    def fsync_then_fail_on_the_second(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync_then_fail_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        replace_files_atomically({tmp_path / "a.csv": b"new a", tmp_path / "b.json": b"new b"})
    assert (tmp_path / "a.csv").read_bytes() == b"old a" and (tmp_path / "b.json").read_bytes() == b"old b"
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "b.json"]


def test_a_folder_built_at_an_atomic_path_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "store") as building:
        building.mkdir()
        (building / "part").write_text("x")
        assert not (tmp_path / "store").exists()
    assert (tmp_path / "store" / "part").read_text() == "x"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(tmp_path / "other") as building:
            building.mkdir()
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_a_file_written_at_an_atomic_path_and_text(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é"
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "t.txt") as tmp:
            tmp.write_text("half")
            raise ValueError
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é" and os.listdir(tmp_path) == ["t.txt"]
